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
- idle: C connected and subscribed clients; server RSS growth per connection in KiB;
- presence (opt-in: --only presence, about 80 s): the gateway's throughput run with the
  benchmark namespace's presence, join_leave and typing on, against the same run with them
  off, alternating, median of 5; the ratio of delivered messages per server CPU-second.

It prints one table with gateway/reference ratios and the targets. Exit code 0 unless a
run crashed; every child process is stopped by PID before exiting.
"""

from __future__ import annotations

import json
import math
import os
import secrets
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
    PYTHON,
    LoadGenProcess,
    MachineLoad,
    ServerProcess,
    Spawn,
    attempt,
    cpu_seconds,
    fmt,
    gateway_command,
    machine,
    measure_idle,
    measure_throughput,
    measured_phase,
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
REFERENCE = HERE.parent / "reference_server.py"
GATEWAY_CONFIG = HERE / "gateway.toml"
SERVERS = ("gateway", "reference")
PACKAGES = ("uvloop", "websockets", "protobuf")  # versions in the report
MEASUREMENTS = ("throughput", "latency", "idle")  # the default set
OPT_IN = ("presence",)
# The presence measurement turns these on in the benchmark namespace (environment
# overrides of bench/fanout/gateway.toml), against the same gateway without them.
PRESENCE_ENV = {
    "REALTIME_NAMESPACES__BENCH__PRESENCE": "true",
    "REALTIME_NAMESPACES__BENCH__JOIN_LEAVE": "true",
    "REALTIME_NAMESPACES__BENCH__TYPING": "true",
}
PRESENCE_VARIANTS = ("off", "on")
# Before GO, time for the server to write the last join pushes (join_leave: every
# subscriber is told of every later one) so that they do not land in the measured phase.
PRESENCE_SETTLE = 0.5

# (subscribers, messages) per throughput run, each repeated `repeats` times (the median
# counts); latency (subscribers, publishes per second, seconds); idle connections.
PLANS: dict[str, dict[str, Any]] = {
    "full": {
        "throughput": [(100, 10_000), (1000, 1_000), (5000, 200)],
        "repeats": 3,
        "latency": [(100, 200.0, 5.0), (1000, 20.0, 5.0)],
        "idle": 10_000,
        "presence": [(100, 10_000), (1000, 1_000)],
        "presence_repeats": 5,
    },
    "quick": {
        "throughput": [(100, 2_000), (1000, 300)],
        "repeats": 1,
        "latency": [(100, 200.0, 3.0), (1000, 20.0, 3.0)],
        "idle": 2_000,
        "presence": [(100, 2_000), (1000, 300)],
        "presence_repeats": 1,
    },
}
BURST = 50
TARGET_RATIO_N = 1000
TARGET_RATIO = 1.0
TARGET_P99_MS = 5.0
TARGET_IDLE_KIB = 10.0


class Server(ServerProcess):
    """The gateway (`realtime serve` with bench/fanout/gateway.toml, and `env` on top of
    its environment: config overrides) or the reference."""

    def __init__(
        self, kind: str, logdir: Path, secret: str, env: dict[str, str] | None = None
    ) -> None:
        self.extra_env = env or {}
        super().__init__(kind, logdir, secret)

    def command(self) -> tuple[list[str], dict[str, str]]:
        if self.kind == "gateway":
            self.banner = "ws://"
            cmd, env = gateway_command(GATEWAY_CONFIG, self.secret, SERVER=self.port)
            env.update(self.extra_env)
            return cmd, env
        self.banner = "listening"
        return [PYTHON, str(REFERENCE), "--port", str(self.port)], server_env()


# ----------------------------------------------------------------------------- runs


@dataclass
class Results:
    runs: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    latency: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    idle: dict[str, dict[str, Any]] = field(default_factory=dict)
    # (presence variant "off" / "on", N) -> the gateway's throughput runs
    presence_runs: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> dict[tuple[str, int], dict[str, Any]]:
        """The median run (by deliveries per CPU-second) of each (server, N)."""
        return medians(self.runs)


def run_throughput(kind: str, n: int, messages: int, logdir: Path, secret: str) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        return measure_throughput(server, spawn, n, messages, BURST)

    return with_server(Server(kind, logdir, secret), LOADGEN, body)


def run_presence(variant: str, n: int, messages: int, logdir: Path, secret: str) -> dict[str, Any]:
    """The gateway's throughput run with presence, join_leave and typing on or off."""

    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        lg = spawn("throughput", ["-n", str(n), "--messages", str(messages), "--burst", str(BURST)])
        lg.expect("READY", 120)
        time.sleep(PRESENCE_SETTLE)
        # The server's CPU from its start to here: connects and subscribes (with presence:
        # the presence entries and, with join_leave, N * (N - 1) / 2 join pushes).
        setup_cpu = cpu_seconds(server.pid)
        result = measured_phase(server, lg)
        result["setup_cpu"] = setup_cpu
        cpu = result["server_cpu"]
        result["per_cpu_second"] = result["delivered"] / cpu if cpu > 0 else math.nan
        result["per_second"] = result["delivered"] / result["elapsed"]
        result["presence"] = variant
        return result

    env = PRESENCE_ENV if variant == "on" else None
    return with_server(Server("gateway", logdir, secret, env), LOADGEN, body)


def run_latency(
    kind: str, n: int, rate: float, seconds: float, logdir: Path, secret: str
) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        lg = spawn("latency", ["-n", str(n), "--rate", str(rate), "--duration", str(seconds)])
        lg.expect("READY", 120)
        return measured_phase(server, lg)

    return with_server(Server(kind, logdir, secret), LOADGEN, body)


def run_idle(kind: str, count: int, logdir: Path, secret: str) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        def spawn_all() -> list[LoadGenProcess]:
            return [spawn("idle", ["-n", str(count), "--batch", "500"])]

        before, after, (result,) = measure_idle(server, spawn_all)
        result.update(
            rss_before_kib=before,
            rss_after_kib=after,
            kib_per_connection=(after - before) / count,
        )
        return result

    return with_server(Server(kind, logdir, secret), LOADGEN, body)


# ----------------------------------------------------------------------------- report


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
        f"Fan-out benchmark ({mode})  {m['date']}",
        m,
        f"python {m['python']}  uvloop {m['uvloop']}  websockets {m['websockets']}  "
        f"protobuf {m['protobuf']}",
        load,
    )
    targets = []
    if "throughput" in only:
        lines += ["", *throughput_section(results, plan)]
        gw = results.throughput.get(("gateway", TARGET_RATIO_N))
        ref = results.throughput.get(("reference", TARGET_RATIO_N))
        ratio = gw["per_cpu_second"] / ref["per_cpu_second"] if gw and ref else None
        label = f"throughput ratio gateway/reference at N={TARGET_RATIO_N:,} >= {TARGET_RATIO:.1f}"
        targets.append(target_line(label, 52, ratio, ">=", TARGET_RATIO))
    if "latency" in only:
        lines += ["", *latency_section(results, plan)]
        for n, rate, _ in plan["latency"]:
            p99 = results.latency.get(("gateway", n), {}).get("p99_ms")
            ref_p99 = results.latency.get(("reference", n), {}).get("p99_ms")
            label = f"latency p99, N={n:,} at {rate * n:,.0f} deliveries/s, < {TARGET_P99_MS:g} ms"
            note = f"  (reference {fmt(ref_p99, '.2f')})"
            targets.append(target_line(label, 52, p99, "<", TARGET_P99_MS, note))
    if "idle" in only:
        lines += ["", *idle_section(results, plan)]
        kib = results.idle.get("gateway", {}).get("kib_per_connection")
        label = f"RSS per idle connection <= {TARGET_IDLE_KIB:g} KiB"
        targets.append(target_line(label, 52, kib, "<=", TARGET_IDLE_KIB))
    if "presence" in only:
        lines += ["", *presence_section(results, plan)]
    if not targets:
        targets.append("  (none for the measurements run)")
    lines += report_footer(targets, elapsed, results.failures)
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


def presence_section(results: Results, plan: dict[str, Any]) -> list[str]:
    lines = [
        "Presence and typing on the publication path: the gateway's throughput run (100-byte"
        f" publications in bursts of {BURST}) with the namespace's presence + join_leave +"
        f" typing on vs off; alternating runs, median of {plan['presence_repeats']}",
        f"{'N':>6} {'msgs':>6} {'off/CPU-s':>11} {'on/CPU-s':>11} {'on/off':>7}"
        f" {'off msg/s':>10} {'on msg/s':>10} {'off CPU':>8} {'on CPU':>7} {'spread off/on':>14}"
        f" {'setup CPU off/on':>17}",
    ]
    runs = medians(results.presence_runs)
    for n, messages in plan["presence"]:
        off, on = runs.get(("off", n)), runs.get(("on", n))
        ratio = on["per_cpu_second"] / off["per_cpu_second"] if off and on else None
        lines.append(
            f"{n:>6} {messages:>6} {fmt(off and off['per_cpu_second']):>11}"
            f" {fmt(on and on['per_cpu_second']):>11} {fmt(ratio, '.2f'):>7}"
            f" {fmt(off and off['per_second']):>10} {fmt(on and on['per_second']):>10}"
            f" {fmt(off and off['server_cpu'], '.2f'):>7}s"
            f" {fmt(on and on['server_cpu'], '.2f'):>6}s"
            f" {fmt(off and 100 * off['spread'], '.0f'):>7}%"
            f"/{fmt(on and 100 * on['spread'], '.0f')}%"
            f" {fmt(off and off['setup_cpu'], '.2f'):>10}s/{fmt(on and on['setup_cpu'], '.2f')}s"
        )
        for r in (off, on):
            if r and r["delivered"] != r["expected"]:
                lines.append(
                    f"{'':>6} ! presence {r['presence']}: delivered {r['delivered']:,}"
                    f" of {r['expected']:,}"
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
    parser = orchestrator_parser(
        "fan-out benchmark: gateway vs reference (presence: opt-in, --only presence)",
        "~30 s smoke run",
        MEASUREMENTS + OPT_IN,
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
    only = set(args.only or MEASUREMENTS)
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
                    results.failures,
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
                        run_args = (kind, n, messages, logdir, secret)
                        r = attempt(results.failures, label, run_throughput, *run_args)
                        if r:
                            results.runs.setdefault((kind, n), []).append(r)
        if "presence" in only:
            repeats = plan["presence_repeats"]
            for rep in range(repeats):
                for n, messages in plan["presence"]:
                    # Alternate which variant goes first, so that a drift of the machine
                    # over the run does not always favour the same one.
                    order = PRESENCE_VARIANTS if rep % 2 == 0 else PRESENCE_VARIANTS[::-1]
                    for variant in order:
                        label = f"gateway presence {variant} N={n:,} ({rep + 1}/{repeats})"
                        run_args = (variant, n, messages, logdir, secret)
                        r = attempt(results.failures, label, run_presence, *run_args)
                        if r:
                            results.presence_runs.setdefault((variant, n), []).append(r)
        for n, rate, seconds in plan["latency"] if "latency" in only else []:
            for kind in SERVERS:
                r = attempt(
                    results.failures,
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
            "machine": machine(*PACKAGES),
            "mode": mode,
            "throughput": [r for runs in results.runs.values() for r in runs],
            "latency": [{"server": k, "n": n, **r} for (k, n), r in results.latency.items()],
            "idle": results.idle,
            "presence": [r for runs in results.presence_runs.values() for r in runs],
            "failures": results.failures,
        }
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    return 1 if results.failures else 0


if __name__ == "__main__":
    run_script(main)
