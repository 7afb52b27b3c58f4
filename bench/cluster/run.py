"""Cluster benchmark: two nodes on one Redis against one node, same load, one invocation.

    python bench/cluster/run.py           # full run, about 2 minutes
    python bench/cluster/run.py --quick   # smoke run, about 15 seconds

Each run starts fresh processes on free 127.0.0.1 ports: for the Redis scenarios a
throwaway `redis-server` (no persistence), then the gateway node(s) (`realtime serve` with
bench/cluster/gateway.toml, the broker set through REALTIME_BROKER__* variables), all
pinned to one CPU; then bench/cluster/loadgen.py (pinned to the other) connects N
WebSocket subscribers to one channel and one publisher, which publishes 100-byte
publications at a fixed rate for a fixed time. The scenarios, for each load:

- memory:  one node on the embedded memory broker (the reference of a node alone);
- redis:   one node on the Redis broker, every subscriber on it (reference A);
- cluster: two nodes on the same redis-server, subscriber i on node 1 + i mod 2, the
           publisher on node 1: half the deliveries cross nodes through Redis (B).

Reported per run:

- delivered messages per CPU-second, CPU = user + system time of every gateway process
  and of redis-server over the measured phase (GO to the last delivery and
  acknowledgement), read per thread from /proc/<pid>/task/*/schedstat: the runtime
  /proc/<pid>/stat's utime + stime count in 10 ms ticks (kept in --json as *_stat);
- Redis per publication, from `INFO stats` / `INFO commandstats` deltas over the same
  phase: commands processed (Redis 7 counts the calls a script makes as commands too),
  EVALSHA calls (the publish script, plus the nodes' once-a-second housekeeping script),
  pub/sub messages sent out (PUBLISH calls x the nodes subscribed to the channel, from
  PUBSUB NUMSUB), bytes in and out, Redis CPU;
- publish-to-deliver latency p50/p99/max (the payload carries the send time; in the
  cluster run split into node 1, same node as the publisher, and node 2, cross-node);
- whether every subscriber got every publication exactly once and in order (offsets
  consecutive from its subscribe position, matching the payload's sequence number) and
  every publish was acknowledged; a FAILED line and exit code 1 when not.

Then ratios cluster/redis and cluster/memory of delivered messages per CPU-second. Every
child process is stopped by PID (SIGTERM, then SIGKILL), also on errors and Ctrl-C.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
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
    RedisServer,
    ServerProcess,
    attempt,
    cpu_seconds,
    fmt,
    gateway_command,
    machine,
    medians,
    orchestrator_parser,
    pin,
    raise_nofile,
    redis_broker_env,
    redis_command,
    redis_snapshot,
    report_header,
    run_script,
    stat_user_system,
)
from common import redis_delta as common_redis_delta

HERE = Path(__file__).resolve().parent
LOADGEN = HERE / "loadgen.py"
GATEWAY_CONFIG = HERE / "gateway.toml"
PACKAGES = ("uvloop", "websockets", "protobuf", "redis", "hiredis")
CHANNEL = "bench/cluster"  # as in loadgen.py
KEY_PREFIX = "bench"
SCENARIOS = ("memory", "redis", "cluster")
LABELS = {
    "memory": "A  1 node, memory",
    "redis": "A  1 node, Redis",
    "cluster": "B  2 nodes, Redis",
}
# Before GO: time for what connecting did on the nodes (online marks written to Redis)
# to finish outside the measured phase; then IDLE seconds in which the servers' CPU is
# measured with nothing published (each node's housekeeping, Redis's own timers).
SETTLE = 0.5
IDLE = 1.0

# (subscribers, publications per second) for `seconds` each.
PLANS: dict[str, dict[str, Any]] = {
    "full": {"loads": [(1000, 20.0), (100, 200.0), (10, 1000.0)], "seconds": 8.0},
    "quick": {"loads": [(20, 100.0)], "seconds": 2.0},
}


# ----------------------------------------------------------------------------- processes


class Gateway(ServerProcess):
    """A node: `realtime serve` with gateway.toml, on the memory broker or on Redis."""

    banner = "ws://"

    def __init__(self, logdir: Path, secret: str, name: str, redis_port: int | None = None) -> None:
        self.name = name
        self.redis_port = redis_port
        super().__init__("gateway", logdir, secret)

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = gateway_command(GATEWAY_CONFIG, self.secret, SERVER=self.port)
        env["REALTIME_SERVER__NODE_NAME"] = self.name
        if self.redis_port is not None:
            env.update(redis_broker_env(self.redis_port, KEY_PREFIX))
        return cmd, env


Redis = RedisServer  # bench/common.py: a throwaway redis-server, pinned like the nodes


def redis_delta(before: dict[str, Any], after: dict[str, Any], subscribed: int) -> dict[str, Any]:
    """bench/common.py's delta (the benchmark's INFO and PUBSUB calls left out) with the
    cluster's pub/sub figures: publications fan out to every subscribed node."""
    delta = common_redis_delta(before, after, own=OWN_COMMANDS)
    calls = delta["calls"]
    delta.update(
        evalsha=calls.get("evalsha", 0) + calls.get("eval", 0),
        publish=calls.get("publish", 0),
        subscribed_nodes=subscribed,
        pubsub_out=calls.get("publish", 0) * subscribed,
    )
    return delta


OWN_COMMANDS = ("info", "pubsub")  # the benchmark's own, left out of the counts


def numsub(port: int) -> int:
    """How many connections (nodes) are subscribed to the benchmark channel in Redis."""
    reply = redis_command(port, "PUBSUB", "NUMSUB", f"{KEY_PREFIX}:c:{CHANNEL}")
    return int(reply[1])


# ----------------------------------------------------------------------------- one run


def run_once(
    scenario: str, n: int, rate: float, seconds: float, logdir: Path, secret: str
) -> dict[str, Any]:
    """One scenario at one load, from fresh processes; all of them stopped at the end."""
    servers: list[ServerProcess] = []
    loadgen: LoadGenProcess | None = None
    try:
        redis = None
        if scenario != "memory":
            redis = Redis("redis", logdir, secret)
            servers.append(redis)
            redis.wait_ready()
        port = redis.port if redis else None
        nodes: list[Gateway] = []
        for name in ("node1", "node2") if scenario == "cluster" else ("node1",):
            nodes.append(Gateway(logdir, secret, name, port))
            servers.append(nodes[-1])
        for node in nodes:  # both start at once; then wait for each
            node.wait_ready()
        ports = ",".join(str(node.port) for node in nodes)
        options = ["--ports", ports, "-n", str(n), "--rate", str(rate)]
        options += ["--duration", str(seconds), "--deadline", str(seconds + 120)]
        loadgen = LoadGenProcess(LOADGEN, nodes[0], "cluster", options)
        loadgen.expect("READY", 120)
        time.sleep(SETTLE)
        result = measure(nodes, redis, loadgen, seconds)
        for server in servers:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.kind} died during the run:\n{server.log_text()}")
        result.update(scenario=scenario, rate=rate, seconds=seconds)
        return result
    finally:
        if loadgen is not None:
            loadgen.stop()
        for server in reversed(servers):  # the nodes first, then Redis
            server.stop()


def measure(
    nodes: list[Gateway], redis: Redis | None, loadgen: LoadGenProcess, seconds: float
) -> dict[str, Any]:
    """GO to a READY load generator; CPU of every server process and Redis's counters over
    the phase until DONE; then the load generator's result with all of it added."""
    pids = {f"node{i + 1}": node.pid for i, node in enumerate(nodes)}
    if redis is not None:
        pids["redis"] = redis.pid
    idle0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(IDLE)
    idle = {name: (cpu_seconds(pid) - idle0[name]) / IDLE for name, pid in pids.items()}
    info0 = redis_snapshot(redis.port) if redis else None
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    stat0 = {name: stat_user_system(pid) for name, pid in pids.items()}
    loadgen.go()
    loadgen.expect("DONE", seconds + 60)
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    stat1 = {name: stat_user_system(pid) for name, pid in pids.items()}
    info1 = redis_snapshot(redis.port) if redis else None
    subscribed = numsub(redis.port) if redis else 0
    result = loadgen.result(timeout=120)
    result["cpu"] = cpu
    result["idle_cpu_share"] = idle  # CPU-seconds per second with nothing published
    result["cpu_stat"] = {  # utime and stime from /proc/<pid>/stat (10 ms ticks)
        name: {"user": stat1[name][0] - stat0[name][0], "sys": stat1[name][1] - stat0[name][1]}
        for name in pids
    }
    total = sum(cpu.values())
    result["total_cpu"] = total
    result["per_cpu_second"] = result["delivered"] / total if total > 0 else math.nan
    if info0 is not None and info1 is not None:
        result["redis_stats"] = redis_delta(info0, info1, subscribed)
    return result


# ----------------------------------------------------------------------------- report


@dataclass
class Results:
    # (scenario, N, rate) -> its runs, one per repeat
    runs: dict[tuple[str, int, float], list[dict[str, Any]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def median(self) -> dict[tuple[str, int, float], dict[str, Any]]:
        """The median run (by delivered messages per CPU-second) of each scenario and load."""
        return medians(self.runs)


def check_line(r: dict[str, Any]) -> str | None:
    """None when every subscriber got every publication exactly once, in order, and every
    publish was acknowledged without an error; else what went wrong."""
    problems = []
    if r["subscribers_bad"]:
        problems.append(
            f"{r['subscribers_bad']} of {r['n']} subscribers wrong: {r['missing']} missing,"
            f" {r['duplicates']} duplicates, {r['out_of_order']} out of order,"
            f" {r['seq_mismatch']} offset/sequence mismatches"
        )
    if r["delivered"] != r["expected"]:
        problems.append(f"delivered {r['delivered']:,} of {r['expected']:,}")
    if r["acked"] != r["messages"] or r["publish_errors"] or not r["acks_consecutive"]:
        problems.append(
            f"publisher: {r['acked']} of {r['messages']} acknowledged,"
            f" {r['publish_errors']} errors, offsets consecutive: {r['acks_consecutive']}"
        )
    if r.get("tail_timeout"):
        problems.append("the last deliveries did not arrive within the tail timeout")
    if not problems:
        return None
    return "; ".join(problems) + "".join(f"\n      {d}" for d in r.get("bad_details", []))


def report(
    results: Results, plan: dict[str, Any], mode: str, elapsed: float, load: MachineLoad
) -> str:
    m = machine(*PACKAGES)
    redis_version = "-"
    binary = shutil.which("redis-server")
    if binary:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
        redis_version = next((w[2:] for w in out.split() if w.startswith("v=")), "-")
    lines = report_header(
        f"Cluster benchmark ({mode})  {m['date']}",
        m,
        f"python {m['python']}  uvloop {m['uvloop']}  websockets {m['websockets']}  "
        f"protobuf {m['protobuf']}  redis-py {m['redis']}  hiredis {m['hiredis']}  "
        f"redis-server {redis_version}",
        load,
    )
    seconds = plan["seconds"]
    lines += [
        f"Load: N WebSocket subscribers on one channel (history on), one publisher on node 1,"
        f" 100-byte publications at a fixed rate for {seconds:g} s. Servers pinned to one"
        " CPU, load generator to the other.",
        "",
        "Delivered messages per CPU-second; CPU = gateway node(s) + redis-server over the"
        " measured phase",
        f"{'N':>5} {'pub/s':>6}  {'scenario':<18} {'delivered':>9} {'CPU s':>6}"
        f" {'node1':>6} {'node2':>6} {'redis':>6} {'per CPU-s':>10} {'us/pub':>7}"
        f" {'us/deliv':>8} {'idle %':>6} {'spread':>6}",
    ]
    runs = results.median
    repeats = max((len(r) for r in results.runs.values()), default=0)
    if repeats > 1:
        lines.append(f"Each row: the median of {repeats} runs by delivered messages per CPU-second")
    for n, rate in plan["loads"]:
        for scenario in SCENARIOS:
            r = runs.get((scenario, n, rate))
            if r is None:
                lines.append(f"{n:>5} {rate:>6g}  {LABELS[scenario]:<18} {'failed':>9}")
                continue
            cpu = r["cpu"]
            total = r["total_cpu"]
            lines.append(
                f"{n:>5} {rate:>6g}  {LABELS[scenario]:<18} {r['delivered']:>9,}"
                f" {total:>6.2f} {cpu.get('node1', 0):>6.2f} {fmt(cpu.get('node2'), '.2f'):>6}"
                f" {fmt(cpu.get('redis'), '.2f'):>6} {fmt(r['per_cpu_second']):>10}"
                f" {1e6 * total / max(1, r['messages']):>7.0f}"
                f" {1e6 * total / max(1, r['delivered']):>8.2f}"
                f" {100 * sum(r['idle_cpu_share'].values()):>6.1f}"
                f" {format(r['spread'], '.0%') if r['repeats'] > 1 else '-':>6}"
            )
        b = runs.get(("cluster", n, rate))
        ratios = []
        for ref in ("redis", "memory"):
            a = runs.get((ref, n, rate))
            ratio = b["per_cpu_second"] / a["per_cpu_second"] if a and b else None
            ratios.append(f"B/A({ref}) {fmt(ratio, '.2f')}")
        lines.append(f"{'':>13} ratio per CPU-second: {'  '.join(ratios)}")
        extra = []
        for more, less in (("redis", "memory"), ("cluster", "redis")):
            hi, lo = runs.get((more, n, rate)), runs.get((less, n, rate))
            if hi and lo:
                us = 1e6 * (hi["total_cpu"] / hi["messages"] - lo["total_cpu"] / lo["messages"])
                extra.append(f"{more} - {less} {us:+.0f} us")
        if extra:
            lines.append(f"{'':>13} CPU per publication: {'  '.join(extra)}")
    lines += [
        "",
        "Redis per publication (INFO deltas over the measured phase; commands include the"
        " calls scripts make; pub/sub out = PUBLISH calls x nodes subscribed)",
        f"{'N':>5} {'pub/s':>6}  {'scenario':<18} {'commands':>8} {'EVALSHA':>8} {'PUBLISH':>8}"
        f" {'nodes':>5} {'pub/sub out':>11} {'bytes in':>8} {'bytes out':>9} {'redis us':>8}",
    ]
    for n, rate in plan["loads"]:
        for scenario in SCENARIOS[1:]:
            r = runs.get((scenario, n, rate))
            if r is None or "redis_stats" not in r:
                continue
            s = r["redis_stats"]
            pubs = max(1, r["messages"])
            lines.append(
                f"{n:>5} {rate:>6g}  {LABELS[scenario]:<18} {s['commands'] / pubs:>8.2f}"
                f" {s['evalsha'] / pubs:>8.2f} {s['publish'] / pubs:>8.2f}"
                f" {s['subscribed_nodes']:>5} {s['pubsub_out'] / pubs:>11.2f}"
                f" {s['bytes_in'] / pubs:>8.0f} {s['bytes_out'] / pubs:>9.0f}"
                f" {1e6 * r['cpu']['redis'] / pubs:>8.1f}"
            )
    lines += [
        "",
        "Latency publish -> deliver, ms (all deliveries; B: node 1 = the publisher's node,"
        " node 2 = cross-node)",
        f"{'N':>5} {'pub/s':>6}  {'scenario':<18} {'p50':>7} {'p99':>7} {'max':>7}"
        f"   {'node1 p50':>9} {'p99':>7}   {'node2 p50':>9} {'p99':>7}",
    ]
    for n, rate in plan["loads"]:
        for scenario in SCENARIOS:
            r = runs.get((scenario, n, rate))
            if r is None:
                continue
            row = (
                f"{n:>5} {rate:>6g}  {LABELS[scenario]:<18} {r['p50_ms']:>7.2f}"
                f" {r['p99_ms']:>7.2f} {r['max_ms']:>7.2f}"
            )
            if scenario == "cluster":
                one, two = r["per_node"][0], r["per_node"][1]
                row += (
                    f"   {one['p50_ms']:>9.2f} {one['p99_ms']:>7.2f}"
                    f"   {two['p50_ms']:>9.2f} {two['p99_ms']:>7.2f}"
                )
            lines.append(row)
    lines += [
        "",
        "Exactly once, in order (every subscriber, every publication; every publish acked)",
    ]
    for (scenario, n, rate), repeated in results.runs.items():  # in the order they ran
        label = f"{LABELS[scenario]}, N={n:,}, {rate:g} pub/s"
        problems = [p for p in map(check_line, repeated) if p is not None]
        if not problems:
            r = repeated[0]
            times = f" ({len(repeated)} runs)" if len(repeated) > 1 else ""
            lines.append(
                f"  OK      {label}: {r['n']:,} subscribers x {r['messages']:,} publications{times}"
            )
        for problem in problems:
            lines.append(f"  FAILED  {label}: {problem}")
    failed = f"; {len(results.failures)} run(s) failed" if results.failures else ""
    lines += ["", f"total {elapsed:.0f} s{failed}"]
    lines += [f"  FAILED {failure}" for failure in results.failures]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = orchestrator_parser(
        "cluster benchmark: two nodes on one Redis against one node (memory, Redis)",
        "~15 s smoke run (N=20, 100 publications/s for 2 s)",
        SCENARIOS,
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs of each scenario and load (median shown)"
    )
    args = parser.parse_args(argv)
    # Ctrl-C, and SIGTERM alike, stop the run through KeyboardInterrupt, so that every
    # `finally` stops its processes; also when started with SIGINT ignored (a background
    # job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    mode = "quick" if args.quick else "full"
    plan = PLANS[mode]
    only = [s for s in SCENARIOS if s in set(args.only or SCENARIOS)]
    raise_nofile()
    load = MachineLoad()
    pin(os.getpid(), LOADGEN_CPU)
    secret = secrets.token_urlsafe(32)
    results = Results()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cluster-bench-") as tmp:
        logdir = Path(tmp)
        print(f"cluster benchmark ({mode}); server logs in {logdir}", file=sys.stderr)
        for rep in range(args.repeats):
            for n, rate in plan["loads"]:
                for scenario in only:
                    label = f"{scenario} N={n:,} {rate:g} pub/s ({rep + 1}/{args.repeats})"
                    run_args = (scenario, n, rate, plan["seconds"], logdir, secret)
                    r = attempt(results.failures, label, run_once, *run_args)
                    if r:
                        results.runs.setdefault((scenario, n, rate), []).append(r)
    elapsed = time.monotonic() - started
    print(report(results, plan, mode, elapsed, load))
    if args.json:
        raw = {
            "machine": machine(*PACKAGES),
            "mode": mode,
            "runs": [r for repeated in results.runs.values() for r in repeated],
            "failures": results.failures,
        }
        Path(args.json).write_text(json.dumps(raw, indent=2) + "\n")
    wrong = [r for rs in results.runs.values() for r in rs if check_line(r) is not None]
    return 1 if results.failures or wrong else 0


if __name__ == "__main__":
    run_script(main)
