"""Poll benchmark: backgrounded mobile apps, what polls and stand-ins cost a gateway.

    python bench/poll/run.py           # full run, about 35 s
    python bench/poll/run.py --quick   # smoke run, about 10 s

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
    ServerProcess,
    attempt,
    cpu_seconds,
    fmt,
    gateway_command,
    machine,
    orchestrator_parser,
    pin,
    raise_nofile,
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
    """`realtime serve` with the TOML written by this run; knows its server API."""

    banner = "ws://"

    def __init__(self, logdir: Path, secret: str) -> None:
        self.config = logdir / "gateway.toml"
        if not self.config.exists():
            self.config.write_text(GATEWAY_TOML)
        self.api_port = 0
        self.api_key = ""
        super().__init__("gateway", logdir, secret)

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = gateway_command(self.config, self.secret, SERVER=self.port)
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
        """One step: its result, with the server's CPU over its measured part."""
        self.send(f"STEP {name} {arg}".rstrip())
        self.expect("READY", timeout)
        pid = self.server.pid
        cpu0 = cpu_seconds(pid)
        self.go()
        self.expect("DONE", timeout)
        cpu = cpu_seconds(pid) - cpu0
        line = self._next(timeout)
        if line is None:
            raise RuntimeError(f"driver exited with {self.proc.wait()} during {name}")
        result: dict[str, Any] = json.loads(line)
        if result["error_count"]:
            raise RuntimeError(f"{name}: {result['error_count']} errors, first: {result['errors']}")
        result["server_cpu"] = cpu
        return result

    def quit(self) -> None:
        if self.proc.poll() is None:
            self.send("QUIT")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.stop()


def stop_all(drivers: list[Driver], servers: list[ServerProcess]) -> None:
    for driver in drivers:
        driver.stop()
    for server in servers:
        server.stop()


def alive(server: ServerProcess) -> None:
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.kind} died during the run:\n{server.log_text()}")


# ----------------------------------------------------------------------------- 1. polls


def poll_options(plan: dict[str, Any]) -> list[str]:
    return ["-n", str(plan["devices"]), "--concurrency", str(plan["concurrency"])]


def run_polls(plan: dict[str, Any], logdir: Path, secret: str) -> dict[str, Any]:
    """The gateway's rounds (publish, full polls, empty polls), then the reference's."""
    drivers: list[Driver] = []
    servers: list[ServerProcess] = []
    out: dict[str, Any] = {"gateway": {"full": [], "empty": []}, "reference": {}}
    try:
        gateway = Gateway(logdir, secret)
        servers.append(gateway)
        gateway.wait_ready()
        driver = Driver(gateway, "poll", poll_options(plan))
        drivers.append(driver)
        rss0 = rss_kib(gateway.pid)
        out["setup"] = driver.step("setup")
        time.sleep(0.5)  # the detach writes of the last devices
        out["setup"]["rss_kib"] = rss_kib(gateway.pid) - rss0
        publishing = []
        for _ in range(plan["rounds"]):
            publishing.append(driver.step("publish"))
            out["gateway"]["full"].append(driver.step("poll", str(PER_ROUND)))
            out["gateway"]["empty"].append(driver.step("poll", "0"))
        out["gateway"]["serial"] = [driver.step("poll", "0 1")]  # one poll in flight
        out["publish"] = publishing
        out["metrics"] = gateway.metrics()
        alive(gateway)
        driver.quit()
        gateway.stop()
        for kind, expect in (("full", PER_ROUND), ("empty", 0)):
            sample = out["gateway"][kind][-1]["sample"].encode("latin-1")
            reference = Reference(logdir, secret, kind, sample)
            servers.append(reference)
            reference.wait_ready()
            ref_driver = Driver(reference, "poll", poll_options(plan))
            drivers.append(ref_driver)
            steps = [ref_driver.step("poll", str(expect)) for _ in range(plan["rounds"])]
            out["reference"][kind] = steps
            if kind == "empty":
                out["reference"]["serial"] = [ref_driver.step("poll", "0 1")]
            alive(reference)
            ref_driver.quit()
            reference.stop()
        return out
    finally:
        stop_all(drivers, servers)


def poll_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """All rounds of one kind on one server together; spread of CPU per poll over rounds."""
    polls = sum(r["polls"] for r in rounds)
    cpu = sum(r["server_cpu"] for r in rounds)
    elapsed = sum(r["elapsed"] for r in rounds)
    latencies = sorted(v for r in rounds for v in r["latencies_ms"])
    per_round = sorted(r["server_cpu"] / r["polls"] for r in rounds)
    median = per_round[(len(per_round) - 1) // 2]

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    return {
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


# ----------------------------------------------------------------------------- 2. stand-ins


def run_standins(k: int, plan: dict[str, Any], logdir: Path, secret: str) -> dict[str, Any]:
    """K devices detached on one channel; a first publication, then steady publishing."""
    drivers: list[Driver] = []
    servers: list[ServerProcess] = []
    try:
        gateway = Gateway(logdir, secret)
        servers.append(gateway)
        gateway.wait_ready()
        options = ["--k", str(k), "--duration", str(plan["duration"])]
        driver = Driver(gateway, "standins", options)
        drivers.append(driver)
        time.sleep(0.3)
        rss0 = rss_kib(gateway.pid)
        setup = driver.step("setup")
        time.sleep(0.5)  # the detach writes of the last devices
        rss = rss_kib(gateway.pid) - rss0
        idle0 = cpu_seconds(gateway.pid)
        time.sleep(plan["idle"])
        idle = (cpu_seconds(gateway.pid) - idle0) / plan["idle"]
        first = driver.step("first")
        steady = driver.step("steady")
        metrics = gateway.metrics()
        alive(gateway)
        driver.quit()
        pubs = steady["publications"]
        wakes = metrics["wakes"]
        armed, coalesced = wakes.get("armed", 0), wakes.get("coalesced", 0)
        return {
            "k": k,
            "setup": setup,
            "rss_kib": rss,
            "idle_share": idle,
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
    finally:
        stop_all(drivers, servers)


# ----------------------------------------------------------------------------- report


@dataclass
class Results:
    polls: dict[str, Any] | None = None
    standins: dict[int, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def report(
    results: Results,
    plan: dict[str, Any],
    mode: str,
    elapsed: float,
    load: MachineLoad,
    only: set[str],
) -> str:
    m = machine(*PACKAGES)
    lines = report_header(
        f"Poll benchmark ({mode})  {m['date']}",
        m,
        f"python {m['python']}  uvloop {m['uvloop']}  websockets {m['websockets']}  "
        f"protobuf {m['protobuf']}  PyJWT {m['PyJWT']}",
        load,
    )
    lines += [
        f"Gateway config: memory broker; namespace chat: history_size 100, push = true;"
        f" [background] poll_rate = poll_burst = {RATE_LIMIT_OFF:,} (raised: the per-device"
        f" rate limit never refuses a poll here), wake_delay = {WAKE_DELAY:,.0f} s (no wake"
        " fires); no push provider. Servers pinned to one CPU, the driver to the other.",
    ]
    polls = results.polls
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
    if polls is not None:
        for kind in KINDS:
            for server in ("gateway", "reference"):
                s = summaries[(kind, server)] = poll_summary(polls[server][kind])
                lines.append(
                    f"{KINDS[kind]:<9} {server:<10} {s['polls']:>7,} {s['answer_bytes']:>8,.0f}"
                    f" {s['per_second']:>8,.0f} {s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f}"
                    f" {s['cpu']:>6.2f} {s['cpu_per_1k']:>14.3f}"
                    f" {100 * s['server_share']:>8.0f} {100 * s['driver_share']:>8.0f}"
                    f" {100 * s['spread']:>5.0f}%"
                )
        setup = polls["setup"]
        lines.append(
            f"setup: {setup['devices']:,} devices on {setup['channels']:,} channels"
            f" ({setup['subscriptions']:,} subscriptions) in {setup['elapsed']:.1f} s;"
            f" gateway RSS +{setup['rss_kib'] / max(1, setup['devices']):.2f} KiB per"
            f" detached device; /metrics polls {json.dumps(polls['metrics']['polls'])}"
        )
    else:
        lines.append("  failed" if "polls" in only else "  not run (--only)")
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

    ks = plan["ks"]
    lines += [
        "",
        f"2. Stand-ins: K devices detached on one channel (no live subscriber, no push"
        f" provider, wake_delay {WAKE_DELAY:,.0f} s); one WebSocket publisher: 1 publication"
        f" (arms one wake per device), then {plan['duration']:g} s of publications in windows"
        " of 20 publish commands, each window acknowledged.",
        f"{'K':>7} {'setup s':>7} {'KiB/dev':>7} {'idle %':>6} {'1st pub ms':>10}"
        f" {'pubs':>7} {'pubs/s':>8} {'CPU us/pub':>10} {'vs K=0':>7} {'server %':>8}"
        f" {'driver %':>8} {'armed':>7} {'coalesced':>11}  wakes",
    ]
    base = results.standins.get(0)
    for k in ks:
        r = results.standins.get(k)
        if r is None:
            lines.append(f"{k:>7,}  {'failed' if 'standins' in only else 'not run (--only)'}")
            continue
        per_dev = r["rss_kib"] / k if k else None
        vs = r["cpu_us_per_pub"] / base["cpu_us_per_pub"] if base else None
        lines.append(
            f"{k:>7,} {r['setup']['elapsed']:>7.1f} {fmt(per_dev, '.2f'):>7}"
            f" {100 * r['idle_share']:>6.2f} {1000 * r['first_cpu']:>10.2f}"
            f" {r['publications']:>7,} {r['per_second']:>8,.0f} {r['cpu_us_per_pub']:>10.1f}"
            f" {fmt(vs, '.2f'):>7} {100 * r['server_cpu'] / r['elapsed']:>8.0f}"
            f" {100 * r['driver_cpu'] / r['elapsed']:>8.0f} {r['armed']:>7,.0f}"
            f" {r['coalesced']:>11,.0f}  {'OK' if r['wakes_ok'] else 'WRONG'}"
        )
    ratios = []
    for k in ks[1:]:
        r = results.standins.get(k)
        vs = r["cpu_us_per_pub"] / base["cpu_us_per_pub"] if base and r else None
        ratios.append(f"K={k:,} {fmt(vs, '.2f')}x")
    lines.append(f"  ratio CPU per publication vs K=0: {'  '.join(ratios)}")
    slope = [
        (r["cpu_us_per_pub"] - base["cpu_us_per_pub"]) / r["k"] * 1000
        for r in results.standins.values()
        if base and r["k"]
    ]
    if slope:
        lines.append(
            "  extra CPU per publication per 1,000 stand-ins: "
            + ", ".join(f"{v:.0f} us" for v in slope)
        )
    failed = f"; {len(results.failures)} run(s) failed" if results.failures else ""
    lines += ["", f"total {elapsed:.0f} s{failed}"]
    lines += [f"  FAILED {failure}" for failure in results.failures]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = orchestrator_parser(
        "poll benchmark: GET /v1/poll against a raw HTTP reference, and stand-ins",
        "~10 s smoke run (200 devices, K = 0, 100, 1,000)",
        MEASUREMENTS,
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    only = set(args.only or MEASUREMENTS)
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
            label = f"polls N={plan['devices']:,} x {plan['rounds']} rounds"
            results.polls = attempt(results.failures, label, run_polls, plan, logdir, secret)
        if "standins" in only:
            for k in plan["ks"]:
                r = attempt(
                    results.failures, f"stand-ins K={k:,}", run_standins, k, plan, logdir, secret
                )
                if r:
                    results.standins[k] = r
    elapsed = time.monotonic() - started
    print(report(results, plan, mode, elapsed, load, only))
    if args.json:
        raw = {"machine": machine(*PACKAGES), "mode": mode, "plan": plan}
        raw.update(polls=results.polls, standins=results.standins, failures=results.failures)
        Path(args.json).write_text(json.dumps(raw, indent=2, default=list) + "\n")
    wrong = [r for r in results.standins.values() if not r["wakes_ok"]]
    return 1 if results.failures or wrong else 0


if __name__ == "__main__":
    run_script(main)
