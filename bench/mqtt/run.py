"""MQTT benchmark: the gateway's MQTT listener against mosquitto, in one invocation.

    python bench/mqtt/run.py           # full run, about 2 minutes (limit: 5)
    python bench/mqtt/run.py --quick   # smoke run, about 40 seconds

For each broker (the gateway: `realtime serve` with bench/mqtt/gateway.toml, [mqtt] on;
mosquitto: the Debian package, with a config generated in a temp dir) and each measurement,
a fresh broker process is started on a free 127.0.0.1 port (pinned to one CPU) and
bench/mqtt/loadgen.py (MQTT 3.1.1 clients on raw uvloop protocols) runs against it (pinned
to the other CPU):

- 1 -> 1: one publisher, one subscriber, QoS 0, 100-byte payloads in bursts of 100
  back-to-back PUBLISH packets, each burst delivered before the next; messages delivered
  per broker CPU-second (user + system time of the broker process over the publish phase,
  read at ns resolution from /proc/<pid>/task/*/schedstat);
- 1 -> 100: the same with 100 subscribers of the topic; deliveries per broker CPU-second;
- idle: C clients connected (keep-alive 300), each subscribed to its own topic; broker
  VmRSS growth per connection in KiB, at C = 2,000 and 20,000 (10,000 per load-generator
  process). The broker holds all C sockets: when RLIMIT_NOFILE cannot be raised to
  C + 100 (the hard limit needs CAP_SYS_RESOURCE), C is lowered to fit and the table
  says so.

Throughput points are medians of repeats. It prints one table with gateway/mosquitto
ratios and the targets (informational). Exit code 0 unless a run crashed (1) or mosquitto
is not installed (2); every child process is stopped by PID before exiting.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import queue
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LOADGEN = HERE / "loadgen.py"
GATEWAY_CONFIG = HERE / "gateway.toml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Children need the `realtime` package: this interpreter, or the repository's virtualenv.
PYTHON = sys.executable
if importlib.util.find_spec("realtime") is None and (REPO / ".venv/bin/python").exists():
    PYTHON = str(REPO / ".venv/bin/python")
SERVERS = ("gateway", "mosquitto")

# Throughput cases: (label, subscribers, messages per run); `repeats` runs of each (the
# median counts). Message counts give mosquitto, the slower of the two here, 2-4 s a run.
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "throughput": [("1->1", 1, 100_000), ("1->100", 100, 4_000)],
        "repeats": 7,
        "idle": [2_000, 20_000],
    },
    "quick": {
        "throughput": [("1->1", 1, 40_000), ("1->100", 100, 1_500)],
        "repeats": 1,
        "idle": [2_000, 20_000],
    },
}
BURST = 100
IDLE_PER_LOADGEN = 10_000
# Connections opened at once by each load generator: mosquitto listens with a backlog of
# 100, and a full accept queue drops SYNs, which cost a 1 s retransmit each.
IDLE_BATCH = 50
# Descriptors a broker needs besides its client sockets (the gateway has 18 at start).
FD_HEADROOM = 100
TARGETS = {"1->1": 1.0, "1->100": 0.8}
TARGET_IDLE_KIB = 2.0
MOSQUITTO_MISSING = (
    "mosquitto is not installed (no `mosquitto` on PATH or in /usr/sbin).\n"
    "Install the Debian package first:  apt-get install -y mosquitto\n"
    "(the benchmark starts its own broker on a free 127.0.0.1 port with a generated config;"
    " the packaged service is not used)"
)


# ----------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process, all threads, in seconds, from the scheduler's
    runtime in /proc/<pid>/task/*/schedstat (ns); falls back to /proc/<pid>/stat (ticks)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        if total:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return sum(stat_user_system(pid))


def stat_user_system(pid: int) -> tuple[float, float]:
    """utime and stime from /proc/<pid>/stat (all threads), in seconds (tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class MachineLoad:
    """How busy the machine was apart from this benchmark: /proc/stat over the whole run,
    minus the CPU time of this process and its (reaped) children."""

    def __init__(self) -> None:
        self.stat0 = self._stat()
        self.ours0 = self._ours()

    @staticmethod
    def _stat() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]

    @staticmethod
    def _ours() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def summary(self) -> tuple[float, float]:
        """(share of all CPUs used by others, share stolen by the hypervisor)."""
        stat1 = self._stat()
        delta = [b - a for a, b in zip(self.stat0, stat1, strict=False)]
        total = sum(delta[:8]) or 1  # user nice system idle iowait irq softirq steal
        busy = (delta[0] + delta[1] + delta[2] + delta[5] + delta[6]) / CLK_TCK
        ours = self._ours() - self.ours0
        return max(0.0, busy - ours) / (total / CLK_TCK), delta[7] / total


CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, LOADGEN_CPU = 0, 1  # indexes into CPUS


def pin(pid: int, which: int) -> None:
    """Pin to the first (broker) or second (load generator, orchestrator) usable CPU."""
    if len(CPUS) >= 2:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {CPUS[which]})


def raise_nofile(want: int) -> int:
    """Raise this process's descriptor limit (inherited by the brokers and load generators):
    to `want` when allowed (root may raise the hard limit), else to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def idle_clients(asked: int, limit: int) -> int:
    """`asked`, or as many (in hundreds) as the broker's descriptor limit allows."""
    return min(asked, (limit - FD_HEADROOM) // 100 * 100)


def source_port_base(count: int) -> int:
    """First of `count` client source ports outside the kernel's ephemeral range (so that
    20,000 connections to one port do not make connect() scan used ports; see
    loadgen.LoadGen.connect), or 0 to let the kernel choose when there is no room."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split())
    except (OSError, ValueError):
        return 0
    if low - 1024 >= count:
        return low - count
    if 65535 - high >= count:
        return high + 1
    return 0


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def mosquitto_version(binary: str) -> str:
    try:
        out = subprocess.run(
            [binary, "-h"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "mosquitto (version unknown)"
    return out.splitlines()[0].strip() if out else "mosquitto (version unknown)"


MOSQUITTO_CONF = """\
# Generated by bench/mqtt/run.py for one run.
listener {port} 127.0.0.1
allow_anonymous true
persistence false
# QoS 1/2 only (the benchmark is QoS 0): never the limit in the way.
max_queued_messages 100000
max_inflight_messages 0
# uvloop sets TCP_NODELAY on the gateway's sockets; mosquitto only when told to.
set_tcp_nodelay true
# No $SYS updates during a run.
sys_interval 0
log_dest file {log}
log_type error
log_type warning
connection_messages false
{user}"""


# ----------------------------------------------------------------------------- processes


class ServerProcess:
    """One broker process on a free port; stopped with SIGTERM (then SIGKILL) by PID."""

    def __init__(self, kind: str, logdir: Path, secret: str, mosquitto: str | None) -> None:
        self.kind = kind
        self.port = free_port()
        self.secret = secret
        self.log_path = logdir / f"{kind}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
        env["PYTHONUNBUFFERED"] = "1"
        if kind == "gateway":
            cmd = [PYTHON, "-m", "realtime", "serve", "--config", str(GATEWAY_CONFIG)]
            env.update(
                REALTIME_MQTT__PORT=str(self.port),
                REALTIME_SERVER__PORT=str(free_port()),
                REALTIME_API__PORT=str(free_port()),
                REALTIME_AUTH__HMAC_SECRET=secret,
                REALTIME_API__KEY=secrets.token_urlsafe(24),
            )
            self.banner: str | None = f"mqtt://127.0.0.1:{self.port}"
        else:
            assert mosquitto is not None
            conf = logdir / f"mosquitto-{self.port}.conf"
            self.broker_log = logdir / f"mosquitto-{self.port}.broker.log"
            # As root, mosquitto switches to the `mosquitto` user, which may not write the
            # log in our private temp dir: stay root (loopback only, for a few seconds).
            user = "user root\n" if os.geteuid() == 0 else ""
            conf.write_text(MOSQUITTO_CONF.format(port=self.port, log=self.broker_log, user=user))
            cmd = [mosquitto, "-c", str(conf)]
            self.banner = None  # ready when the port accepts
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
        self.pid = self.proc.pid
        pin(self.pid, SERVER_CPU)

    def _ready(self) -> bool:
        if self.banner is not None:
            return self.banner in self.log_path.read_text(errors="replace")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            return sock.connect_ex(("127.0.0.1", self.port)) == 0

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start:\n{self.log_text()}")
            if self._ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        text = self.log_path.read_text(errors="replace")
        if self.kind == "mosquitto" and self.broker_log.exists():
            text += self.broker_log.read_text(errors="replace")
        return text[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


class LoadGenProcess:
    """bench/mqtt/loadgen.py with the READY/GO/DONE/result line protocol."""

    def __init__(self, server: ServerProcess, mode: str, options: list[str]) -> None:
        cmd = [
            PYTHON,
            str(LOADGEN),
            mode,
            "--server",
            server.kind,
            "--port",
            str(server.port),
            *options,
        ]
        env = dict(os.environ, BENCH_HMAC_SECRET=server.secret)
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env
        )
        pin(self.proc.pid, LOADGEN_CPU)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, word: str, timeout: float) -> None:
        line = self._next(timeout)
        if line != word:
            if line is not None and line.startswith("{"):
                result = json.loads(line)
                raise RuntimeError(f"loadgen: expected {word}, got errors {result['errors']}")
            raise RuntimeError(f"loadgen: expected {word}, got {line!r}")

    def _next(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"loadgen: nothing within {timeout:.0f}s") from None

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("GO\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 60.0) -> dict[str, Any]:
        line = self._next(timeout)
        if line is None:
            raise RuntimeError(f"loadgen exited with {self.proc.wait()} and no result")
        result: dict[str, Any] = json.loads(line)
        self.proc.wait(timeout)
        if result.get("error_count"):
            raise RuntimeError(f"loadgen saw {result['error_count']} errors: {result['errors']}")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


# ----------------------------------------------------------------------------- runs


@dataclass
class Results:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    idle: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The median run (by deliveries per CPU-second) of each (server, case)."""
        out = {}
        for key, runs in self.runs.items():
            ordered = sorted(runs, key=lambda r: r["per_cpu_second"])
            median = dict(ordered[(len(ordered) - 1) // 2])
            median["repeats"] = len(runs)
            median["spread"] = (
                ordered[-1]["per_cpu_second"] - ordered[0]["per_cpu_second"]
            ) / median["per_cpu_second"]
            out[key] = median
        return out


Spawn = Callable[[str, list[str]], LoadGenProcess]
Body = Callable[[ServerProcess, Spawn], dict[str, Any]]


@dataclass
class Context:
    logdir: Path
    secret: str
    mosquitto: str | None


def with_server(kind: str, ctx: Context, body: Body) -> dict[str, Any]:
    server = ServerProcess(kind, ctx.logdir, ctx.secret, ctx.mosquitto)
    loadgens: list[LoadGenProcess] = []
    try:
        server.wait_ready()

        def spawn(mode: str, options: list[str]) -> LoadGenProcess:
            loadgen = LoadGenProcess(server, mode, options)
            loadgens.append(loadgen)
            return loadgen

        result: dict[str, Any] = body(server, spawn)
        if server.proc.poll() is not None:
            raise RuntimeError(f"{kind} died during the run:\n{server.log_text()}")
        return result
    finally:
        for loadgen in loadgens:
            loadgen.stop()
        server.stop()


def run_throughput(kind: str, n: int, messages: int, ctx: Context) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        lg = spawn("throughput", ["-n", str(n), "--messages", str(messages), "--burst", str(BURST)])
        lg.expect("READY", 120)
        cpu0, (user0, sys0) = cpu_seconds(server.pid), stat_user_system(server.pid)
        lg.go()
        lg.expect("DONE", 150)
        cpu = cpu_seconds(server.pid) - cpu0
        user1, sys1 = stat_user_system(server.pid)
        result = lg.result()
        result.update(server_cpu=cpu, server_user_stat=user1 - user0, server_sys_stat=sys1 - sys0)
        result["per_cpu_second"] = result["delivered"] / cpu if cpu > 0 else math.nan
        result["per_second"] = result["delivered"] / result["elapsed"]
        if result["delivered"] != result["expected"]:
            raise RuntimeError(
                f"delivered {result['delivered']:,} of {result['expected']:,}"
                f" ({result['timeouts']} burst timeouts)"
            )
        return result

    return with_server(kind, ctx, body)


def run_idle(kind: str, count: int, ctx: Context) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        time.sleep(0.5)
        before = rss_kib(server.pid)
        loadgens = []
        base = source_port_base(count)
        for first in range(0, count, IDLE_PER_LOADGEN):
            n = min(IDLE_PER_LOADGEN, count - first)
            options = ["-n", str(n), "--first", str(first), "--batch", str(IDLE_BATCH)]
            options += ["--source-port", str(base)]
            loadgens.append(spawn("idle", options))
        for lg in loadgens:
            lg.expect("READY", 150)
        time.sleep(1.0)  # let the broker finish any work triggered by the last connections
        after = rss_kib(server.pid)
        for lg in loadgens:
            lg.go()
        for lg in loadgens:
            lg.expect("DONE", 60)
        results = [lg.result() for lg in loadgens]
        alive = sum(r["alive"] for r in results)
        if alive != count:
            raise RuntimeError(f"only {alive:,} of {count:,} connections alive at the end")
        return {
            "n": count,
            "loadgens": len(loadgens),
            "open_seconds": max(r["open_seconds"] for r in results),
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_connection": (after - before) / count,
        }

    return with_server(kind, ctx, body)


def attempt(results: Results, label: str, fn: Any, *args: Any) -> dict[str, Any] | None:
    start = time.monotonic()
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    try:
        result: dict[str, Any] = fn(*args)
    except Exception as exc:  # report, go on with the other runs
        print(f" FAILED ({exc})", file=sys.stderr, flush=True)
        results.failures.append(f"{label}: {exc}")
        return None
    print(f" {time.monotonic() - start:.1f}s", file=sys.stderr, flush=True)
    return result


# ----------------------------------------------------------------------------- report


def machine(mosquitto: str | None) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        uvloop_version = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uvloop_version = "-"
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "mosquitto": mosquitto_version(mosquitto) if mosquitto else "mosquitto not installed",
    }


def fmt(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def report(
    results: Results,
    plan: dict[str, Any],
    mode: str,
    elapsed: float,
    load: MachineLoad,
    only: set[str],
    mosquitto: str | None,
) -> str:
    m = machine(mosquitto)
    others, steal = load.summary()
    lines = [
        f"MQTT benchmark: gateway vs mosquitto ({mode})  {m['date']}",
        f"machine: nproc={m['nproc']}  cpu={m['cpu']}  kernel={m['kernel']}",
        f"python {m['python']}  uvloop {m['uvloop']}  {m['mosquitto']}",
        f"other load during the run: {100 * others:.0f}% of all CPUs used by other processes,"
        f" {100 * steal:.0f}% stolen by the hypervisor"
        + ("  (WARNING: noisy results)" if others > 0.05 or steal > 0.05 else ""),
    ]
    targets = []
    if "throughput" in only:
        lines += ["", *throughput_section(results, plan)]
        throughput = results.throughput
        for case, n, _ in plan["throughput"]:
            gw = throughput.get(("gateway", case))
            mq = throughput.get(("mosquitto", case))
            ratio = gw["per_cpu_second"] / mq["per_cpu_second"] if gw and mq else None
            what = "messages" if n == 1 else "deliveries"
            label = f"{case} {what} per CPU-second >= {TARGETS[case]:.1f}x mosquitto"
            targets.append(
                f"  {label:<54} {fmt(ratio, '.2f'):>7}  "
                f"{verdict(None if ratio is None else ratio >= TARGETS[case])}"
            )
    if "idle" in only:
        lines += ["", *idle_section(results, plan)]
        for count in plan["idle"]:
            gw = results.idle.get(("gateway", count), {})
            kib = gw.get("kib_per_connection")
            mq_kib = results.idle.get(("mosquitto", count), {}).get("kib_per_connection")
            clients = gw.get("n", count)
            label = f"RSS per idle MQTT connection <= {TARGET_IDLE_KIB:g} KiB ({clients:,} clients)"
            targets.append(
                f"  {label:<54} {fmt(kib, '.2f'):>7}  "
                f"{verdict(None if kib is None else kib <= TARGET_IDLE_KIB)}"
                f"  (mosquitto {fmt(mq_kib, '.2f')})"
            )
    failed = f"; {len(results.failures)} run(s) failed" if results.failures else ""
    lines += [
        "",
        "Targets (gateway; informational)",
        *targets,
        "",
        f"total {elapsed:.0f} s{failed}",
    ]
    for failure in results.failures:
        lines.append(f"  FAILED {failure}")
    return "\n".join(lines)


def throughput_section(results: Results, plan: dict[str, Any]) -> list[str]:
    lines = [
        f"Throughput: QoS 0, 100-byte payloads, bursts of {BURST} PUBLISH; messages delivered"
        f" per broker CPU-second (median of {plan['repeats']})",
        f"{'case':>7} {'msgs':>7} {'gateway/CPU-s':>14} {'mosquitto/CPU-s':>16} {'ratio':>6}"
        f" {'gw msg/s':>10} {'mq msg/s':>10} {'gw CPU':>7} {'mq CPU':>7} {'spread gw/mq':>13}",
    ]
    throughput = results.throughput
    for case, _, messages in plan["throughput"]:
        gw = throughput.get(("gateway", case))
        mq = throughput.get(("mosquitto", case))
        ratio = gw["per_cpu_second"] / mq["per_cpu_second"] if gw and mq else None
        lines.append(
            f"{case:>7} {messages:>7} {fmt(gw and gw['per_cpu_second']):>14}"
            f" {fmt(mq and mq['per_cpu_second']):>16} {fmt(ratio, '.2f'):>6}"
            f" {fmt(gw and gw['per_second']):>10} {fmt(mq and mq['per_second']):>10}"
            f" {fmt(gw and gw['server_cpu'], '.2f'):>6}s"
            f" {fmt(mq and mq['server_cpu'], '.2f'):>6}s"
            f" {fmt(gw and 100 * gw['spread'], '.0f'):>6}%"
            f"/{fmt(mq and 100 * mq['spread'], '.0f')}%"
        )
    lines.append("  broker CPU per delivery, us (user + system from /proc/<pid>/stat, median run):")
    for case, _, _ in plan["throughput"]:
        parts = []
        for kind in SERVERS:
            r = throughput.get((kind, case))
            if r is None:
                parts.append(f"{kind} -")
                continue
            delivered = max(1, r["delivered"])
            parts.append(
                f"{kind} {1e6 * r['server_cpu'] / delivered:.2f}"
                f" ({1e6 * r['server_user_stat'] / delivered:.2f}"
                f" + {1e6 * r['server_sys_stat'] / delivered:.2f})"
            )
        lines.append(f"{case:>7}   " + "   ".join(parts))
    return lines


def idle_section(results: Results, plan: dict[str, Any]) -> list[str]:
    lines = [
        "Idle memory: clients connected (keep-alive 300), one subscription each; broker VmRSS",
        f"{'clients':>8} {'server':>10} {'before MiB':>11} {'after MiB':>10} {'KiB/conn':>9}"
        f" {'connect s':>10}",
    ]
    capped = []
    for count in plan["idle"]:
        for kind in SERVERS:
            r = results.idle.get((kind, count))
            if r is None:
                lines.append(f"{count:>8,} {kind:>10} {'failed':>11}")
                continue
            if r["n"] != count and count not in capped:
                capped.append(count)
            lines.append(
                f"{r['n']:>8,} {kind:>10} {r['rss_before_kib'] / 1024:>11.1f}"
                f" {r['rss_after_kib'] / 1024:>10.1f} {r['kib_per_connection']:>9.2f}"
                f" {r['open_seconds']:>10.1f}"
            )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for count in capped:
        lines.append(
            f"  ({count:,} asked: RLIMIT_NOFILE is {soft:,}/{hard:,} (soft/hard) and may not be"
            " raised here (no CAP_SYS_RESOURCE); the broker keeps "
            f"{FD_HEADROOM} descriptors for itself)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="MQTT benchmark: gateway vs mosquitto")
    parser.add_argument("--quick", action="store_true", help="~40 s smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument(
        "--only",
        choices=["throughput", "idle"],
        action="append",
        help="run only these measurements (repeatable)",
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    only = set(args.only or ["throughput", "idle"])
    mosquitto = mosquitto_binary()
    if mosquitto is None:
        print(MOSQUITTO_MISSING, file=sys.stderr)
        return 2
    limit = raise_nofile(max(plan["idle"]) + FD_HEADROOM)
    load = MachineLoad()
    pin(os.getpid(), LOADGEN_CPU)
    ctx = Context(Path(), secrets.token_urlsafe(32), mosquitto)
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mqtt-bench-") as tmp:
        ctx.logdir = Path(tmp)
        print(f"MQTT benchmark ({mode}); broker logs in {tmp}", file=sys.stderr)
        if "idle" in only:
            for count in plan["idle"]:
                for kind in SERVERS:
                    label = f"{kind} idle C={count:,}"
                    r = attempt(results, label, run_idle, kind, idle_clients(count, limit), ctx)
                    if r:
                        results.idle[(kind, count)] = r
        if "throughput" in only:
            for rep in range(plan["repeats"]):
                for case, n, messages in plan["throughput"]:
                    for kind in SERVERS:
                        label = f"{kind} {case} ({rep + 1}/{plan['repeats']})"
                        r = attempt(results, label, run_throughput, kind, n, messages, ctx)
                        if r:
                            results.runs.setdefault((kind, case), []).append(r)
    elapsed = time.monotonic() - started
    print(report(results, plan, mode, elapsed, load, only, mosquitto))
    if args.json:
        raw = {
            "machine": machine(mosquitto),
            "mode": mode,
            "throughput": [
                {"case": case, **r} for (_, case), runs in results.runs.items() for r in runs
            ],
            "idle": [{"server": k, **r} for (k, _), r in results.idle.items()],
            "failures": results.failures,
        }
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    return 1 if results.failures else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # children were stopped on the way out
        print("interrupted", file=sys.stderr)
        sys.exit(130)
