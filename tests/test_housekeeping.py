"""The node's once-a-second housekeeping: ping buckets when ticks come late.

Real WebSocket clients on a real gateway; the test stops the node's housekeeping task
and calls `Node.tick` itself with the `now` values a busy event loop produces (ticks
2.5 s apart, a long stall), then counts the ping pushes each client received.
"""

from __future__ import annotations

import asyncio
import contextlib

from realtime.app import Gateway
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import CloseCode
from tests.conftest import GatewayFactory, RawClient, make_token

BUCKETS = 4  # client.ping_interval: one bucket per second of the interval


async def stop_housekeeping(gateway: Gateway) -> None:
    """Only the test ticks from now on."""
    task = gateway.node._housekeeper
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def open_in_bucket(gateway: Gateway, user: str) -> tuple[RawClient, int]:
    """A connected client and the index of the ping bucket its session is in."""
    node = gateway.node
    before = set(node.sessions)
    client = await RawClient.open(gateway, token=make_token(user))
    (session,) = node.sessions - before
    (index,) = [i for i, bucket in enumerate(node._ping_buckets) if session in bucket]
    return client, index


async def pings_received(client: RawClient) -> int:
    """Ping pushes received since the last call. The round trip of a ping command is the
    barrier: what the node pushed before its reply has arrived before the reply."""
    reply = await client.request(ping=pb.PingRequest())
    assert reply.HasField("ping"), reply
    count = 0
    while not client.pushes.empty():
        if client.pushes.get_nowait().HasField("ping"):
            count += 1
    return count


async def test_late_ticks_ping_every_bucket_they_jumped_over(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    # A pong timeout far beyond the test's jumps: any 3002 below would be a bug.
    gateway = await make_gateway(client={"ping_interval": BUCKETS, "pong_timeout": 120})
    node = gateway.node
    await stop_housekeeping(gateway)
    by_bucket: dict[int, RawClient] = {}
    for n in range(BUCKETS):
        client, index = await open_in_bucket(gateway, f"user{n}")
        clients.append(client)
        by_bucket[index] = client
    assert sorted(by_bucket) == list(range(BUCKETS))  # one client in each bucket

    async def received() -> list[int]:
        return [await pings_received(by_bucket[i]) for i in range(BUCKETS)]

    # Seconds aligned on bucket 0, just after the loop's clock (last_rx is on it).
    base = float((int(node.loop.time()) // BUCKETS + 1) * BUCKETS)
    node.tick(base)  # a first tick (the cancelled task may have ticked before)
    await received()

    # 2.5 s late: seconds base+1 and base+2 are due, bucket 1 as well as bucket 2.
    node.tick(base + 2.5)
    assert await received() == [0, 1, 1, 0]
    # Seconds base+3, +4, +5: buckets 3, 0 and 1.
    node.tick(base + 5.0)
    assert await received() == [1, 1, 0, 1]
    # Seconds base+6, +7: buckets 2 and 3.
    node.tick(base + 7.5)
    assert await received() == [0, 0, 1, 1]
    # A tick in the same second as the last one has nothing more to do.
    node.tick(base + 7.9)
    assert await received() == [0, 0, 0, 0]
    # A long stall (seconds base+8 to base+40): one round of buckets, each pinged once.
    node.tick(base + 40.2)
    assert await received() == [1, 1, 1, 1]
    node.tick(base + 41.0)
    assert await received() == [0, 1, 0, 0]

    assert node.metrics.disconnects[int(CloseCode.NO_PONG)] == 0
    assert all(client.close_code is None for client in clients)
    assert len(node.sessions) == BUCKETS
