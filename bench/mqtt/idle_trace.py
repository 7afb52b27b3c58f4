"""Where an idle MQTT connection's memory goes: tracemalloc, gateway in-process.

    python bench/mqtt/idle_trace.py                 # 2,000 clients, by file:line
    python bench/mqtt/idle_trace.py -n 5000 --frames 6 --group traceback --top 40

Starts the gateway (bench/mqtt/gateway.toml, memory broker, free ports) on uvloop in this
process with tracemalloc on, then runs bench/mqtt/loadgen.py's idle mode as a subprocess:
N MQTT 3.1.1 clients, keep-alive 300, each subscribed to its own topic `bench/idle/<i>`
with a JWT granting "#". Between a snapshot taken before the clients connect and one taken
once they are all READY (both after gc.collect()), it prints the growth divided by N,
grouped by the allocating file:line (or, with `--group traceback`, by the whole stack of
`--frames` frames), biggest first, and the total.

What tracemalloc cannot see is left out: the kernel's socket buffers, and anything libuv
or uvloop allocate with their own malloc calls outside CPython's allocator (uvloop's
transports are Python objects: they are traced, at the line that was running when the
loop created them, often "<unknown>"). VmRSS growth (bench/mqtt/run.py --only idle) is
the figure that counts; this says what makes it up.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import sys
import tracemalloc
from pathlib import Path

import uvloop

from realtime.app import Gateway
from realtime.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import PYTHON, raise_nofile, rss_kib

HERE = Path(__file__).resolve().parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="tracemalloc of idle MQTT connections")
    parser.add_argument("-n", type=int, default=2000, help="idle clients (default 2000)")
    parser.add_argument("--frames", type=int, default=1, help="frames kept per allocation")
    parser.add_argument("--group", choices=["lineno", "traceback"], default="lineno")
    parser.add_argument("--top", type=int, default=30, help="rows printed")
    return parser.parse_args()


async def read_line(stream: asyncio.StreamReader, want: str) -> str:
    while True:
        line = (await asyncio.wait_for(stream.readline(), 150)).decode()
        if not line:
            raise RuntimeError(f"load generator ended before {want!r}")
        if line.strip() == want or (want == "{" and line.startswith("{")):
            return line


def snapshot() -> tracemalloc.Snapshot:
    gc.collect()
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


async def main(args: argparse.Namespace) -> None:
    secret = secrets.token_urlsafe(24)
    environ = {
        "REALTIME_SERVER__PORT": "0",
        "REALTIME_API__PORT": "0",
        "REALTIME_MQTT__PORT": "0",
        "REALTIME_AUTH__HMAC_SECRET": secret,
        "REALTIME_API__KEY": secrets.token_urlsafe(24),
    }
    gateway = Gateway(load_config(HERE / "gateway.toml", environ))
    await gateway.start()
    assert gateway.mqtt is not None
    command = [PYTHON, str(HERE / "loadgen.py"), "idle", "--server", "gateway"]
    command += ["--port", str(gateway.mqtt.port), "-n", str(args.n), "--batch", "50"]
    before = snapshot()
    rss_before = rss_kib(os.getpid())
    loadgen = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "BENCH_HMAC_SECRET": secret},
    )
    assert loadgen.stdin is not None and loadgen.stdout is not None
    try:
        await read_line(loadgen.stdout, "READY")
        await asyncio.sleep(1.0)  # the last SUBACKs are written; nothing else is pending
        after = snapshot()
        rss_after = rss_kib(os.getpid())
        connected = gateway.mqtt.server.open_connections
        loadgen.stdin.write(b"GO\n")
        await loadgen.stdin.drain()
        await read_line(loadgen.stdout, "DONE")
        await read_line(loadgen.stdout, "{")
    finally:
        if loadgen.returncode is None:
            loadgen.kill()
        await loadgen.wait()
    await gateway.stop(drain_timeout=2.0)
    if connected != args.n:
        raise SystemExit(f"{connected} of {args.n} clients connected")
    stats = after.compare_to(before, args.group)
    total = sum(s.size_diff for s in stats)
    print(f"{args.n:,} idle MQTT connections, growth per connection after gc.collect()")
    print(f"{'bytes':>8} {'blocks':>7}  where")
    for stat in stats[: args.top]:
        where = " <- ".join(str(frame) for frame in reversed(stat.traceback))  # innermost first
        print(f"{stat.size_diff / args.n:8.1f} {stat.count_diff / args.n:7.2f}  {where}")
    print(f"{total / args.n:8.1f}          total traced")
    print(f"{(rss_after - rss_before) * 1024 / args.n:8.1f}          VmRSS growth (traced run)")


if __name__ == "__main__":
    options = parse_args()
    raise_nofile(options.n + 256)
    tracemalloc.start(options.frames)
    uvloop.run(main(options))
