"""MQTT load generator: raw uvloop asyncio.Protocol MQTT 3.1.1 clients.

Spawned by bench/mqtt/run.py, one process per measurement (two for very many idle
connections). It talks to the orchestrator with lines on stdin/stdout, like
bench/fanout/loadgen.py:

    loadgen -> "READY"   clients are connected and subscribed
    run.py  -> "GO"      (after snapshotting broker CPU / RSS)
    loadgen -> "DONE"    the measured phase is over
    loadgen -> {...}     one JSON line with the results, then exit

Packets are built with the gateway's codec (`realtime.mqtt`); CONNACK and SUBACK are decoded
with its `PacketDecoder`. After the handshake, a subscriber does not decode what it receives:
it walks the fixed headers (first byte, remaining-length varint) and counts PUBLISH packets
(type 0x3_), so counting costs the same whatever the broker. Both brokers get the same bytes:
the gateway's CONNECT carries a JWT as the password (HS256, $BENCH_HMAC_SECRET), mosquitto's
the same kind of string (it lets anonymous clients in and ignores it). TCP_NODELAY is set on
every client socket.

Modes:
  throughput  N subscribers of one topic + 1 publisher, all QoS 0; bursts of B PUBLISH packets
              (100-byte payloads) written back to back, then wait until all N*B deliveries
              arrived; repeat until M messages. One unmeasured warm-up burst before READY.
  idle        C clients (keep-alive 300), each subscribed to its own topic, then nothing.
              With --source-port, client i binds that port + i (see LoadGen.connect).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import socket
import sys
import time
from collections.abc import Callable

import jwt
import uvloop

from realtime.mqtt import (
    MQTT_3_1_1,
    ConnAck,
    Connect,
    PacketDecoder,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    encode,
    encode_publish,
)

TOPIC = "bench/mqtt"
IDLE_TOPIC = "bench/idle/{}"
PAYLOAD_BYTES = 100
KEEP_ALIVE = 300
VERSION = MQTT_3_1_1

SETUP, COUNT = 0, 1


class Stats:
    def __init__(self) -> None:
        self.delivered = 0
        self.target = 0
        self.reached: asyncio.Event | None = None
        self.errors: list[str] = []

    def arm(self, target: int) -> asyncio.Event:
        self.target = target
        self.reached = asyncio.Event()
        if self.delivered >= target:
            self.reached.set()
        return self.reached


class Client(asyncio.Protocol):
    """One MQTT 3.1.1 connection. SETUP: decode (CONNACK, SUBACK); COUNT: count PUBLISHes."""

    __slots__ = (
        "closing",
        "decoder",
        "mode",
        "packets",
        "partial",
        "skip",
        "stats",
        "transport",
        "waiter",
    )

    def __init__(self, stats: Stats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None
        self.closing = False
        self.mode = SETUP
        self.decoder: PacketDecoder | None = PacketDecoder(VERSION, server=False)
        self.packets: list[object] = []
        self.waiter: asyncio.Future[None] | None = None
        self.partial = b""  # COUNT: an incomplete fixed header
        self.skip = 0  # COUNT: bytes of the current packet still to come

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closing:
            self.stats.errors.append(f"connection lost: {exc!r}")
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        if self.mode == SETUP:
            assert self.decoder is not None
            try:
                self.packets.extend(self.decoder.feed(data))
            except Exception as exc:  # reported; the run fails
                self.stats.errors.append(f"bad packet: {exc!r}")
            waiter = self.waiter
            if self.packets and waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if self.partial:
            data = self.partial + data
            self.partial = b""
        size = len(data)
        pos = self.skip
        if pos >= size:
            self.skip = pos - size
            return
        count = 0
        while pos < size:
            first = data[pos]
            if pos + 1 == size:
                self.partial = data[pos:]
                break
            b = data[pos + 1]
            if b < 0x80:
                end = pos + 2 + b
            else:  # a remaining length of 2-4 bytes
                length = b & 0x7F
                shift = 7
                p = pos + 2
                while p < size:
                    b = data[p]
                    p += 1
                    length |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                else:
                    self.partial = data[pos:]
                    break
                end = p + length
            if first & 0xF0 == 0x30:
                count += 1
            elif first != 0xD0:  # PINGRESP is harmless; anything else is not expected
                self.stats.errors.append(f"unexpected packet type 0x{first:02x}")
            pos = end
        self.skip = pos - size if pos > size else 0
        if count:
            stats = self.stats
            stats.delivered += count
            if stats.delivered >= stats.target and stats.reached is not None:
                stats.reached.set()

    async def next_packet(self, timeout: float) -> object:
        while not self.packets:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, timeout)
            finally:
                self.waiter = None
        return self.packets.pop(0)


class LoadGen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stats = Stats()
        self.loop = asyncio.get_running_loop()
        self.clients: list[Client] = []

    def password(self, user: str) -> bytes:
        if self.args.server != "gateway":
            return b"mosquitto-ignores-this"
        claims = {
            "sub": user,
            "exp": int(time.time()) + 3600,
            "subscribe": ["#"],
            "publish": ["#"],
        }
        return jwt.encode(claims, self.args.secret, "HS256").encode()

    async def connect(self, index: int | None) -> Client:
        """A TCP connection; idle clients bind source port `--source-port` + index first.

        With more than ~14,000 connections from one address to one port, Linux's connect()
        gets slow: it tries every even ephemeral port before the odd ones, so each connect
        scans thousands of used ports (~1 ms of system time). An explicit source port
        outside the ephemeral range skips that search.
        """
        args = self.args
        if index is not None and args.source_port:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((args.host, args.source_port + index))
            except OSError:  # in use: let the kernel choose
                sock.close()
            else:
                sock.setblocking(False)
                try:
                    await self.loop.sock_connect(sock, (args.host, args.port))
                except BaseException:
                    sock.close()
                    raise
                _, client = await self.loop.create_connection(lambda: Client(self.stats), sock=sock)
                return client
        _, client = await self.loop.create_connection(
            lambda: Client(self.stats), args.host, args.port
        )
        return client

    async def open_client(self, client_id: str, topic: str | None, index: int | None) -> Client:
        args = self.args
        client = await self.connect(index)
        assert client.transport is not None
        connect = Connect(
            client_id=client_id,
            clean_start=True,
            keep_alive=KEEP_ALIVE,
            username=client_id,
            password=self.password(client_id),
        )
        client.transport.write(encode(connect, VERSION))
        connack = await client.next_packet(args.step_timeout)
        if not isinstance(connack, ConnAck) or connack.reason_code != 0:
            raise RuntimeError(f"{client_id}: CONNECT refused: {connack!r}")
        if topic is not None:
            subscribe = Subscribe(1, [(topic, SubscriptionOptions(qos=0))])
            client.transport.write(encode(subscribe, VERSION))
            suback = await client.next_packet(args.step_timeout)
            if not isinstance(suback, SubAck) or suback.reason_codes != [0]:
                raise RuntimeError(f"{client_id}: SUBSCRIBE refused: {suback!r}")
        if client.packets or (client.decoder is not None and client.decoder.buffered):
            raise RuntimeError(f"{client_id}: unexpected packets after the handshake")
        client.decoder = None
        client.mode = COUNT
        return client

    async def open_many(self, count: int, topic_of: Callable[[int], str]) -> None:
        batch, first = self.args.batch, self.args.first
        for start in range(first, first + count, batch):
            stop = min(start + batch, first + count)
            clients = await asyncio.gather(
                *(self.open_client(f"c{i}", topic_of(i), i) for i in range(start, stop))
            )
            self.clients.extend(clients)
        gc.collect()
        gc.freeze()

    async def handshake_with_orchestrator(self) -> None:
        print("READY", flush=True)
        line = await self.loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "GO":
            raise RuntimeError(f"expected GO from the orchestrator, got {line!r}")

    def close_all(self) -> None:
        for client in self.clients:
            client.closing = True
            if client.transport is not None:
                client.transport.abort()

    # ------------------------------------------------------------------ modes

    async def throughput(self) -> dict[str, object]:
        args = self.args
        await self.open_many(args.n, lambda i: TOPIC)
        publisher = await self.open_client(f"publisher-{os.getpid()}", None, None)
        self.clients.append(publisher)
        burst = b"".join(
            encode_publish(TOPIC, bytes([i % 256]) * PAYLOAD_BYTES, 0, False, False, 0, VERSION)
            for i in range(args.burst)
        )
        stats = self.stats
        per_burst = args.n * args.burst
        # Warm-up: one burst, not measured.
        reached = stats.arm(per_burst)
        publisher.transport.write(burst)  # type: ignore[union-attr]
        await asyncio.wait_for(reached.wait(), args.burst_timeout)
        stats.delivered = 0
        bursts = max(1, args.messages // args.burst)
        await self.handshake_with_orchestrator()
        start = time.perf_counter()
        cpu0 = time.process_time()
        timeouts = 0
        for i in range(bursts):
            reached = stats.arm((i + 1) * per_burst)
            publisher.transport.write(burst)  # type: ignore[union-attr]
            try:
                await asyncio.wait_for(reached.wait(), args.burst_timeout)
            except TimeoutError:
                timeouts += 1
                break
        elapsed = time.perf_counter() - start
        loadgen_cpu = time.process_time() - cpu0
        print("DONE", flush=True)
        sent = bursts * args.burst
        return {
            "mode": "throughput",
            "n": args.n,
            "messages": sent,
            "expected": sent * args.n,
            "delivered": stats.delivered,
            "elapsed": elapsed,
            "loadgen_cpu": loadgen_cpu,
            "timeouts": timeouts,
        }

    async def idle(self) -> dict[str, object]:
        start = time.perf_counter()
        await self.open_many(self.args.n, IDLE_TOPIC.format)
        opened = time.perf_counter() - start
        await self.handshake_with_orchestrator()
        alive = sum(1 for c in self.clients if c.transport is not None)
        print("DONE", flush=True)
        return {"mode": "idle", "n": self.args.n, "alive": alive, "open_seconds": opened}


async def main(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.n + 256
    if soft < want:
        try:  # root may raise the hard limit too
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loadgen = LoadGen(args)
    result: dict[str, object]
    try:
        async with asyncio.timeout(args.deadline):
            result = await getattr(loadgen, args.mode)()
    finally:
        loadgen.close_all()
    result["server"] = args.server
    result["errors"] = loadgen.stats.errors[:5]
    result["error_count"] = len(loadgen.stats.errors)
    print(json.dumps(result), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="MQTT load generator (see module doc)")
    parser.add_argument("mode", choices=["throughput", "idle"])
    parser.add_argument("--server", choices=["gateway", "mosquitto"], required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--secret",
        default=os.environ.get("BENCH_HMAC_SECRET", ""),
        help="HS256 secret for the gateway's tokens (default: $BENCH_HMAC_SECRET)",
    )
    parser.add_argument("-n", type=int, default=1, help="subscribers (idle: connections)")
    parser.add_argument("--first", type=int, default=0, help="idle: index of the first client")
    parser.add_argument("--messages", type=int, default=1000, help="throughput: publishes")
    parser.add_argument("--burst", type=int, default=100, help="throughput: publishes per burst")
    parser.add_argument("--batch", type=int, default=500, help="connections opened at once")
    parser.add_argument(
        "--source-port",
        type=int,
        default=0,
        help="idle: client i binds this port + i (0: the kernel chooses)",
    )
    parser.add_argument("--step-timeout", type=float, default=20.0)
    parser.add_argument("--burst-timeout", type=float, default=30.0)
    parser.add_argument("--deadline", type=float, default=150.0, help="hard limit, seconds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
