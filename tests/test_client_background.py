"""The Python client through the README's "Mobile apps in the background" lifecycle, against
a real in-process gateway: register the push token, background, poll over HTTP, come back
with recovery from the polled positions. The gateway's side is in tests/test_background.py."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import pytest

from realtime.app import Gateway
from realtime.client import (
    Client,
    DisconnectedError,
    PollError,
    PollResult,
    Publication,
    RealtimeError,
    StreamPosition,
)
from realtime.client.poll import PollTarget, poll_error, poll_query
from realtime.protocol.codes import ErrorCode
from realtime.transports.websocket import parse_poll_query

from .conftest import GatewayFactory, api_post, make_token, ws_url

CHAT = {"history_size": 100, "push": True, "publish": "token"}
BACKGROUND = {"wake_delay": 0.3, "poll_max_wait": 5.0, "poll_page_size": 3}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(namespaces={"chat": CHAT}, background=BACKGROUND)


@pytest.fixture
async def opened() -> AsyncIterator[list[Client]]:
    clients: list[Client] = []
    yield clients
    for client in clients:
        await client.close()


def phone_token(device: str, user: str = "alice") -> str:
    return make_token(user, device=device)


async def app(gateway: Gateway, opened: list[Client], device: str, **kwargs: Any) -> Client:
    client = Client(ws_url(gateway), token=phone_token(device), **kwargs)
    opened.append(client)
    await client.connect()
    return client


async def publish_numbers(gateway: Gateway, channel: str, numbers: range) -> None:
    for n in numbers:
        status, body = await api_post(gateway, "publish", {"channel": channel, "data": {"n": n}})
        assert status == 200, body


async def detached(gateway: Gateway, opened: list[Client], device: str, channel: str) -> None:
    """A device that subscribed to `channel`, went to the background and closed."""
    client = await app(gateway, opened, device)
    await client.subscribe(channel)
    await client.background()
    await client.close()


async def history_of(gateway: Gateway, channel: str) -> tuple[list[Publication], StreamPosition]:
    async with Client(ws_url(gateway), token=make_token("reader")) as reader:
        return await reader.history(channel)


async def all_pages(client: Client, **kwargs: Any) -> list[PollResult]:
    return [page async for page in client.poll_pages(**kwargs)]


async def poll_failure(client: Client, **kwargs: Any) -> PollError:
    with pytest.raises(PollError) as caught:
        await client.poll(**kwargs)
    return caught.value


async def test_background_poll_and_foreground_recovery(
    gateway: Gateway, opened: list[Client]
) -> None:
    token = phone_token("phone-1")
    client = await app(gateway, opened, "phone-1")
    await publish_numbers(gateway, "chat/room", range(3))
    _, top = await client.history("chat/room")
    # Recovered publications are queued when subscribe returns: the app takes one.
    sub = await client.subscribe("chat/room", since=StreamPosition(0, top.epoch))
    assert (await sub.get(timeout=5)).offset == 1
    assert sub.position == StreamPosition(3, top.epoch)
    assert sub.processed == StreamPosition(1, top.epoch)

    # By default the positions are what the app took out, not what was queued.
    state = await client.background()
    assert state.positions == {"chat/room": StreamPosition(1, top.epoch)}
    assert state.detach_ttl == 86400 and client.backgrounded
    await client.close()
    await publish_numbers(gateway, "chat/room", range(3, 7))

    # Woken: a client that never connects polls, pages of 3 (poll_page_size) in order.
    poller = Client(ws_url(gateway), token=token)
    pages = await all_pages(poller)
    assert [page.more for page in pages] == [True, False]
    pubs = [pub for page in pages for pub in page.publications]
    assert [pub.offset for pub in pubs] == [2, 3, 4, 5, 6, 7]
    assert [json.loads(pub.data)["n"] for pub in pubs] == [1, 2, 3, 4, 5, 6]
    assert {pub.channel for pub in pubs} == {"chat/room"}
    # The same offsets and bytes as history (and the socket) have.
    history, history_top = await history_of(gateway, "chat/room")
    assert [(p.offset, p.data) for p in history[1:]] == [(p.offset, p.data) for p in pubs]
    assert history_top == StreamPosition(7, top.epoch)
    room = pages[-1].channels["chat/room"]
    assert room.recovered and room.position == StreamPosition(7, top.epoch)
    reached = pages[-1].positions
    # Nothing new: an empty page from where the last one ended.
    empty = await poller.poll()
    assert empty.publications == [] and not empty.more
    assert empty.positions == reached

    # Foreground: a new client recovers from the polled positions: nothing comes twice.
    await publish_numbers(gateway, "chat/room", range(7, 8))
    back = await app(gateway, opened, "phone-1")
    sub = await back.subscribe("chat/room", since=reached["chat/room"])
    assert sub.recovered
    assert (await sub.get(timeout=5)).offset == 8
    await publish_numbers(gateway, "chat/room", range(8, 9))
    assert (await sub.get(timeout=5)).offset == 9
    assert sub.qsize() == 0
    # Attached again: the detached session is over.
    error = await poll_failure(poller)
    assert (error.status, error.error) == (404, "no_detached_session")


async def test_register_and_unregister_device(gateway: Gateway, opened: list[Client]) -> None:
    async def devices() -> list[dict[str, Any]]:
        status, body = await api_post(gateway, "devices", {"user": "alice"})
        assert status == 200, body
        listed: list[dict[str, Any]] = body["devices"]
        return listed

    push_token = secrets.token_hex(32)
    client = await app(gateway, opened, "phone-reg")
    await client.register_device(
        "apns", push_token, environment="sandbox", app_id="com.example.chat", platform="ios"
    )
    [record] = await devices()
    assert {k: record[k] for k in ("device", "provider", "token", "environment")} == {
        "device": "phone-reg",
        "provider": "apns",
        "token": push_token,
        "environment": "sandbox",
    }
    assert (record["app_id"], record["platform"]) == ("com.example.chat", "ios")
    # FCM, default environment: the record is replaced.
    await client.register_device("fcm", "fcm-token-1", platform="android")
    [record] = await devices()
    assert (record["provider"], record["token"], record["environment"]) == (
        "fcm",
        "fcm-token-1",
        "production",
    )
    await client.unregister_device()
    assert await devices() == []

    with pytest.raises(RealtimeError) as caught:
        await client.register_device("carrier-pigeon", "x")
    assert caught.value.code == ErrorCode.BAD_REQUEST
    # Without a device claim, the device commands are refused; the connection goes on.
    async with Client(ws_url(gateway), token=make_token("alice")) as plain:
        with pytest.raises(RealtimeError) as caught:
            await plain.register_device("fcm", "fcm-token-2")
        assert caught.value.code == ErrorCode.DEVICE_REQUIRED
        with pytest.raises(RealtimeError) as caught:
            await plain.background()
        assert caught.value.code == ErrorCode.DEVICE_REQUIRED
        assert not plain.backgrounded
        await plain.ping()


async def test_poll_errors_carry_the_json_code(
    make_gateway: GatewayFactory, opened: list[Client]
) -> None:
    gateway = await make_gateway(
        namespaces={"chat": CHAT}, background={**BACKGROUND, "poll_rate": 0.05, "poll_burst": 3}
    )
    url = ws_url(gateway)
    error = await poll_failure(Client(url, token="not-a-jwt"))
    assert (error.status, error.error, error.code) == (401, "unauthorized", ErrorCode.UNAUTHORIZED)
    assert isinstance(error, RealtimeError) and not error.temporary

    error = await poll_failure(Client(url, token=make_token("alice")))
    assert (error.status, error.error) == (400, "device_required")
    assert error.code == ErrorCode.DEVICE_REQUIRED

    await app(gateway, opened, "attached")  # connected: in the foreground
    error = await poll_failure(Client(url, token=phone_token("attached")))
    assert (error.status, error.error) == (404, "no_detached_session")
    assert error.code == ErrorCode.NOT_AVAILABLE

    await detached(gateway, opened, "greedy", "chat/rate")
    greedy = Client(url, token=phone_token("greedy"))
    error = await poll_failure(greedy, limit=-1)
    assert (error.status, error.error, error.code) == (400, "bad_request", ErrorCode.BAD_REQUEST)
    for _ in range(3):  # poll_burst
        await greedy.poll()
    error = await poll_failure(greedy)
    assert (error.status, error.error) == (429, "too_many_requests")
    assert error.code == ErrorCode.TOO_MANY_REQUESTS and error.temporary
    assert 0 < error.retry_after_ms <= 20_000  # one poll per 20 s

    # A refused token is fetched again once (get_token), as on connect.
    tokens = iter(["not-a-jwt", phone_token("calm")])
    fetched: list[str] = []

    async def get_token() -> str:
        fetched.append(next(tokens))
        return fetched[-1]

    await detached(gateway, opened, "calm", "chat/rate")
    result = await Client(url, get_token=get_token).poll()
    assert len(fetched) == 2 and set(result.channels) == {"chat/rate"}


async def test_poll_pages_stop_at_the_rate_limit_with_the_pages_so_far(
    make_gateway: GatewayFactory, opened: list[Client]
) -> None:
    gateway = await make_gateway(
        namespaces={"chat": CHAT}, background={**BACKGROUND, "poll_rate": 0.05, "poll_burst": 2}
    )
    await detached(gateway, opened, "slow", "chat/many")
    await publish_numbers(gateway, "chat/many", range(10))
    poller = Client(ws_url(gateway), token=phone_token("slow"))
    handled: list[int] = []
    with pytest.raises(PollError) as caught:
        async for page in poller.poll_pages():
            handled += [pub.offset for pub in page.publications]
    assert handled == [1, 2, 3, 4, 5, 6]
    assert caught.value.error == "too_many_requests" and caught.value.retry_after_ms > 0


async def test_a_backgrounded_client_does_not_reconnect(
    gateway: Gateway, opened: list[Client]
) -> None:
    disconnects: asyncio.Queue[bool] = asyncio.Queue()
    client = await app(gateway, opened, "phone-bg", backoff_min=0.05, backoff_max=0.2)
    client.on_disconnect = lambda code, reason, again: disconnects.put_nowait(again)
    sub = await client.subscribe("chat/bg")
    await client.background()
    # The server drops the socket (as the OS would): no reconnect, which would attach the
    # device again and cancel its wake.
    status, _ = await api_post(gateway, "disconnect", {"user": "alice", "reconnect": True})
    assert status == 200
    assert await asyncio.wait_for(disconnects.get(), 5) is False
    assert not client.connected
    with pytest.raises(DisconnectedError):
        await sub.get(timeout=5)
    poller = Client(ws_url(gateway), token=phone_token("phone-bg"))
    await publish_numbers(gateway, "chat/bg", range(1))
    assert [pub.offset for pub in (await poller.poll()).publications] == [1]
    # connect() again is coming back: attached, reconnecting by itself again.
    await client.connect()
    assert not client.backgrounded
    await client.ping()
    error = await poll_failure(poller)
    assert error.error == "no_detached_session"
    await api_post(gateway, "disconnect", {"user": "alice", "reconnect": True})
    assert await asyncio.wait_for(disconnects.get(), 5) is True


async def test_foreground_on_a_socket_that_survived(gateway: Gateway, opened: list[Client]) -> None:
    client = await app(gateway, opened, "phone-fg")
    sub = await client.subscribe("chat/fg")
    state = await client.background()
    assert set(state.positions) == {"chat/fg"}
    poller = Client(ws_url(gateway), token=phone_token("phone-fg"))
    assert (await poller.poll()).channels["chat/fg"].publications == []
    # The socket still delivers while it lives (a poll would return it too: dedupe by offset).
    await publish_numbers(gateway, "chat/fg", range(1))
    assert (await sub.get(timeout=5)).offset == 1
    assert [pub.offset for pub in (await poller.poll()).publications] == [1]
    await client.foreground()
    assert not client.backgrounded
    error = await poll_failure(poller)
    assert error.error == "no_detached_session"


async def test_poll_publications_keep_data_publisher_and_tags(
    gateway: Gateway, opened: list[Client]
) -> None:
    await detached(gateway, opened, "phone-data", "chat/data")
    async with Client(ws_url(gateway), token=make_token("bob")) as bob:
        await bob.publish("chat/data", b"\x00\xffnot json", tags={"kind": "bin"})
        await bob.publish("chat/data", b'{"a": [1, "\\u00e9"]}')
        sender = bob.client_id
    page = await Client(ws_url(gateway), token=phone_token("phone-data")).poll()
    binary, text = page.channels["chat/data"].publications
    assert (binary.data, binary.tags, binary.user, binary.client) == (
        b"\x00\xffnot json",
        {"kind": "bin"},
        "bob",
        sender,
    )
    # JSON payloads travel as JSON: the same value, in compact form.
    assert json.loads(text.data) == {"a": [1, "é"]} and text.tags == {}


def test_poll_query_is_what_the_gateway_parses() -> None:
    since = {"chat/a b": StreamPosition(3, "e1"), "odd:name&x=%": StreamPosition(0, "")}
    query = poll_query(since, 2.5, 10)
    wait, limit, parsed = parse_poll_query(parse_qs(query))
    assert (wait, limit) == (2.5, 10)
    assert {ch: (p.offset, p.epoch) for ch, p in parsed.items()} == {
        ch: (p.offset, p.epoch) for ch, p in since.items()
    }
    assert poll_query(None, 0, 0) == ""


@pytest.mark.parametrize(
    ("url", "host", "port", "tls", "header"),
    [
        ("ws://127.0.0.1:8000/connection/websocket", "127.0.0.1", 8000, False, "127.0.0.1:8000"),
        (
            "wss://rt.example.com/connection/websocket",
            "rt.example.com",
            443,
            True,
            "rt.example.com",
        ),
        ("ws://[::1]/ws", "::1", 80, False, "[::1]"),
        ("wss://[::1]:8443/ws", "::1", 8443, True, "[::1]:8443"),
    ],
)
def test_poll_goes_to_the_websocket_host_and_port(
    url: str, host: str, port: int, tls: bool, header: str
) -> None:
    assert PollTarget.from_ws_url(url) == PollTarget(host, port, tls, header)


BUSY = b'{"error":{"code":"busy","message":"m","retry_after_ms":1000}}'
UNAVAILABLE = b'{"error":{"code":"unavailable","message":"m","retry_after_ms":250}}'


@pytest.mark.parametrize(
    ("status", "body", "error", "code", "retry"),
    [
        (503, BUSY, "busy", ErrorCode.NOT_AVAILABLE, 1000),
        (503, UNAVAILABLE, "unavailable", ErrorCode.BROKER_UNAVAILABLE, 250),
        (502, b"<html>Bad Gateway</html>", "", 0, 0),
    ],
)
def test_poll_error_answers(status: int, body: bytes, error: str, code: int, retry: int) -> None:
    """The answers of the busy and unavailable gateway (tests/test_background.py drives
    them), and a proxy's page."""
    got = poll_error(status, body)
    assert (got.status, got.error, got.code, got.retry_after_ms) == (status, error, code, retry)
    assert got.temporary


async def test_poll_through_a_proxy_that_chunks(gateway: Gateway, opened: list[Client]) -> None:
    """A stand-in for a reverse proxy that re-chunks the gateway's answer."""
    await detached(gateway, opened, "phone-proxy", "chat/proxy")
    await publish_numbers(gateway, "chat/proxy", range(2))

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", gateway.websocket.port)
        up_writer.write(request)
        answer = await up_reader.read()
        up_writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"content-length")]
        chunks = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
            for i in range(0, len(body), 7)
        )
        writer.write(
            b"\r\n".join([*lines, b"Transfer-Encoding: chunked", b"", chunks + b"0\r\n\r\n"])
        )
        await writer.drain()
        writer.close()

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = proxy.sockets[0].getsockname()[1]
    async with proxy:
        poller = Client(
            f"ws://127.0.0.1:{port}/connection/websocket", token=phone_token("phone-proxy")
        )
        page = await poller.poll()
    assert [json.loads(p.data)["n"] for p in page.publications] == [0, 1]
