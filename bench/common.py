"""What the benchmarks in bench/*/run.py and their load generators have in common.

The orchestrators (run.py) and the load generators (loadgen.py) are scripts, not a package:
each puts bench/ on sys.path and imports this module. The orchestrator side uses only the
standard library (a benchmark may be started with a Python that lacks the project's
dependencies: the children then use the repository's virtualenv); the load generator side
imports PyJWT only when it mints a token.

Orchestrator side: reading a process's CPU time and RSS from /proc, the other load on the
machine, CPU pinning and descriptor limits, server and load generator processes (started on
free ports, stopped by PID) with the READY/GO/DONE line protocol between them, the
measurements both benchmarks make (throughput per server CPU-second, RSS per idle
connection), medians of repeats, and the parts of the report that look the same; for the
Redis broker, a throwaway redis-server and the deltas of its INFO counters.

Load generator side: that protocol seen from the other end, the timed publish bursts and the
idle mode, the result line, the common command-line options, and JWTs for bench clients.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import operator
import os
import platform
import queue
import resource
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Generic, NoReturn, Protocol, TypeVar

from realtime.protocol.framing import encode_varint  # stdlib only: cheap for orchestrators

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Children need the `realtime` package: this interpreter, or the repository's virtualenv.
PYTHON = sys.executable
if importlib.util.find_spec("realtime") is None and (REPO / ".venv/bin/python").exists():
    PYTHON = str(REPO / ".venv/bin/python")


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
    return sum(stat_user_system(pid))


def stat_user_system(pid: int) -> tuple[float, float]:
    """utime and stime from /proc/<pid>/stat (all threads), in seconds (tick resolution)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def rss_kib(pid: int) -> int:
    """Resident memory (VmRSS) of a process in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


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


# ----------------------------------------------------------------------------- machine setup


CPUS = sorted(os.sched_getaffinity(0))
SERVER_CPU, LOADGEN_CPU = 0, 1  # indexes into CPUS


def pin(pid: int, which: int) -> None:
    """Pin to the first (server) or second (load generator, orchestrator) usable CPU, so
    that the server has a core to itself; nothing is pinned on a single-CPU machine."""
    if len(CPUS) >= 2:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {CPUS[which]})


def raise_nofile(want: int | None = None) -> int:
    """Raise this process's descriptor limit (inherited by its children), since every
    benchmark client holds a socket: to `want` when allowed (root may raise the hard limit
    too), else, or without `want`, to the hard limit. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want is None:
        want = hard
    if soft >= want:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, so that runs never collide."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- processes


def server_env() -> dict[str, str]:
    """This environment for a server: unbuffered output (the log shows when it is ready)
    and no REALTIME_* settings of our own shell leaking into the gateway's config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def gateway_command(config: Path, secret: str, **ports: int) -> tuple[list[str], dict[str, str]]:
    """`realtime serve` with a benchmark's config: the listeners named in `ports` on those
    ports (SERVER=... sets REALTIME_SERVER__PORT), the admin API on a free port, tokens
    checked with the run's HMAC secret, and a throwaway API key."""
    env = server_env()
    env.update({f"REALTIME_{name}__PORT": str(port) for name, port in ports.items()})
    env.update(
        REALTIME_API__PORT=str(free_port()),
        REALTIME_AUTH__HMAC_SECRET=secret,
        REALTIME_API__KEY=secrets.token_urlsafe(24),
    )
    return [PYTHON, "-m", "realtime", "serve", "--config", str(config)], env


class ServerProcess:
    """One server process on a free 127.0.0.1 port, pinned to the server CPU, its output in
    a log file; stopped with SIGTERM (then SIGKILL) by PID.

    A subclass says how to start it (`command`) and may set `banner`: the log text that
    means it is ready; without one it is ready when its port accepts connections.
    """

    banner: str | None = None

    def __init__(self, kind: str, logdir: Path, secret: str) -> None:
        self.kind = kind
        self.port = free_port()
        self.secret = secret
        self.logdir = logdir
        self.log_path = logdir / f"{kind}-{self.port}.log"
        cmd, env = self.command()
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

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment of this server (`self.port` is chosen)."""
        raise NotImplementedError

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
        """The end of the server's output, for error messages."""
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
    """A load generator script (pinned to the other CPU) against `server`, driven with the
    READY/GO/DONE/result line protocol; killed by PID in stop()."""

    def __init__(self, script: Path, server: ServerProcess, mode: str, options: list[str]) -> None:
        cmd = [
            PYTHON,
            str(script),
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


Spawn = Callable[[str, list[str]], LoadGenProcess]
Body = Callable[[ServerProcess, Spawn], dict[str, Any]]


def with_server(server: ServerProcess, loadgen: Path, body: Body) -> dict[str, Any]:
    """Run `body` once `server` is ready, with a `spawn(mode, options)` that starts the
    `loadgen` script against it; afterwards every process is stopped, whatever happened.
    A server that died during the run fails it."""
    loadgens: list[LoadGenProcess] = []
    try:
        server.wait_ready()

        def spawn(mode: str, options: list[str]) -> LoadGenProcess:
            process = LoadGenProcess(loadgen, server, mode, options)
            loadgens.append(process)
            return process

        result: dict[str, Any] = body(server, spawn)
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.kind} died during the run:\n{server.log_text()}")
        return result
    finally:
        for process in loadgens:
            process.stop()
        server.stop()


def measured_phase(server: ServerProcess, loadgen: LoadGenProcess) -> dict[str, Any]:
    """GO to a READY load generator; its result once DONE, with the server's CPU time over
    that phase only (server_cpu from schedstat; the tick-based user/system split from
    /proc/<pid>/stat as server_user_stat and server_sys_stat)."""
    cpu0, (user0, sys0) = cpu_seconds(server.pid), stat_user_system(server.pid)
    loadgen.go()
    loadgen.expect("DONE", 150)
    cpu = cpu_seconds(server.pid) - cpu0
    user1, sys1 = stat_user_system(server.pid)
    result = loadgen.result()
    result.update(server_cpu=cpu, server_user_stat=user1 - user0, server_sys_stat=sys1 - sys0)
    return result


def measure_throughput(
    server: ServerProcess, spawn: Spawn, n: int, messages: int, burst: int
) -> dict[str, Any]:
    """The loadgen's throughput mode (n subscribers, `messages` publishes in bursts), with
    deliveries per server CPU-second and per second added."""
    lg = spawn("throughput", ["-n", str(n), "--messages", str(messages), "--burst", str(burst)])
    lg.expect("READY", 120)
    result = measured_phase(server, lg)
    cpu = result["server_cpu"]
    result["per_cpu_second"] = result["delivered"] / cpu if cpu > 0 else math.nan
    result["per_second"] = result["delivered"] / result["elapsed"]
    return result


def measure_idle(
    server: ServerProcess, spawn_all: Callable[[], list[LoadGenProcess]]
) -> tuple[int, int, list[dict[str, Any]]]:
    """The server's RSS (KiB) before the load generators from `spawn_all` connect their idle
    clients and once they all are READY, and the load generators' results."""
    time.sleep(0.5)
    before = rss_kib(server.pid)
    loadgens = spawn_all()
    for lg in loadgens:
        lg.expect("READY", 150)
    time.sleep(1.0)  # let the server finish any work triggered by the last connections
    after = rss_kib(server.pid)
    for lg in loadgens:
        lg.go()
    for lg in loadgens:
        lg.expect("DONE", 60)
    return before, after, [lg.result() for lg in loadgens]


def attempt(failures: list[str], label: str, fn: Any, *args: Any) -> dict[str, Any] | None:
    """fn(*args), timed on stderr; a failure is noted in `failures` (and None returned) so
    that the other runs still happen."""
    start = time.monotonic()
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    try:
        result: dict[str, Any] = fn(*args)
    except Exception as exc:  # report, go on with the other runs
        print(f" FAILED ({exc})", file=sys.stderr, flush=True)
        failures.append(f"{label}: {exc}")
        return None
    print(f" {time.monotonic() - start:.1f}s", file=sys.stderr, flush=True)
    return result


K = TypeVar("K")


def medians(runs: dict[K, list[dict[str, Any]]]) -> dict[K, dict[str, Any]]:
    """The median run (by deliveries per CPU-second; the lower one of an even count) of each
    key, with `repeats` and `spread` ((max - min) / median: how far to trust it) added."""
    out = {}
    for key, repeats in runs.items():
        ordered = sorted(repeats, key=lambda r: r["per_cpu_second"])
        median = dict(ordered[(len(ordered) - 1) // 2])
        median["repeats"] = len(repeats)
        median["spread"] = (ordered[-1]["per_cpu_second"] - ordered[0]["per_cpu_second"]) / median[
            "per_cpu_second"
        ]
        out[key] = median
    return out


# ----------------------------------------------------------------------------- report


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def machine(*packages: str) -> dict[str, str]:
    """What the numbers were measured on: date, CPU, kernel, Python and `packages`' versions."""
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **{name: package_version(name) for name in packages},
    }


def fmt(value: Any, spec: str = ",.0f") -> str:
    """A table cell: `value` formatted, or "-" for a missing (None, NaN) one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "<": operator.lt,
}


def target_line(
    label: str, width: int, value: float | None, compare: str, target: float, note: str = ""
) -> str:
    """One row of the targets: label, measured value, PASS when `value compare target` holds,
    MISS when not, "-" when not measured."""
    ok = None if value is None else COMPARE[compare](value, target)
    return f"  {label:<{width}} {fmt(value, '.2f'):>7}  {verdict(ok)}{note}"


def report_header(title: str, m: dict[str, str], software: str, load: MachineLoad) -> list[str]:
    """Title, machine, software versions and how noisy the machine was."""
    others, steal = load.summary()
    return [
        title,
        f"machine: nproc={m['nproc']}  cpu={m['cpu']}  kernel={m['kernel']}",
        software,
        f"other load during the run: {100 * others:.0f}% of all CPUs used by other processes,"
        f" {100 * steal:.0f}% stolen by the hypervisor"
        + ("  (WARNING: noisy results)" if others > 0.05 or steal > 0.05 else ""),
    ]


def report_footer(targets: list[str], elapsed: float, failures: list[str]) -> list[str]:
    """The targets, the total time and the runs that failed."""
    failed = f"; {len(failures)} run(s) failed" if failures else ""
    lines = [
        "",
        "Targets (gateway; informational)",
        *targets,
        "",
        f"total {elapsed:.0f} s{failed}",
    ]
    lines += [f"  FAILED {failure}" for failure in failures]
    return lines


# ----------------------------------------------------------------------------- command line


def orchestrator_parser(
    description: str, quick_help: str, measurements: Sequence[str]
) -> argparse.ArgumentParser:
    """The options every run.py has: --quick, --json PATH, --only MEASUREMENT."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument(
        "--only",
        choices=list(measurements),
        action="append",
        help="run only these measurements (repeatable)",
    )
    return parser


def run_script(main: Callable[[], int]) -> NoReturn:
    """Exit with main()'s code, or 130 on Ctrl-C (children are stopped on the way out)."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


# ----------------------------------------------------------------------------- load generators


def mint_token(secret: str, user: str, **claims: object) -> str:
    """An HS256 JWT for a bench client, valid for an hour, with extra `claims`."""
    import jwt  # here: the orchestrators import this module and may run without PyJWT

    payload = {"sub": user, "exp": int(time.time()) + 3600, **claims}
    return jwt.encode(payload, secret, "HS256")


class Stats:
    """Deliveries counted by all clients of a load generator, and the errors they saw."""

    def __init__(self) -> None:
        self.delivered = 0
        self.target = 0
        self.reached: asyncio.Event | None = None
        self.errors: list[str] = []

    def arm(self, target: int) -> asyncio.Event:
        """An event set once `target` deliveries have been counted."""
        self.target = target
        self.reached = asyncio.Event()
        if self.delivered >= target:
            self.reached.set()
        return self.reached


class BenchClient(Protocol):
    """What LoadGenBase needs of a client connection."""

    closing: bool
    transport: asyncio.Transport | None


C = TypeVar("C", bound=BenchClient)


class LoadGenBase(Generic[C]):
    """A load generator's modes share the orchestrator handshake, the timed bursts, the idle
    mode and the result line; subclasses open the clients (`open_idle` for the idle mode).
    A mode is the coroutine method named like it."""

    def __init__(self, args: argparse.Namespace, stats: Stats) -> None:
        self.args = args
        self.stats = stats
        self.loop = asyncio.get_running_loop()
        self.clients: list[C] = []
        self.publishers: list[C] = []

    async def handshake_with_orchestrator(self) -> None:
        print("READY", flush=True)
        line = await self.loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "GO":
            raise RuntimeError(f"expected GO from the orchestrator, got {line!r}")

    def close_all(self) -> None:
        for client in self.clients + self.publishers:
            client.closing = True
            if client.transport is not None:
                client.transport.abort()

    async def timed_bursts(self, publisher: C, burst: bytes, *, own_cpu: bool) -> dict[str, object]:
        """The measured phase of the throughput mode, from GO to DONE: --messages publishes,
        as bursts of --burst written back to back, each once the previous one has reached
        all -n subscribers. With `own_cpu`, the result has this process's CPU time too."""
        args, stats = self.args, self.stats
        bursts = max(1, args.messages // args.burst)
        per_burst = args.n * args.burst
        assert publisher.transport is not None
        await self.handshake_with_orchestrator()
        start = time.perf_counter()
        cpu0 = time.process_time()
        timeouts = 0
        for i in range(bursts):
            reached = stats.arm((i + 1) * per_burst)
            publisher.transport.write(burst)
            try:
                await asyncio.wait_for(reached.wait(), args.burst_timeout)
            except TimeoutError:
                timeouts += 1
                break
        elapsed = time.perf_counter() - start
        loadgen_cpu = time.process_time() - cpu0
        print("DONE", flush=True)
        sent = bursts * args.burst
        result: dict[str, object] = {
            "mode": "throughput",
            "n": args.n,
            "messages": sent,
            "expected": sent * args.n,
            "delivered": stats.delivered,
            "elapsed": elapsed,
        }
        if own_cpu:
            result["loadgen_cpu"] = loadgen_cpu
        result["timeouts"] = timeouts
        return result

    async def open_idle(self) -> None:
        """Open the idle mode's -n clients into self.clients."""
        raise NotImplementedError

    async def idle(self) -> dict[str, object]:
        start = time.perf_counter()
        await self.open_idle()
        opened = time.perf_counter() - start
        await self.handshake_with_orchestrator()
        alive = sum(1 for c in self.clients if c.transport is not None)
        print("DONE", flush=True)
        return {"mode": "idle", "n": self.args.n, "alive": alive, "open_seconds": opened}

    async def run(self) -> None:
        """The mode named on the command line, within --deadline; then every connection is
        closed and the result printed as one JSON line, with the errors seen."""
        result: dict[str, object]
        try:
            async with asyncio.timeout(self.args.deadline):
                result = await getattr(self, self.args.mode)()
        finally:
            self.close_all()
        result["server"] = self.args.server
        result["errors"] = self.stats.errors[:5]
        result["error_count"] = len(self.stats.errors)
        print(json.dumps(result), flush=True)


def loadgen_parser(
    description: str, modes: Sequence[str], servers: Sequence[str], secret_help: str
) -> argparse.ArgumentParser:
    """A load generator's first options: mode, server kind, address and token secret (the
    orchestrator passes it in $BENCH_HMAC_SECRET, not on the command line)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("mode", choices=list(modes))
    parser.add_argument("--server", choices=list(servers), required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--secret", default=os.environ.get("BENCH_HMAC_SECRET", ""), help=secret_help
    )
    return parser


# ----------------------------------------------------------------------------- WebSocket clients
# The pieces of the hand-written protobuf WebSocket clients (bench/fanout, bench/delta): a
# varint-delimited message, a masked client frame, the HTTP upgrade and its answer.

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def delimited(message: bytes) -> bytes:
    """One message as realtime.v1.proto frames carry it: its length as a varint, then it."""
    return encode_varint(len(message)) + message


def client_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    """A masked client frame (RFC 6455 5.3: a fresh random key per frame)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    if n:
        mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")
    return header + key + payload


def ws_upgrade_request(host: str, port: int, path: str, subprotocol: str) -> tuple[bytes, bytes]:
    """(the HTTP upgrade request, its Sec-WebSocket-Key) for a client of `subprotocol`."""
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: " + key.decode() + "\r\n"
        f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {subprotocol}\r\n\r\n"
    ).encode()
    return request, key


def ws_upgrade_error(response: bytes, key: bytes, subprotocol: str) -> str | None:
    """Why the server's answer (up to the blank line) to an upgrade with `key` is not a
    switch to `subprotocol`; None when it is."""
    lines = response.decode("latin-1").split("\r\n")
    pairs = (line.partition(":") for line in lines[1:])
    headers = {k.strip().lower(): v.strip() for k, _, v in pairs}
    expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
    if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != expected:
        return f"handshake refused: {lines[0]}"
    if headers.get("sec-websocket-protocol") != subprotocol:
        return f"server did not select {subprotocol}"
    return None


def add_timeouts(parser: argparse.ArgumentParser) -> None:
    """A load generator's last options: how long a step, a burst and the whole run may take."""
    parser.add_argument("--step-timeout", type=float, default=20.0)
    parser.add_argument("--burst-timeout", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=150.0, help="hard limit, seconds")


# ----------------------------------------------------------------------------- Redis
# A throwaway redis-server for the benchmarks of the Redis broker, and what they read of
# it, with the standard library only (bench/cluster and bench/poll share them).

REDIS_INFO_REQUEST = ("INFO", "stats", "commandstats")
REDIS_COUNTERS = ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes")


def redis_broker_env(port: int, key_prefix: str) -> dict[str, str]:
    """The REALTIME_BROKER__* variables of a gateway on the Redis broker at `port`."""
    return {
        "REALTIME_BROKER__TYPE": "redis",
        "REALTIME_BROKER__REDIS_URLS": f'["redis://127.0.0.1:{port}/0"]',
        "REALTIME_BROKER__KEY_PREFIX": key_prefix,
    }


class RedisServer(ServerProcess):
    """A throwaway redis-server: loopback only, no persistence (no RDB, no AOF), pinned to
    the server CPU like the gateway; ready once it answers PING."""

    def command(self) -> tuple[list[str], dict[str, str]]:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        workdir = self.logdir / f"redis-{self.port}"
        workdir.mkdir(exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(workdir), "--loglevel", "warning"]
        return [binary, *args], server_env()

    def _ready(self) -> bool:
        try:
            return bool(redis_command(self.port, "PING") == "PONG")
        except OSError:
            return False


def redis_version() -> str:
    """The installed redis-server's version, or "-"."""
    binary = shutil.which("redis-server")
    if binary is None:
        return "-"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    return next((w[2:] for w in out.split() if w.startswith("v=")), "-")


def redis_command(port: int, *args: str) -> Any:
    """One command on a fresh connection to 127.0.0.1:`port` (RESP2)."""
    request = f"*{len(args)}\r\n".encode()
    for arg in args:
        data = arg.encode()
        request += b"$%d\r\n%s\r\n" % (len(data), data)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        with sock.makefile("rb") as f:
            return read_redis_reply(f)


def read_redis_reply(f: Any) -> Any:
    """One RESP2 reply from a binary file: str, int, None or a list of them."""
    line = f.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"redis: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind == b"*":
        return [read_redis_reply(f) for _ in range(int(rest))]
    raise RuntimeError(f"redis: unexpected reply {line!r}")


def redis_snapshot(port: int) -> dict[str, Any]:
    """The counters of `INFO stats` and the calls of each command from `INFO
    commandstats`, with the size of this snapshot's own reply."""
    text = redis_command(port, *REDIS_INFO_REQUEST)
    stats: dict[str, Any] = {"calls": {}, "reply_bytes": len(text) + len(str(len(text))) + 5}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.startswith("cmdstat_"):
            fields = dict(item.split("=", 1) for item in value.split(","))
            stats["calls"][name[len("cmdstat_") :]] = int(fields["calls"])
        elif name in REDIS_COUNTERS:
            stats[name] = int(value)
    return stats


def redis_delta(
    before: dict[str, Any], after: dict[str, Any], own: Sequence[str] = ("info",)
) -> dict[str, Any]:
    """What Redis did between two snapshots, without the snapshots themselves: the calls
    of each command (Redis 7 counts the calls a script makes too) but those in `own` (the
    benchmark's), their sum, and the bytes in and out (the first snapshot's reply is in
    the output bytes, the second one's request in the input bytes)."""
    calls = {
        name: count - before["calls"].get(name, 0)
        for name, count in after["calls"].items()
        if name not in own and count > before["calls"].get(name, 0)
    }
    request_bytes = 4 + sum(len(str(len(a))) + len(a) + 5 for a in REDIS_INFO_REQUEST)
    return {
        "commands": sum(calls.values()),
        "calls": calls,
        "bytes_in": after["total_net_input_bytes"]
        - before["total_net_input_bytes"]
        - request_bytes,
        "bytes_out": after["total_net_output_bytes"]
        - before["total_net_output_bytes"]
        - before["reply_bytes"],
    }
