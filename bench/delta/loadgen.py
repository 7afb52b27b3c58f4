"""Delta-push load generator: a feed document, N subscribers, one paced publisher.

Spawned by bench/delta/run.py, one process per run, with the READY / GO / DONE / result
line protocol of bench/common.py (LoadGenBase).

The document is a ~2.2 KB JSON feed (20-24 items with an id, a title, three counters and a
timestamp, plus the feed's version and update time). Each update bumps the version and
the time and changes one or two counters; about one update in 30 adds an item at the top
and about one in 30 removes one. The sequence is made from a seed before the run, so the
publisher and every subscriber know what version v must be.

N subscribers subscribe to one channel, all with delta "fossil" or all without (--delta);
one more client publishes the documents at --rate per second (Command{publish} with an
id, so that every publish is answered and checked). The clients are hand-written uvloop
protocols speaking realtime.v1.proto, like bench/fanout/loadgen.py, but each subscriber
decodes every message it receives:

- bytes: the WebSocket payload bytes of the binary frames (varint prefixes included) and
  the frame headers, counted from GO on; also the Publication.data bytes alone;
- correctness: every publication must come with the next offset and must produce the next
  document exactly. A full payload is compared with the publisher's bytes. A delta is
  applied with realtime.protocol.delta.apply_delta to the subscriber's own base (the
  document it verified last) and the result compared. apply_delta is a pure function and
  every base was verified equal to the publisher's document, so by default a result is
  remembered per (version, delta bytes): 1,000 subscribers receiving the same delta pay for
  one application (~27 us in Python, mostly the checksum), not 1,000. --no-memo applies
  every delta for every subscriber.

A subscriber whose check fails records an error and drops its base, so every later delta
fails too: the run then fails (the orchestrator treats errors as a failed run).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path

import uvloop

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.delta import DeltaError, apply_delta
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
CHANNEL = "feed/front-page"

# ----------------------------------------------------------------------------- the feed

WORDS = (
    *("market", "rally", "energy", "city", "council", "vote", "launch", "update", "storm"),
    *("season", "record", "team", "final", "court", "ruling", "study", "health", "space"),
    *("mission", "budget", "plan", "rail", "transit", "museum", "festival"),
)
COUNTERS = ("score", "comments", "views")


def _item(rng: random.Random, number: int, ts: int) -> dict[str, object]:
    words = rng.randint(2, 4)
    return {
        "id": f"it-{number:05d}",
        "title": " ".join(rng.choice(WORDS) for _ in range(words)).capitalize(),
        "score": rng.randint(0, 5000),
        "comments": rng.randint(0, 400),
        "views": rng.randint(100, 90_000),
        "ts": ts - rng.randint(0, 86_400),
    }


def feed_docs(count: int, seed: int) -> list[bytes]:
    """`count` versions of the feed document (compact JSON), version v at index v."""
    rng = random.Random(seed)
    ts = 1_790_000_000
    items = [_item(rng, i, ts) for i in range(1, 21)]
    number = len(items) + 1
    docs = []
    for version in range(count):
        ts += rng.randint(1, 3)
        if version:
            r = rng.random()
            if r < 0.03 and len(items) < 24:
                item = _item(rng, number, ts)
                item["ts"] = ts
                items.insert(0, item)
                number += 1
            elif r < 0.06 and len(items) > 18:
                items.pop(rng.randrange(len(items)))
            for _ in range(rng.randint(1, 2)):
                item = rng.choice(items)
                item[rng.choice(COUNTERS)] += rng.randint(1, 25)  # type: ignore[operator]
        doc = {"feed": "front-page", "version": version, "updated": ts, "items": items}
        docs.append(json.dumps(doc, separators=(",", ":")).encode())
    return docs


# ----------------------------------------------------------------------------- clients


class FeedStats(Stats):
    """Stats, plus what the subscribers counted from GO on."""

    def __init__(self) -> None:
        super().__init__()
        self.payload_bytes = 0  # binary frame payloads (varint prefixes included)
        self.header_bytes = 0  # their WebSocket frame headers
        self.frames = 0
        self.reads = 0  # data_received calls: about the server's writes, when reads keep up
        self.data_bytes = 0  # Publication.data of every delivery
        self.delta_data_bytes = 0  # ... of the deliveries that carried a delta
        self.deltas = 0
        self.full = 0
        self.applied = 0  # apply_delta calls (fewer than deltas when memoized)
        self.other = 0  # messages that were not publications


class Client(asyncio.Protocol):
    """A realtime.v1.proto WebSocket client. Before `measuring`, binary frames are kept in
    `messages` for request(); after, each message is decoded and checked (subscribers)."""

    __slots__ = (
        "base",
        "buffer",
        "closing",
        "gen",
        "key",
        "measuring",
        "messages",
        "offset",
        "opened",
        "transport",
        "upgrade",
        "version",
        "waiter",
    )

    def __init__(self, gen: LoadGen) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.opened = False
        self.closing = False
        self.measuring = False
        self.messages: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        self.upgrade, self.key = ws_upgrade_request(gen.args.host, gen.args.port, PATH, SUBPROTOCOL)
        self.base: bytes | None = None  # the last verified document: the delta base
        self.version = 0  # the document version expected next
        self.offset = 0  # the last publication's offset

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.upgrade)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            self.gen.stats.errors.append(f"connection lost: {exc!r}")
        self._wake(ConnectionError(f"connection lost: {exc!r}"))

    def _wake(self, exc: BaseException | None = None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
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
        stats = self.gen.stats
        if self.measuring:
            stats.reads += 1
        pos = 0
        size = len(data)
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
                if self.measuring:
                    stats.payload_bytes += length
                    stats.header_bytes += head
                    stats.frames += 1
                    self._messages(data, start, end)
                else:
                    self.messages.append(data[start:end])
                    self._wake()
            elif opcode == 0x9:  # ping
                self.transport.write(client_frame(data[start:end], 0xA))  # type: ignore[union-attr]
            elif opcode == 0x8:
                stats.errors.append(f"server closed: {data[start:end]!r}")
            elif opcode == 0x1:
                stats.errors.append("unexpected text frame")
            pos = end
        self.buffer = data[pos:] if pos < size else b""

    def _messages(self, data: bytes, pos: int, end: int) -> None:
        """Decode and check each varint-delimited message of a frame."""
        gen = self.gen
        while pos < end:
            length, shift = 0, 0
            while True:
                b = data[pos]
                pos += 1
                length |= (b & 0x7F) << shift
                if b < 0x80:
                    break
                shift += 7
            reply = pb.Reply.FromString(data[pos : pos + length])
            pos += length
            if reply.HasField("push") and reply.push.HasField("pub"):
                gen.check(self, reply.push.pub)
            else:
                gen.stats.other += 1

    async def request(self, command: pb.Command, timeout: float) -> pb.Reply:
        """Send `command` and wait for its reply (the next message that is not a push)."""
        self.waiter = asyncio.get_running_loop().create_future()
        seen = len(self.messages)
        assert self.transport is not None
        self.transport.write(client_frame(delimited(command.SerializeToString())))
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

    async def wait_open(self, timeout: float) -> None:
        if self.waiter is not None:
            await asyncio.wait_for(self.waiter, timeout)
        self.waiter = None


# ----------------------------------------------------------------------------- load generator


class LoadGen(LoadGenBase[Client]):
    stats: FeedStats

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, FeedStats())
        self.docs = feed_docs(args.updates, args.seed)
        self.memo: set[tuple[int, bytes]] | None = None if args.no_memo else set()

    def error(self, client: Client, message: str) -> None:
        self.stats.errors.append(message)
        client.base = None  # every later delta for this client fails too

    def check(self, client: Client, pub: pb.Publication) -> None:
        """One publication received by `client`: is it the next document?"""
        stats = self.stats
        version = client.version
        client.version = version + 1
        stats.delivered += 1
        if stats.delivered >= stats.target and stats.reached is not None:
            stats.reached.set()
        if version >= len(self.docs):
            self.error(client, f"publication past the last version ({version})")
            return
        if client.offset and pub.offset != client.offset + 1:
            self.error(client, f"offset {pub.offset} after {client.offset}")
        client.offset = pub.offset
        data = pub.data
        stats.data_bytes += len(data)
        expected = self.docs[version]
        if pub.delta:
            stats.deltas += 1
            stats.delta_data_bytes += len(data)
            base = client.base
            if base is None:
                self.error(client, f"version {version}: a delta without a verified base")
                return
            memo = self.memo
            if memo is None or (version, data) not in memo:
                stats.applied += 1
                try:
                    doc = apply_delta(base, data)
                except DeltaError as exc:
                    self.error(client, f"version {version}: {exc}")
                    return
                if doc != expected:
                    self.error(client, f"version {version}: the delta gives another document")
                    return
                if memo is not None:
                    memo.add((version, data))
        else:
            stats.full += 1
            if data != expected:
                self.error(client, f"version {version}: the payload is another document")
                return
        client.base = expected

    async def open_client(self, user: str, subscribe: bool) -> Client:
        args = self.args
        _, client = await self.loop.create_connection(lambda: Client(self), args.host, args.port)
        await client.wait_open(args.step_timeout)
        token = mint_token(args.secret, user)
        connect = pb.Command(id=1, connect=pb.ConnectRequest(token=token))
        await client.request(connect, args.step_timeout)
        if subscribe:
            delta = "" if args.delta == "none" else args.delta
            request = pb.SubscribeRequest(channel=CHANNEL, delta=delta)
            await client.request(pb.Command(id=2, subscribe=request), args.step_timeout)
        client.messages = []
        return client

    async def feed(self) -> dict[str, object]:
        args, stats, docs = self.args, self.stats, self.docs
        batch = args.batch
        for first in range(0, args.n, batch):
            self.clients += await asyncio.gather(
                *(self.open_client(f"u{i}", True) for i in range(first, min(first + batch, args.n)))
            )
        publisher = await self.open_client("publisher", False)
        self.publishers.append(publisher)
        frames = [
            client_frame(
                delimited(
                    pb.Command(
                        id=i + 1, publish=pb.PublishRequest(channel=CHANNEL, data=doc)
                    ).SerializeToString()
                )
            )
            for i, doc in enumerate(docs)
        ]
        for client in self.clients:
            client.measuring = True
        gc.collect()
        gc.freeze()
        reached = stats.arm(args.n * len(docs))
        await self.handshake_with_orchestrator()
        began = time.perf_counter()
        cpu0 = time.process_time()
        interval = 1.0 / args.rate
        start = self.loop.time() + 0.02
        assert publisher.transport is not None
        late, max_late = 0, 0.0
        for i, frame in enumerate(frames):
            delay = start + i * interval - self.loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.001:
                # Behind schedule: publishes go out back to back, and the server may write
                # several to a subscriber at once (fewer syscalls per delivery).
                late += 1
                max_late = max(max_late, -delay)
            publisher.transport.write(frame)
        published = time.perf_counter()
        timeouts = 0
        try:
            await asyncio.wait_for(reached.wait(), args.burst_timeout)
        except TimeoutError:
            timeouts = 1
        elapsed = time.perf_counter() - began
        loadgen_cpu = time.process_time() - cpu0
        print("DONE", flush=True)
        self.check_publish_replies(publisher, len(docs))
        sizes = [len(doc) for doc in docs]
        return {
            "mode": "feed",
            "n": args.n,
            "delta": args.delta,
            "updates": len(docs),
            "rate": args.rate,
            "expected": args.n * len(docs),
            "delivered": stats.delivered,
            "deltas": stats.deltas,
            "full": stats.full,
            "applied": stats.applied,
            "payload_bytes": stats.payload_bytes,
            "header_bytes": stats.header_bytes,
            "frames": stats.frames,
            "reads": stats.reads,
            "data_bytes": stats.data_bytes,
            "delta_data_bytes": stats.delta_data_bytes,
            "other_messages": stats.other,
            "doc_bytes_mean": sum(sizes) / len(sizes),
            "doc_bytes_min": min(sizes),
            "doc_bytes_max": max(sizes),
            "elapsed": elapsed,
            "publish_seconds": published - began,
            "drain_seconds": elapsed - (published - began),
            "late_publishes": late,
            "max_late_ms": 1e3 * max_late,
            "loadgen_cpu": loadgen_cpu,
            "memo": self.memo is not None,
            "timeouts": timeouts,
        }

    def check_publish_replies(self, publisher: Client, count: int) -> None:
        """Every publish answered, without error, at consecutive offsets."""
        offsets = []
        for frame in publisher.messages:
            for message in split_delimited(frame):
                reply = pb.Reply.FromString(message)
                if reply.HasField("error"):
                    self.stats.errors.append(f"publish {reply.id}: error {reply.error.code}")
                elif reply.HasField("publish"):
                    offsets.append(reply.publish.position.offset)
        if len(offsets) != count:
            self.stats.errors.append(f"{len(offsets)} publish replies for {count} publishes")
        elif offsets != list(range(offsets[0], offsets[0] + count)):
            self.stats.errors.append("publish offsets are not consecutive")


async def main(args: argparse.Namespace) -> None:
    raise_nofile()
    await LoadGen(args).run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = loadgen_parser(
        "delta-push load generator (see module doc)",
        ["feed"],
        ["gateway"],
        "HS256 secret for connect tokens (default: $BENCH_HMAC_SECRET)",
    )
    parser.add_argument("-n", type=int, default=100, help="subscribers")
    parser.add_argument("--delta", choices=["fossil", "none"], default="fossil")
    parser.add_argument("--updates", type=int, default=500, help="documents published")
    parser.add_argument("--rate", type=float, default=100.0, help="publishes per second")
    parser.add_argument("--seed", type=int, default=1, help="of the document sequence")
    parser.add_argument("--no-memo", action="store_true", help="apply every delta N times")
    parser.add_argument("--batch", type=int, default=200, help="connections opened at once")
    add_timeouts(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
