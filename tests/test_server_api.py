"""The server API over real HTTP: key, validation, every endpoint, health and metrics."""

from __future__ import annotations

import asyncio
import json

import pytest

from realtime.app import Gateway
from realtime.protocol import realtime_pb2 as pb

from .conftest import GatewayFactory, RawClient, api_post, make_token


async def http_get(gateway: Gateway, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    raw = await reader.read()
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789", ""])
async def test_api_key_is_required(gateway: Gateway, key: str | None) -> None:
    status, body = await api_post(gateway, "publish", {"channel": "a", "data": 1}, key=key)
    assert status == 401
    assert body["error"]["code"] == "unauthorized"


async def test_authorization_header_form(gateway: Gateway) -> None:
    from .conftest import API_KEY

    payload = json.dumps({"channel": "a", "data": 1}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    writer.write(
        b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"Authorization: apikey {API_KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 200")


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "code"),
    [
        ("publish", {"channel": "a"}, 400, "bad_request"),
        ("publish", {"channel": "a b", "data": 1}, 400, "bad_channel"),
        ("publish", {"channel": "a", "data": 1, "extra": 1}, 400, "bad_request"),
        ("publish", {"channel": "a", "b64data": "%%%"}, 400, "bad_request"),
        ("publish", [1, 2], 400, "bad_request"),
        ("broadcast", {"channels": "a", "data": 1}, 400, "bad_request"),
        ("broadcast", {"channels": [], "data": 1}, 400, "bad_request"),
        ("history", {"channel": "news"}, 409, "not_available"),
        ("history", {"channel": "chat/a", "limit": -1}, 400, "bad_request"),
        ("channels", {"filter": "a/#/b"}, 400, "bad_request"),
        ("disconnect", {}, 400, "bad_request"),
        ("nope", {}, 404, "not_found"),
    ],
)
async def test_bad_requests_get_json_errors(
    gateway: Gateway, endpoint: str, body: object, status: int, code: str
) -> None:
    got, answer = await api_post(gateway, endpoint, body)
    assert got == status, answer
    assert answer["error"]["code"] == code
    assert answer["error"]["message"]


async def test_invalid_json_body(gateway: Gateway) -> None:
    from .conftest import API_KEY

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    writer.write(
        b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + f"X-API-Key: {API_KEY}\r\nContent-Length: 5\r\n\r\n{{bad}}".encode()
    )
    raw = await reader.read()
    writer.close()
    assert raw.startswith(b"HTTP/1.1 400")
    assert json.loads(raw.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_json"


async def test_publish_binary_and_idempotent(gateway: Gateway, clients: list[RawClient]) -> None:
    client = await RawClient.open(gateway)
    clients.append(client)
    await client.subscribe("chat/bin")
    body = {"channel": "chat/bin", "b64data": "AAEC", "idempotency_key": "x1"}
    status, first = await api_post(gateway, "publish", body)
    _, again = await api_post(gateway, "publish", body)
    assert status == 200 and again["duplicate"] and again["position"] == first["position"]
    assert (await client.publication()).pub.data == b"\x00\x01\x02"


async def test_broadcast_reports_per_channel(gateway: Gateway, clients: list[RawClient]) -> None:
    client = await RawClient.open(gateway)
    clients.append(client)
    await client.subscribe("chat/b1")
    status, body = await api_post(
        gateway, "broadcast", {"channels": ["chat/b1", "news", "bad channel"], "data": {"x": 1}}
    )
    assert status == 200
    results = body["results"]
    assert results[0] == {"channel": "chat/b1", "position": results[0]["position"]}
    assert results[0]["position"]["offset"] == 1
    assert results[2]["error"]["code"] == "bad_channel"
    assert json.loads((await client.publication()).pub.data) == {"x": 1}


async def test_history_channels_info(gateway: Gateway, clients: list[RawClient]) -> None:
    for i in range(3):
        await api_post(gateway, "publish", {"channel": "chat/h", "data": i})
    status, body = await api_post(gateway, "history", {"channel": "chat/h", "limit": 2})
    assert status == 200
    assert [p["data"] for p in body["publications"]] == [0, 1]
    epoch = body["position"]["epoch"]
    status, body = await api_post(
        gateway, "history", {"channel": "chat/h", "since": {"offset": 2, "epoch": epoch}}
    )
    assert [p["offset"] for p in body["publications"]] == [3]

    a = await RawClient.open(gateway)
    b = await RawClient.open(gateway, token=make_token("bob"))
    clients += [a, b]
    await a.subscribe("rooms/1")
    await b.subscribe("rooms/1")
    await b.subscribe("rooms/2")
    status, body = await api_post(gateway, "channels", {"filter": "rooms/+"})
    assert body["channels"] == [
        {"channel": "rooms/1", "subscribers": 2},
        {"channel": "rooms/2", "subscribers": 1},
    ]
    status, info = await api_post(gateway, "info", {})
    assert info["connections"] == 2 and info["users"] == 2 and info["broker"] == "memory"


async def test_disconnect_and_nodes_on_one_node(
    gateway: Gateway, clients: list[RawClient]
) -> None:
    bob = await RawClient.open(gateway, token=make_token("bob"))
    alice = await RawClient.open(gateway)
    clients += [bob, alice]
    status, body = await api_post(gateway, "nodes", {})
    assert status == 200
    (node,) = body["nodes"]
    assert node["node_id"] == gateway.node.cluster.node_id and node["broker"] == "memory"
    assert node["rss_bytes"] > 0 and node["started_at"] > 0
    status, body = await api_post(gateway, "disconnect", {"user": "bob", "reason": "bye"})
    assert status == 200
    assert body == {"disconnected": 1, "nodes": 1, "unanswered": []}
    code, reason = await bob.wait_closed()
    assert code == 3005 and reason == "bye"  # force reconnect: reconnect defaults to true
    assert (await alice.subscribe("rooms/still-here")) is not None  # others are untouched


async def test_method_not_allowed(gateway: Gateway) -> None:
    status, body = await http_get(gateway, "/api/v1/publish")
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


async def test_health_ready_and_metrics(gateway: Gateway, clients: list[RawClient]) -> None:
    assert await http_get(gateway, "/healthz") == (200, '{"status":"ok"}')
    assert (await http_get(gateway, "/readyz"))[0] == 200
    client = await RawClient.open(gateway)
    clients.append(client)
    await client.subscribe("news")
    await client.request(subscribe=pb.SubscribeRequest(channel="$bad"))
    await api_post(gateway, "publish", {"channel": "news", "data": "m"})
    await client.publication()
    status, text = await http_get(gateway, "/metrics")
    assert status == 200
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["realtime_connections"] == 1
    assert samples["realtime_subscriptions"] == 1
    assert samples['realtime_errors_total{code="102"}'] == 1
    assert samples['realtime_publications_total{source="api"}'] == 1
    assert samples["realtime_messages_in_total"] == 3  # connect, subscribe, bad subscribe
    assert samples["realtime_messages_out_total"] >= 4
    assert samples["realtime_bytes_out_total"] > 0
    assert samples['realtime_api_requests_total{endpoint="publish",status="200"}'] == 1


async def test_readyz_reports_draining(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway()
    gateway.node.begin_drain()
    status, body = await http_get(gateway, "/readyz")
    assert status == 503 and json.loads(body)["draining"] is True
