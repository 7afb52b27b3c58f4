"""Poll benchmark: backgrounded mobile apps, what polls and stand-ins cost a gateway.

    python bench/poll/run.py                   # full run, both brokers, about 90 s
    python bench/poll/run.py --broker memory   # full run, memory broker only, about 35 s
    python bench/poll/run.py --quick           # smoke run, memory broker, about 10 s

Two sizing questions for operators of backgrounded apps (README, "Mobile apps in the
background"), one invocation:

1. Polls. A fresh `realtime serve` (memory broker; a temporary TOML written here: namespace
   `chat` with history_size 100 and push = true; [background] poll_rate and poll_burst
   raised to 1,000,000 so the per-device rate limit never refuses a poll, wake_delay
   3,600 s so no wake fires) gets N detached devices from bench/poll/driver.py: each
   connects over WebSocket with a token carrying a `device` claim, subscribes to 1-3
   rooms, sends app_state background and closes. Then rounds of: a round of publications
   through the server API so that every device has 5 new ones (not measured); every device
   polls once, `--concurrency` at a time, one `GET /v1/poll` per TCP connection (full
   polls: 5 publications each); every device polls once more (empty polls: nothing new,
   the common case of a background fetch); after the rounds, every device polls once more
   with one poll in flight (the latency of a lone poll). Each answer is checked (200, the
   publications expected, recovered, no `more`).
   Reference: bench/poll/reference_http.py, a raw uvloop HTTP server that answers each
   request with a fixed response (a gateway answer of the mean size, replayed byte for
   byte) and closes, driven by the same driver with the same requests, once with a full
   answer and once with an empty one.
   Reported: polls/s, latency p50/p99 (connect to last byte), server CPU-seconds per 1,000
   polls and the ratio gateway/reference of that CPU and of polls/s.
2. Stand-ins. For each K (0, 1,000, 10,000), a fresh gateway with K devices detached on one
   channel (`chat/standin`: no live subscriber, no push provider, wake_delay 3,600 s so no
   push is attempted). One WebSocket publisher publishes one publication (it arms one wake
   per device: measured apart), then publishes for a fixed time in windows of 20 publish
   commands, each window acknowledged before the next. Reported: publications/s, server
   CPU per publication and its ratio to K = 0, the CPU of the first publication, RSS per
   detached device, the idle CPU, and the gateway's wake counters from /metrics (armed =
   K, coalesced = K x publications: every stand-in saw every publication).
In both parts, after a set-up the run waits until the server processes are quiet (< 5% of
a core over 0.25 s) before it measures anything: on Redis, a set-up's user online and
offline marks are written seconds after it.

--broker memory|redis|both (default: both; memory with --quick). With redis, both parts run
again with the gateway on the Redis broker (REALTIME_BROKER__* variables, keys under
`bench:`) and one throwaway redis-server (bench/common.py: no persistence, loopback, pinned
to the server CPU with the gateway, fresh for each gateway). Reported besides: the CPU of
the gateway and of redis-server, their sum, and Redis commands per poll or per
publication, from `INFO stats` / `INFO commandstats` deltas over each measured phase
(Redis 7 counts the calls a script makes as commands too; the benchmark's own INFO calls
are left out); ratios of the sum per poll to the memory-broker gateway's CPU per poll and
to the reference's.

CPU is the server process's user + system time over each measured phase only, per thread
from /proc/<pid>/task/*/schedstat (bench/common.py); the driver runs in its own process on
the other CPU and its CPU is reported apart ("driver %": near 100% means the driver, not
the server, set the pace). Every child process is stopped by PID, also on errors and
Ctrl-C; the exit code is 1 when a run failed or a check did not hold.
"""

from __future__ import annotations

import json
import math
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A script, not a package module: bench/ goes on the path for the shared bench/common.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    LOADGEN_CPU,
    PYTHON,
    REPO,
    LoadGenProcess,
    MachineLoad,
    RedisServer,
    ServerProcess,
    attempt,
    cpu_seconds,
    fmt,
    gateway_command,
    machine,
    orchestrator_parser,
    package_version,
    pin,
    raise_nofile,
    redis_broker_env,
    redis_delta,
    redis_snapshot,
    redis_version,
    report_header,
    rss_kib,
    run_script,
    server_env,
)

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "driver.py"
REFERENCE = HERE / "reference_http.py"
PACKAGES = ("uvloop", "websockets", "protobuf", "PyJWT")
MEASUREMENTS = ("polls", "standins")
BROKERS = ("memory", "redis")
KEY_PREFIX = "bench"  # of the gateway's keys in the throwaway redis-server
PER_ROUND = 5  # publications per device per round (driver.PER_ROUND)
# Poll phases: full (PER_ROUND publications each), empty (nothing new), and empty with one
# poll in flight (the latency of a poll on an otherwise idle server).
KINDS = {"full": "full", "empty": "empty", "serial": "empty c=1"}
RATE_LIMIT_OFF = 1_000_000
WAKE_DELAY = 3600.0

PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "devices": 2000,
        "rounds": 5,
        "concurrency": 16,
        "ks": (0, 1000, 10000),
        "duration": 3.0,
        "idle": 1.0,
    },
    "quick": {
        "devices": 200,
        "rounds": 2,
        "concurrency": 16,
        "ks": (0, 100, 1000),
        "duration": 0.5,
        "idle": 0.3,
    },
}

GATEWAY_TOML = f"""\
# Written by bench/poll/run.py for one run; ports and secrets come from the environment.
[server]
host = "127.0.0.1"
port = 0
drain_timeout = 2.0
reconnect_jitter = 0.0

[api]
host = "127.0.0.1"
port = 0

[mqtt]
enabled = false

[log]
level = "warning"

[limits]
# The benchmark measures polls and stand-ins, not the guards.
max_queue_bytes = 67108864
commands_per_second = 1000000.0
command_burst = 1000000
user_publishes_per_second = 1000000.0
user_publish_burst = 1000000

[client]
ping_interval = 300

[background]
# Raised so that the per-device poll rate limit never refuses a poll, and so that no wake
# fires during a run (no push provider is configured anyway).
poll_rate = {RATE_LIMIT_OFF}.0
poll_burst = {RATE_LIMIT_OFF}
wake_delay = {WAKE_DELAY}

[namespaces.chat]
subscribe = "authenticated"
publish = "authenticated"
history_size = 100
history_ttl = 600.0
push = true
"""


# ----------------------------------------------------------------------------- processes


class Gateway(ServerProcess):
    """`realtime serve` with the TOML written by this run, on the memory broker or on
    `redis`; knows its server API."""

    banner = "ws://"

    def __init__(self, logdir: Path, secret: str, redis: RedisServer | None = None) -> None:
        self.config = logdir / "gateway.toml"
        if not self.config.exists():
            self.config.write_text(GATEWAY_TOML)
        self.redis = redis
        self.api_port = 0
        self.api_key = ""
        super().__init__("gateway" if redis is None else "gateway-redis", logdir, secret)

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = gateway_command(self.config, self.secret, SERVER=self.port)
        if self.redis is not None:
            env.update(redis_broker_env(self.redis.port, KEY_PREFIX))
        self.api_port = int(env["REALTIME_API__PORT"])
        self.api_key = env["REALTIME_API__KEY"]
        return cmd, env

    def metrics(self) -> dict[str, dict[str, float]]:
        """realtime_push_wakes_total and realtime_polls_total from /metrics, by label."""
        url = f"http://127.0.0.1:{self.api_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            text = answer.read().decode()
        found: dict[str, dict[str, float]] = {"wakes": {}, "polls": {}}
        for line in text.splitlines():
            for name, key in (
                ("realtime_push_wakes_total{", "wakes"),
                ("realtime_polls_total{", "polls"),
            ):
                if line.startswith(name):
                    label = line.split('"')[1]
                    found[key][label] = float(line.rsplit(None, 1)[1])
        return found


class Reference(ServerProcess):
    """bench/poll/reference_http.py replaying `response`."""

    banner = "listening"

    def __init__(self, logdir: Path, secret: str, kind: str, response: bytes) -> None:
        self.response_file = logdir / f"reference-{kind}-answer.bin"
        self.response_file.write_bytes(response)
        super().__init__(f"reference-{kind}", logdir, secret)

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd = [PYTHON, str(REFERENCE), "--port", str(self.port)]
        return [*cmd, "--response-file", str(self.response_file)], server_env()


class Driver(LoadGenProcess):
    """bench/poll/driver.py against `server`, for several steps (see its module doc)."""

    def __init__(self, server: ServerProcess, mode: str, options: list[str]) -> None:
        cmd = [PYTHON, str(DRIVER), mode, "--server", server.kind.split("-")[0]]
        cmd += ["--port", str(server.port), *options]
        env = dict(os.environ, BENCH_HMAC_SECRET=server.secret)
        if isinstance(server, Gateway):
            cmd += ["--api-port", str(server.api_port)]
            env["BENCH_API_KEY"] = server.api_key
        self.server = server
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        )
        pin(self.proc.pid, LOADGEN_CPU)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def step(self, name: str, arg: str = "", timeout: float = 150.0) -> dict[str, Any]:
        """One step: its result, with the server's CPU over its measured part; for a
        gateway on Redis also redis-server's CPU and what Redis did (`redis`: INFO deltas;
        the INFO calls are made outside the CPU readings)."""
        self.send(f"STEP {name} {arg}".rstrip())
        self.expect("READY", timeout)
        redis = getattr(self.server, "redis", None)
        info0 = redis_snapshot(redis.port) if redis is not None else None
        info1, redis_cpu = None, 0.0
        redis_cpu0 = cpu_seconds(redis.pid) if redis is not None else 0.0
        pid = self.server.pid
        cpu0 = cpu_seconds(pid)
        self.go()
        self.expect("DONE", timeout)
        cpu = cpu_seconds(pid) - cpu0
        if redis is not None:
            redis_cpu = cpu_seconds(redis.pid) - redis_cpu0
            info1 = redis_snapshot(redis.port)
        line = self._next(timeout)
        if line is None:
            raise RuntimeError(f"driver exited with {self.proc.wait()} during {name}")
        result: dict[str, Any] = json.loads(line)
        if result["error_count"]:
            raise RuntimeError(f"{name}: {result['error_count']} errors, first: {result['errors']}")
        result["server_cpu"] = cpu
        if info0 is not None and info1 is not None:
            result["redis_cpu"] = redis_cpu
            result["redis"] = redis_delta(info0, info1)
        return result

    def quit(self) -> None:
        if self.proc.poll() is None:
            self.send("QUIT")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.stop()


def stop_all(drivers: list[Driver], servers: list[ServerProcess]) -> None:
    """The drivers, then the servers in reverse order of start (a gateway before its
    redis-server)."""
    for driver in drivers:
        driver.stop()
    for server in reversed(servers):
        server.stop()


def alive(*servers: ServerProcess) -> None:
    for server in servers:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.kind} died during the run:\n{server.log_text()}")


def settle(
    pids: list[int], window: float = 0.25, quiet: float = 0.05, limit: float = 120.0
) -> float:
    """Wait until the processes `pids` together use less than `quiet` of a core over
    `window` seconds: the work a step left behind is done (on Redis, the user online and
    offline marks of a set-up are written one user at a time, seconds after it). Returns
    the seconds waited."""
    start = time.monotonic()
    while time.monotonic() - start < limit:
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        time.sleep(window)
        if (sum(cpu_seconds(pid) for pid in pids) - cpu0) / window < quiet:
            break
    return time.monotonic() - start


def start_gateway(
    broker: str, logdir: Path, secret: str, servers: list[ServerProcess]
) -> tuple[Gateway, RedisServer | None]:
    """A ready gateway on `broker` (with a fresh redis-server first for "redis"), each
    process added to `servers` as soon as it is started."""
    redis = None
    if broker == "redis":
        redis = RedisServer("redis", logdir, secret)
        servers.append(redis)
        redis.wait_ready()
    gateway = Gateway(logdir, secret, redis)
    servers.append(gateway)
    gateway.wait_ready()
    return gateway, redis


# ----------------------------------------------------------------------------- 1. polls


def poll_options(plan: dict[str, Any]) -> list[str]:
    return ["-n", str(plan["devices"]), "--concurrency", str(plan["concurrency"])]


def run_polls(plan: dict[str, Any], logdir: Path, secret: str, broker: str) -> dict[str, Any]:
    """A gateway on `broker`: set-up, rounds of (publish, full polls, empty polls), then
    the empty polls with one in flight."""
    drivers: list[Driver] = []
    servers: list[ServerProcess] = []
    out: dict[str, Any] = {"broker": broker, "full": [], "empty": []}
    try:
        gateway, redis = start_gateway(broker, logdir, secret, servers)
        driver = Driver(gateway, "poll", poll_options(plan))
        drivers.append(driver)
        rss0 = rss_kib(gateway.pid)
        redis_rss0 = rss_kib(redis.pid) if redis else 0
        out["setup"] = driver.step("setup")
        time.sleep(0.5)  # the detach writes of the last devices
        out["setup"]["settle"] = settle([server.pid for server in servers])
        out["setup"]["rss_kib"] = rss_kib(gateway.pid) - rss0
        if redis:
            out["setup"]["redis_rss_kib"] = rss_kib(redis.pid) - redis_rss0
        publishing = []
        for _ in range(plan["rounds"]):
            publishing.append(driver.step("publish"))
            out["full"].append(driver.step("poll", str(PER_ROUND)))
            out["empty"].append(driver.step("poll", "0"))
        out["serial"] = [driver.step("poll", "0 1")]  # one poll in flight
        out["publish"] = publishing
        out["metrics"] = gateway.metrics()
        alive(*servers)
        driver.quit()
        return out
    finally:
        stop_all(drivers, servers)


def run_reference(
    plan: dict[str, Any], logdir: Path, secret: str, samples: dict[str, str]
) -> dict[str, Any]:
    """The reference server replaying a gateway answer of each kind (`samples`), driven
    like the gateway: full and empty rounds, then the empty polls with one in flight."""
    drivers: list[Driver] = []
    servers: list[ServerProcess] = []
    out: dict[str, Any] = {}
    try:
        for kind, expect in (("full", PER_ROUND), ("empty", 0)):
            reference = Reference(logdir, secret, kind, samples[kind].encode("latin-1"))
            servers.append(reference)
            reference.wait_ready()
            driver = Driver(reference, "poll", poll_options(plan))
            drivers.append(driver)
            out[kind] = [driver.step("poll", str(expect)) for _ in range(plan["rounds"])]
            if kind == "empty":
                out["serial"] = [driver.step("poll", "0 1")]
            alive(reference)
            driver.quit()
            reference.stop()
        return out
    finally:
        stop_all(drivers, servers)


def poll_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """All rounds of one kind on one server together; spread of CPU per poll over rounds
    (on Redis: of gateway + redis-server CPU per poll)."""
    polls = sum(r["polls"] for r in rounds)
    cpu = sum(r["server_cpu"] for r in rounds)
    redis_cpu = sum(r.get("redis_cpu", 0.0) for r in rounds)
    elapsed = sum(r["elapsed"] for r in rounds)
    latencies = sorted(v for r in rounds for v in r["latencies_ms"])
    per_round = sorted((r["server_cpu"] + r.get("redis_cpu", 0.0)) / r["polls"] for r in rounds)
    median = per_round[(len(per_round) - 1) // 2]

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    summary = {
        "polls": polls,
        "per_second": polls / elapsed,
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "cpu": cpu,
        "cpu_per_1k": 1000 * cpu / polls,
        "server_share": cpu / elapsed,
        "driver_share": sum(r["driver_cpu"] for r in rounds) / elapsed,
        "answer_bytes": sum(r["answer_bytes"] for r in rounds) / len(rounds),
        "body_bytes": sum(r["body_bytes"] for r in rounds) / len(rounds),
        "spread": (per_round[-1] - per_round[0]) / median if median else math.nan,
        "rounds": len(rounds),
    }
    if all("redis" in r for r in rounds):
        calls: dict[str, int] = {}
        for r in rounds:
            for command, count in r["redis"]["calls"].items():
                calls[command] = calls.get(command, 0) + count
        summary.update(
            redis_cpu=redis_cpu,
            redis_us=1e6 * redis_cpu / polls,
            gateway_us=1e6 * cpu / polls,
            total_us=1e6 * (cpu + redis_cpu) / polls,
            total_share=(cpu + redis_cpu) / elapsed,
            commands=sum(calls.values()) / polls,
            calls={c: n / polls for c, n in sorted(calls.items(), key=lambda item: -item[1])},
            bytes_in=sum(r["redis"]["bytes_in"] for r in rounds) / polls,
            bytes_out=sum(r["redis"]["bytes_out"] for r in rounds) / polls,
        )
    return summary


# ----------------------------------------------------------------------------- 2. stand-ins


def run_standins(
    k: int, plan: dict[str, Any], logdir: Path, secret: str, broker: str
) -> dict[str, Any]:
    """K devices detached on one channel; a first publication, then steady publishing."""
    drivers: list[Driver] = []
    servers: list[ServerProcess] = []
    try:
        gateway, redis = start_gateway(broker, logdir, secret, servers)
        options = ["--k", str(k), "--duration", str(plan["duration"])]
        driver = Driver(gateway, "standins", options)
        drivers.append(driver)
        time.sleep(0.3)
        pids = {"gateway": gateway.pid} | ({"redis": redis.pid} if redis else {})
        rss0 = {name: rss_kib(pid) for name, pid in pids.items()}
        setup = driver.step("setup")
        time.sleep(0.5)  # the detach writes of the last devices
        setup["settle"] = settle(list(pids.values()))
        rss = {name: rss_kib(pid) - rss0[name] for name, pid in pids.items()}
        idle0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(plan["idle"])
        idle = {name: (cpu_seconds(pid) - idle0[name]) / plan["idle"] for name, pid in pids.items()}
        first = driver.step("first")
        steady = driver.step("steady")
        metrics = gateway.metrics()
        alive(*servers)
        driver.quit()
        pubs = steady["publications"]
        wakes = metrics["wakes"]
        armed, coalesced = wakes.get("armed", 0), wakes.get("coalesced", 0)
        out = {
            "k": k,
            "broker": broker,
            "setup": setup,
            "rss_kib": rss["gateway"],
            "idle_share": idle["gateway"],
            "first_cpu": first["server_cpu"],
            "first_elapsed": first["elapsed"],
            "publications": pubs,
            "elapsed": steady["elapsed"],
            "server_cpu": steady["server_cpu"],
            "driver_cpu": steady["driver_cpu"],
            "per_second": pubs / steady["elapsed"],
            "cpu_us_per_pub": 1e6 * steady["server_cpu"] / pubs,
            "armed": armed,
            "coalesced": coalesced,
            "wakes_ok": armed == k and coalesced == k * pubs,
        }
        if redis:
            stats = steady["redis"]
            out.update(
                redis_rss_kib=rss["redis"],
                redis_idle_share=idle["redis"],
                redis_first_cpu=first["redis_cpu"],
                redis_first=first["redis"],
                redis_cpu=steady["redis_cpu"],
                redis_us_per_pub=1e6 * steady["redis_cpu"] / pubs,
                total_us_per_pub=1e6 * (steady["server_cpu"] + steady["redis_cpu"]) / pubs,
                redis=stats,
                commands_per_pub=stats["commands"] / pubs,
            )
        return out
    finally:
        stop_all(drivers, servers)


# ----------------------------------------------------------------------------- report


@dataclass
class Results:
    polls: dict[str, dict[str, Any]] = field(default_factory=dict)  # by broker
    reference: dict[str, Any] | None = None
    standins: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # broker, K
    failures: list[str] = field(default_factory=list)


def times(value: float | None, spec: str = ".1f") -> str:
    """A ratio cell: `value`x, or "-" when it could not be computed."""
    return "-" if value is None else f"{value:{spec}}x"


def report(
    results: Results,
    plan: dict[str, Any],
    mode: str,
    elapsed: float,
    load: MachineLoad,
    only: set[str],
    brokers: tuple[str, ...],
) -> str:
    m = machine(*PACKAGES)
    software = (
        f"python {m['python']}  uvloop {m['uvloop']}  websockets {m['websockets']}  "
        f"protobuf {m['protobuf']}  PyJWT {m['PyJWT']}"
    )
    if "redis" in brokers:
        software += f"  redis-py {package_version('redis')}  hiredis"
        software += f" {package_version('hiredis')}  redis-server {redis_version()}"
    lines = report_header(f"Poll benchmark ({mode})  {m['date']}", m, software, load)
    on = " and ".join(f"{b} broker" for b in brokers)
    lines += [
        f"Gateway config: {on}; namespace chat: history_size 100, push = true;"
        f" [background] poll_rate = poll_burst = {RATE_LIMIT_OFF:,} (raised: the per-device"
        f" rate limit never refuses a poll here), wake_delay = {WAKE_DELAY:,.0f} s (no wake"
        " fires); no push provider. Servers pinned to one CPU, the driver to the other.",
    ]
    if "redis" in brokers:
        lines.append(
            "Redis broker: one throwaway redis-server per gateway (no persistence), pinned to"
            " the gateway's CPU; its CPU and INFO commandstats deltas over each measured step."
        )
    memory = results.polls.get("memory")
    redis = results.polls.get("redis")
    reference = results.reference
    n, rounds = plan["devices"], plan["rounds"]
    lines += [
        "",
        f"1. Polls: {n:,} detached devices (1-3 rooms each, rooms of ~10), {rounds} rounds of:"
        f" {PER_ROUND} publications per device through the server API (not measured); every"
        f" device polls once (full: {PER_ROUND} publications) and once more (empty: nothing"
        f" new). GET /v1/poll, one request per TCP connection, {plan['concurrency']} in flight"
        " (the server saturated: latency is mostly queueing), then the empty polls once more"
        " with 1 in flight (c=1: the latency of one poll). Reference: a raw uvloop HTTP server"
        " replaying a gateway answer of the mean size, driven the same way.",
        f"{'kind':<9} {'server':<10} {'polls':>7} {'answer B':>8} {'polls/s':>8} {'p50 ms':>7}"
        f" {'p99 ms':>7} {'CPU s':>6} {'CPU-s/1k polls':>14} {'server %':>8} {'driver %':>8}"
        f" {'spread':>6}",
    ]
    summaries: dict[tuple[str, str], dict[str, Any]] = {}
    for kind in KINDS:
        for server, found in (("gateway", memory), ("redis", redis), ("reference", reference)):
            if found is not None:
                summaries[(kind, server)] = poll_summary(found[kind])
    if summaries:
        for kind in KINDS:
            for server in ("gateway", "reference"):
                s = summaries.get((kind, server))
                if s is None:
                    continue
                lines.append(
                    f"{KINDS[kind]:<9} {server:<10} {s['polls']:>7,} {s['answer_bytes']:>8,.0f}"
                    f" {s['per_second']:>8,.0f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f}"
                    f" {s['cpu']:>6.2f} {s['cpu_per_1k']:>14.3f}"
                    f" {100 * s['server_share']:>8.0f} {100 * s['driver_share']:>8.0f}"
                    f" {100 * s['spread']:>5.0f}%"
                )
    if memory is not None:
        setup = memory["setup"]
        lines.append(
            f"setup: {setup['devices']:,} devices on {setup['channels']:,} channels"
            f" ({setup['subscriptions']:,} subscriptions) in {setup['elapsed']:.1f} s;"
            f" gateway RSS +{setup['rss_kib'] / max(1, setup['devices']):.2f} KiB per"
            f" detached device; /metrics polls {json.dumps(memory['metrics']['polls'])}"
        )
    elif "polls" not in only:
        lines.append("  not run (--only)")
    elif "memory" not in brokers:
        lines.append("  memory broker: not run (--broker)")
    else:
        lines.append("  memory broker: failed")
    lines += ["", "Ratios gateway/reference (same driver, same requests, same answer bytes)"]
    for kind in ("full", "empty"):
        g, r = summaries.get((kind, "gateway")), summaries.get((kind, "reference"))
        cpu = g["cpu_per_1k"] / r["cpu_per_1k"] if g and r else None
        rate = g["per_second"] / r["per_second"] if g and r else None
        lines.append(
            f"  ratio {kind} polls: CPU per poll gateway/reference {fmt(cpu, '.1f')}x;"
            f" polls/s gateway/reference {fmt(rate, '.2f')}"
        )
    g = summaries.get(("full", "gateway"))
    e = summaries.get(("empty", "gateway"))
    if g and e:
        lines.append(
            f"  one gateway core: ~{1000 / g['cpu_per_1k']:,.0f} full polls/s or"
            f" ~{1000 / e['cpu_per_1k']:,.0f} empty polls/s (1 / CPU per poll)"
        )
    if "redis" in brokers and "polls" in only:
        lines += redis_poll_lines(redis, summaries)

    lines += standin_lines(results, plan, only, brokers)
    failed = f"; {len(results.failures)} run(s) failed" if results.failures else ""
    lines += ["", f"total {elapsed:.0f} s{failed}"]
    lines += [f"  FAILED {failure}" for failure in results.failures]
    return "\n".join(lines)


def redis_poll_lines(
    redis: dict[str, Any] | None, summaries: dict[tuple[str, str], dict[str, Any]]
) -> list[str]:
    """The polls on the Redis broker: CPU of the gateway, of redis-server and their sum per
    poll, Redis commands per poll, and the sum against the memory gateway and the reference."""
    lines = [
        "",
        "1b. The same polls with the gateway on the Redis broker (a fresh gateway and"
        " redis-server; CPU per poll in us: gateway, redis-server, sum; Redis commands per"
        " poll from INFO commandstats, the calls scripts make included; vs memory / vs ref:"
        " the sum against the memory gateway's CPU per poll and the reference's)",
        f"{'kind':<9} {'polls':>7} {'answer B':>8} {'polls/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'gw us':>6} {'redis us':>8} {'sum us':>7} {'cmds':>6} {'EVALSHA':>7}"
        f" {'vs memory':>9} {'vs ref':>7} {'server %':>8} {'driver %':>8} {'spread':>6}",
    ]
    if redis is None:
        return [*lines, "  failed"]
    for kind in KINDS:
        s = summaries[(kind, "redis")]
        g, r = summaries.get((kind, "gateway")), summaries.get((kind, "reference"))
        vs_memory = s["total_us"] / (1000 * g["cpu_per_1k"]) if g else None
        vs_ref = s["total_us"] / (1000 * r["cpu_per_1k"]) if r else None
        evalsha = s["calls"].get("evalsha", 0.0) + s["calls"].get("eval", 0.0)
        lines.append(
            f"{KINDS[kind]:<9} {s['polls']:>7,} {s['answer_bytes']:>8,.0f}"
            f" {s['per_second']:>8,.0f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f}"
            f" {s['gateway_us']:>6.0f} {s['redis_us']:>8.0f} {s['total_us']:>7.0f}"
            f" {s['commands']:>6.2f} {evalsha:>7.2f} {times(vs_memory, '.2f'):>9}"
            f" {times(vs_ref):>7} {100 * s['total_share']:>8.0f}"
            f" {100 * s['driver_share']:>8.0f} {100 * s['spread']:>5.0f}%"
        )
    setup = redis["setup"]
    lines.append(
        f"setup: {setup['devices']:,} devices in {setup['elapsed']:.1f} s, then quiet after"
        f" {0.5 + setup['settle']:.1f} s; RSS per detached"
        f" device: gateway +{setup['rss_kib'] / max(1, setup['devices']):.2f} KiB,"
        f" redis-server +{setup['redis_rss_kib'] / max(1, setup['devices']):.2f} KiB;"
        f" /metrics polls {json.dumps(redis['metrics']['polls'])}"
    )
    lines.append("Redis commands per poll, by command (and bytes in / out per poll):")
    for kind in KINDS:
        s = summaries[(kind, "redis")]
        calls = ", ".join(f"{c} {v:.2f}" for c, v in s["calls"].items() if v >= 0.005)
        lines.append(
            f"  {KINDS[kind]:<9} {s['commands']:.2f}: {calls}"
            f" ({s['bytes_in']:,.0f} / {s['bytes_out']:,.0f} B)"
        )
    for kind in ("full", "empty"):
        s, g = summaries[(kind, "redis")], summaries.get((kind, "gateway"))
        vs = s["total_us"] / (1000 * g["cpu_per_1k"]) if g else None
        gw = s["gateway_us"] / (1000 * g["cpu_per_1k"]) if g else None
        rate = s["per_second"] / g["per_second"] if g else None
        lines.append(
            f"  ratio {kind} polls on Redis: (gateway + redis) CPU per poll / memory gateway"
            f" {times(vs, '.2f')} (gateway alone {times(gw, '.2f')}); polls/s Redis/memory"
            f" {fmt(rate, '.2f')}"
        )
    full, empty = summaries[("full", "redis")], summaries[("empty", "redis")]
    lines.append(
        f"  on Redis, one gateway core: ~{1e6 / full['gateway_us']:,.0f} full polls/s or"
        f" ~{1e6 / empty['gateway_us']:,.0f} empty polls/s (1 / gateway CPU per poll), plus"
        f" {full['redis_us']:.0f} / {empty['redis_us']:.0f} us of Redis CPU per poll"
        f" (~{1e6 / full['redis_us']:,.0f} / ~{1e6 / empty['redis_us']:,.0f} polls/s per"
        " Redis core)"
    )
    return lines


def standin_lines(
    results: Results, plan: dict[str, Any], only: set[str], brokers: tuple[str, ...]
) -> list[str]:
    ks = plan["ks"]
    lines = [
        "",
        f"2. Stand-ins: K devices detached on one channel (no live subscriber, no push"
        f" provider, wake_delay {WAKE_DELAY:,.0f} s); one WebSocket publisher: 1 publication"
        f" (arms one wake per device), then {plan['duration']:g} s of publications in windows"
        " of 20 publish commands, each window acknowledged.",
    ]
    missing = "failed" if "standins" in only else "not run (--only)"
    if "memory" in brokers:
        lines.append(
            f"{'K':>7} {'setup s':>7} {'KiB/dev':>7} {'idle %':>6} {'1st pub ms':>10}"
            f" {'pubs':>7} {'pubs/s':>8} {'CPU us/pub':>10} {'vs K=0':>7} {'server %':>8}"
            f" {'driver %':>8} {'armed':>7} {'coalesced':>11}  wakes"
        )
        found = results.standins.get("memory", {})
        base = found.get(0)
        for k in ks:
            r = found.get(k)
            if r is None:
                lines.append(f"{k:>7,}  {missing}")
                continue
            per_dev = r["rss_kib"] / k if k else None
            vs = r["cpu_us_per_pub"] / base["cpu_us_per_pub"] if base else None
            lines.append(
                f"{k:>7,} {r['setup']['elapsed']:>7.1f} {fmt(per_dev, '.2f'):>7}"
                f" {100 * r['idle_share']:>6.2f} {1000 * r['first_cpu']:>10.2f}"
                f" {r['publications']:>7,} {r['per_second']:>8,.0f}"
                f" {r['cpu_us_per_pub']:>10.1f} {fmt(vs, '.2f'):>7}"
                f" {100 * r['server_cpu'] / r['elapsed']:>8.0f}"
                f" {100 * r['driver_cpu'] / r['elapsed']:>8.0f} {r['armed']:>7,.0f}"
                f" {r['coalesced']:>11,.0f}  {'OK' if r['wakes_ok'] else 'WRONG'}"
            )
        ratios = []
        for k in ks[1:]:
            r = found.get(k)
            vs = r["cpu_us_per_pub"] / base["cpu_us_per_pub"] if base and r else None
            ratios.append(f"K={k:,} {fmt(vs, '.2f')}x")
        lines.append(f"  ratio CPU per publication vs K=0: {'  '.join(ratios)}")
        slope = [
            (r["cpu_us_per_pub"] - base["cpu_us_per_pub"]) / r["k"] * 1000
            for r in found.values()
            if base and r["k"]
        ]
        if slope:
            lines.append(
                "  extra CPU per publication per 1,000 stand-ins: "
                + ", ".join(f"{v:.0f} us" for v in slope)
            )
    if "redis" in brokers:
        lines += [
            "",
            "2b. Stand-ins with the gateway on the Redis broker (quiet s: from the end of the"
            " set-up until gateway + redis-server use < 5% of a core; CPU and idle: gateway +"
            " redis-server; us/pub: gateway, redis-server, sum; vs K=0 of the sum; Redis"
            " commands per publication, the calls scripts make included)",
            f"{'K':>7} {'setup s':>7} {'quiet s':>7} {'KiB/dev':>7} {'redis KiB':>9} {'idle %':>6}"
            f" {'1st pub ms':>10} {'pubs':>7} {'pubs/s':>8} {'gw us':>6} {'redis us':>8}"
            f" {'sum us':>7} {'vs K=0':>7} {'cmds':>6} {'server %':>8} {'driver %':>8}"
            f" {'armed':>7} {'coalesced':>11}  wakes",
        ]
        found = results.standins.get("redis", {})
        base = found.get(0)
        for k in ks:
            r = found.get(k)
            if r is None:
                lines.append(f"{k:>7,}  {missing}")
                continue
            per_dev = r["rss_kib"] / k if k else None
            redis_dev = r["redis_rss_kib"] / k if k else None
            vs = r["total_us_per_pub"] / base["total_us_per_pub"] if base else None
            busy = r["server_cpu"] + r["redis_cpu"]
            lines.append(
                f"{k:>7,} {r['setup']['elapsed']:>7.1f} {0.5 + r['setup']['settle']:>7.1f}"
                f" {fmt(per_dev, '.2f'):>7} {fmt(redis_dev, '.2f'):>9}"
                f" {100 * (r['idle_share'] + r['redis_idle_share']):>6.2f}"
                f" {1000 * (r['first_cpu'] + r['redis_first_cpu']):>10.2f}"
                f" {r['publications']:>7,} {r['per_second']:>8,.0f}"
                f" {r['cpu_us_per_pub']:>6.1f} {r['redis_us_per_pub']:>8.1f}"
                f" {r['total_us_per_pub']:>7.1f} {fmt(vs, '.2f'):>7}"
                f" {r['commands_per_pub']:>6.2f} {100 * busy / r['elapsed']:>8.0f}"
                f" {100 * r['driver_cpu'] / r['elapsed']:>8.0f} {r['armed']:>7,.0f}"
                f" {r['coalesced']:>11,.0f}  {'OK' if r['wakes_ok'] else 'WRONG'}"
            )
        ratios = []
        for k in ks[1:]:
            r = found.get(k)
            vs = r["total_us_per_pub"] / base["total_us_per_pub"] if base and r else None
            ratios.append(f"K={k:,} {times(vs, '.2f')}")
        lines.append(
            f"  ratio (gateway + redis) CPU per publication vs K=0 on Redis: {'  '.join(ratios)}"
        )
        if base:
            calls = ", ".join(
                f"{c} {v / base['publications']:.2f}"
                for c, v in sorted(base["redis"]["calls"].items(), key=lambda item: -item[1])
                if v / base["publications"] >= 0.005
            )
            lines.append(f"  Redis commands per publication at K=0: {calls}")
    return lines


# ----------------------------------------------------------------------------- main


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = orchestrator_parser(
        "poll benchmark: GET /v1/poll against a raw HTTP reference, and stand-ins",
        "~10 s smoke run (200 devices, K = 0, 100, 1,000; memory broker unless --broker)",
        MEASUREMENTS,
    )
    parser.add_argument(
        "--broker",
        choices=(*BROKERS, "both"),
        help="the gateway's broker (default: both; memory with --quick); redis needs"
        " redis-server installed",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    only = set(args.only or MEASUREMENTS)
    choice = args.broker or ("memory" if args.quick else "both")
    brokers = BROKERS if choice == "both" else (choice,)
    raise_nofile()
    load = MachineLoad()
    pin(os.getpid(), LOADGEN_CPU)
    secret = secrets.token_urlsafe(32)
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="poll-bench-") as tmp:
        logdir = Path(tmp)
        print(f"poll benchmark ({mode}); server logs in {logdir}", file=sys.stderr)
        if "polls" in only:
            for broker in brokers:
                label = f"polls N={plan['devices']:,} x {plan['rounds']} rounds, {broker} broker"
                r = attempt(results.failures, label, run_polls, plan, logdir, secret, broker)
                if r:
                    results.polls[broker] = r
            # The reference replays a memory gateway's answers (a Redis one's without it).
            source = results.polls.get("memory") or results.polls.get("redis")
            if source:
                samples = {kind: source[kind][-1]["sample"] for kind in ("full", "empty")}
                label = "reference"
                results.reference = attempt(
                    results.failures, label, run_reference, plan, logdir, secret, samples
                )
        if "standins" in only:
            for broker in brokers:
                found = results.standins.setdefault(broker, {})
                for k in plan["ks"]:
                    label = f"stand-ins K={k:,}, {broker} broker"
                    r = attempt(
                        results.failures, label, run_standins, k, plan, logdir, secret, broker
                    )
                    if r:
                        found[k] = r
    elapsed = time.monotonic() - started
    print(report(results, plan, mode, elapsed, load, only, brokers))
    if args.json:
        raw = {"machine": machine(*PACKAGES), "mode": mode, "plan": plan, "brokers": brokers}
        raw.update(
            polls=results.polls,
            reference=results.reference,
            standins=results.standins,
            failures=results.failures,
        )
        Path(args.json).write_text(json.dumps(raw, indent=2, default=list) + "\n")
    wrong = [r for found in results.standins.values() for r in found.values() if not r["wakes_ok"]]
    return 1 if results.failures or wrong else 0


if __name__ == "__main__":
    run_script(main)
