"""Poll benchmark driver: detached devices, server-API publications, polls, a publisher.

Spawned by bench/poll/run.py, one process per server, pinned to the other CPU. Unlike the
other load generators it lives for several steps; each step is one exchange on
stdin/stdout (the READY/GO/DONE lines of bench/common.py, repeated):

    run.py -> "STEP <name> [arg]"
    driver -> "READY"          prepared (connections that are not measured are open)
    run.py -> "GO"             (after snapshotting the server's CPU)
    driver -> "DONE"           the measured part is over
    driver -> {...}            one JSON line: the step's result, with the errors seen
    ...
    run.py -> "QUIT"

Mode `poll` (a gateway, or the reference HTTP server), -n devices. Device i is user
`user-i` with device claim `phone-i` and 1 + i % 3 channels of namespace `chat`, rooms of
about --room-size devices whose publications per round add up to PER_ROUND for every
device (one room: 5; two: 3 + 2; three: 2 + 2 + 1):

- setup:          each device connects over WebSocket (protobuf), subscribes to its rooms,
                  sends app_state background, and closes: a detached device;
- publish:        one round through the server API (`broadcast`, <= 1,000 channels per
                  call, on one keep-alive connection): every device then has PER_ROUND new
                  publications;
- poll <expect> [<c>]: every device polls once (`GET /v1/poll`, Authorization: Bearer, one
                  request per TCP connection on asyncio streams), c (default
                  --concurrency) at a time;
                  after DONE each answer is checked: 200, JSON, `expect` publications in
                  all, every channel recovered, no `more`. The result has the latencies,
                  and the answer (head and body) whose size is nearest the mean: the
                  reference server replays it.

Mode `standins` (a gateway), --k devices detached on one channel `chat/standin`:

- setup:   the K devices connect, subscribe, background, close (as above);
- first:   a publisher connection (unmeasured) publishes one publication: it arms one wake
           per device;
- steady:  the publisher publishes for --duration seconds, --window publish commands at a
           time (each window acknowledged before the next): later publications only move
           each device's cursor. No subscriber, no push provider.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.framing import split_delimited

# A script, not a package module: bench/ goes on the path for the shared bench/common.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    client_frame,
    delimited,
    loadgen_parser,
    mint_token,
    raise_nofile,
    ws_upgrade_error,
    ws_upgrade_request,
)

SUBPROTOCOL = "realtime.v1.proto"
WS_PATH = "/connection/websocket"
POLL_PATH = "/v1/poll"
NAMESPACE = "chat"
STANDIN_CHANNEL = "chat/standin"
PER_ROUND = 5
# Publications per round on each of a device's rooms, by its number of rooms: PER_ROUND.
ROOM_COUNTS = {1: (5,), 2: (3, 2), 3: (2, 2, 1)}
MAX_BROADCAST = 1000  # channels per server-API broadcast call
MESSAGE = {"from": "user-0", "text": "see you at the station at six, platform 4"}
PUBLISH_BYTES = 100


def device_rooms(i: int, n: int, room_size: int) -> list[tuple[str, int]]:
    """Device i's channels, each with its publications per round."""
    rooms = 1 + i % 3
    peers = len(range(rooms - 1, n, 3))  # devices with as many rooms
    slots = max(1, math.ceil(peers / room_size))
    k = (i // 3) % slots
    return [(f"{NAMESPACE}/g{rooms}s{s}-{k}", m) for s, m in enumerate(ROOM_COUNTS[rooms])]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# ----------------------------------------------------------------------------- WebSocket


class WsClient:
    """A protobuf WebSocket client on asyncio streams (setup and publishing only)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> WsClient:
        reader, writer = await asyncio.open_connection(host, port)
        request, key = ws_upgrade_request(host, port, WS_PATH, SUBPROTOCOL)
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        error = ws_upgrade_error(head[:-4], key, SUBPROTOCOL)
        if error is not None:
            writer.close()
            raise ConnectionError(error)
        return cls(reader, writer)

    def send(self, *commands: pb.Command) -> None:
        """The commands as one frame (the gateway runs them in order)."""
        payload = b"".join(delimited(c.SerializeToString()) for c in commands)
        self.writer.write(client_frame(payload))

    async def replies(self) -> list[pb.Reply]:
        """The messages of the next data frame from the server (pings answered)."""
        reader = self.reader
        while True:
            b0, b1 = await reader.readexactly(2)
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(await reader.readexactly(2), "big")
            elif length == 127:
                length = int.from_bytes(await reader.readexactly(8), "big")
            payload = await reader.readexactly(length)
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.writer.write(client_frame(payload, 0xA))
            elif opcode == 0x8:
                raise ConnectionError(f"server closed: {payload!r}")
            elif opcode == 0x2:
                return [pb.Reply.FromString(m) for m in split_delimited(payload)]

    async def until_reply(self, command_id: int) -> list[pb.Reply]:
        """Replies up to the one to `command_id`; errors among them raise."""
        seen = []
        while True:
            for reply in await self.replies():
                if reply.HasField("error"):
                    raise RuntimeError(
                        f"reply {reply.id}: {reply.error.code} {reply.error.message}"
                    )
                seen.append(reply)
                if reply.id == command_id:
                    return seen

    def close(self) -> None:
        self.writer.close()


# ----------------------------------------------------------------------------- the driver


class Driver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = asyncio.get_running_loop()
        self.errors: list[str] = []
        self.error_count = 0
        self.publisher: WsClient | None = None
        self.publish_id = 1
        n = args.n if args.mode == "poll" else args.k
        self.n = n
        self.tokens = [mint_token(args.secret, f"user-{i}", device=f"phone-{i}") for i in range(n)]
        if args.mode == "poll":
            self.rooms = [device_rooms(i, n, args.room_size) for i in range(n)]
        else:
            self.rooms = [[(STANDIN_CHANNEL, 1)] for _ in range(n)]
        host = f"{args.host}:{args.port}"
        self.requests = [
            (
                f"GET {POLL_PATH} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                "Connection: close\r\n\r\n"
            ).encode()
            for token in self.tokens
        ]

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 5:
            self.errors.append(text)

    async def line(self) -> str:
        return (await self.loop.run_in_executor(None, sys.stdin.readline)).strip()

    async def ready_go(self) -> None:
        print("READY", flush=True)
        got = await self.line()
        if got != "GO":
            raise RuntimeError(f"expected GO, got {got!r}")

    def done(self) -> None:
        print("DONE", flush=True)

    async def serve(self) -> None:
        while True:
            command = await self.line()
            if not command or command == "QUIT":
                return
            word, _, rest = command.partition(" ")
            if word != "STEP":
                raise RuntimeError(f"unknown command {command!r}")
            step, _, arg = rest.partition(" ")
            self.errors, self.error_count = [], 0
            try:
                async with asyncio.timeout(self.args.deadline):
                    result = await getattr(self, f"step_{step}")(arg)
            except Exception as exc:  # reported, the orchestrator fails the run
                self.error(f"{step}: {exc!r}")
                result = {}
            result.update(step=step, errors=self.errors, error_count=self.error_count)
            print(json.dumps(result), flush=True)

    # ------------------------------------------------------------------ setup

    async def detach_device(self, i: int) -> None:
        args = self.args
        client = await WsClient.open(args.host, args.port)
        try:
            commands = [pb.Command(id=1, connect=pb.ConnectRequest(token=self.tokens[i]))]
            for channel, _ in self.rooms[i]:
                commands.append(
                    pb.Command(id=len(commands) + 1, subscribe=pb.SubscribeRequest(channel=channel))
                )
            client.send(*commands)
            await client.until_reply(len(commands))
            # app_state only once connect and subscribe are answered. Sent in the same
            # frame, its detach is undone: connect ends any detached session of the device
            # in a task that starts only after the frame's commands ran, and so writes
            # after the detach (the app then polls 404; docs/PERFORMANCE.md).
            background = pb.AppStateRequest(state=pb.AppStateRequest.STATE_BACKGROUND)
            client.send(pb.Command(id=len(commands) + 1, app_state=background))
            replies = await client.until_reply(len(commands) + 1)
            if len(replies[-1].app_state.positions) != len(self.rooms[i]):
                raise RuntimeError(f"app_state kept {replies[-1].app_state.positions}")
        finally:
            client.close()

    async def step_setup(self, arg: str) -> dict[str, Any]:
        """Not measured (the orchestrator takes RSS before and after)."""
        await self.ready_go()
        start = time.perf_counter()
        await self.each(self.n, self.args.setup_concurrency, self.detach_device)
        elapsed = time.perf_counter() - start
        self.done()
        channels = {c for rooms in self.rooms for c, _ in rooms}
        return {
            "devices": self.n,
            "channels": len(channels),
            "subscriptions": sum(len(r) for r in self.rooms),
            "elapsed": elapsed,
        }

    async def each(self, count: int, concurrency: int, fn: Any) -> None:
        """fn(i) for i in range(count), `concurrency` at a time, each within the step
        timeout; failures are counted as errors."""
        timeout = self.args.step_timeout
        items = iter(range(count))

        async def worker() -> None:
            for i in items:
                try:
                    await asyncio.wait_for(fn(i), timeout)
                except Exception as exc:
                    self.error(f"device {i}: {exc!r}")

        await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))

    # ------------------------------------------------------------------ publish (server API)

    async def step_publish(self, arg: str) -> dict[str, Any]:
        """One round: every room gets its count of publications. Not measured."""
        args = self.args
        counts: dict[str, int] = {}
        for rooms in self.rooms:
            counts.update(rooms)
        await self.ready_go()
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection(args.host, args.api_port)
        key = os.environ.get("BENCH_API_KEY", "")
        published = 0
        try:
            for k in range(1, max(counts.values(), default=0) + 1):
                channels = sorted(c for c, m in counts.items() if m >= k)
                for first in range(0, len(channels), MAX_BROADCAST):
                    chunk = channels[first : first + MAX_BROADCAST]
                    body = json.dumps({"channels": chunk, "data": MESSAGE}).encode()
                    writer.write(
                        b"POST /api/v1/broadcast HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nX-API-Key: " + key.encode() + b"\r\n"
                        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                    )
                    status, answer = await read_answer(reader)
                    if status != 200:
                        raise RuntimeError(f"broadcast: {status} {answer[:200]!r}")
                    results = json.loads(answer)["results"]
                    failed = [r for r in results if "error" in r]
                    if failed:
                        raise RuntimeError(f"broadcast: {len(failed)} failed: {failed[0]}")
                    published += len(results)
        finally:
            writer.close()
        elapsed = time.perf_counter() - start
        self.done()
        return {"publications": published, "elapsed": elapsed}

    # ------------------------------------------------------------------ polls

    async def step_poll(self, arg: str) -> dict[str, Any]:
        """Every device polls once; checks after DONE. arg: "<expect> [<concurrency>]"."""
        words = arg.split()
        expect = int(words[0]) if words else 0
        args = self.args
        concurrency = int(words[1]) if len(words) > 1 else args.concurrency
        n = self.n
        answers: list[bytes | None] = [None] * n
        latencies: list[float] = [0.0] * n
        requests = self.requests
        host, port = args.host, args.port
        timeout = args.step_timeout
        counter = iter(range(n))
        perf = time.perf_counter

        async def one(i: int) -> None:
            t0 = perf()
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(requests[i])
                head = await reader.readuntil(b"\r\n\r\n")
                at = head.find(b"\r\nContent-Length:")
                if at < 0:
                    at = head.lower().find(b"\r\ncontent-length:")
                length = int(head[at + 17 : head.index(b"\r\n", at + 2)])
                body = await reader.readexactly(length)
            finally:
                writer.close()
            latencies[i] = perf() - t0
            answers[i] = head + body

        async def worker() -> None:
            for i in counter:
                try:
                    await asyncio.wait_for(one(i), timeout)
                except Exception as exc:
                    self.error(f"poll {i}: {exc!r}")

        await self.ready_go()
        cpu0 = time.process_time()
        start = perf()
        await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
        elapsed = perf() - start
        driver_cpu = time.process_time() - cpu0
        self.done()
        return self.check_polls(answers, latencies, expect) | {
            "polls": n,
            "elapsed": elapsed,
            "driver_cpu": driver_cpu,
            "concurrency": min(concurrency, n),
        }

    def check_polls(
        self, answers: list[bytes | None], latencies: list[float], expect: int
    ) -> dict[str, Any]:
        sizes: list[int] = []
        bodies: list[int] = []
        publications = 0
        for i, answer in enumerate(answers):
            if answer is None:
                continue  # counted as an error already
            head, _, body = answer.partition(b"\r\n\r\n")
            sizes.append(len(answer))
            bodies.append(len(body))
            status = head[9:12]
            if status != b"200":
                self.error(f"poll {i}: {head.splitlines()[0]!r} {body[:200]!r}")
                continue
            try:
                found = json.loads(body)
                got = sum(len(c["publications"]) for c in found["channels"].values())
                recovered = all(c["recovered"] for c in found["channels"].values())
            except (ValueError, KeyError, TypeError) as exc:
                self.error(f"poll {i}: not a poll answer ({exc!r}): {body[:200]!r}")
                continue
            publications += got
            if got != expect or not recovered or found["more"]:
                self.error(
                    f"poll {i}: {got} publications (expected {expect}), recovered={recovered},"
                    f" more={found['more']}"
                )
        mean = sum(sizes) / len(sizes) if sizes else 0.0
        sample = min(
            (a for a in answers if a is not None), key=lambda a: abs(len(a) - mean), default=b""
        )
        return {
            "answered": len(sizes),
            "publications": publications,
            "answer_bytes": mean,
            "body_bytes": sum(bodies) / len(bodies) if bodies else 0.0,
            "latencies_ms": [round(1000 * v, 3) for v in latencies if v],
            "p50_ms": 1000 * percentile([v for v in latencies if v], 50),
            "p99_ms": 1000 * percentile([v for v in latencies if v], 99),
            "sample": sample.decode("latin-1"),
        }

    # ------------------------------------------------------------------ stand-ins

    async def open_publisher(self) -> WsClient:
        if self.publisher is None:
            args = self.args
            client = await WsClient.open(args.host, args.port)
            token = mint_token(args.secret, "publisher")
            client.send(pb.Command(id=1, connect=pb.ConnectRequest(token=token)))
            await client.until_reply(1)
            self.publisher = client
            self.publish_id = 2
        return self.publisher

    async def publish_window(self, client: WsClient, count: int, data: bytes) -> None:
        """`count` publish commands, one frame each, written at once; all acknowledged."""
        first = self.publish_id
        frames = []
        for k in range(count):
            request = pb.PublishRequest(channel=STANDIN_CHANNEL, data=data)
            frames.append(
                client_frame(
                    delimited(pb.Command(id=first + k, publish=request).SerializeToString())
                )
            )
        self.publish_id += count
        client.writer.write(b"".join(frames))
        acked = 0
        while acked < count:
            for reply in await client.replies():
                if reply.HasField("error"):
                    raise RuntimeError(
                        f"publish {reply.id}: {reply.error.code} {reply.error.message}"
                    )
                if reply.id:
                    acked += 1

    async def step_first(self, arg: str) -> dict[str, Any]:
        client = await self.open_publisher()
        data = json.dumps({"n": 0, "pad": "x" * (PUBLISH_BYTES - 20)}).encode()
        await self.ready_go()
        start = time.perf_counter()
        await self.publish_window(client, 1, data)
        elapsed = time.perf_counter() - start
        self.done()
        return {"publications": 1, "elapsed": elapsed}

    async def step_steady(self, arg: str) -> dict[str, Any]:
        args = self.args
        client = await self.open_publisher()
        data = json.dumps({"n": 1, "pad": "x" * (PUBLISH_BYTES - 20)}).encode()
        await self.ready_go()
        cpu0 = time.process_time()
        start = time.perf_counter()
        end = start + args.duration
        published = 0
        while time.perf_counter() < end:
            await self.publish_window(client, args.window, data)
            published += args.window
        elapsed = time.perf_counter() - start
        driver_cpu = time.process_time() - cpu0
        self.done()
        return {"publications": published, "elapsed": elapsed, "driver_cpu": driver_cpu}


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """An HTTP/1.1 answer with a Content-Length: its status and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(None, 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def main(args: argparse.Namespace) -> None:
    raise_nofile()
    driver = Driver(args)
    try:
        await driver.serve()
    finally:
        if driver.publisher is not None:
            driver.publisher.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = loadgen_parser(
        "poll benchmark driver (see module doc)",
        ["poll", "standins"],
        ["gateway", "reference"],
        "HS256 secret for tokens (default: $BENCH_HMAC_SECRET)",
    )
    parser.add_argument("--api-port", type=int, default=0, help="the gateway's server API")
    parser.add_argument("-n", type=int, default=2000, help="poll: detached devices")
    parser.add_argument("--room-size", type=int, default=10, help="poll: devices per room")
    parser.add_argument("--concurrency", type=int, default=16, help="poll: polls in flight")
    parser.add_argument("--setup-concurrency", type=int, default=64)
    parser.add_argument("--k", type=int, default=0, help="standins: detached devices")
    parser.add_argument("--duration", type=float, default=3.0, help="standins: seconds")
    parser.add_argument("--window", type=int, default=20, help="standins: publishes at once")
    parser.add_argument("--step-timeout", type=float, default=20.0, help="per device or poll")
    parser.add_argument("--deadline", type=float, default=120.0, help="per step, seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
