"""Fan-out benchmark: the gateway against a raw reference server, in one invocation.

    python bench/fanout/run.py           # full run, about 2-3 minutes
    python bench/fanout/run.py --quick   # smoke run, about 30 seconds

For each server (the gateway: `realtime serve`; the reference: bench/reference_server.py)
and each measurement, a fresh server process is started on free 127.0.0.1 ports (pinned to
one CPU) and bench/fanout/loadgen.py runs against it (pinned to another):

- throughput: N subscribers, one publisher, bursts of 50 publishes of 100 bytes; delivered
  messages per server CPU-second (user + system time of the server process over the
  publish phase only, read at ns resolution from /proc/<pid>/task/*/schedstat; the tick
  based utime+stime of /proc/<pid>/stat is kept in the --json output);
- latency: 20,000 deliveries/s as 100 subscribers x 200 publishes/s and as 1,000 x 20;
  p50/p99 in ms (the loadgen timestamps each payload and every subscriber decodes it);
- idle: C connected and subscribed clients; server RSS growth per connection in KiB.

It prints one table with gateway/reference ratios and the targets. Exit code 0 unless a
run crashed; every child process is stopped by PID before exiting.
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
import secrets
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
REFERENCE = HERE.parent / "reference_server.py"
GATEWAY_CONFIG = HERE / "gateway.toml"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Children need the `realtime` package: this interpreter, or the repository's virtualenv.
PYTHON = sys.executable
if importlib.util.find_spec("realtime") is None and (REPO / ".venv/bin/python").exists():
    PYTHON = str(REPO / ".venv/bin/python")
SERVERS = ("gateway", "reference")

# (subscribers, messages) per throughput run, each repeated `repeats` times (the median
# counts); latency (subscribers, publishes per second, seconds); idle connections.
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "throughput": [(100, 10_000), (1000, 1_000), (5000, 200)],
        "repeats": 3,
        "latency": [(100, 200.0, 5.0), (1000, 20.0, 5.0)],
        "idle": 10_000,
    },
    "quick": {
        "throughput": [(100, 2_000), (1000, 300)],
        "repeats": 1,
        "latency": [(100, 200.0, 3.0), (1000, 20.0, 3.0)],
        "idle": 2_000,
    },
}
BURST = 50
TARGET_RATIO_N = 1000
TARGET_RATIO = 1.0
TARGET_P99_MS = 5.0
TARGET_IDLE_KIB = 10.0


# ----------------------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process, all threads, in seconds.

    The scheduler's runtime from /proc/<pid>/task/*/schedstat (nanoseconds): utime + stime
    in /proc/<pid>/stat are this same total, but in 10 ms ticks, too coarse for a gateway
    run that costs half a second. Falls back to /proc/<pid>/stat.
    """
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        if total:
            return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    return stat_cpu_seconds(pid)


def stat_user_system(pid: int) -> tuple[float, float]:
    """utime and stime from /proc/<pid>/stat (all threads), in seconds (tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def stat_cpu_seconds(pid: int) -> float:
    return sum(stat_user_system(pid))


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
    minus the CPU time of this process and its (reaped) children. Other processes on a
    2-core machine make every number here noisy, so the report says when there were any."""

    def __init__(self) -> None:
        self.stat0 = self._stat()
        self.ours0 = self._ours()

    @staticmethod
    def _stat() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]

    @staticmethod
    def _ours() -> float:
        import resource

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
        total_seconds = total / CLK_TCK
        return max(0.0, busy - ours) / total_seconds, delta[7] / total


CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, LOADGEN_CPU = 0, 1  # indexes into CPUS


def pin(pid: int, which: int) -> None:
    """Pin to the first (server) or second (load generator, orchestrator) usable CPU, so
    that the server has a core to itself; nothing is pinned on a single-CPU machine."""
    if len(CPUS) >= 2:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {CPUS[which]})


def raise_nofile() -> None:
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# ----------------------------------------------------------------------------- processes


class ServerProcess:
    """One server process on free ports; stopped with SIGTERM (then SIGKILL) by PID."""

    def __init__(self, kind: str, logdir: Path, secret: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.secret = secret
        self.log_path = logdir / f"{kind}-{self.port}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
        env["PYTHONUNBUFFERED"] = "1"
        if kind == "gateway":
            cmd = [PYTHON, "-m", "realtime", "serve", "--config", str(GATEWAY_CONFIG)]
            env.update(
                REALTIME_SERVER__PORT=str(self.port),
                REALTIME_API__PORT=str(free_port()),
                REALTIME_AUTH__HMAC_SECRET=secret,
                REALTIME_API__KEY=secrets.token_urlsafe(24),
            )
            self.banner = "ws://"
        else:
            cmd = [PYTHON, str(REFERENCE), "--port", str(self.port)]
            self.banner = "listening"
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

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start:\n{self.log_text()}")
            if self.banner in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.kind} not ready after {timeout}s:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

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
    """bench/fanout/loadgen.py with the READY/GO/DONE/result line protocol."""

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
    runs: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    latency: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    idle: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> dict[tuple[str, int], dict[str, Any]]:
        """The median run (by deliveries per CPU-second) of each (server, N)."""
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


def with_server(kind: str, logdir: Path, secret: str, body: Body) -> dict[str, Any]:
    server = ServerProcess(kind, logdir, secret)
    loadgen: LoadGenProcess | None = None
    try:
        server.wait_ready()

        def spawn(mode: str, options: list[str]) -> LoadGenProcess:
            nonlocal loadgen
            loadgen = LoadGenProcess(server, mode, options)
            return loadgen

        result: dict[str, Any] = body(server, spawn)
        if server.proc.poll() is not None:
            raise RuntimeError(f"{kind} died during the run:\n{server.log_text()}")
        return result
    finally:
        if loadgen is not None:
            loadgen.stop()
        server.stop()


def run_throughput(kind: str, n: int, messages: int, logdir: Path, secret: str) -> dict[str, Any]:
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
        return result

    return with_server(kind, logdir, secret, body)


def run_latency(
    kind: str, n: int, rate: float, seconds: float, logdir: Path, secret: str
) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        lg = spawn("latency", ["-n", str(n), "--rate", str(rate), "--duration", str(seconds)])
        lg.expect("READY", 120)
        cpu0, (user0, sys0) = cpu_seconds(server.pid), stat_user_system(server.pid)
        lg.go()
        lg.expect("DONE", 150)
        cpu = cpu_seconds(server.pid) - cpu0
        user1, sys1 = stat_user_system(server.pid)
        result = lg.result()
        result.update(server_cpu=cpu, server_user_stat=user1 - user0, server_sys_stat=sys1 - sys0)
        return result

    return with_server(kind, logdir, secret, body)


def run_idle(kind: str, count: int, logdir: Path, secret: str) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        time.sleep(0.5)
        before = rss_kib(server.pid)
        lg = spawn("idle", ["-n", str(count), "--batch", "500"])
        lg.expect("READY", 150)
        time.sleep(1.0)  # let the server finish any work triggered by the last connections
        after = rss_kib(server.pid)
        lg.go()
        lg.expect("DONE", 60)
        result = lg.result()
        result.update(
            rss_before_kib=before,
            rss_after_kib=after,
            kib_per_connection=(after - before) / count,
        )
        return result

    return with_server(kind, logdir, secret, body)


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


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": version("uvloop"),
        "websockets": version("websockets"),
        "protobuf": version("protobuf"),
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
) -> str:
    m = machine()
    others, steal = load.summary()
    lines = [
        f"Fan-out benchmark ({mode})  {m['date']}",
        f"machine: nproc={m['nproc']}  cpu={m['cpu']}  kernel={m['kernel']}",
        f"python {m['python']}  uvloop {m['uvloop']}  websockets {m['websockets']}  "
        f"protobuf {m['protobuf']}",
        f"other load during the run: {100 * others:.0f}% of all CPUs used by other processes,"
        f" {100 * steal:.0f}% stolen by the hypervisor"
        + ("  (WARNING: noisy results)" if others > 0.05 or steal > 0.05 else ""),
    ]
    targets = []
    if "throughput" in only:
        lines += ["", *throughput_section(results, plan)]
        gw = results.throughput.get(("gateway", TARGET_RATIO_N))
        ref = results.throughput.get(("reference", TARGET_RATIO_N))
        ratio = gw["per_cpu_second"] / ref["per_cpu_second"] if gw and ref else None
        label = f"throughput ratio gateway/reference at N={TARGET_RATIO_N:,} >= {TARGET_RATIO:.1f}"
        targets.append(
            f"  {label:<52} {fmt(ratio, '.2f'):>7}  "
            f"{verdict(None if ratio is None else ratio >= TARGET_RATIO)}"
        )
    if "latency" in only:
        lines += ["", *latency_section(results, plan)]
        for n, rate, _ in plan["latency"]:
            p99 = results.latency.get(("gateway", n), {}).get("p99_ms")
            ref_p99 = results.latency.get(("reference", n), {}).get("p99_ms")
            label = f"latency p99, N={n:,} at {rate * n:,.0f} deliveries/s, < {TARGET_P99_MS:g} ms"
            targets.append(
                f"  {label:<52} {fmt(p99, '.2f'):>7}  "
                f"{verdict(None if p99 is None else p99 < TARGET_P99_MS)}"
                f"  (reference {fmt(ref_p99, '.2f')})"
            )
    if "idle" in only:
        lines += ["", *idle_section(results, plan)]
        kib = results.idle.get("gateway", {}).get("kib_per_connection")
        label = f"RSS per idle connection <= {TARGET_IDLE_KIB:g} KiB"
        targets.append(
            f"  {label:<52} {fmt(kib, '.2f'):>7}  "
            f"{verdict(None if kib is None else kib <= TARGET_IDLE_KIB)}"
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
        f"Throughput: 100-byte publications in bursts of {BURST}; delivered messages per "
        f"server CPU-second (median of {plan['repeats']})",
        f"{'N':>6} {'msgs':>6} {'gateway/CPU-s':>14} {'reference/CPU-s':>16} {'ratio':>6}"
        f" {'gw msg/s':>10} {'ref msg/s':>10} {'gw CPU':>7} {'ref CPU':>7} {'spread gw/ref':>14}",
    ]
    throughput = results.throughput
    for n, messages in plan["throughput"]:
        gw = throughput.get(("gateway", n))
        ref = throughput.get(("reference", n))
        ratio = gw["per_cpu_second"] / ref["per_cpu_second"] if gw and ref else None
        lines.append(
            f"{n:>6} {messages:>6} {fmt(gw and gw['per_cpu_second']):>14}"
            f" {fmt(ref and ref['per_cpu_second']):>16} {fmt(ratio, '.2f'):>6}"
            f" {fmt(gw and gw['per_second']):>10} {fmt(ref and ref['per_second']):>10}"
            f" {fmt(gw and gw['server_cpu'], '.2f'):>6}s"
            f" {fmt(ref and ref['server_cpu'], '.2f'):>6}s"
            f" {fmt(gw and 100 * gw['spread'], '.0f'):>7}%"
            f"/{fmt(ref and 100 * ref['spread'], '.0f')}%"
        )
        for r in (gw, ref):
            if r and r["delivered"] != r["expected"]:
                lines.append(
                    f"{'':>6} ! {r['server']}: delivered {r['delivered']:,} of {r['expected']:,}"
                )
    return lines


def latency_section(results: Results, plan: dict[str, Any]) -> list[str]:
    lines = [
        "Latency: publish -> subscriber receive, ms, at a fixed rate (one publication per"
        " loop tick: nothing to coalesce)",
        f"{'N':>6} {'pub/s':>6} {'server':>10} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7}"
        f" {'lost':>6} {'CPU %':>6} {'CPU us/delivery':>16} {'(user + sys)':>13}",
    ]
    for n, rate, _ in plan["latency"]:
        for kind in SERVERS:
            r = results.latency.get((kind, n))
            if r is None:
                lines.append(f"{n:>6} {rate:>6g} {kind:>10} {'failed':>7}")
                continue
            delivered = max(1, r["delivered"])
            lines.append(
                f"{n:>6} {rate:>6g} {kind:>10} {r['p50_ms']:>7.2f} {r['p90_ms']:>7.2f}"
                f" {r['p99_ms']:>7.2f} {r['max_ms']:>7.2f} {r['lost']:>6}"
                f" {100 * r['server_cpu'] / r['elapsed']:>6.0f}"
                f" {1e6 * r['server_cpu'] / delivered:>16.1f}"
                f" {1e6 * r['server_user_stat'] / delivered:>6.1f} +"
                f" {1e6 * r['server_sys_stat'] / delivered:>4.1f}"
            )
        gw, ref = results.latency.get(("gateway", n)), results.latency.get(("reference", n))
        if gw and ref and gw["server_cpu"] > 0 and ref["server_cpu"] > 0:
            unbatched = (gw["delivered"] / gw["server_cpu"]) / (
                ref["delivered"] / ref["server_cpu"]
            )
            lines.append(
                f"{'':>6} deliveries per CPU-second, gateway/reference, nothing to coalesce:"
                f" {unbatched:.2f}"
            )
    return lines


def idle_section(results: Results, plan: dict[str, Any]) -> list[str]:
    lines = [
        f"Idle memory: {plan['idle']:,} connected + subscribed clients; server RSS (VmRSS)",
        f"{'server':>10} {'before MiB':>11} {'after MiB':>10} {'KiB/conn':>9}",
    ]
    for kind in SERVERS:
        r = results.idle.get(kind)
        if r is None:
            lines.append(f"{kind:>10} {'failed':>11}")
            continue
        lines.append(
            f"{kind:>10} {r['rss_before_kib'] / 1024:>11.1f} {r['rss_after_kib'] / 1024:>10.1f}"
            f" {r['kib_per_connection']:>9.2f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="fan-out benchmark: gateway vs reference")
    parser.add_argument("--quick", action="store_true", help="~30 s smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument(
        "--only",
        choices=["throughput", "latency", "idle"],
        action="append",
        help="run only these measurements (repeatable)",
    )
    parser.add_argument(
        "--latency-n",
        type=int,
        metavar="N",
        help="latency run with N subscribers instead of 1,000, at the same 20,000 "
        "deliveries/s (the publish rate becomes 20,000/N)",
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = dict(PLANS[mode])
    if args.latency_n:
        _, _, seconds = plan["latency"][0]
        plan["latency"] = [(args.latency_n, 20_000 / args.latency_n, seconds)]
    only = set(args.only or ["throughput", "latency", "idle"])
    raise_nofile()
    load = MachineLoad()
    pin(os.getpid(), LOADGEN_CPU)
    secret = secrets.token_urlsafe(32)
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fanout-bench-") as tmp:
        logdir = Path(tmp)
        print(f"fan-out benchmark ({mode}); server logs in {logdir}", file=sys.stderr)
        if "idle" in only:
            for kind in SERVERS:
                r = attempt(
                    results,
                    f"{kind} idle C={plan['idle']:,}",
                    run_idle,
                    kind,
                    plan["idle"],
                    logdir,
                    secret,
                )
                if r:
                    results.idle[kind] = r
        if "throughput" in only:
            for rep in range(plan["repeats"]):
                for n, messages in plan["throughput"]:
                    for kind in SERVERS:
                        label = f"{kind} throughput N={n:,} ({rep + 1}/{plan['repeats']})"
                        r = attempt(
                            results, label, run_throughput, kind, n, messages, logdir, secret
                        )
                        if r:
                            results.runs.setdefault((kind, n), []).append(r)
        for n, rate, seconds in plan["latency"] if "latency" in only else []:
            for kind in SERVERS:
                r = attempt(
                    results,
                    f"{kind} latency N={n:,}",
                    run_latency,
                    kind,
                    n,
                    rate,
                    seconds,
                    logdir,
                    secret,
                )
                if r:
                    results.latency[(kind, n)] = r
    elapsed = time.monotonic() - started
    print(report(results, plan, mode, elapsed, load, only))
    if args.json:
        raw = {
            "machine": machine(),
            "mode": mode,
            "throughput": [r for runs in results.runs.values() for r in runs],
            "latency": [{"server": k, "n": n, **r} for (k, n), r in results.latency.items()],
            "idle": results.idle,
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
