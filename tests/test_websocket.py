"""The WebSocket gateway end to end: real server, real sockets, real clients."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect

from realtime.app import Gateway
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import Action, CloseCode, ErrorCode

from .conftest import GatewayFactory, RawClient, api_post, make_token, publish, ws_url


async def test_connect_subscribe_and_receive_api_publication(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    client = await RawClient.open(gateway)
    clients.append(client)
    result = await client.subscribe("news")
    assert not result.recoverable
    await publish(gateway, "news", {"text": "hello"})
    push = await client.publication()
    assert push.channel == "news"
    assert json.loads(push.pub.data) == {"text": "hello"}


async def test_json_and_proto_subscribers_get_the_same_publication(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    proto = await RawClient.open(gateway, fmt="proto")
    text = await RawClient.open(gateway, fmt="json")
    clients += [proto, text]
    await proto.subscribe("open/room")
    await text.subscribe("open/room")
    reply = await proto.request(publish=pb.PublishRequest(channel="open/room", data=b'{"n":1}'))
    assert not reply.HasField("error")
    for client in (proto, text):
        push = await client.publication()
        assert json.loads(push.pub.data) == {"n": 1}
        assert push.pub.info.user == "alice"


async def test_plain_json_client_without_subprotocol(gateway: Gateway) -> None:
    """A tool that offers no subprotocol gets JSON (e.g. `python -m websockets`)."""
    async with connect(ws_url(gateway)) as ws:
        assert ws.subprotocol is None
        token = make_token()
        await ws.send(json.dumps({"id": 1, "connect": {"token": token}}))
        reply = json.loads(await ws.recv())
        assert reply["id"] == 1 and reply["connect"]["client"]
        await ws.send(json.dumps({"id": 2, "subscribe": {"channel": "news"}}))
        assert json.loads(await ws.recv()) == {"id": 2, "subscribe": {}}
        await publish(gateway, "news", {"hi": True})
        push = json.loads(await ws.recv())
        assert push == {"push": {"channel": "news", "pub": {"data": {"hi": True}}}}


async def test_token_in_query_and_header(gateway: Gateway, clients: list[RawClient]) -> None:
    token = make_token("bob")
    by_query = await RawClient.open(gateway, token=None, query=f"?token={token}")
    by_header = await RawClient.open(
        gateway, token=None, additional_headers={"Authorization": f"Bearer {token}"}
    )
    clients += [by_query, by_header]
    for client in (by_query, by_header):
        reply = await client.request(connect=pb.ConnectRequest())
        assert reply.connect.client, reply


@pytest.mark.parametrize(
    ("token", "code", "close"),
    [
        ("not-a-jwt", ErrorCode.UNAUTHORIZED, CloseCode.INVALID_TOKEN),
        (
            make_token(secret="another-secret-that-is-long-enough-000"),
            ErrorCode.UNAUTHORIZED,
            CloseCode.INVALID_TOKEN,
        ),
        (make_token(algorithm="HS512"), ErrorCode.UNAUTHORIZED, CloseCode.INVALID_TOKEN),
        (make_token(ttl=-60), ErrorCode.TOKEN_EXPIRED, CloseCode.TOKEN_EXPIRED),
        ("", ErrorCode.UNAUTHORIZED, CloseCode.INVALID_TOKEN),
    ],
    ids=["garbage", "wrong-secret", "wrong-algorithm", "expired", "missing"],
)
async def test_bad_tokens_are_refused(
    gateway: Gateway, token: str, code: ErrorCode, close: CloseCode
) -> None:
    client = await RawClient.open(gateway, token=None)
    reply = await client.request(connect=pb.ConnectRequest(token=token))
    assert reply.error.code == code
    if code == ErrorCode.TOKEN_EXPIRED:
        assert reply.error.action == Action.REFRESH_TOKEN
    assert (await client.wait_closed())[0] == close


async def test_alg_none_token_is_refused(gateway: Gateway) -> None:
    import base64

    def b64(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'mallory', 'exp': 2**31})}."
    client = await RawClient.open(gateway, token=None)
    reply = await client.request(connect=pb.ConnectRequest(token=unsigned))
    assert reply.error.code == ErrorCode.UNAUTHORIZED
    assert (await client.wait_closed())[0] == CloseCode.INVALID_TOKEN


async def test_commands_before_connect_are_refused(gateway: Gateway) -> None:
    client = await RawClient.open(gateway, token=None)
    reply = await client.request(subscribe=pb.SubscribeRequest(channel="news"))
    assert reply.error.code == ErrorCode.NOT_CONNECTED
    assert (await client.wait_closed())[0] == CloseCode.BAD_REQUEST


async def test_permissions_and_bad_channels(gateway: Gateway, clients: list[RawClient]) -> None:
    token = make_token(subscribe=["rooms/+"], publish=[])
    client = await RawClient.open(gateway, token=token)
    clients.append(client)
    assert (await client.request(subscribe=pb.SubscribeRequest(channel="rooms/1"))).subscribe
    for channel, code in [
        ("rooms/1/x", ErrorCode.PERMISSION_DENIED),
        ("other", ErrorCode.PERMISSION_DENIED),
        ("rooms/+", ErrorCode.BAD_CHANNEL),
        ("", ErrorCode.BAD_CHANNEL),
        ("$SYS/x", ErrorCode.BAD_CHANNEL),
        ("rooms/1", ErrorCode.ALREADY_SUBSCRIBED),
    ]:
        reply = await client.request(subscribe=pb.SubscribeRequest(channel=channel))
        assert reply.error.code == code, channel
    reply = await client.request(publish=pb.PublishRequest(channel="rooms/1", data=b"x"))
    assert reply.error.code == ErrorCode.PERMISSION_DENIED
    reply = await client.request(unsubscribe=pb.UnsubscribeRequest(channel="nope"))
    assert reply.error.code == ErrorCode.NOT_SUBSCRIBED
    # The connection is still fine after all those errors.
    assert (await client.request(ping=pb.PingRequest())).HasField("ping")


async def test_server_api_only_namespace_refuses_client_publish(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(namespaces={"default": {"publish": "none"}})
    client = await RawClient.open(gateway)
    clients.append(client)
    reply = await client.request(publish=pb.PublishRequest(channel="news", data=b"x"))
    assert reply.error.code == ErrorCode.PERMISSION_DENIED


async def test_unknown_command_gets_an_error_reply(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    client = await RawClient.open(gateway)
    clients.append(client)
    reply = await client.request()  # a Command with an id and no request
    assert reply.error.code == ErrorCode.UNKNOWN_COMMAND
    reply = await client.request(connect=pb.ConnectRequest(token=make_token()))
    assert reply.error.code == ErrorCode.ALREADY_CONNECTED
    assert (await client.request(ping=pb.PingRequest())).HasField("ping")


@pytest.mark.parametrize(
    ("fmt", "frame"),
    [
        ("proto", b"\xff\xff\xff\xff\xff\xff"),  # varint too long
        ("proto", b"\x05ab"),  # length past the end
        ("proto", b"\x02\xff\xff"),  # not a protobuf Command
        ("json", "{not json"),
        ("json", '{"id": 1, "subscribe": {"channel": 5}}'),
        ("json", '{"id": 1, "subscribe": {}, "publish": {}}'),
        ("json", '{"id": "one"}'),
        ("json", "[1, 2]"),
    ],
)
async def test_malformed_frames_close_with_bad_request(
    gateway: Gateway, clients: list[RawClient], fmt: str, frame: bytes | str
) -> None:
    bystander = await RawClient.open(gateway)
    clients.append(bystander)
    await bystander.subscribe("news")
    client = await RawClient.open(gateway, fmt=fmt)
    await client.ws.send(frame)
    code, reason = await client.wait_closed()
    assert code == CloseCode.BAD_REQUEST
    assert "malformed frame" in reason
    assert client.disconnect is not None and not client.disconnect.reconnect
    # Others carry on.
    await publish(gateway, "news", 1)
    assert (await bystander.publication()).pub.data == b"1"


async def test_oversized_frame_closes_with_1009(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(limits={"max_frame_bytes": 1024})
    client = await RawClient.open(gateway)
    await client.ws.send(b"\x00" * 2000)
    assert (await client.wait_closed())[0] == 1009


async def test_many_commands_in_one_frame(gateway: Gateway, clients: list[RawClient]) -> None:
    client = await RawClient.open(gateway)
    clients.append(client)
    frame = b"".join(
        client.codec.encode_command(
            pb.Command(id=10 + i, subscribe=pb.SubscribeRequest(channel=f"c{i}"))
        )
        for i in range(5)
    )
    await client.ws.send(frame)
    for i in range(5):
        assert not (await client.reply(10 + i)).HasField("error")


async def test_minimum_app_version_gate(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(client={"min_version": {"ios": "3.2.0"}})
    for version, ok in [("3.1.9", False), ("", False), ("3.2.0", True), ("10.0", True)]:
        client = await RawClient.open(gateway, token=None)
        reply = await client.request(
            connect=pb.ConnectRequest(token=make_token(), platform="ios", version=version)
        )
        if ok:
            assert reply.HasField("connect"), version
            clients.append(client)
        else:
            assert reply.error.code == ErrorCode.APP_VERSION_TOO_OLD, version
            assert reply.error.action == Action.UPDATE_APP
            code, _ = await client.wait_closed()
            assert code == CloseCode.APP_VERSION_TOO_OLD
            assert not CloseCode(code).reconnect
    # Platforms without a minimum are not gated.
    android = await RawClient.open(gateway, connect_request={"platform": "android"})
    clients.append(android)


async def test_token_expiry_closes_and_refresh_extends(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    expiring = await RawClient.open(gateway, token=make_token(ttl=2))
    refreshed = await RawClient.open(gateway, token=make_token(ttl=2))
    clients.append(refreshed)
    reply = await refreshed.request(refresh=pb.RefreshRequest(token=make_token(ttl=60)))
    assert 55 <= reply.refresh.expires_in <= 60
    # Refresh with a token of another user is refused.
    reply = await refreshed.request(refresh=pb.RefreshRequest(token=make_token("eve")))
    assert reply.error.code == ErrorCode.UNAUTHORIZED
    code, _ = await expiring.wait_closed(timeout=6)
    assert code == CloseCode.TOKEN_EXPIRED and CloseCode(code).reconnect
    assert (await refreshed.request(ping=pb.PingRequest())).HasField("ping")


async def test_command_rate_limit_answers_retry_after(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    # A slow refill (one token per 2 s), so that machine load cannot change the count.
    gateway = await make_gateway(limits={"commands_per_second": 0.5, "command_burst": 5})
    client = await RawClient.open(gateway)
    clients.append(client)
    frame = b"".join(
        client.codec.encode_command(
            pb.Command(id=100 + i, history=pb.HistoryRequest(channel="chat/x"))
        )
        for i in range(8)
    )
    await client.ws.send(frame)
    replies = [await client.reply(100 + i) for i in range(8)]
    limited = [r for r in replies if r.error.code == ErrorCode.TOO_MANY_REQUESTS]
    assert len(limited) == 3
    assert all(r.error.temporary and r.error.retry_after_ms > 0 for r in limited)
    assert all(r.error.action == Action.RETRY for r in limited)
    await asyncio.sleep(limited[-1].error.retry_after_ms / 1000)
    assert not (await client.request(history=pb.HistoryRequest(channel="chat/x"))).HasField("error")


async def test_user_publish_rate_limit_spans_connections(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(limits={"user_publishes_per_second": 1.0, "user_publish_burst": 3})
    first = await RawClient.open(gateway)
    second = await RawClient.open(gateway)
    clients += [first, second]
    codes = []
    for client in (first, second, first, second):
        reply = await client.request(publish=pb.PublishRequest(channel="news", data=b"1"))
        codes.append(reply.error.code)
    assert codes == [0, 0, 0, ErrorCode.TOO_MANY_REQUESTS]


async def test_flood_is_closed(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        limits={"commands_per_second": 1.0, "command_burst": 1, "flood_close_after": 20}
    )
    client = await RawClient.open(gateway)
    frame = b"".join(
        client.codec.encode_command(pb.Command(id=0, history=pb.HistoryRequest(channel="x")))
        for _ in range(50)
    )
    await client.ws.send(frame)
    assert (await client.wait_closed())[0] == CloseCode.FLOOD


async def test_max_subscriptions(make_gateway: GatewayFactory, clients: list[RawClient]) -> None:
    gateway = await make_gateway(limits={"max_subscriptions": 2})
    client = await RawClient.open(gateway)
    clients.append(client)
    await client.subscribe("a")
    await client.subscribe("b")
    reply = await client.request(subscribe=pb.SubscribeRequest(channel="c"))
    assert reply.error.code == ErrorCode.LIMIT_EXCEEDED


async def test_slow_consumer_is_disconnected_without_delaying_others(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(limits={"max_queue_bytes": 262144})
    fast = await RawClient.open(gateway)
    clients.append(fast)
    await fast.subscribe("news")
    # The slow client subscribes and then never reads: its socket buffers fill up.
    slow = await RawClient.open(gateway, max_queue=1)
    await slow.subscribe("news")
    slow._reader.cancel()
    slow.ws.transport.pause_reading()
    payload = "x" * 4000
    count = 3000  # 12 MB: more than the slow client's socket buffers and queue can hold
    received = 0
    for i in range(count):
        await gateway.node.publish("news", json.dumps({"i": i, "p": payload}).encode())
        if i % 10 == 9:
            # Let the fast client read what was sent so far.
            while received <= i:
                push = await fast.publication(timeout=5)
                assert json.loads(push.pub.data)["i"] == received
                received += 1
    assert gateway.node.metrics.disconnects[int(CloseCode.SLOW)] == 1
    # The slow client's close frame waits behind its full buffers; after the close timeout
    # the connection is cut, and only the fast client remains.
    for _ in range(100):
        if len(gateway.node.sessions) == 1:
            break
        await asyncio.sleep(0.1)
    assert len(gateway.node.sessions) == 1


async def test_recovery_returns_exactly_the_missed_publications(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    client = await RawClient.open(gateway)
    result = await client.subscribe("chat/room")
    assert result.recoverable and result.position.epoch
    for i in range(3):
        await publish(gateway, "chat/room", i)
    seen = [(await client.publication()).pub.offset for _ in range(3)]
    assert seen == [1, 2, 3]
    last = pb.StreamPosition(offset=3, epoch=result.position.epoch)
    await client.close()
    for i in range(3, 8):  # missed while away
        await publish(gateway, "chat/room", i)
    back = await RawClient.open(gateway)
    clients.append(back)
    result = await back.subscribe("chat/room", recover=True, since=last)
    assert result.recovered
    assert [p.offset for p in result.publications] == [4, 5, 6, 7, 8]
    assert [json.loads(p.data) for p in result.publications] == [3, 4, 5, 6, 7]
    assert result.position.offset == 8
    await publish(gateway, "chat/room", 8)
    assert (await back.publication()).pub.offset == 9


async def test_recovery_beyond_history_says_not_recovered(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(namespaces={"chat": {"history_size": 3}})
    first = await publish(gateway, "chat/r", 0)
    epoch = first["position"]["epoch"]
    for i in range(1, 6):
        await publish(gateway, "chat/r", i)
    client = await RawClient.open(gateway)
    clients.append(client)
    result = await client.subscribe(
        "chat/r", recover=True, since=pb.StreamPosition(offset=1, epoch=epoch)
    )
    assert not result.recovered and not result.publications
    assert result.position.offset == 6
    # Another epoch (e.g. the node restarted) is not recoverable either.
    await client.request(unsubscribe=pb.UnsubscribeRequest(channel="chat/r"))
    result = await client.subscribe(
        "chat/r", recover=True, since=pb.StreamPosition(offset=5, epoch="other")
    )
    assert not result.recovered
    # Within history it is.
    await client.request(unsubscribe=pb.UnsubscribeRequest(channel="chat/r"))
    result = await client.subscribe(
        "chat/r", recover=True, since=pb.StreamPosition(offset=4, epoch=epoch)
    )
    assert result.recovered and [p.offset for p in result.publications] == [5, 6]


async def test_recovery_racing_live_publications_has_no_gap_or_duplicate(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    """Publish continuously while clients resubscribe with recovery: every client must see
    every offset exactly once, in order."""
    first = await publish(gateway, "chat/race", "start")
    epoch = first["position"]["epoch"]
    stop = asyncio.Event()

    async def publisher() -> None:
        n = 0
        while not stop.is_set():
            await gateway.node.publish("chat/race", str(n).encode())
            n += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(publisher())
    try:
        for _ in range(10):
            client = await RawClient.open(gateway)
            clients.append(client)
            result = await client.subscribe(
                "chat/race", recover=True, since=pb.StreamPosition(offset=1, epoch=epoch)
            )
            if not result.recovered:  # history (50) overtaken: that is allowed, not partial
                assert not result.publications
                continue
            offsets = [p.offset for p in result.publications]
            top = result.position.offset
            assert offsets == list(range(2, top + 1))
            await asyncio.sleep(0.01)
            push = await client.publication()
            assert push.pub.offset == top + 1
            previous = top + 1
            while not client.pushes.empty():
                push = client.pushes.get_nowait()
                assert push.pub.offset == previous + 1
                previous += 1
            await client.close()
            clients.remove(client)
            first = await publish(gateway, "chat/race", "mark")
            epoch = first["position"]["epoch"]
    finally:
        stop.set()
        await task


async def test_history_command(gateway: Gateway, clients: list[RawClient]) -> None:
    for i in range(5):
        await publish(gateway, "chat/h", i)
    client = await RawClient.open(gateway)
    clients.append(client)
    reply = await client.request(history=pb.HistoryRequest(channel="chat/h", limit=2, reverse=True))
    assert [json.loads(p.data) for p in reply.history.publications] == [4, 3]
    assert reply.history.position.offset == 5
    reply = await client.request(history=pb.HistoryRequest(channel="news"))
    assert reply.error.code == ErrorCode.NOT_AVAILABLE


async def test_idempotent_client_publish(gateway: Gateway, clients: list[RawClient]) -> None:
    client = await RawClient.open(gateway)
    clients.append(client)
    await client.subscribe("chat/idem")
    request = pb.PublishRequest(channel="chat/idem", data=b"1", idempotency_key="k1")
    first = await client.request(publish=request)
    again = await client.request(publish=request)
    assert first.publish.position == again.publish.position
    assert again.publish.duplicate and not first.publish.duplicate
    assert (await client.publication()).pub.offset == 1
    await asyncio.sleep(0.1)
    assert client.unexpected_pushes() == []


async def test_server_ping_and_dead_connection_detection(
    make_gateway: GatewayFactory, clients: list[RawClient]
) -> None:
    gateway = await make_gateway(client={"ping_interval": 1, "pong_timeout": 1})
    alive = await RawClient.open(gateway)
    clients.append(alive)
    connect_reply_interval = 1
    push = await alive.push(timeout=4, pings=True)
    assert push.HasField("ping")
    await alive.send(id=0, ping=pb.PingRequest())
    silent = await RawClient.open(gateway)
    # websockets' client answers WebSocket pings but our app-level pings need an answer
    # the silent client never sends.
    code, _ = await silent.wait_closed(timeout=8)
    assert code == CloseCode.NO_PONG
    assert connect_reply_interval == 1


async def test_connect_timeout(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(client={"connect_timeout": 1.0})
    client = await RawClient.open(gateway, token=None)
    assert (await client.wait_closed(timeout=5))[0] == CloseCode.CONNECT_TIMEOUT


async def test_disconnect_user_through_api(gateway: Gateway, clients: list[RawClient]) -> None:
    mine = [await RawClient.open(gateway, token=make_token("carol")) for _ in range(2)]
    other = await RawClient.open(gateway, token=make_token("dave"))
    clients.append(other)
    status, body = await api_post(gateway, "disconnect", {"user": "carol", "reconnect": False})
    assert status == 200 and body == {"disconnected": 2, "nodes": 1, "unanswered": []}
    for client in mine:
        assert (await client.wait_closed())[0] == CloseCode.FORBIDDEN
    assert (await other.request(ping=pb.PingRequest())).HasField("ping")


async def test_graceful_drain(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(server={"reconnect_jitter": 2.0})
    clients = [await RawClient.open(gateway) for _ in range(5)]
    for client in clients:
        await client.subscribe("news")
    await gateway.node.publish("news", b"last words")
    await gateway.stop(drain_timeout=3.0)
    hints = set()
    for client in clients:
        push = await client.publication()
        assert push.pub.data == b"last words"  # queued data is delivered before the close
        code, _ = await client.wait_closed()
        assert code == CloseCode.SHUTDOWN and CloseCode(code).reconnect
        assert client.disconnect is not None and client.disconnect.reconnect
        assert 0 <= client.disconnect.reconnect_after_ms <= 2000
        hints.add(client.disconnect.reconnect_after_ms)
    assert len(hints) > 1  # jittered
    assert not gateway.node.sessions


async def test_health_on_public_port(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.websocket.port)
    writer.write(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b'{"status": "ok"}')


async def test_json_commands_batched_in_one_frame(gateway: Gateway) -> None:
    async with connect(ws_url(gateway), subprotocols=["realtime.v1.json"]) as ws:  # type: ignore[list-item]
        await ws.send(json.dumps({"id": 1, "connect": {"token": make_token()}}))
        await ws.recv()
        await ws.send('{"id":2,"subscribe":{"channel":"a"}}\n{"id":3,"subscribe":{"channel":"b"}}')
        # One message per frame from the server (frames are shared between subscribers).
        assert await ws.recv() == '{"id":2,"subscribe":{}}'
        assert await ws.recv() == '{"id":3,"subscribe":{}}'


async def test_garbage_on_the_socket_never_hurts_others(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    """Random bytes before and after the handshake: each bad connection is closed, the
    process and a bystander carry on."""
    import random

    bystander = await RawClient.open(gateway)
    clients.append(bystander)
    await bystander.subscribe("news")
    rng = random.Random(7)
    for round_ in range(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.websocket.port)
        if round_ % 2:  # a valid handshake first, then garbage frames
            writer.write(
                b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
        writer.write(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))))
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)  # the server answers or closes, never hangs
        writer.close()
    await publish(gateway, "news", "still here")
    assert json.loads((await bystander.publication()).pub.data) == "still here"


async def test_allowed_origins(make_gateway: GatewayFactory, clients: list[RawClient]) -> None:
    from websockets.exceptions import InvalidStatus

    gateway = await make_gateway(server={"allowed_origins": ["https://app.example"]})
    clients.append(await RawClient.open(gateway, origin="https://app.example"))
    clients.append(await RawClient.open(gateway))  # no Origin: not a browser
    with pytest.raises(InvalidStatus) as refused:
        await RawClient.open(gateway, origin="https://evil.example")
    assert refused.value.response.status_code == 403
