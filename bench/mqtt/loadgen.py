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
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

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

# A script, not a package module: bench/ goes on the path for the shared bench/common.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import LoadGenBase, Stats, add_timeouts, loadgen_parser, mint_token, raise_nofile

TOPIC = "bench/mqtt"
IDLE_TOPIC = "bench/idle/{}"
PAYLOAD_BYTES = 100
KEEP_ALIVE = 300
VERSION = MQTT_3_1_1

SETUP, COUNT = 0, 1


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


class LoadGen(LoadGenBase[Client]):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__(args, Stats())

    def password(self, user: str) -> bytes:
        if self.args.server != "gateway":
            return b"mosquitto-ignores-this"
        return mint_token(self.args.secret, user, subscribe=["#"], publish=["#"]).encode()

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

    # ------------------------------------------------------------------ modes

    async def throughput(self) -> dict[str, object]:
        args = self.args
        await self.open_many(args.n, lambda i: TOPIC)
        publisher = await self.open_client(f"publisher-{os.getpid()}", None, None)
        self.publishers.append(publisher)
        burst = b"".join(
            encode_publish(TOPIC, bytes([i % 256]) * PAYLOAD_BYTES, 0, False, False, 0, VERSION)
            for i in range(args.burst)
        )
        # Warm-up: one burst, not measured.
        reached = self.stats.arm(args.n * args.burst)
        publisher.transport.write(burst)  # type: ignore[union-attr]
        await asyncio.wait_for(reached.wait(), args.burst_timeout)
        self.stats.delivered = 0
        return await self.timed_bursts(publisher, burst, own_cpu=True)

    async def open_idle(self) -> None:
        await self.open_many(self.args.n, IDLE_TOPIC.format)


async def main(args: argparse.Namespace) -> None:
    raise_nofile(args.n + 256)  # the clients' sockets, and some room
    await LoadGen(args).run()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = loadgen_parser(
        "MQTT load generator (see module doc)",
        ["throughput", "idle"],
        ["gateway", "mosquitto"],
        "HS256 secret for the gateway's tokens (default: $BENCH_HMAC_SECRET)",
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
    add_timeouts(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    uvloop.run(main(parse_args()))
