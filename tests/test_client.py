"""The project's asyncio client against the real gateway."""

from __future__ import annotations

import asyncio
import json

from realtime.app import Gateway
from realtime.client import Client, DisconnectedError, RealtimeError, Subscription
from realtime.protocol.codes import CloseCode, ErrorCode

from .conftest import GatewayFactory, api_post, make_token, publish, ws_url


async def test_subscribe_publish_history(gateway: Gateway) -> None:
    async with Client(ws_url(gateway), token=make_token()) as client:
        sub = await client.subscribe("chat/room")
        position = await client.publish("chat/room", b'{"text":"hi"}')
        assert position.offset == 1
        pub = await sub.get(timeout=5)
        assert pub.offset == 1 and json.loads(pub.data) == {"text": "hi"}
        assert pub.user == "alice"
        await publish(gateway, "chat/room", {"from": "backend"})
        assert json.loads((await sub.get(timeout=5)).data) == {"from": "backend"}
        pubs, top = await client.history("chat/room")
        assert [p.offset for p in pubs] == [1, 2] and top.offset == 2


async def test_errors_surface_as_realtime_errors(gateway: Gateway) -> None:
    token = make_token(subscribe=["chat/+"], publish=[])
    async with Client(ws_url(gateway), token=token) as client:
        try:
            await client.subscribe("secret")
        except RealtimeError as exc:
            assert exc.code == ErrorCode.PERMISSION_DENIED
        else:
            raise AssertionError("subscribe should be refused")


async def test_reconnect_recovers_exactly_the_missed_publications(gateway: Gateway) -> None:
    disconnects: list[tuple[int | None, bool]] = []
    client = Client(ws_url(gateway), token=make_token("erin"), backoff_min=0.05, backoff_max=0.2)
    client.on_disconnect = lambda code, reason, again: disconnects.append((code, again))
    await client.connect()
    sub = await client.subscribe("chat/feed")
    received: list[int] = []
    for i in range(5):
        await publish(gateway, "chat/feed", i)
    for _ in range(5):
        received.append((await sub.get(timeout=5)).offset)
    # The server drops the client (as on a node restart), publications continue meanwhile.
    status, _ = await api_post(gateway, "disconnect", {"user": "erin", "reconnect": True})
    assert status == 200
    for i in range(5, 15):
        await publish(gateway, "chat/feed", i)
    while len(received) < 15:
        received.append((await sub.get(timeout=5)).offset)
    assert received == list(range(1, 16))
    assert sub.recovered
    assert disconnects and disconnects[0] == (CloseCode.FORCE_RECONNECT, True)
    await client.close()


async def test_recovery_failure_is_reported(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(namespaces={"chat": {"history_size": 2}})
    failed: list[Subscription] = []
    published = asyncio.Event()
    tokens = 0

    async def get_token() -> str:
        # The reconnect waits until everything is published, so the gap is certain.
        nonlocal tokens
        tokens += 1
        if tokens > 1:
            await published.wait()
        return make_token("fred")

    client = Client(ws_url(gateway), get_token=get_token, backoff_min=0.05, backoff_max=0.2)
    await client.connect()
    sub = await client.subscribe("chat/x")
    sub.on_recovery_failed = failed.append
    await publish(gateway, "chat/x", 0)
    await sub.get(timeout=5)
    await api_post(gateway, "disconnect", {"user": "fred"})
    for i in range(1, 6):  # more than history keeps
        await publish(gateway, "chat/x", i)
    published.set()
    for _ in range(200):
        if failed:
            break
        await asyncio.sleep(0.05)
    assert failed == [sub] and not sub.recovered
    await publish(gateway, "chat/x", "live")
    assert json.loads((await sub.get(timeout=5)).data) == "live"
    await client.close()


async def test_token_refresh_keeps_the_connection(gateway: Gateway) -> None:
    minted: list[str] = []

    async def get_token() -> str:
        token = make_token("gina", ttl=2)
        minted.append(token)
        return token

    disconnects: list[int | None] = []
    client = Client(ws_url(gateway), get_token=get_token)
    client.on_disconnect = lambda code, reason, again: disconnects.append(code)
    await client.connect()
    await asyncio.sleep(3.5)  # past the first token's expiry
    assert len(minted) >= 2
    assert client.connected and disconnects == []
    await client.ping()
    await client.close()


async def test_app_too_old_does_not_reconnect(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(client={"min_version": {"python": "99.0"}})
    client = Client(ws_url(gateway), token=make_token())
    try:
        await client.connect()
    except RealtimeError as exc:
        assert exc.code == ErrorCode.APP_VERSION_TOO_OLD
    except DisconnectedError as exc:
        assert not exc.reconnect
    else:
        raise AssertionError("connect should be refused")
    finally:
        await client.close()
