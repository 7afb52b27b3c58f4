"""The client's Fossil deltas, presence, typing and user status against the real gateway."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from realtime.app import Gateway
from realtime.client import (
    Client,
    ClientInfo,
    PresenceStats,
    RealtimeError,
    StreamPosition,
    Subscription,
    Typing,
)
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import CloseCode, ErrorCode
from realtime.protocol.framing import encode_delimited

from .conftest import GatewayFactory, RawClient, make_token, ws_url

NAMESPACES: dict[str, Any] = {
    "feed": {"history_size": 50, "history_ttl": 60.0, "delta": True},
    "room": {
        "history_size": 10,
        "presence": True,
        "join_leave": True,
        "typing": True,
        # Long enough that "throttled" and "stopped" never depend on the test's speed.
        "typing_throttle": 60.0,
        "typing_timeout": 120.0,
    },
}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(namespaces=NAMESPACES)


def feed_doc(version: int, items: int = 30) -> bytes:
    """A feed-like JSON document; each version changes one item's score and the stamp."""
    doc = {
        "feed": "top",
        "version": version,
        "items": [
            {
                "id": i,
                "title": f"headline number {i}",
                "score": i * 10 + (version if i == version % items else 0),
            }
            for i in range(items)
        ],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def poll(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def http_get(gateway: Gateway, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    return raw.partition(b"\r\n\r\n")[2].decode()


async def delta_deliveries(gateway: Gateway) -> float:
    for line in (await http_get(gateway, "/metrics")).splitlines():
        if line.startswith("realtime_delta_deliveries_total "):
            return float(line.split()[1])
    raise AssertionError("realtime_delta_deliveries_total is not in /metrics")


async def receive(sub: Subscription, count: int) -> list[bytes]:
    return [(await sub.get(timeout=5)).data for _ in range(count)]


# ---------------------------------------------------------------- deltas


async def test_delta_round_trip_with_mixed_subscribers(gateway: Gateway) -> None:
    channel = "feed/top"
    metric_before = await delta_deliveries(gateway)
    raw_delta = await RawClient.open(gateway)
    raw_full = await RawClient.open(gateway)
    await raw_delta.subscribe(channel, delta="fossil")
    await raw_full.subscribe(channel)
    async with (
        Client(ws_url(gateway), token=make_token("dana")) as reader,
        Client(ws_url(gateway), token=make_token("eli")) as publisher,
    ):
        with_deltas = await reader.subscribe(channel, delta=True)
        plain = await reader.subscribe("feed/other")  # an unrelated subscription
        docs = [feed_doc(v) for v in range(1, 21)]
        for doc in docs:
            await publisher.publish(channel, doc)
        got = await receive(with_deltas, len(docs))
        assert got == docs  # byte for byte, the first in full and the rest rebuilt
        assert with_deltas.deltas_applied == len(docs) - 1
        assert with_deltas.delta_failures == 0
        assert plain.qsize() == 0

        # A non-delta subscriber of the same client library, on the same channel.
        full_sub = await publisher.subscribe(channel)
        more = [feed_doc(v) for v in range(21, 26)]
        for doc in more:
            await publisher.publish(channel, doc)
        assert await receive(with_deltas, len(more)) == more
        assert await receive(full_sub, len(more)) == more
        assert full_sub.deltas_applied == 0

    # On the wire: deltas only to the subscriber that asked, the first one in full.
    flags = [(await raw_delta.publication()).pub.delta for _ in range(25)]
    assert flags == [False] + [True] * 24
    full_pushes = [(await raw_full.publication()).pub for _ in range(25)]
    assert not any(p.delta for p in full_pushes)
    assert [p.data for p in full_pushes] == docs + more
    # raw_delta: 24 deltas, the client's subscription: 24 deltas.
    assert await delta_deliveries(gateway) - metric_before == 48
    await raw_delta.close()
    await raw_full.close()


async def test_late_delta_subscriber_starts_from_a_full_publication(gateway: Gateway) -> None:
    channel = "feed/late"
    async with (
        Client(ws_url(gateway), token=make_token("fay")) as early,
        Client(ws_url(gateway), token=make_token("gus")) as late,
    ):
        first = await early.subscribe(channel, delta=True)
        for v in range(1, 6):
            await early.publish(channel, feed_doc(v))
        assert await receive(first, 5) == [feed_doc(v) for v in range(1, 6)]
        second = await late.subscribe(channel, delta=True)
        for v in range(6, 11):
            await early.publish(channel, feed_doc(v))
        expected = [feed_doc(v) for v in range(6, 11)]
        assert await receive(first, 5) == expected
        assert await receive(second, 5) == expected
        assert second.deltas_applied == 4  # offset 6 came in full
        assert first.deltas_applied == 9


async def test_recovery_with_since_carries_deltas(gateway: Gateway) -> None:
    channel = "feed/since"
    docs = [feed_doc(v) for v in range(1, 13)]
    async with Client(ws_url(gateway), token=make_token("hal")) as client:
        for doc in docs:
            await client.publish(channel, doc)
        pubs, top = await client.history(channel)
        assert top.offset == 12
        since = StreamPosition(pubs[3].offset, top.epoch)
    # The server's recovery reply: the first recovered publication in full, then deltas.
    raw = await RawClient.open(gateway)
    result = await raw.subscribe(channel, delta="fossil", recover=True, since=since.to_pb())
    assert result.recovered
    assert [p.delta for p in result.publications] == [False] + [True] * 7
    await raw.close()
    # The client rebuilds them through the same path as live deltas.
    async with Client(ws_url(gateway), token=make_token("hal")) as client:
        sub = await client.subscribe(channel, since=since, delta=True)
        assert sub.recovered
        assert await receive(sub, 8) == docs[4:]
        assert sub.deltas_applied == 7


async def test_reconnect_recovers_missed_publications_as_deltas(gateway: Gateway) -> None:
    channel = "feed/reconnect"
    release = asyncio.Event()
    minted = 0

    async def get_token() -> str:
        # The first token expires within 2 seconds; the server then closes the
        # connection (3003) and the client asks for a new token, which waits until the
        # test has published what the client must recover.
        nonlocal minted
        minted += 1
        if minted > 1:
            await release.wait()
        return make_token("ivy", ttl=2 if minted == 1 else 3600)

    down = asyncio.Event()
    codes: list[int | None] = []

    def on_disconnect(code: int | None, reason: str, again: bool) -> None:
        codes.append(code)
        down.set()

    client = Client(
        ws_url(gateway),
        get_token=get_token,
        backoff_min=0.05,
        backoff_max=0.2,
        command_timeout=30,
    )
    client.on_disconnect = on_disconnect
    publisher = Client(ws_url(gateway), token=make_token("publisher"))
    await client.connect()
    await publisher.connect()
    sub = await client.subscribe(channel, delta=True)
    docs = [feed_doc(v) for v in range(1, 31)]
    for doc in docs[:5]:
        await publisher.publish(channel, doc)
    assert await receive(sub, 5) == docs[:5]
    applied = sub.deltas_applied
    assert applied == 4

    await asyncio.wait_for(down.wait(), 10)
    assert codes == [CloseCode.TOKEN_EXPIRED]
    for doc in docs[5:]:
        await publisher.publish(channel, doc)
    release.set()
    assert await receive(sub, 25) == docs[5:]
    assert sub.recovered and client.connected
    # Nothing was published after the reconnect: the 24 deltas came in the recovery
    # reply (its first publication is full).
    assert sub.deltas_applied - applied == 24
    assert sub.delta_failures == 0
    await publisher.close()
    await client.close()


def _replace_base(sub: Subscription, make: Callable[[bytes], bytes | None]) -> None:
    assert sub._base is not None
    sub._base = make(sub._base)


CORRUPTIONS: dict[str, Callable[[Subscription], None]] = {
    # Same length, other bytes: only the checksum notices.
    "wrong_bytes": lambda sub: _replace_base(
        sub, lambda base: base.replace(b"headline number 7", b"headline NUMBER 7")
    ),
    "truncated": lambda sub: _replace_base(sub, lambda base: base[:-25]),
    "missing": lambda sub: _replace_base(sub, lambda base: None),
    # The base is believed to be of another offset than the delta's predecessor.
    "stale_offset": lambda sub: setattr(sub, "_base_offset", sub._base_offset - 1),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
async def test_a_delta_that_does_not_apply_resubscribes(
    gateway: Gateway, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    channel = f"feed/corrupt-{corruption}"
    async with (
        Client(ws_url(gateway), token=make_token("jon")) as client,
        Client(ws_url(gateway), token=make_token("kim")) as publisher,
    ):
        sub = await client.subscribe(channel, delta=True, recover=False)
        docs = [feed_doc(v) for v in range(1, 9)]
        for doc in docs[:3]:
            await publisher.publish(channel, doc)
        assert await receive(sub, 3) == docs[:3]
        assert sub.deltas_applied == 2
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="realtime.client"):
            CORRUPTIONS[corruption](sub)
            await publisher.publish(channel, docs[3])
            # Recovered in full from the last good position, never garbage.
            assert await receive(sub, 1) == [docs[3]]
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "not applied" in warnings[0].getMessage()
        assert sub.delta_failures == 1
        assert sub.recovered  # recovery is used for the resync even with recover=False
        for doc in docs[4:]:
            await publisher.publish(channel, doc)
        assert await receive(sub, 4) == docs[4:]
        # The first publication after the resubscribe is full, the others deltas again.
        assert sub.deltas_applied == 2 + 3
        assert sub.delta_failures == 1 and sub.qsize() == 0


async def test_a_failed_resync_recovery_is_reported(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(namespaces={"feed": {"history_size": 2, "delta": True}})
    channel = "feed/short"
    failed: list[Subscription] = []
    async with Client(ws_url(gateway), token=make_token("lou")) as client:
        sub = await client.subscribe(channel, delta=True)
        sub.on_recovery_failed = failed.append
        publisher = await RawClient.open(gateway)
        await publisher.request(publish=pb.PublishRequest(channel=channel, data=feed_doc(1)))
        assert await receive(sub, 1) == [feed_doc(1)]
        await publisher.request(publish=pb.PublishRequest(channel=channel, data=feed_doc(2)))
        assert await receive(sub, 1) == [feed_doc(2)]
        _replace_base(sub, lambda base: base.replace(b"number 9", b"NUMBER 9"))
        # Five publications in one frame: the server fans them out in one go, so history
        # (2 deep) has moved past the failed delta before the client can resubscribe.
        frame = encode_delimited(
            [
                pb.Command(
                    id=100 + v, publish=pb.PublishRequest(channel=channel, data=feed_doc(v))
                ).SerializeToString()
                for v in range(3, 8)
            ]
        )
        await publisher.ws.send(frame)
        await eventually(lambda: bool(failed), "on_recovery_failed")
        assert failed == [sub] and not sub.recovered and sub.delta_failures == 1
        assert sub.qsize() == 0  # nothing built on the wrong base was delivered
        await publisher.request(publish=pb.PublishRequest(channel=channel, data=feed_doc(8)))
        assert await receive(sub, 1) == [feed_doc(8)]  # full after the resubscribe
        await publisher.request(publish=pb.PublishRequest(channel=channel, data=feed_doc(9)))
        assert await receive(sub, 1) == [feed_doc(9)]
        assert sub.deltas_applied == 2
        await publisher.close()


async def test_delta_needs_a_namespace_that_offers_it(gateway: Gateway) -> None:
    async with Client(ws_url(gateway), token=make_token()) as client:
        with pytest.raises(RealtimeError) as info:
            await client.subscribe("room/no-deltas", delta=True)
        assert info.value.code == ErrorCode.NOT_AVAILABLE
        assert "room/no-deltas" not in client.subscriptions
        # Without delta the same channel works.
        await client.subscribe("room/no-deltas")


# ---------------------------------------------------------------- presence and typing


class Events:
    def __init__(self) -> None:
        self.joins: list[ClientInfo] = []
        self.leaves: list[ClientInfo] = []
        self.typing: list[Typing] = []

    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        return {
            "on_join": self.joins.append,
            "on_leave": self.leaves.append,
            "on_typing": self.typing.append,
        }


async def test_presence_join_leave_and_stats(gateway: Gateway) -> None:
    channel = "room/lobby"
    events = Events()
    alice = Client(ws_url(gateway), token=make_token("alice", device="laptop"))
    bob = Client(ws_url(gateway), token=make_token("bob", device="phone", info={"name": "Bob"}))
    await alice.connect()
    await bob.connect()
    await alice.subscribe(channel, **events.callbacks())

    def bobs(infos: list[ClientInfo]) -> list[ClientInfo]:
        return [info for info in infos if info.client == bob.client_id]

    bob_sub = await bob.subscribe(channel)
    await eventually(lambda: len(bobs(events.joins)) == 1, "bob's join")
    (joined,) = bobs(events.joins)
    assert (joined.user, joined.client, joined.device) == ("bob", bob.client_id, "phone")
    assert joined.info_json() == {"name": "Bob"}

    present = await alice.presence(channel)
    assert set(present) == {alice.client_id, bob.client_id}
    bob_info = present[bob.client_id]
    assert bob_info.user == "bob" and bob_info.device == "phone"
    assert bob_info.transport == "websocket" and bob_info.info_json() == {"name": "Bob"}
    assert present[alice.client_id].info_json() is None
    assert await bob.presence_stats(channel) == PresenceStats(clients=2, users=2)

    await bob_sub.unsubscribe()
    await eventually(lambda: len(bobs(events.leaves)) == 1, "bob's leave")
    assert bobs(events.leaves)[0].user == "bob"
    assert all(info.user == "bob" for info in events.joins + events.leaves)
    assert await alice.presence_stats(channel) == PresenceStats(clients=1, users=1)
    assert set(await alice.presence(channel)) == {alice.client_id}
    await bob.close()
    await alice.close()


async def test_presence_errors_map_to_realtime_errors(gateway: Gateway) -> None:
    token = make_token(subscribe=["room/mine", "feed/#"])
    async with Client(ws_url(gateway), token=token) as client:
        for call in (client.presence, client.presence_stats):
            with pytest.raises(RealtimeError) as info:
                await call("feed/top")  # no presence in that namespace
            assert info.value.code == ErrorCode.NOT_AVAILABLE
            with pytest.raises(RealtimeError) as info:
                await call("room/theirs")  # the token may not subscribe there
            assert info.value.code == ErrorCode.PERMISSION_DENIED
        # Presence needs subscribe permission, not a subscription.
        assert await client.presence("room/mine") == {}
        assert await client.presence_stats("room/mine") == PresenceStats(0, 0)


async def test_typing_events(gateway: Gateway) -> None:
    channel = "room/typing"
    events = Events()
    own = Events()
    alice = Client(ws_url(gateway), token=make_token("alice"))
    bob = Client(ws_url(gateway), token=make_token("bob"))
    await alice.connect()
    await bob.connect()
    await alice.subscribe(channel, **events.callbacks())
    await bob.subscribe(channel, on_typing=own.typing.append)

    assert await bob.typing(channel) is True  # forwarded
    await eventually(lambda: len(events.typing) == 1, "typing started")
    assert events.typing[0] == Typing(channel, "bob", bob.client_id or "", True)
    assert await bob.typing(channel) is False  # throttled: the first one still holds

    assert await bob.typing(channel, active=False) is True
    await eventually(lambda: len(events.typing) == 2, "typing stopped")
    assert events.typing[1] == Typing(channel, "bob", bob.client_id or "", False)

    # Publishing ends typing for the receivers.
    assert await bob.typing(channel) is True
    await eventually(lambda: len(events.typing) == 3, "typing started again")
    await bob.publish(channel, b'{"text":"done"}')
    await eventually(lambda: len(events.typing) == 4, "typing ended by the publication")
    assert [t.active for t in events.typing] == [True, False, True, False]
    assert own.typing == []  # the typist's own connection is not told

    with pytest.raises(RealtimeError) as info:
        await alice.typing("room/elsewhere")
    assert info.value.code == ErrorCode.NOT_SUBSCRIBED
    with pytest.raises(RealtimeError) as info:
        await alice.typing("feed/top")
    assert info.value.code == ErrorCode.NOT_AVAILABLE
    await bob.close()
    await alice.close()


async def test_user_status(gateway: Gateway) -> None:
    alice = Client(ws_url(gateway), token=make_token("alice"))
    bob = Client(ws_url(gateway), token=make_token("bob"))
    await alice.connect()
    await bob.connect()
    statuses = await alice.user_status(["bob", "alice", "nobody"])
    assert [s.user for s in statuses] == ["bob", "alice", "nobody"]
    assert statuses[0].online and statuses[0].last_seen > 0
    assert statuses[1].online
    assert not statuses[2].online and statuses[2].last_seen == 0

    await bob.close()

    async def bob_offline() -> bool:
        (status,) = await alice.user_status(["bob"])
        return not status.online

    await poll(bob_offline, "bob offline")
    (status,) = await alice.user_status(["bob"])
    assert status.last_seen > 0  # remembered after going offline

    with pytest.raises(TypeError):
        await alice.user_status("bob")
    with pytest.raises(RealtimeError) as info:
        await alice.user_status([])
    assert info.value.code == ErrorCode.BAD_REQUEST
    await alice.close()
