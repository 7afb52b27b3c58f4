"""Cluster load generator: raw uvloop WebSocket clients spread over one or more nodes.

Spawned by bench/cluster/run.py, one process per run, with the READY/GO/DONE line protocol
of bench/common.py:

    loadgen -> "READY"   subscribers are connected and subscribed, the publisher connected
    run.py  -> "GO"      (after snapshotting the servers' CPU and Redis's counters)
    loadgen -> "DONE"    every publication acknowledged and delivered (or the tail timed out)
    loadgen -> {...}     one JSON line with the results, then exit

-n subscribers subscribe to one channel; subscriber i connects to node i mod len(--ports),
so with two ports they are split evenly. One publisher, connected to the first port, then
publishes --rate publications per second for --duration seconds (one publish command per
due time; no bursts unless the loop falls behind). Each payload carries its sequence
number and `time.monotonic_ns()` at send; subscribers stamp the arrival of each frame and
keep it, and everything is decoded after the measured phase (so decoding delays no stamp):

- latency: arrival - send, over all deliveries, and per node (node 1 is the publisher's
  node; on the other nodes every delivery crossed nodes through Redis pub/sub);
- exactly once, in order: each subscriber must see offsets start+1 .. start+M, each once,
  in that order, with the payload's sequence number matching the offset (start is the
  position its subscribe reply gave); the publisher must get M acknowledgements without
  an error.

The clients are hand-written protobuf WebSocket clients, as in bench/fanout/loadgen.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import struct
import sys
import time
from pathlib import Path

import uvloop

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.framing import split_delimited

# A script, not a package module: bench/ goes on the path for the shared bench/common.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    LoadGenBase,
    Stats,
    add_timeouts,
    client_frame,
    delimited,
    loadgen_parser,
    mint_token,
    raise_nofile,
    ws_upgrade_error,
    ws_upgrade_request,
)

SUBPROTOCOL = "realtime.v1.proto"
PATH = "/connection/websocket"
CHANNEL = "bench/cluster"
PAYLOAD_BYTES = 100
HEAD = struct.Struct("!IQ")  # sequence number, monotonic_ns at send

# SETUP: frames kept for request(); RECORD: frames kept with their arrival time.
SETUP, RECORD = 0, 1


def count_messages(data: bytes, pos: int, end: int) -> int:
    """How many messages of at least PAYLOAD_BYTES lie in data[pos:end], a run of
    varint-length-prefixed messages: the publications (replies and pings are shorter)."""
    n = 0
    while pos < end:
        length, shift = 0, 0
        while True:
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        pos += length
        if length >= PAYLOAD_BYTES:
            n += 1
    return n


class Client(asyncio.Protocol):
    __slots__ = (
        "buffer",
        "closing",
        "frames",
        "key",
        "mode",
        "node",
        "opened",
        "replies",
        "request_bytes",
        "stats",
        "transport",
        "waiter",
    )

    def __init__(self, stats: Stats, host: str, port: int, node: int) -> None:
        self.stats = stats
        self.node = node
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.opened = False
        self.closing = False
        self.mode = SETUP
        self.replies: list[bytes] = []  # SETUP: frame payloads, read by request()
        self.frames: list[tuple[int, bytes]] = []  # RECORD: (arrival monotonic_ns, payload)
        self.waiter: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        self.request_bytes, self.key = ws_upgrade_request(host, port, PATH, SUBPROTOCOL)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request_bytes)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            self.stats.errors.append(f"node {self.node + 1}: connection lost: {exc!r}")
        self._wake(ConnectionError(f"connection lost: {exc!r}"))

    def _wake(self, exc: BaseException | None = None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        if self.buffer:
            data = self.buffer + data
        if not self.opened:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            error = ws_upgrade_error(data[:end], self.key, SUBPROTOCOL)
            if error is not None:
                self._wake(ConnectionError(error))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.opened = True
            data = data[end + 4 :]
            self._wake()
        pos = 0
        size = len(data)
        delivered = 0
        while size - pos >= 2:
            length = data[pos + 1]  # server frames are unmasked
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            start = pos + head
            end = start + length
            if end > size:
                break
            opcode = data[pos] & 0x0F
            if opcode == 0x2:
                payload = data[start:end]
                if self.mode == RECORD:
                    self.frames.append((now, payload))
                    delivered += count_messages(payload, 0, length)
                else:
                    self.replies.append(payload)
                    self._wake()
            elif opcode == 0x9:  # ping
                self.transport.write(client_frame(data[start:end], 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.stats.errors.append(
                    f"node {self.node + 1}: server closed: {data[start:end]!r}"
                )
            elif opcode == 0x1:
                self.stats.errors.append("unexpected text frame")
            pos = end
        self.buffer = data[pos:] if pos < size else b""
        if delivered:
            stats = self.stats
            stats.delivered += delivered
            if stats.delivered >= stats.target and stats.reached is not None:
                stats.reached.set()

    async def request(self, command: pb.Command, timeout: float) -> pb.Reply:
        """Send one command and wait for its reply (pushes before it are skipped)."""
        self.waiter = asyncio.get_running_loop().create_future()
        seen = len(self.replies)
        assert self.transport is not None
        self.transport.write(client_frame(delimited(command.SerializeToString())))
        while True:
            while len(self.replies) == seen:
                await asyncio.wait_for(self.waiter, timeout)
                self.waiter = asyncio.get_running_loop().create_future()
            frame = self.replies[seen]
            seen += 1
            for message in split_delimited(frame):
                reply = pb.Reply.FromString(message)
                if reply.HasField("push"):
                    continue
                self.waiter = None
                if reply.HasField("error"):
                    raise RuntimeError(f"server error: {reply.error.code} {reply.error.message}")
                return reply


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


class LoadGen(LoadGenBase[Client]):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, Stats())
        self.ports = [int(p) for p in args.ports.split(",")] if args.ports else [args.port]
        self.starts: list[int] = []  # each subscriber's position (offset) at subscribe
        self.acks = Stats()  # the publisher's (its replies are not counted there)
        self.acks_seen = self.acks_seen_frames = 0

    async def open_client(self, user: str, node: int, stats: Stats) -> tuple[Client, pb.Reply]:
        args = self.args
        port = self.ports[node]
        _, client = await self.loop.create_connection(
            lambda: Client(stats, args.host, port, node), args.host, port
        )
        assert client.waiter is not None
        await asyncio.wait_for(client.waiter, args.step_timeout)  # 101 received
        connect = pb.Command(id=1, connect=pb.ConnectRequest(token=mint_token(args.secret, user)))
        reply = await client.request(connect, args.step_timeout)
        return client, reply

    async def open_subscriber(self, i: int) -> tuple[Client, int]:
        client, _ = await self.open_client(f"u{i}", i % len(self.ports), self.stats)
        subscribe = pb.Command(id=2, subscribe=pb.SubscribeRequest(channel=CHANNEL))
        reply = await client.request(subscribe, self.args.step_timeout)
        client.replies = []
        client.mode = RECORD
        return client, reply.subscribe.position.offset

    async def open_subscribers(self, count: int) -> None:
        batch = self.args.batch
        for first in range(0, count, batch):
            results = await asyncio.gather(
                *(self.open_subscriber(i) for i in range(first, min(first + batch, count)))
            )
            self.clients.extend(client for client, _ in results)
            self.starts.extend(start for _, start in results)

    # ------------------------------------------------------------------ the run

    async def cluster(self) -> dict[str, object]:
        args = self.args
        await self.open_subscribers(args.n)
        publisher, _ = await self.open_client("publisher", 0, self.acks)
        publisher.replies = []
        publisher.mode = RECORD
        self.publishers.append(publisher)
        gc.collect()
        gc.freeze()
        count = max(1, round(args.rate * args.duration))
        pad = bytes(PAYLOAD_BYTES - HEAD.size)
        await self.handshake_with_orchestrator()
        began = time.perf_counter()
        cpu0 = time.process_time()
        interval = 1.0 / args.rate
        start = self.loop.time() + 0.02
        late = 0
        for i in range(count):
            delay = start + i * interval - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -interval:
                late += 1
            data = HEAD.pack(i, time.monotonic_ns()) + pad
            command = pb.Command(id=i + 1, publish=pb.PublishRequest(channel=CHANNEL, data=data))
            publisher.transport.write(client_frame(delimited(command.SerializeToString())))  # type: ignore[union-attr]
        published = time.perf_counter() - began
        delivered = self.stats.arm(count * args.n)
        tail_timeout = False
        try:
            async with asyncio.timeout(args.tail_timeout):
                await delivered.wait()
                while self.count_acks(publisher) < count:
                    await asyncio.sleep(0.01)
        except TimeoutError:
            tail_timeout = True
        elapsed = time.perf_counter() - began
        loadgen_cpu = time.process_time() - cpu0
        print("DONE", flush=True)
        result: dict[str, object] = {
            "mode": "cluster",
            "n": args.n,
            "nodes": len(self.ports),
            "rate": args.rate,
            "messages": count,
            "expected": count * args.n,
            "elapsed": elapsed,
            "publish_elapsed": published,
            "late_publishes": late,
            "tail_timeout": tail_timeout,
            "loadgen_cpu": loadgen_cpu,
        }
        result.update(self.check_publisher(publisher, count))
        result.update(self.check_subscribers(count))
        return result

    def count_acks(self, publisher: Client) -> int:
        """Replies to the publisher's commands so far (not pushes: a server ping may come
        any time, one bucket of connections per second)."""
        frames = publisher.frames
        for _, payload in frames[self.acks_seen_frames :]:
            for message in split_delimited(payload):
                if pb.Reply.FromString(message).id:
                    self.acks_seen += 1
        self.acks_seen_frames = len(frames)
        return self.acks_seen

    def check_publisher(self, publisher: Client, count: int) -> dict[str, object]:
        """Every publish acknowledged once, without an error, with consecutive offsets."""
        offsets: dict[int, int] = {}
        errors = 0
        for _, payload in publisher.frames:
            for message in split_delimited(payload):
                reply = pb.Reply.FromString(message)
                if reply.HasField("error"):
                    errors += 1
                    if len(self.stats.errors) < 20:
                        self.stats.errors.append(
                            f"publish {reply.id}: {reply.error.code} {reply.error.message}"
                        )
                elif reply.HasField("publish"):
                    offsets[reply.id] = reply.publish.position.offset
        first = offsets.get(1, 0)
        consecutive = all(offsets.get(i + 1) == first + i for i in range(count))
        return {"acked": len(offsets), "publish_errors": errors, "acks_consecutive": consecutive}

    def check_subscribers(self, count: int) -> dict[str, object]:
        """Latencies (all, per node) and the exactly-once-in-order check per subscriber."""
        nodes = len(self.ports)
        per_node: list[list[float]] = [[] for _ in range(nodes)]
        delivered = 0
        bad = 0
        missing = duplicates = out_of_order = mismatched = 0
        details: list[str] = []
        for index, client in enumerate(self.clients):
            expect = self.starts[index] + 1
            seen: set[int] = set()
            problems = 0
            latencies = per_node[client.node]
            for received, payload in client.frames:
                for message in split_delimited(payload):
                    reply = pb.Reply.FromString(message)
                    if not reply.push.HasField("pub") or reply.push.channel != CHANNEL:
                        continue
                    pub = reply.push.pub
                    delivered += 1
                    seq, sent = HEAD.unpack_from(pub.data)
                    latencies.append((received - sent) / 1e6)
                    offset = pub.offset
                    if offset in seen:
                        duplicates += 1
                        problems += 1
                        continue
                    seen.add(offset)
                    if offset != expect:
                        out_of_order += 1
                        problems += 1
                    if offset - self.starts[index] != seq + 1:
                        mismatched += 1
                        problems += 1
                    expect = offset + 1
            lost = sum(1 for k in range(1, count + 1) if self.starts[index] + k not in seen)
            missing += lost
            problems += lost
            if problems:
                bad += 1
                if len(details) < 5:
                    details.append(
                        f"subscriber {index} (node {client.node + 1}): {len(seen)} distinct of"
                        f" {count}, {lost} missing"
                    )
        everything = sorted(v for values in per_node for v in values)
        result: dict[str, object] = {
            "delivered": delivered,
            "subscribers_bad": bad,
            "missing": missing,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "seq_mismatch": mismatched,
            "bad_details": details,
            "p50_ms": percentile(everything, 50),
            "p99_ms": percentile(everything, 99),
            "max_ms": everything[-1] if everything else float("nan"),
            "per_node": [],
        }
        for node, values in enumerate(per_node):
            values.sort()
            result["per_node"].append(  # type: ignore[attr-defined]
                {
                    "node": node + 1,
                    "deliveries": len(values),
                    "p50_ms": percentile(values, 50),
                    "p99_ms": percentile(values, 99),
                    "max_ms": values[-1] if values else float("nan"),
                }
            )
        return result

    async def open_idle(self) -> None:  # not a mode here
        raise NotImplementedError


async def main(args: argparse.Namespace) -> None:
    raise_nofile()
    await LoadGen(args).run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = loadgen_parser(
        "cluster load generator (see module doc)",
        ["cluster"],
        ["gateway"],
        "HS256 secret for connect tokens (default: $BENCH_HMAC_SECRET)",
    )
    parser.add_argument(
        "--ports", default="", help="comma-separated WebSocket ports of the nodes (default --port)"
    )
    parser.add_argument("-n", type=int, default=100, help="subscribers")
    parser.add_argument("--rate", type=float, default=100.0, help="publishes per second")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of publishing")
    # At most 50 at once: a node's redis-py pool holds at most 100 connections per Redis
    # (redis-py 8's default) and refuses a command beyond that ("Too many connections",
    # error 115 to the client), so 200 concurrent subscribes would fail on a Redis node.
    parser.add_argument("--batch", type=int, default=50, help="connections opened at once")
    parser.add_argument(
        "--tail-timeout", type=float, default=10.0, help="wait for the last deliveries, seconds"
    )
    add_timeouts(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
