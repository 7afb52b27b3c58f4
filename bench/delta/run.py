"""Delta-push benchmark: a feed document to N subscribers, with Fossil deltas and without.

    python bench/delta/run.py           # full run, about 100 s
    python bench/delta/run.py --quick   # smoke run, about 15 s

For each point (N subscribers, a count of updates, a publish rate) and each variant (all
subscribers with delta "fossil", or all with full payloads), a fresh gateway is started on
free 127.0.0.1 ports (`realtime serve` with bench/delta/gateway.toml, pinned to one CPU)
and bench/delta/loadgen.py runs against it (pinned to the other): N subscribers on
"feed/front-page", one client publishing a ~2.2 KB JSON feed document with small changes
per update at a fixed rate. The two variants alternate (which one goes first changes with
each repeat); the median run counts (by deliveries per server CPU-second).

Reported per variant: WebSocket payload bytes per delivered update (what the subscribers
read from their binary frames, varint prefixes included), the frame header bytes on top,
the Publication.data bytes alone, the share of deliveries that were deltas, and the
server's CPU time (user + system from /proc/<pid>/task/*/schedstat over the publish phase)
per publication and per delivery. Then the ratios: bytes full/delta and CPU delta/full.
"deliv/read" is deliveries per read of a subscriber socket: 1.00 means one publication per
server write. More means that a subscriber read late (two writes in one read) or that the
server wrote several publications at once (they arrived together, because the publisher
fell behind its schedule), which makes the server's CPU per delivery smaller; the report
warns when more than 1% of a run's publishes were over 1 ms late.

Every subscriber checks every publication: the next offset, and the next document exactly
(a full payload compared with the publisher's bytes, a delta applied to the subscriber's
base with realtime.protocol.delta.apply_delta; see loadgen.py). A run with a wrong
document, a lost publication or a publish error fails.

Exit code 0 unless a run failed; every child process is stopped by PID before exiting.
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
    MachineLoad,
    ServerProcess,
    Spawn,
    attempt,
    fmt,
    gateway_command,
    machine,
    measured_phase,
    medians,
    orchestrator_parser,
    pin,
    raise_nofile,
    report_header,
    run_script,
    with_server,
)

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
GATEWAY_CONFIG = HERE / "gateway.toml"
PACKAGES = ("uvloop", "protobuf", "python-fossil-delta")  # versions in the report
MEASUREMENTS = ("feed",)
VARIANTS = ("fossil", "none")

# (subscribers, updates, publishes per second) per point, each variant `repeats` times.
# The rates keep the server and the load generator below one core (N=1,000 at 40 pub/s:
# ~50% and ~70%), so that publications are written one by one as they come, not
# coalesced by a backlog.
PLANS: dict[str, dict[str, Any]] = {
    "full": {"points": [(100, 1000, 250.0), (1000, 400, 40.0)], "repeats": 3},
    "quick": {"points": [(100, 300, 200.0), (1000, 120, 40.0)], "repeats": 1},
}
# A run with more of its publishes this far behind schedule is flagged in the report.
LATE_SHARE = 0.01


class Server(ServerProcess):
    """The gateway with bench/delta/gateway.toml."""

    banner = "ws://"

    def command(self) -> tuple[list[str], dict[str, str]]:
        return gateway_command(GATEWAY_CONFIG, self.secret, SERVER=self.port)


@dataclass
class Results:
    runs: dict[tuple[str, int], list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def run_feed(
    variant: str, n: int, updates: int, rate: float, memo: bool, logdir: Path, secret: str
) -> dict[str, Any]:
    def body(server: ServerProcess, spawn: Spawn) -> dict[str, Any]:
        options = ["-n", str(n), "--delta", variant, "--updates", str(updates)]
        options += ["--rate", str(rate)] + ([] if memo else ["--no-memo"])
        lg = spawn("feed", options)
        lg.expect("READY", 120)
        result = measured_phase(server, lg)
        if result["delivered"] != result["expected"]:
            raise RuntimeError(f"delivered {result['delivered']:,} of {result['expected']:,}")
        cpu, delivered = result["server_cpu"], max(1, result["delivered"])
        result.update(
            per_cpu_second=delivered / cpu if cpu > 0 else math.nan,
            cpu_us_per_publication=1e6 * cpu / updates,
            cpu_us_per_delivery=1e6 * cpu / delivered,
            payload_per_update=result["payload_bytes"] / delivered,
            wire_per_update=(result["payload_bytes"] + result["header_bytes"]) / delivered,
            data_per_update=result["data_bytes"] / delivered,
            deliveries_per_read=delivered / max(1, result["reads"]),
        )
        return result

    return with_server(Server("gateway", logdir, secret), LOADGEN, body)


# ----------------------------------------------------------------------------- report


def report(
    results: Results, plan: dict[str, Any], mode: str, elapsed: float, load: MachineLoad
) -> str:
    m = machine(*PACKAGES)
    lines = report_header(
        f"Delta-push benchmark ({mode})  {m['date']}",
        m,
        f"python {m['python']}  uvloop {m['uvloop']}  protobuf {m['protobuf']}  "
        f"python-fossil-delta {m['python-fossil-delta']}",
        load,
    )
    runs = medians(results.runs)
    any_run = next(iter(runs.values()), None)
    doc = (
        f"{any_run['doc_bytes_mean']:,.0f}-byte (mean; {any_run['doc_bytes_min']:,}-"
        f"{any_run['doc_bytes_max']:,})"
        if any_run
        else "~2.2 KB"
    )
    lines += [
        "",
        f"Feed: a {doc} JSON document, 1-2 counters changed per update; N subscribers on one"
        f" channel, all with delta fossil or all with full payloads; paced publishes;"
        f" median of {plan['repeats']} (by deliveries per server CPU-second)",
        f"{'N':>6} {'updates':>7} {'pub/s':>6} {'variant':>8} {'WS payload B':>13}"
        f" {'+ frame hdr':>12} {'data B':>7} {'deltas':>7} {'deliv/read':>10}"
        f" {'CPU us/pub':>11} {'us/delivery':>12} {'CPU %':>6} {'spread':>7}",
    ]
    summary = []
    for n, updates, rate in plan["points"]:
        for variant in VARIANTS:
            r = runs.get((variant, n))
            label = "fossil" if variant == "fossil" else "full"
            if r is None:
                lines.append(f"{n:>6} {updates:>7} {rate:>6g} {label:>8} {'failed':>13}")
                continue
            lines.append(
                f"{n:>6} {updates:>7} {rate:>6g} {label:>8} {r['payload_per_update']:>13.1f}"
                f" {r['wire_per_update']:>12.1f} {r['data_per_update']:>7.1f}"
                f" {100 * r['deltas'] / max(1, r['delivered']):>6.1f}%"
                f" {r['deliveries_per_read']:>10.2f}"
                f" {r['cpu_us_per_publication']:>11.0f} {r['cpu_us_per_delivery']:>12.2f}"
                f" {100 * r['server_cpu'] / r['elapsed']:>6.0f} {100 * r['spread']:>6.0f}%"
            )
        delta, full = runs.get(("fossil", n)), runs.get(("none", n))
        if delta and full:
            payload = ratio(full, delta, "payload_per_update")
            wire = ratio(full, delta, "wire_per_update")
            cpu = ratio(delta, full, "cpu_us_per_publication")
            summary.append(
                f"  N={n:>5,}: bytes per update full/delta {fmt(payload, '.1f')}x (payload),"
                f" {fmt(wire, '.1f')}x (with frame headers); server CPU per publication"
                f" delta/full {fmt(cpu, '.2f')}"
            )
    lines += ["", "Ratios (medians)", *summary]
    every = [r for rs in results.runs.values() for r in rs]
    late = [r for r in every if r["late_publishes"] > LATE_SHARE * r["updates"]]
    if late:
        worst = max(r["max_late_ms"] for r in late)
        lines.append(
            f"  ! {len(late)} run(s) published more than {100 * LATE_SHARE:g}% of their updates"
            f" behind schedule (up to {worst:.0f} ms): the load generator could not keep up,"
            " and the server may have written several publications per syscall, so their CPU"
            " figures are too low"
        )
    else:
        count = sum(r["late_publishes"] for r in every)
        lines.append(
            f"  publishes more than 1 ms behind schedule: {count:,} of"
            f" {sum(r['updates'] for r in every):,}"
        )
    checked = [r for rs in results.runs.values() for r in rs]
    if checked:
        deliveries = sum(r["delivered"] for r in checked)
        deltas = sum(r["deltas"] for r in checked)
        applied = sum(r["applied"] for r in checked)
        lines += [
            "",
            f"Checked: {deliveries:,} deliveries in {len(checked)} runs, each the next offset and"
            f" exactly the publisher's document; {deltas:,} were deltas"
            f" ({applied:,} apply_delta calls"
            + (", memoized per version and delta bytes)" if checked[0]["memo"] else ")"),
        ]
    failed = f"; {len(results.failures)} run(s) failed" if results.failures else ""
    lines += ["", f"total {elapsed:.0f} s{failed}"]
    lines += [f"  FAILED {failure}" for failure in results.failures]
    return "\n".join(lines)


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float:
    return a[key] / b[key] if b[key] else math.nan


def main(argv: list[str] | None = None) -> int:
    parser = orchestrator_parser(
        "delta-push benchmark: Fossil deltas vs full payloads", "~15 s smoke run", MEASUREMENTS
    )
    parser.add_argument(
        "--no-memo",
        action="store_true",
        help="every subscriber applies every delta (slow at N=1,000; see loadgen.py)",
    )
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    raise_nofile()
    load = MachineLoad()
    pin(os.getpid(), LOADGEN_CPU)
    secret = secrets.token_urlsafe(32)
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="delta-bench-") as tmp:
        logdir = Path(tmp)
        print(f"delta-push benchmark ({mode}); server logs in {logdir}", file=sys.stderr)
        for rep in range(plan["repeats"]):
            for n, updates, rate in plan["points"]:
                order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
                for variant in order:
                    label = f"{variant} N={n:,} ({rep + 1}/{plan['repeats']})"
                    run_args = (variant, n, updates, rate, not args.no_memo, logdir, secret)
                    r = attempt(results.failures, label, run_feed, *run_args)
                    if r:
                        results.runs.setdefault((variant, n), []).append(r)
    elapsed = time.monotonic() - started
    print(report(results, plan, mode, elapsed, load))
    if args.json:
        raw = {
            "machine": machine(*PACKAGES),
            "mode": mode,
            "runs": [r for runs in results.runs.values() for r in runs],
            "failures": results.failures,
        }
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    return 1 if results.failures else 0


if __name__ == "__main__":
    run_script(main)
