"""Backgrounded apps over real sockets (issue #6): app_state and dropped sockets detach the
device's session, GET /v1/poll serves what it missed on the public port, coming back
attaches it again. The silent pushes themselves are in tests/test_push_e2e.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote

import pytest
import redis as sync_redis
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect

from realtime.app import Gateway
from realtime.brokers.memory import MemoryDetachedStore
from realtime.brokers.redis import RedisBroker
from realtime.core.broker import StreamPosition
from realtime.core.devices import DetachedSession, DetachedStore
from realtime.protocol import realtime_pb2 as pb
from realtime.transports.websocket import parse_poll_query

from .conftest import GatewayFactory, RawClient, api_post, make_token
from .redis_server import RedisServer
from .test_device_registry import redis_broker

CHAT = {"history_size": 100, "push": True, "publish": "token"}
BACKGROUND = {"wake_delay": 0.3, "poll_max_wait": 5.0, "poll_page_size": 3}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(namespaces={"chat": CHAT}, background=BACKGROUND)


def phone_token(user: str = "alice", device: str = "phone-1") -> str:
    return make_token(user, device=device)


async def http_poll(
    gateway: Gateway, token: str | None, query: str = "", timeout: float = 10.0
) -> tuple[int, dict[str, Any]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.websocket.port)
    auth = f"Authorization: Bearer {token}\r\n" if token is not None else ""
    writer.write(
        f"GET /v1/poll{'?' + query if query else ''} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode().split("\r\n")
    length = next(int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length"))
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    writer.close()
    return int(lines[0].split()[1]), json.loads(body)


async def publish(gateway: Gateway, channel: str, n: int) -> None:
    status, body = await api_post(gateway, "publish", {"channel": channel, "data": {"n": n}})
    assert status == 200, body


def datas(channel_poll: dict[str, Any]) -> list[int]:
    return [p["data"]["n"] for p in channel_poll["publications"]]


async def background(client: RawClient, **positions: Any) -> pb.AppStateResult:
    reply = await client.request(
        app_state=pb.AppStateRequest(state=pb.AppStateRequest.STATE_BACKGROUND, positions=positions)
    )
    assert not reply.HasField("error"), reply.error
    return reply.app_state


async def away(
    gateway: Gateway, clients: list[RawClient], device: str, *channels: str
) -> RawClient:
    """alice's app on `device`, subscribed to `channels`, sent to the background."""
    app = await RawClient.open(gateway, token=phone_token(device=device))
    clients.append(app)
    for channel in channels:
        await app.subscribe(channel)
    await background(app)
    return app


async def test_background_poll_and_foreground_recovery(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    app = await RawClient.open(gateway, token=phone_token())
    clients.append(app)
    await app.subscribe("chat/room")
    await publish(gateway, "chat/room", 0)
    first = await app.publication()
    state = await background(app)
    assert state.positions["chat/room"].offset == first.pub.offset == 1
    assert state.detach_ttl == 86400
    await app.close()
    for n in range(1, 6):
        await publish(gateway, "chat/room", n)
    # Pages of 3 (poll_page_size), in order, with the next position; then nothing more.
    status, body = await http_poll(gateway, phone_token())
    assert status == 200 and body["more"] is True
    room = body["channels"]["chat/room"]
    assert datas(room) == [1, 2, 3] and room["recovered"] is True
    assert [p["offset"] for p in room["publications"]] == [2, 3, 4]
    status, body = await http_poll(gateway, phone_token())
    assert datas(body["channels"]["chat/room"]) == [4, 5] and body["more"] is False
    reached = body["channels"]["chat/room"]["position"]
    status, body = await http_poll(gateway, phone_token())
    assert datas(body["channels"]["chat/room"]) == []
    assert gateway.node.metrics.polls == {"ok": 2, "empty": 1}
    # Foreground: reconnect and recover from what was polled: nothing twice.
    back = await RawClient.open(gateway, token=phone_token())
    clients.append(back)
    await publish(gateway, "chat/room", 6)
    since = pb.StreamPosition(offset=reached["offset"], epoch=reached["epoch"])
    result = await back.subscribe("chat/room", recover=True, since=since)
    assert result.recovered and [p.offset for p in result.publications] == [7]
    # Attached again: its detached session is gone.
    status, body = await http_poll(gateway, phone_token())
    assert status == 404 and body["error"]["code"] == "no_detached_session"


async def test_dropped_socket_detaches_and_app_positions_win(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    app = await RawClient.open(gateway, token=phone_token(device="tab"))
    await app.subscribe("chat/a")
    await app.subscribe("chat/b")
    for n in range(3):
        await publish(gateway, "chat/a", n)
    for _ in range(3):
        await app.publication()
    await app.close()  # no app_state: the socket just went
    await publish(gateway, "chat/a", 3)
    await publish(gateway, "chat/b", 10)
    await asyncio.sleep(0.1)
    status, body = await http_poll(gateway, phone_token(device="tab"))
    assert status == 200
    assert datas(body["channels"]["chat/a"]) == [3]
    assert datas(body["channels"]["chat/b"]) == [10]
    # The app's own positions win over the stored ones (it may have missed a reply).
    epoch = body["channels"]["chat/a"]["position"]["epoch"]
    query = "since=" + quote(f"chat/a:2:{epoch}")
    status, body = await http_poll(gateway, phone_token(device="tab"), query)
    assert datas(body["channels"]["chat/a"]) == [2, 3]
    # A position from another epoch (or beyond history): recovered=false, reload.
    status, body = await http_poll(
        gateway, phone_token(device="tab"), "since=" + quote("chat/a:1:other")
    )
    assert body["channels"]["chat/a"]["recovered"] is False
    assert body["channels"]["chat/a"]["publications"] == []


async def test_long_poll_waits_for_a_publication(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    await away(gateway, clients, "w", "chat/wait")
    poll = asyncio.create_task(http_poll(gateway, phone_token(device="w"), "wait=5"))
    await asyncio.sleep(0.3)
    assert not poll.done()
    await publish(gateway, "chat/wait", 42)
    status, body = await asyncio.wait_for(poll, 5)
    assert status == 200 and datas(body["channels"]["chat/wait"]) == [42]
    # Nothing comes: the poll answers empty after its wait.
    status, body = await http_poll(gateway, phone_token(device="w"), "wait=0.3")
    assert status == 200 and datas(body["channels"]["chat/wait"]) == []


async def test_foreground_on_the_same_socket_ends_the_detached_session(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    app = await away(gateway, clients, "fg", "chat/fg")
    assert (await http_poll(gateway, phone_token(device="fg")))[0] == 200
    reply = await app.request(
        app_state=pb.AppStateRequest(state=pb.AppStateRequest.STATE_FOREGROUND)
    )
    assert not reply.HasField("error")
    assert (await http_poll(gateway, phone_token(device="fg")))[0] == 404


@pytest.mark.parametrize(
    ("token", "query", "status", "code"),
    [
        (None, "", 401, "unauthorized"),
        ("not-a-jwt", "", 401, "unauthorized"),
        ("no-device", "", 400, "device_required"),
        ("phone", "wait=abc", 400, "bad_request"),
        ("phone", "limit=-1", 400, "bad_request"),
        ("phone", "since=nocolons", 400, "bad_request"),
        ("phone", "since=" + quote("chat/x:-5:e"), 400, "bad_request"),
        ("phone", "since=" + quote(f"chat/x:{2**64}:e"), 400, "bad_request"),
        ("phone", "wait=nan", 400, "bad_request"),
        ("phone", "limit=1e3", 400, "bad_request"),
        ("phone", "", 404, "no_detached_session"),
    ],
)
async def test_poll_answers_bad_input_with_json_errors(
    gateway: Gateway, token: str | None, query: str, status: int, code: str
) -> None:
    real = {"no-device": make_token("alice"), "phone": phone_token(device="bad")}.get(
        token or "", token
    )
    got_status, body = await http_poll(gateway, real, query)
    assert (got_status, body["error"]["code"]) == (status, code)
    # The public port goes on serving.
    assert (await http_poll(gateway, None))[0] == 401


async def test_app_state_needs_a_device_claim(gateway: Gateway, clients: list[RawClient]) -> None:
    app = await RawClient.open(gateway, token=make_token("alice"))
    clients.append(app)
    reply = await app.request(
        app_state=pb.AppStateRequest(state=pb.AppStateRequest.STATE_BACKGROUND)
    )
    assert reply.error.code == 118  # DEVICE_REQUIRED
    await app.subscribe("chat/still-fine")


async def test_readme_json_lines(gateway: Gateway, clients: list[RawClient]) -> None:
    """The README's app_state line, as an app sends it over the JSON subprotocol."""
    app = await RawClient.open(gateway, token=phone_token(device="json"), fmt="json")
    clients.append(app)
    await app.subscribe("chat/room1")
    await app.ws.send(
        '{"id":7,"app_state":{"state":"background","positions":'
        '{"chat/room1":{"offset":41,"epoch":"a1b2"}}}}'
    )
    reply = await app.reply(7)
    assert reply.app_state.detach_ttl == 86400
    assert reply.app_state.positions["chat/room1"].offset == 41
    await app.ws.send('{"id":8,"app_state":{"state":"foreground"}}')
    assert not (await app.reply(8)).HasField("error")


@pytest.mark.parametrize(
    ("spec", "hhmm", "quiet"),
    [
        ("22:00-07:00", "23:00", True),
        ("22:00-07:00", "06:59", True),
        ("22:00-07:00", "07:00", False),
        ("22:00-07:00", "12:00", False),
        ("09:00-17:00", "10:30", True),
        ("09:00-17:00", "17:00", False),
        ("", "03:00", False),
        ("garbage", "03:00", False),
    ],
)
def test_quiet_hours(spec: str, hhmm: str, quiet: bool) -> None:
    from realtime.core.background import in_quiet_hours

    hours, minutes = map(int, hhmm.split(":"))
    day = 1_795_392_000  # a UTC midnight
    assert in_quiet_hours(spec, day + hours * 3600 + minutes * 60) is quiet


async def test_a_device_shut_out_by_the_server_keeps_no_place(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    """Disconnected by the server API without reconnect: no detached session, no wakes;
    with reconnect (FORCE_RECONNECT) its place is kept like any dropped socket."""
    for reconnect, user in ((False, "banned"), (True, "moved")):
        app = await RawClient.open(gateway, token=make_token(user, device="phone"))
        clients.append(app)
        await app.subscribe("chat/kick")
        status, body = await api_post(
            gateway, "disconnect", {"user": user, "reconnect": reconnect, "reason": "test"}
        )
        assert status == 200 and body["disconnected"] == 1, body
        code, _ = await app.wait_closed()
        assert code == (3005 if reconnect else 3502)
        expected = 200 if reconnect else 404
        deadline = asyncio.get_running_loop().time() + 5
        while (got := await http_poll(gateway, make_token(user, device="phone")))[0] != expected:
            assert asyncio.get_running_loop().time() < deadline, got
            await asyncio.sleep(0.05)
        assert ((user, "phone") in gateway.node.background.local) is reconnect


async def test_a_page_filled_exactly_says_more_only_when_there_is_more(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    app = await away(gateway, clients, "exact", "chat/exact-a", "chat/exact-b")
    await app.close()
    for n in range(3):  # exactly a page (poll_page_size 3) on the first channel
        await publish(gateway, "chat/exact-a", n)
    status, body = await http_poll(gateway, phone_token(device="exact"))
    assert status == 200 and datas(body["channels"]["chat/exact-a"]) == [0, 1, 2]
    assert body["more"] is False  # chat/exact-b has nothing new: no empty page to fetch
    for n in range(3, 6):
        await publish(gateway, "chat/exact-a", n)
    await publish(gateway, "chat/exact-b", 100)
    status, body = await http_poll(gateway, phone_token(device="exact"))
    assert datas(body["channels"]["chat/exact-a"]) == [3, 4, 5] and body["more"] is True
    status, body = await http_poll(gateway, phone_token(device="exact"))
    assert datas(body["channels"]["chat/exact-b"]) == [100] and body["more"] is False


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_a_connect_then_a_drop_in_one_breath_leaves_the_app_detached(
    make_gateway: GatewayFactory, redis_server: RedisServer, clients: list[RawClient], broker: str
) -> None:
    """The attach of a connection and the detach of its drop happen in the order they were
    asked for, also when both are still on their way to the store."""
    config: dict[str, Any] = {"namespaces": {"chat": CHAT}, "background": BACKGROUND}
    if broker == "redis":
        config["broker"] = {
            "type": "redis",
            "redis_urls": [redis_server.url],
            "key_prefix": "breath" + str(time.monotonic_ns()),
        }
    gateway = await make_gateway(**config)
    app = await RawClient.open(gateway, token=phone_token(device="breath"))
    clients.append(app)
    await app.subscribe("chat/breath")
    [session] = [s for s in gateway.node.sessions if s.principal and s.principal.device]
    apps = gateway.node.background
    for _ in range(3):
        apps.attach_soon("alice", "breath")  # a connection opened...
        apps.detach_soon(session, "dropped")  # ...and dropped before either reached the store
    await asyncio.wait(list(apps._tasks), timeout=5)
    assert ("alice", "breath") in apps.local
    stored = await gateway.node.broker.detached_sessions.get("alice", "breath")
    assert stored is not None and stored.detached_at == apps.local[("alice", "breath")].detached_at


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_connect_subscribe_and_background_in_one_frame(
    make_gateway: GatewayFactory, redis_server: RedisServer, broker: str
) -> None:
    """An app that pipelines its whole start-up (connect, subscribe, app_state) in one
    frame is detached, not attached again by its own connect landing late."""
    config: dict[str, Any] = {"namespaces": {"chat": CHAT}, "background": BACKGROUND}
    if broker == "redis":
        config["broker"] = {
            "type": "redis",
            "redis_urls": [redis_server.url],
            "key_prefix": "frame" + str(time.monotonic_ns()),
        }
    gateway = await make_gateway(**config)
    url = f"ws://127.0.0.1:{gateway.websocket.port}/connection/websocket"
    for n in range(5):
        token = phone_token(device=f"pipelined-{n}")
        async with ws_connect(url, subprotocols=["realtime.v1.json"]) as ws:  # type: ignore[list-item]
            await ws.send(
                json.dumps({"id": 1, "connect": {"token": token}})
                + '\n{"id":2,"subscribe":{"channel":"chat/frame"}}'
                + '\n{"id":3,"app_state":{"state":"background"}}'
            )
            for _ in range(3):
                assert "error" not in await ws.recv()
        status, body = await http_poll(gateway, token)
        assert status == 200, body
        assert body["channels"]["chat/frame"]["recovered"] is True


async def test_stand_ins_share_a_channel_and_a_timer(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    """Many detached devices on one channel: the first publication arms a wake for each,
    later ones only count; a device that comes back leaves the batch, the rest are woken
    once each (no push provider here: a wake finds no token)."""
    devices = [f"crowd-{n}" for n in range(40)]
    for device in devices:
        await (await away(gateway, clients, device, "chat/crowd")).close()
    apps = gateway.node.background
    group = apps.stand_ins["chat/crowd"]
    assert len(group.devices) == len(group.idle) == 40
    counts = gateway.node.metrics.wakes
    await publish(gateway, "chat/crowd", 1)
    await publish(gateway, "chat/crowd", 2)
    assert counts["armed"] == 40 and counts["coalesced"] == 40 and not group.idle
    text = gateway.node.metrics.render()
    assert "realtime_detached_devices 40" in text and "realtime_wakes_pending 40" in text
    [batch] = {apps.local[("alice", d)].pending for d in devices}
    back = await RawClient.open(gateway, token=phone_token(device="crowd-0"))  # comes back
    clients.append(back)
    while ("alice", "crowd-0") in apps.local:
        await asyncio.sleep(0.01)
    while counts["no_token"] < 39:
        await asyncio.sleep(0.02)
    assert counts["no_token"] == 39 and counts["cancelled"] == 1
    assert batch is not None and len(group.devices) == len(group.idle) == 39
    # Woken, they wait for the next publication to arm again.
    await publish(gateway, "chat/crowd", 3)
    assert counts["armed"] == 40 + 39


@pytest.mark.parametrize("broker", ["memory", "redis-2-instances"])
async def test_a_poll_reads_many_channels_at_once(
    make_gateway: GatewayFactory,
    make_redis_server: Callable[[], RedisServer],
    clients: list[RawClient],
    broker: str,
) -> None:
    """Channels spread over two Redis instances (read in one pipeline each): pages in
    channel-name order, the positions reached written back."""
    config: dict[str, Any] = {"namespaces": {"chat": CHAT}, "background": BACKGROUND}
    urls: list[str] = []
    if broker != "memory":
        urls = [make_redis_server().url, make_redis_server().url]
        config["broker"] = {"type": "redis", "redis_urls": urls, "key_prefix": "many"}
    gateway = await make_gateway(**config)
    channels = [f"chat/many-{n}" for n in range(6)]
    await (await away(gateway, clients, "many", *channels)).close()
    for n, channel in enumerate(channels):
        for k in range(n % 3):  # 0, 1, 2, 0, 1, 2 new publications
            await publish(gateway, channel, 10 * n + k)
    pages = []
    while True:
        status, body = await http_poll(gateway, phone_token(device="many"))
        assert status == 200, body
        pages.append({c: datas(p) for c, p in body["channels"].items() if p["publications"]})
        assert all(p["recovered"] for p in body["channels"].values())
        if not body["more"]:
            break
        for url in urls:  # as after a Redis restart: its scripts are gone
            sync_redis.Redis.from_url(url).script_flush()
    # poll_page_size is 3: 1 + 2, then 1 + 2, nothing split across pages wrongly.
    assert pages == [
        {"chat/many-1": [10], "chat/many-2": [20, 21]},
        {"chat/many-4": [40], "chat/many-5": [50, 51]},
    ]
    store = gateway.node.broker.detached_sessions
    stored = await store.get("alice", "many")
    assert stored is not None
    assert {c: p.offset for c, p in stored.positions.items()} == {
        c: n % 3 for n, c in enumerate(channels)
    }
    # Then nothing new, and nothing more.
    status, body = await http_poll(gateway, phone_token(device="many"))
    assert status == 200 and not body["more"]
    assert all(not p["publications"] for p in body["channels"].values())


async def test_polls_are_rate_limited_per_device(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(
        namespaces={"chat": CHAT}, background={**BACKGROUND, "poll_rate": 0.05, "poll_burst": 3}
    )
    for device in ("greedy", "calm"):
        await (await away(gateway, clients, device, "chat/rate")).close()
    statuses = [(await http_poll(gateway, phone_token(device="greedy")))[0] for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    status, body = await http_poll(gateway, phone_token(device="greedy"))
    assert status == 429 and body["error"]["code"] == "too_many_requests"
    assert 0 < body["error"]["retry_after_ms"] <= 20_000  # one poll per 20 s
    # Another device of the same user has its own budget.
    assert (await http_poll(gateway, phone_token(device="calm")))[0] == 200


async def test_polls_in_flight_are_bounded(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(
        namespaces={"chat": CHAT}, background={**BACKGROUND, "max_polls_in_flight": 1}
    )
    for device in ("first", "second"):
        await (await away(gateway, clients, device, "chat/busy")).close()
    waiting = asyncio.create_task(http_poll(gateway, phone_token(device="first"), "wait=5"))
    while gateway.node.polls.in_flight == 0:
        await asyncio.sleep(0.01)
    status, body = await http_poll(gateway, phone_token(device="second"))
    assert status == 503 and body["error"]["code"] == "busy"
    assert body["error"]["retry_after_ms"] > 0
    await publish(gateway, "chat/busy", 1)
    status, body = await waiting
    assert status == 200 and datas(body["channels"]["chat/busy"]) == [1]
    assert gateway.node.polls.in_flight == 0
    assert (await http_poll(gateway, phone_token(device="second")))[0] == 200


QUERY_PARTS = st.sampled_from(["wait", "limit", "since", "token", "x", ""])
QUERY_VALUES = st.one_of(
    st.text(max_size=30),
    st.from_regex(r"[a-z/]{0,8}:-?[0-9]{0,25}:[a-z0-9]{0,6}", fullmatch=True),
    st.sampled_from(["nan", "inf", "-inf", "1e309", "-0", "0x10", "1_000", " 5 "]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(QUERY_PARTS, QUERY_VALUES), max_size=6))
def test_poll_query_parses_or_says_what_is_wrong(pairs: list[tuple[str, str]]) -> None:
    query: dict[str, list[str]] = {}
    for name, value in pairs:
        query.setdefault(name, []).append(value)
    try:
        wait, limit, since = parse_poll_query(query)
    except ValueError as exc:
        assert str(exc)
        return
    assert wait >= 0 and limit >= 0
    assert all(0 <= p.offset < 2**63 for p in since.values())


async def test_random_poll_requests_get_json_answers(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    """Fuzzed query strings over the wire: always a JSON answer, never a hang or a 500."""
    import random

    app = await away(gateway, clients, "fuzz", "chat/fuzz")
    await app.close()
    rng = random.Random(6)
    alphabet = "abc:/%&=?+ 0123456789-.e"
    token = phone_token(device="fuzz")
    for _ in range(40):
        query = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        query = "&".join([query, "wait=0"]) if rng.random() < 0.5 else query
        status, body = await http_poll(gateway, token, quote(query, safe="=&:"))
        assert status in (200, 400, 429), (query, status, body)
        assert ("channels" in body) if status == 200 else body["error"]["code"]


# ----------------------------------------------------------------------------- the store


@pytest.fixture(params=["memory", "redis"])
async def detached_store(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[DetachedStore]:
    if request.param == "memory":
        yield MemoryDetachedStore()
        return
    broker = await redis_broker([redis_server.url])
    yield broker.detached_sessions
    await broker.close()


async def test_detached_store_contract(detached_store: DetachedStore) -> None:
    store = detached_store
    positions = {"chat/a": StreamPosition(3, "e1"), "chat/b": StreamPosition(0, "")}
    await store.detach(DetachedSession("u", "d", "background", 100.5, positions), ttl=60)
    found = await store.get("u", "d")
    assert found is not None and found.positions == positions and found.detached_at == 100.5
    assert await store.get("u", "other") is None
    # A poll advances the channels the session has, and only those.
    await store.advance(
        "u", "d", {"chat/a": StreamPosition(7, "e1"), "chat/z": StreamPosition(1, "")}
    )
    found = await store.get("u", "d")
    assert found is not None
    assert found.positions == {"chat/a": StreamPosition(7, "e1"), "chat/b": StreamPosition(0, "")}
    # Detaching again replaces it whole.
    await store.detach(DetachedSession("u", "d", "dropped", 200.0, {}), ttl=60)
    found = await store.get("u", "d")
    assert found is not None and found.state == "dropped" and found.positions == {}
    attached = await store.attach("u", "d")
    assert attached is not None and attached.detached_at == 200.0
    assert await store.get("u", "d") is None and await store.attach("u", "d") is None
    await store.advance("u", "d", {"chat/a": StreamPosition(9, "e1")})  # gone: no-op
    assert await store.get("u", "d") is None
    # Expiry.
    await store.detach(DetachedSession("u", "short", "background", 1.0, positions), ttl=0.2)
    await asyncio.sleep(0.4)
    assert await store.get("u", "short") is None


async def test_wake_budget_is_per_device_and_slides(detached_store: DetachedStore) -> None:
    store = detached_store
    now = 1_800_000_000.0
    spent = [await store.spend_wake("u", "d", now + i, 3, 3600) for i in range(5)]
    assert spent == [True, True, True, False, False]
    assert await store.spend_wake("u", "other", now + 5, 3, 3600)  # its own budget
    assert not await store.spend_wake("u", "d", now + 3599, 3, 3600)
    # An hour after the first wake one is free again, then the second frees up.
    assert await store.spend_wake("u", "d", now + 3600.5, 3, 3600)
    assert not await store.spend_wake("u", "d", now + 3600.6, 3, 3600)
    assert await store.spend_wake("u", "d", now + 3601.5, 3, 3600)
    # It outlives detached sessions: the device coming back does not reset it.
    await store.detach(DetachedSession("u", "d", "background", now, {}), ttl=60)
    await store.attach("u", "d")
    assert not await store.spend_wake("u", "d", now + 3601.6, 3, 3600)


async def test_the_wake_budget_holds_across_nodes(redis_server: RedisServer) -> None:
    one = await redis_broker([redis_server.url], prefix="wb-shared")
    two = await redis_broker([redis_server.url], prefix="wb-shared")
    try:
        now = time.time()
        got = [
            await broker.detached_sessions.spend_wake("u", "d", now + i / 10, 3, 3600)
            for i, broker in enumerate([one, two, one, two, one])
        ]
        assert got == [True, True, True, False, False]
    finally:
        await one.close()
        await two.close()


async def test_adoption_hands_each_session_to_one_node(
    make_redis_server: Callable[[], RedisServer],
) -> None:
    """Two nodes taking over a dead node's detached sessions at once, over two Redis
    instances: each session goes to exactly one of them, then the dead node is forgotten;
    a session that came back or moved on is not taken."""
    urls = [make_redis_server().url, make_redis_server().url]
    one = await redis_broker(urls, prefix="adopt")
    two = await redis_broker(urls, prefix="adopt")
    try:
        store = one.detached_sessions
        for n in range(60):
            positions = {"chat/a": StreamPosition(n, "e")}
            await store.detach(DetachedSession("u", f"d{n}", "dropped", 5.0, positions, "dead"), 60)
        await store.attach("u", "d0")  # came back
        await store.detach(DetachedSession("u", "d1", "dropped", 6.0, {}, "alive"), 60)
        assert await store.orphaned_nodes() == ["alive", "dead"]

        async def take(broker: RedisBroker, node: str) -> list[DetachedSession]:
            got: list[DetachedSession] = []
            while batch := await broker.detached_sessions.adopt("dead", node, 7, 60):
                got += batch
            return got

        first, second = await asyncio.gather(take(one, "n1"), take(two, "n2"))
        devices = sorted(s.device for s in first + second)
        assert devices == sorted(f"d{n}" for n in range(2, 60))
        assert {s.node for s in first} <= {"n1"} and {s.node for s in second} <= {"n2"}
        stored = await store.get("u", "d30")
        assert stored is not None and stored.node in ("n1", "n2")
        assert stored.positions == {"chat/a": StreamPosition(30, "e")}
        assert "dead" not in await store.orphaned_nodes()
        # The new owner's index has them: should it die too, they move on again.
        owner = stored.node
        assert len(await take(one, "n3")) == 0
        moved = await one.detached_sessions.adopt(owner, "n3", 100, 60)
        assert "d30" in {s.device for s in moved}
    finally:
        await one.close()
        await two.close()
