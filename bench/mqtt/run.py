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

import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A script, not a package module: bench/ goes on the path for the shared bench/common.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    LOADGEN_CPU,
    LoadGenProcess,
    MachineLoad,
    ServerProcess,
    Spawn,
    attempt,
    fmt,
    free_port,
    gateway_command,
    machine,
    measure_idle,
    measure_throughput,
    medians,
    orchestrator_parser,
    pin,
    raise_nofile,
    report_footer,
    report_header,
    run_script,
    server_env,
    target_line,
    with_server,
)

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
GATEWAY_CONFIG = HERE / "gateway.toml"
SERVERS = ("gateway", "mosquitto")
MEASUREMENTS = ("throughput", "idle")

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


# ----------------------------------------------------------------------------- setup


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


class Broker(ServerProcess):
    """The gateway (`realtime serve` with bench/mqtt/gateway.toml) or mosquitto."""

    def __init__(self, kind: str, logdir: Path, secret: str, mosquitto: str | None) -> None:
        self.mosquitto = mosquitto
        super().__init__(kind, logdir, secret)

    def command(self) -> tuple[list[str], dict[str, str]]:
        if self.kind == "gateway":
            self.banner = f"mqtt://127.0.0.1:{self.port}"
            return gateway_command(GATEWAY_CONFIG, self.secret, MQTT=self.port, SERVER=free_port())
        assert self.mosquitto is not None
        conf = self.logdir / f"mosquitto-{self.port}.conf"
        self.broker_log = self.logdir / f"mosquitto-{self.port}.broker.log"
        # As root, mosquitto switches to the `mosquitto` user, which may not write the
        # log in our private temp dir: stay root (loopback only, for a few seconds).
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(MOSQUITTO_CONF.format(port=self.port, log=self.broker_log, user=user))
        return [self.mosquitto, "-c", str(conf)], server_env()  # ready when the port accepts

    def log_text(self) -> str:
        text = self.log_path.read_text(errors="replace")
        if self.kind == "mosquitto" and self.broker_log.exists():
            text += self.broker_log.read_text(errors="replace")
        return text[-3000:]


# ----------------------------------------------------------------------------- runs


@dataclass
class Results:
    runs: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    idle: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> dict[tuple[str, str], dict[str, Any]]:
        """The median run (by deliveries per CPU-second) of each (server, case)."""
        return medians(self.runs)


@dataclass
class Context:
    logdir: Path
    secret: str
    mosquitto: str | None

    def broker(self, kind: str) -> Broker:
        return Broker(kind, self.logdir, self.secret, self.mosquitto)


def run_throughput(kind: str, n: int, messages: int, ctx: Context) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        result = measure_throughput(server, spawn, n, messages, BURST)
        if result["delivered"] != result["expected"]:
            raise RuntimeError(
                f"delivered {result['delivered']:,} of {result['expected']:,}"
                f" ({result['timeouts']} burst timeouts)"
            )
        return result

    return with_server(ctx.broker(kind), LOADGEN, body)


def run_idle(kind: str, count: int, ctx: Context) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        def spawn_all() -> list[LoadGenProcess]:
            loadgens = []
            base = source_port_base(count)
            for first in range(0, count, IDLE_PER_LOADGEN):
                n = min(IDLE_PER_LOADGEN, count - first)
                options = ["-n", str(n), "--first", str(first), "--batch", str(IDLE_BATCH)]
                options += ["--source-port", str(base)]
                loadgens.append(spawn("idle", options))
            return loadgens

        before, after, results = measure_idle(server, spawn_all)
        alive = sum(r["alive"] for r in results)
        if alive != count:
            raise RuntimeError(f"only {alive:,} of {count:,} connections alive at the end")
        return {
            "n": count,
            "loadgens": len(results),
            "open_seconds": max(r["open_seconds"] for r in results),
            "rss_before_kib": before,
            "rss_after_kib": after,
            "kib_per_connection": (after - before) / count,
        }

    return with_server(ctx.broker(kind), LOADGEN, body)


# ----------------------------------------------------------------------------- report


def machine_info(mosquitto: str | None) -> dict[str, str]:
    version = mosquitto_version(mosquitto) if mosquitto else "mosquitto not installed"
    return {**machine("uvloop"), "mosquitto": version}


def report(
    results: Results,
    plan: dict[str, Any],
    mode: str,
    elapsed: float,
    load: MachineLoad,
    only: set[str],
    mosquitto: str | None,
) -> str:
    m = machine_info(mosquitto)
    lines = report_header(
        f"MQTT benchmark: gateway vs mosquitto ({mode})  {m['date']}",
        m,
        f"python {m['python']}  uvloop {m['uvloop']}  {m['mosquitto']}",
        load,
    )
    targets = []
    if "throughput" in only:
        lines += ["", *throughput_section(results, plan)]
        throughput = results.throughput
        for case, n, _ in plan["throughput"]:
            gw = throughput.get(("gateway", case))
            mq = throughput.get(("mosquitto", case))
            ratio = gw["per_cpu_second"] / mq["per_cpu_second"] if gw and mq else None
            what = "messages" if n == 1 else "deliveries"
            target = TARGETS[case]
            label = f"{case} {what} per CPU-second >= {target:.1f}x mosquitto"
            targets.append(target_line(label, 54, ratio, ">=", target))
    if "idle" in only:
        lines += ["", *idle_section(results, plan)]
        for count in plan["idle"]:
            gw = results.idle.get(("gateway", count), {})
            kib = gw.get("kib_per_connection")
            mq_kib = results.idle.get(("mosquitto", count), {}).get("kib_per_connection")
            clients = gw.get("n", count)
            label = f"RSS per idle MQTT connection <= {TARGET_IDLE_KIB:g} KiB ({clients:,} clients)"
            note = f"  (mosquitto {fmt(mq_kib, '.2f')})"
            targets.append(target_line(label, 54, kib, "<=", TARGET_IDLE_KIB, note))
    lines += report_footer(targets, elapsed, results.failures)
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
    parser = orchestrator_parser(
        "MQTT benchmark: gateway vs mosquitto", "~40 s smoke run", MEASUREMENTS
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    only = set(args.only or MEASUREMENTS)
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
                    r = attempt(
                        results.failures, label, run_idle, kind, idle_clients(count, limit), ctx
                    )
                    if r:
                        results.idle[(kind, count)] = r
        if "throughput" in only:
            for rep in range(plan["repeats"]):
                for case, n, messages in plan["throughput"]:
                    for kind in SERVERS:
                        label = f"{kind} {case} ({rep + 1}/{plan['repeats']})"
                        r = attempt(results.failures, label, run_throughput, kind, n, messages, ctx)
                        if r:
                            results.runs.setdefault((kind, case), []).append(r)
    elapsed = time.monotonic() - started
    print(report(results, plan, mode, elapsed, load, only, mosquitto))
    if args.json:
        raw = {
            "machine": machine_info(mosquitto),
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
    run_script(main)
