"""Fan-out load generator: raw uvloop asyncio.Protocol WebSocket clients.

Spawned by bench/fanout/run.py, one process per measurement. It talks to the orchestrator
with lines on stdin/stdout:

    loadgen -> "READY"   subscribers are connected and subscribed
    run.py  -> "GO"      (after snapshotting server CPU / RSS)
    loadgen -> "DONE"    the measured phase is over
    loadgen -> {...}     one JSON line with the results, then exit

Clients are hand-written (no websockets library: it would be the bottleneck with thousands
of subscribers): HTTP upgrade, masked client frames, and a frame parser that counts
*messages* by walking the varint length prefixes inside each binary frame, so the gateway
(several messages per frame) and the reference (one frame per message) count the same.

Modes:
  throughput  N subscribers + 1 publisher; bursts of B publishes back to back, then wait for
              all N*B deliveries; repeat until M messages.
  latency     N subscribers; publish at a fixed rate with time.monotonic_ns() in the payload;
              per-delivery latency percentiles and loss.
  idle        C connected + subscribed clients that do nothing (for RSS per connection).

--server picks what the publisher sends: to the gateway a `Command{publish}`; to the
reference the exact `Reply{push{pub}}` bytes the gateway would deliver (the reference
forwards payloads untouched), so subscribers receive the same bytes from both servers.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import os
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
)

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = "realtime.v1.proto"
PATH = "/connection/websocket"
CHANNEL = "bench/fanout"
CONTROL_CHANNEL = "bench/control"  # the publisher's own subscription (never published to)
PAYLOAD_BYTES = 100

# SETUP: frames kept for request(); COUNT: publications counted; RECORD: frames kept with
# their arrival time; DISCARD: subscribed and waiting (join pushes, with presence, dropped).
SETUP, COUNT, RECORD, DISCARD = 0, 1, 2, 3


def count_messages(data: bytes, pos: int, end: int) -> int:
    """How many publications lie in data[pos:end], a run of varint-length-prefixed
    messages. Messages shorter than the payload (server pings, replies) are not counted."""
    n = 0
    while pos < end:
        b = data[pos]
        if b < 0x80:
            pos += 1 + b
            if b >= PAYLOAD_BYTES:
                n += 1
            continue
        length = b & 0x7F
        shift = 7
        pos += 1
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


class RecordingStats(Stats):
    """Stats, and the frames received in the latency mode (decoded after the run)."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[tuple[int, bytes]] = []  # (receive monotonic_ns, frame payload)


class Client(asyncio.Protocol):
    __slots__ = (
        "_host",
        "buffer",
        "closing",
        "key",
        "messages",
        "mode",
        "opened",
        "stats",
        "transport",
        "waiter",
    )

    def __init__(self, stats: RecordingStats, host: str, port: int) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.opened = False
        self.closing = False
        self.mode = SETUP
        self.messages: list[bytes] = []  # SETUP mode: decoded later
        self.waiter: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        self.key = base64.b64encode(os.urandom(16))
        self._host = f"{host}:{port}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(  # type: ignore[union-attr]
            (
                f"GET {PATH} HTTP/1.1\r\nHost: {self._host}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: " + self.key.decode() + "\r\n"
                f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n\r\n"
            ).encode()
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            self.stats.errors.append(f"connection lost: {exc!r}")
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
            response = data[:end].decode("latin-1")
            expected = base64.b64encode(hashlib.sha1(self.key + GUID).digest()).decode()
            lines = response.split("\r\n")
            pairs = (line.partition(":") for line in lines[1:])
            headers = {k.strip().lower(): v.strip() for k, _, v in pairs}
            if " 101 " not in lines[0] + " " or headers.get("sec-websocket-accept") != expected:
                self._wake(ConnectionError(f"handshake refused: {lines[0]}"))
                self.transport.close()  # type: ignore[union-attr]
                return
            if headers.get("sec-websocket-protocol") != SUBPROTOCOL:
                self._wake(ConnectionError("server did not select realtime.v1.proto"))
                self.transport.close()  # type: ignore[union-attr]
                return
            self.opened = True
            data = data[end + 4 :]
            self._wake()
        pos = 0
        size = len(data)
        mode = self.mode
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
                if mode == COUNT:
                    delivered += count_messages(data, start, end)
                elif mode == RECORD:
                    payload = data[start:end]
                    self.stats.samples.append((now, payload))
                    delivered += count_messages(payload, 0, length)
                elif mode == SETUP:
                    self.messages.append(data[start:end])
                    self._wake()
            elif opcode == 0x9:  # ping
                self.transport.write(client_frame(data[start:end], 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                self.stats.errors.append(f"server closed: {data[start:end]!r}")
            elif opcode == 0x1:
                self.stats.errors.append("unexpected text frame")
            pos = end
        self.buffer = data[pos:] if pos < size else b""
        if delivered:
            stats = self.stats
            stats.delivered += delivered
            if stats.delivered >= stats.target and stats.reached is not None:
                stats.reached.set()

    async def wait(self, timeout: float) -> None:
        if self.waiter is not None:
            await asyncio.wait_for(self.waiter, timeout)
        self.waiter = asyncio.get_running_loop().create_future()

    async def request(self, payload: bytes, timeout: float) -> pb.Reply:
        """Send one Command (delimited) and wait for its reply: the next message that is
        not a push (with presence on, join pushes arrive around subscribe replies)."""
        self.waiter = asyncio.get_running_loop().create_future()
        seen = len(self.messages)
        assert self.transport is not None
        self.transport.write(client_frame(payload))
        while True:
            while len(self.messages) == seen:
                await asyncio.wait_for(self.waiter, timeout)
                self.waiter = asyncio.get_running_loop().create_future()
            frame = self.messages[seen]
            seen += 1
            for message in split_delimited(frame):
                reply = pb.Reply.FromString(message)
                if reply.HasField("push"):
                    continue
                self.waiter = None
                if reply.HasField("error"):
                    raise RuntimeError(f"server error: {reply.error.code} {reply.error.message}")
                return reply


class LoadGen(LoadGenBase[Client]):
    stats: RecordingStats

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, RecordingStats())

    async def open_client(self, user: str, channel: str) -> tuple[Client, pb.Reply]:
        args = self.args
        _, client = await self.loop.create_connection(
            lambda: Client(self.stats, args.host, args.port), args.host, args.port
        )
        await client.wait(args.step_timeout)  # 101 received
        connect = pb.Command(id=1, connect=pb.ConnectRequest(token=mint_token(args.secret, user)))
        reply = await client.request(delimited(connect.SerializeToString()), args.step_timeout)
        subscribe = pb.Command(id=2, subscribe=pb.SubscribeRequest(channel=channel))
        await client.request(delimited(subscribe.SerializeToString()), args.step_timeout)
        client.messages = []
        client.mode = DISCARD
        return client, reply

    async def open_subscribers(self, count: int) -> None:
        batch = self.args.batch
        for first in range(0, count, batch):
            results = await asyncio.gather(
                *(
                    self.open_client(f"u{i}", CHANNEL)
                    for i in range(first, min(first + batch, count))
                )
            )
            self.clients.extend(client for client, _ in results)
        gc.collect()
        gc.freeze()

    async def open_publisher(self) -> tuple[Client, str]:
        client, reply = await self.open_client("publisher", CONTROL_CHANNEL)
        self.publishers.append(client)
        # The gateway's connection id shows up in every publication it delivers; against the
        # reference, a made-up id of the same length keeps the delivered bytes the same.
        return client, reply.connect.client or "Pb" + "x" * 10

    def publish_bytes(self, data: bytes, client_id: str) -> bytes:
        """One publish, as the masked frame this server needs."""
        message: pb.Command | pb.Reply
        if self.args.server == "gateway":
            message = pb.Command(id=0, publish=pb.PublishRequest(channel=CHANNEL, data=data))
        else:
            pub = pb.Publication(data=data)
            pub.info.user = "publisher"
            pub.info.client = client_id
            message = pb.Reply(push=pb.Push(channel=CHANNEL, pub=pub))
        return client_frame(delimited(message.SerializeToString()))

    # ------------------------------------------------------------------ modes

    async def throughput(self) -> dict[str, object]:
        args = self.args
        await self.open_subscribers(args.n)
        publisher, client_id = await self.open_publisher()
        for client in self.clients:
            client.mode = COUNT
        burst = b"".join(
            self.publish_bytes(bytes([i % 256]) * PAYLOAD_BYTES, client_id)
            for i in range(args.burst)
        )
        return await self.timed_bursts(publisher, burst, own_cpu=False)

    async def latency(self) -> dict[str, object]:
        args = self.args
        await self.open_subscribers(args.n)
        publisher, client_id = await self.open_publisher()
        for client in self.clients:
            client.mode = RECORD
        stats = self.stats
        count = int(args.rate * args.duration)
        await self.handshake_with_orchestrator()
        began = time.perf_counter()
        interval = 1.0 / args.rate
        start = self.loop.time() + 0.05
        pad = bytes(PAYLOAD_BYTES - 8)
        for i in range(count):
            delay = start + i * interval - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            data = time.monotonic_ns().to_bytes(8, "big") + pad
            publisher.transport.write(self.publish_bytes(data, client_id))  # type: ignore[union-attr]
        reached = stats.arm(count * args.n)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reached.wait(), args.burst_timeout)
        elapsed = time.perf_counter() - began
        print("DONE", flush=True)
        latencies: list[float] = []
        for received, payload in stats.samples:
            pos = 0
            end = len(payload)
            while pos < end:  # split the frame into messages
                length, shift = 0, 0
                while True:
                    b = payload[pos]
                    pos += 1
                    length |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                reply = pb.Reply.FromString(payload[pos : pos + length])
                pos += length
                if reply.push.HasField("pub"):
                    sent = int.from_bytes(reply.push.pub.data[:8], "big")
                    latencies.append((received - sent) / 1e6)
        latencies.sort()

        def pct(p: float) -> float:
            if not latencies:
                return float("nan")
            return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

        return {
            "mode": "latency",
            "n": args.n,
            "messages": count,
            "expected": count * args.n,
            "delivered": len(latencies),
            "lost": count * args.n - len(latencies),
            "elapsed": elapsed,
            "rate_deliveries": args.rate * args.n,
            "p50_ms": pct(50),
            "p90_ms": pct(90),
            "p99_ms": pct(99),
            "max_ms": latencies[-1] if latencies else float("nan"),
        }

    async def open_idle(self) -> None:
        await self.open_subscribers(self.args.n)


async def main(args: argparse.Namespace) -> None:
    raise_nofile()
    await LoadGen(args).run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = loadgen_parser(
        "fan-out load generator (see module doc)",
        ["throughput", "latency", "idle"],
        ["gateway", "reference"],
        "HS256 secret for connect tokens (default: $BENCH_HMAC_SECRET)",
    )
    parser.add_argument("-n", type=int, default=100, help="subscribers (idle: connections)")
    parser.add_argument("--messages", type=int, default=1000, help="throughput: publishes")
    parser.add_argument("--burst", type=int, default=50, help="throughput: publishes per burst")
    parser.add_argument("--rate", type=float, default=20.0, help="latency: publishes/second")
    parser.add_argument("--duration", type=float, default=5.0, help="latency: seconds")
    parser.add_argument("--batch", type=int, default=200, help="connections opened at once")
    add_timeouts(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
