"""A slow Redis read loop or a flood does not stall the node's other clients.

A gateway (in this process) on a real redis-server of the test's own:

- **flood**: another process publishes to one channel, through the broker's own publish
  script, in bursts far beyond the node's pub/sub queue (`broker.pubsub_queue_size`, small
  here). Meanwhile a bystander client of the same node makes ping, publish and history
  round trips: all of them complete; the overflow is dropped and counted, and the flooded
  channel's subscriber (the Python client) is told to resubscribe (2500) and recovers:
  in the end it has every publication, once, in order.
- **stall**: the redis-server is stopped (SIGSTOP) for a few seconds. Clients that need
  nothing from Redis (pings, connects) are answered throughout; a publish is answered
  within the command timeout, done or refused with the temporary error 115 and a retry
  hint; retried with its idempotency key, it is published once; the node carries on.

Every wait is bounded: a node that stalls fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from realtime.app import Gateway
from realtime.client import Client, Subscription
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import ErrorCode

from .conftest import GatewayFactory, RawClient, make_token, publish, ws_url
from .redis_server import RedisServer
from .test_server_api import http_get

FLOOD = "flood/stream"
HISTORY = 200_000
QUEUE = 100

# A process of its own publishes to FLOOD, in bursts of `burst` pipelined runs of the
# broker's publish script (so the stream holds every publication, as through a node),
# until SIGTERM or `max_seconds`; it prints how many it published.
FLOODER = """
import signal, sys, time
import redis
from realtime.brokers.redis_envelope import PUBLICATION_HEAD, publication_tail
from realtime.brokers.redis_scripts import PUBLISH

port, prefix, channel, history, burst = sys.argv[1:6]
pause, max_seconds = float(sys.argv[6]), float(sys.argv[7])
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
client = redis.Redis(port=int(port))
script = client.register_script(PUBLISH)
keys = [f"{prefix}:m:{channel}", f"{prefix}:s:{channel}"]
sent = 0
deadline = time.monotonic() + max_seconds
print("flooding", flush=True)
name = f"{prefix}:c:{channel}"
while not stop and time.monotonic() < deadline:
    pipe = client.pipeline(transaction=False)
    for _ in range(int(burst)):
        sent += 1
        tail = publication_tail(b'{"n":%d}' % sent, "flooder", "", None, None)
        args = [name, PUBLICATION_HEAD, tail, int(history), 300000, 86400, "ffff0000", 1000]
        script(keys=keys, args=args, client=pipe)
    pipe.execute()
    time.sleep(pause)
print(sent, flush=True)
"""


def config(redis_url: str, prefix: str, **broker: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "type": "redis",
        "redis_urls": [redis_url],
        "key_prefix": prefix,
        "connect_timeout": 1.0,
        "command_timeout": 1.0,
        "reconnect_max_delay": 0.5,
        "position_check_interval": 0.5,
    }
    settings.update(broker)
    return {
        "broker": settings,
        # Recovery replies after a flood are big, and the bystander is quick: this test is
        # about neither slow consumers nor rate limits.
        "limits": {
            "max_queue_bytes": 64 * 1024 * 1024,
            "commands_per_second": 10_000.0,
            "command_burst": 10_000,
            "user_publishes_per_second": 10_000.0,
            "user_publish_burst": 10_000,
        },
        "namespaces": {"flood": {"history_size": HISTORY, "history_ttl": 300.0}},
    }


async def metrics(gateway: Gateway) -> dict[str, float]:
    status, text = await asyncio.wait_for(http_get(gateway, "/metrics"), 10)
    assert status == 200
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


class Bystander:
    """A client of the flooded node doing ordinary round trips on its own channel."""

    def __init__(self, client: RawClient, channel: str) -> None:
        self.client = client
        self.channel = channel
        self.latencies: list[float] = []
        self.round_trips = 0

    async def request(self, **request: Any) -> pb.Reply:
        start = time.monotonic()
        reply = await self.client.request(timeout=10.0, **request)
        self.latencies.append(time.monotonic() - start)
        self.round_trips += 1
        return reply

    async def run(self, rounds: int) -> None:
        for i in range(rounds):
            assert (await self.request(ping=pb.PingRequest())).HasField("ping")
            data = json.dumps({"i": i}).encode()
            request = pb.PublishRequest(channel=self.channel, data=data, idempotency_key=f"b{i}")
            reply = await self.request(publish=request)
            assert not reply.HasField("error"), reply.error
            assert reply.publish.position.offset == i + 1
            reply = await self.request(
                history=pb.HistoryRequest(channel=self.channel, limit=5, reverse=True)
            )
            assert not reply.HasField("error"), reply.error
            assert reply.history.publications[0].offset == i + 1
            await asyncio.sleep(0.04)  # spread over the flood (a few seconds)


async def test_a_flood_does_not_stall_the_nodes_other_clients(
    make_gateway: GatewayFactory,
    make_redis_server: Callable[[], RedisServer],
    clients: list[RawClient],
) -> None:
    server = make_redis_server()
    prefix = "iso"
    gateway = await make_gateway(**config(server.url, prefix, pubsub_queue_size=QUEUE))
    broker = gateway.node.broker
    shard = broker.shards[0]  # type: ignore[attr-defined]
    failed: list[Subscription] = []
    offsets: list[int] = []
    flooder: asyncio.subprocess.Process | None = None
    async with Client(
        ws_url(gateway),
        token=make_token("flooded"),
        backoff_min=0.05,
        backoff_max=0.5,
        max_queue=1_000_000,
    ) as flooded:
        sub = await flooded.subscribe(FLOOD)
        sub.on_recovery_failed = failed.append

        async def consume() -> None:
            async for pub in sub:
                offsets.append(pub.offset)

        consumer = asyncio.create_task(consume())
        raw = await RawClient.open(gateway, token=make_token("bystander"))
        clients.append(raw)
        await raw.subscribe("chat/bystander")
        bystander = Bystander(raw, "chat/bystander")
        try:
            flooder = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                FLOODER,
                str(server.port),
                prefix,
                FLOOD,
                str(HISTORY),
                "500",  # per burst: 5x the node's queue, arriving at once
                "0.02",
                "60",
                stdout=asyncio.subprocess.PIPE,
            )
            assert flooder.stdout is not None
            line = await asyncio.wait_for(flooder.stdout.readline(), 20)
            assert line.strip() == b"flooding"
            await until(lambda: shard.pubsub.dropped > 0, 20, "the node drops pub/sub messages")
            # The bystander's round trips, while the flood goes on.
            await asyncio.wait_for(bystander.run(50), 60)
            assert (await asyncio.wait_for(http_get(gateway, "/healthz"), 10))[0] == 200
            assert flooder.returncode is None, "the flood ended before the bystander did"
            flooder.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(flooder.communicate(), 30)
            total = int(out.split()[-1])
            assert total >= 20 * QUEUE
            # The flood is over: a last publication, through the node's server API.
            last = await publish(gateway, FLOOD, "end")
            assert last["position"]["offset"] == total + 1
            await until(lambda: bool(offsets) and offsets[-1] == total + 1, 60, "recovery")
        finally:
            if flooder is not None and flooder.returncode is None:
                flooder.kill()
                await flooder.wait()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
    assert bystander.round_trips == 150
    samples = await metrics(gateway)
    dropped = samples["realtime_redis_pubsub_dropped"]
    assert dropped == shard.pubsub.dropped > 0
    gaps = samples['realtime_channel_events_total{kind="stream_gap"}']
    assert gaps >= 1
    # Told to resubscribe, the flooded channel's subscriber recovered every publication:
    # nothing lost, nothing twice, in order.
    assert offsets == list(range(1, total + 2))
    assert not failed and sub.dropped == 0
    print(
        f"flood: {total} publications, {dropped:g} dropped by the node, {gaps:g} gaps; "
        f"bystander round trips: max {max(bystander.latencies) * 1000:.1f} ms, "
        f"median {sorted(bystander.latencies)[75] * 1000:.1f} ms"
    )


async def test_a_stalled_redis_does_not_stall_the_node(
    make_gateway: GatewayFactory,
    make_redis_server: Callable[[], RedisServer],
    clients: list[RawClient],
) -> None:
    server = make_redis_server()
    gateway = await make_gateway(**config(server.url, "stall"))
    listener = await RawClient.open(gateway, token=make_token("listener"))
    pinger = await RawClient.open(gateway, token=make_token("pinger"))
    publisher = await RawClient.open(gateway, token=make_token("publisher"))
    clients.extend([listener, pinger, publisher])
    await listener.subscribe("chat/room")
    reply = await publisher.request(publish=pb.PublishRequest(channel="chat/room", data=b"1"))
    assert not reply.HasField("error"), reply.error
    assert (await listener.publication()).pub.data == b"1"
    assert server.process is not None
    pid = server.process.pid
    stall = 3.0
    pings: list[float] = []
    answers: list[pb.Reply] = []

    async def ping_all_along(until_time: float) -> None:
        while time.monotonic() < until_time:
            start = time.monotonic()
            assert (await pinger.request(timeout=5.0, ping=pb.PingRequest())).HasField("ping")
            pings.append(time.monotonic() - start)
            await asyncio.sleep(0.05)

    async def publish_once(data: bytes) -> pb.Reply:
        """Publish `data` (idempotency key = data) until done, as told by the replies."""
        request = pb.PublishRequest(channel="chat/room", data=data, idempotency_key=data.decode())
        deadline = time.monotonic() + 30
        while True:
            start = time.monotonic()
            reply = await publisher.request(timeout=10.0, publish=request)
            # Answered within the command timeout (1 s), give or take the loop.
            assert time.monotonic() - start < 5.0
            answers.append(reply)
            if not reply.HasField("error"):
                return reply
            error = reply.error
            assert error.code == ErrorCode.BROKER_UNAVAILABLE, error
            assert error.temporary and error.retry_after_ms > 0, error
            assert time.monotonic() < deadline
            await asyncio.sleep(error.retry_after_ms / 1000)

    os.kill(pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        pinging = asyncio.create_task(ping_all_along(stopped_at + stall))
        publishing = asyncio.create_task(publish_once(b"2"))
        # Meanwhile: a new client connects (nothing in connect waits for Redis) and the
        # health endpoint answers.
        newcomer = await RawClient.open(gateway, token=make_token("newcomer"), open_timeout=5)
        clients.append(newcomer)
        assert (await newcomer.request(ping=pb.PingRequest())).HasField("ping")
        assert (await asyncio.wait_for(http_get(gateway, "/healthz"), 5))[0] == 200
        await asyncio.wait_for(pinging, stall + 10)
        assert time.monotonic() - stopped_at >= stall
    finally:
        os.kill(pid, signal.SIGCONT)
    done = await asyncio.wait_for(publishing, 40)
    assert len(pings) >= 20 and max(pings) < 2.0, pings
    # The node carries on: the publication (made once, whatever the retries), then a new one.
    assert (await listener.publication(timeout=10)).pub.data == b"2"
    fresh = await publisher.request(publish=pb.PublishRequest(channel="chat/room", data=b"3"))
    assert not fresh.HasField("error"), fresh.error
    assert fresh.publish.position.offset == done.publish.position.offset + 1
    assert (await listener.publication(timeout=10)).pub.data == b"3"
    history = await publisher.request(history=pb.HistoryRequest(channel="chat/room"))
    assert [p.data for p in history.history.publications] == [b"1", b"2", b"3"]
    assert listener.unexpected_pushes() == []  # nothing else: no gap, no duplicate
    assert (await asyncio.wait_for(http_get(gateway, "/readyz"), 5))[0] == 200
    refused = sum(reply.HasField("error") for reply in answers)
    print(
        f"stall: {len(pings)} pings, max {max(pings) * 1000:.1f} ms; publish answered "
        f"{len(answers)} times ({refused} refused with 115)"
    )
