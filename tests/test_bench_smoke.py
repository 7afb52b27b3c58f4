"""Smoke tests of the benchmarks in bench/: tiny runs, so that the scripts keep working.

They start real gateway processes on free 127.0.0.1 ports (as the benchmarks do) and take a
few seconds; the numbers they produce mean nothing at this size.
"""

from __future__ import annotations

import importlib.util
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.delta import make_delta

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load(path: Path, name: str) -> ModuleType:
    """A bench script as a module (bench/*/run.py share a name, so each gets its own)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_delta_feed_both_variants(tmp_path: Path) -> None:
    run = load(BENCH / "delta/run.py", "bench_delta_run")
    secret = secrets.token_urlsafe(32)
    results: dict[str, dict[str, Any]] = {}
    for variant in ("fossil", "none"):
        results[variant] = run.run_feed(variant, 5, 40, 400.0, True, tmp_path, secret)
    delta, full = results["fossil"], results["none"]
    for r in (delta, full):
        assert r["delivered"] == r["expected"] == 5 * 40
        assert r["error_count"] == 0
    assert full["deltas"] == 0
    assert delta["deltas"] == 5 * 39  # the first publication goes in full to new subscribers
    assert delta["payload_per_update"] * 5 < full["payload_per_update"]


def test_delta_checker_catches_wrong_documents() -> None:
    loadgen = load(BENCH / "delta/loadgen.py", "bench_delta_loadgen")
    docs = loadgen.feed_docs(4, 1)
    assert docs == loadgen.feed_docs(4, 1) and len(set(docs)) == 4
    for memo in (set(), None):
        gen = loadgen.LoadGen.__new__(loadgen.LoadGen)
        gen.docs, gen.memo, gen.stats = docs, memo, loadgen.FeedStats()

        class Sub:
            version, offset, base = 0, 0, None

        sub = Sub()
        gen.check(sub, pb.Publication(offset=1, data=docs[0]))
        gen.check(sub, pb.Publication(offset=2, data=make_delta(docs[0], docs[1]), delta=True))
        assert gen.stats.errors == []
        # A delta against the wrong base (version 1 -> 3 sent as version 2) is caught, and
        # the subscriber has no base for the next one.
        gen.check(sub, pb.Publication(offset=3, data=make_delta(docs[1], docs[3]), delta=True))
        gen.check(sub, pb.Publication(offset=4, data=make_delta(docs[2], docs[3]), delta=True))
        assert len(gen.stats.errors) == 2


def test_fanout_presence_variant(tmp_path: Path) -> None:
    run = load(BENCH / "fanout/run.py", "bench_fanout_run")
    secret = secrets.token_urlsafe(32)
    for variant in ("off", "on"):
        r = run.run_presence(variant, 20, 100, tmp_path, secret)
        assert r["delivered"] == r["expected"] == 20 * 100
        assert r["presence"] == variant


def test_cluster_quick_run() -> None:
    """`bench/cluster/run.py --quick`: one node on the memory broker, one on Redis, two on
    one Redis (real redis-server and `realtime serve` processes), a few seconds each."""
    script = BENCH / "cluster/run.py"
    run = subprocess.Popen(
        [sys.executable, str(script), "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=BENCH.parent,
    )
    try:
        out, err = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # run.py stops the servers it started (by PID) on its way out.
        run.send_signal(signal.SIGTERM)
        try:
            out, err = run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            run.kill()
            out, err = run.communicate()
        message = f"bench/cluster/run.py --quick took over 120 s\n{out}\n{err}"
        raise AssertionError(message) from None
    assert run.returncode == 0, f"exit {run.returncode}\n{out}\n{err[-3000:]}"
    assert "Delivered messages per CPU-second" in out
    assert "ratio per CPU-second: B/A(redis) " in out
    assert "B/A(redis) -" not in out  # a ratio was computed
    assert "Redis per publication" in out
    for label in ("A  1 node, memory", "A  1 node, Redis", "B  2 nodes, Redis"):
        assert f"  OK      {label}, N=20" in out, out
    assert "FAILED" not in out


def test_poll_quick_run() -> None:
    """`bench/poll/run.py --quick`: polls against a gateway and the raw HTTP reference, and
    stand-ins at K = 0, 100, 1,000 (real `realtime serve` processes), about 10 seconds."""
    script = BENCH / "poll/run.py"
    run = subprocess.Popen(
        [sys.executable, str(script), "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=BENCH.parent,
    )
    try:
        out, err = run.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        # run.py stops the servers it started (by PID) on its way out.
        run.send_signal(signal.SIGTERM)
        try:
            out, err = run.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            run.kill()
            out, err = run.communicate()
        raise AssertionError(f"bench/poll/run.py --quick took over 120 s\n{out}\n{err}") from None
    assert run.returncode == 0, f"exit {run.returncode}\n{out}\n{err[-3000:]}"
    for kind in ("full", "empty"):
        assert f"ratio {kind} polls: CPU per poll gateway/reference " in out, out
    assert "gateway/reference -" not in out  # every ratio was computed
    assert "ratio CPU per publication vs K=0: K=100 " in out, out
    assert " -x" not in out
    assert "WRONG" not in out and "FAILED" not in out and "failed" not in out
