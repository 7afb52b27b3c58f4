"""Shared fixtures: a real gateway on free loopback ports, tokens, a raw protocol client.

The gateway runs in the test's event loop (uvloop) with real sockets; clients are real
WebSocket clients (websockets' asyncio client) speaking the wire protocol directly, so
the tests see exactly what an app would.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import jwt
import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from realtime.app import Gateway
from realtime.config import config_from_dict
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codec import JSON, PROTOBUF, Codec

from .redis_server import RedisServer

SECRET = "test-secret-that-is-long-enough-0123456789"
API_KEY = "test-api-key-0123456789"

BASE_CONFIG: dict[str, Any] = {
    "server": {"host": "127.0.0.1", "port": 0, "node_name": "test", "drain_timeout": 2.0},
    "api": {"host": "127.0.0.1", "port": 0, "key": API_KEY},
    "auth": {"hmac_secret": SECRET, "leeway": 0.0},
    "log": {"level": "warning"},
    "mqtt": {"host": "127.0.0.1", "port": 0},
    "namespaces": {
        "default": {"subscribe": "token", "publish": "token"},
        "chat": {"history_size": 50, "history_ttl": 60.0, "publish": "token"},
        "open": {"subscribe": "authenticated", "publish": "authenticated"},
    },
}


def pytest_asyncio_loop_factories(config: object, item: object) -> dict[str, Any]:
    """Every async test runs on uvloop, as the gateway does in production."""
    return {"uvloop": uvloop.new_event_loop}


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


GatewayFactory = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def make_gateway() -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def factory(**overrides: Any) -> Gateway:
        config = config_from_dict(merge(BASE_CONFIG, overrides), "test")
        gateway = Gateway(config)
        await gateway.start()
        started.append(gateway)
        return gateway

    yield factory
    for gateway in started:
        await gateway.stop(drain_timeout=1.0)


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


def make_token(
    user: str = "alice",
    *,
    subscribe: list[str] | None = None,
    publish: list[str] | None = None,
    ttl: float = 3600,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"sub": user, "exp": int(time.time() + ttl)}
    payload["subscribe"] = subscribe if subscribe is not None else ["#"]
    payload["publish"] = publish if publish is not None else ["#"]
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm=algorithm)


def ws_url(gateway: Gateway, query: str = "") -> str:
    return f"ws://127.0.0.1:{gateway.websocket.port}/connection/websocket{query}"


def api_url(gateway: Gateway, path: str) -> str:
    return f"http://127.0.0.1:{gateway.http.port}{path}"


class RawClient:
    """A WebSocket client speaking the wire protocol by hand."""

    def __init__(self, ws: ClientConnection, codec: Codec) -> None:
        self.ws = ws
        self.codec = codec
        self.replies: dict[int, pb.Reply] = {}
        self.pushes: asyncio.Queue[pb.Push] = asyncio.Queue()
        self.next_id = 1
        self.frames = 0
        self.close_code: int | None = None
        self.close_reason = ""
        self.disconnect: pb.Disconnect | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self._arrived = asyncio.Event()

    @classmethod
    async def open(
        cls,
        gateway: Gateway,
        *,
        token: str | None = "default",
        fmt: str = "proto",
        query: str = "",
        connect_request: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> RawClient:
        codec = PROTOBUF if fmt == "proto" else JSON
        ws = await connect(ws_url(gateway, query), subprotocols=[codec.name], **kwargs)  # type: ignore[list-item]
        client = cls(ws, codec)
        if token is not None:
            if token == "default":
                token = make_token()
            reply = await client.request(
                connect=pb.ConnectRequest(token=token, **(connect_request or {}))
            )
            assert not reply.HasField("error"), reply.error
        return client

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                self.frames += 1
                data = frame.encode() if isinstance(frame, str) else frame
                for reply in self.codec.decode_replies(data):
                    if reply.id:
                        self.replies[reply.id] = reply
                        self._arrived.set()
                    else:
                        if reply.push.HasField("disconnect"):
                            self.disconnect = reply.push.disconnect
                        self.pushes.put_nowait(reply.push)
        except ConnectionClosed:
            pass
        finally:
            if self.ws.close_code is not None:
                self.close_code = self.ws.close_code
                self.close_reason = self.ws.close_reason or ""
            self._arrived.set()

    async def send(self, *, id: int | None = None, **request: Any) -> int:
        command_id = self.next_id if id is None else id
        if id is None:
            self.next_id += 1
        command = pb.Command(id=command_id, **request)
        await self.ws.send(self.codec.encode_command(command))
        return command_id

    async def request(self, timeout: float = 5.0, **request: Any) -> pb.Reply:
        command_id = await self.send(**request)
        return await self.reply(command_id, timeout)

    async def reply(self, command_id: int, timeout: float = 5.0) -> pb.Reply:
        deadline = asyncio.get_running_loop().time() + timeout
        while command_id not in self.replies:
            if self._reader.done():
                raise ConnectionError(f"closed {self.close_code} {self.close_reason}")
            self._arrived.clear()
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no reply to command {command_id}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)
        return self.replies.pop(command_id)

    async def push(self, timeout: float = 5.0, *, pings: bool = False) -> pb.Push:
        """The next push; the server's pings (which come at the session's own phase, so
        in any test) are skipped unless asked for."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            push = await asyncio.wait_for(self.pushes.get(), max(deadline - loop.time(), 0))
            if pings or not push.HasField("ping"):
                return push

    def unexpected_pushes(self) -> list[pb.Push]:
        """The pushes queued now, but the server's pings (every ping_interval, at a phase
        of the session's own: one may come in any test)."""
        found = []
        while not self.pushes.empty():
            push = self.pushes.get_nowait()
            if not push.HasField("ping"):
                found.append(push)
        return found

    async def publication(self, timeout: float = 5.0) -> pb.Push:
        while True:
            push = await self.push(timeout)
            if push.HasField("pub"):
                return push

    async def subscribe(self, channel: str, **kwargs: Any) -> pb.SubscribeResult:
        reply = await self.request(subscribe=pb.SubscribeRequest(channel=channel, **kwargs))
        assert not reply.HasField("error"), reply.error
        return reply.subscribe

    async def wait_closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        return self.close_code, self.close_reason

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


@pytest.fixture
async def clients() -> AsyncIterator[list[RawClient]]:
    opened: list[RawClient] = []
    yield opened
    for client in opened:
        await client.close()


async def api_post(
    gateway: Gateway, endpoint: str, body: Any, key: str | None = API_KEY
) -> tuple[int, Any]:
    """POST JSON to the server API with a raw HTTP/1.1 request."""
    import json

    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    headers = f"POST /api/v1/{endpoint} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    headers += f"Content-Length: {len(payload)}\r\nConnection: close\r\n"
    if key is not None:
        headers += f"X-API-Key: {key}\r\n"
    writer.write(headers.encode() + b"\r\n" + payload)
    raw = await reader.read()
    writer.close()
    head, _, body_bytes = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body_bytes) if body_bytes else None


async def publish(gateway: Gateway, channel: str, data: Any, **extra: Any) -> dict[str, Any]:
    status, body = await api_post(gateway, "publish", {"channel": channel, "data": data, **extra})
    assert status == 200, body
    result: dict[str, Any] = body
    return result


# ----------------------------------------------------------------------------- Redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One real redis-server for the session; tests keep apart by key prefix."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def make_redis_server() -> Iterator[Callable[[], RedisServer]]:
    """Redis servers of the test's own (to kill and restart), stopped at teardown."""
    servers: list[RedisServer] = []

    def factory() -> RedisServer:
        server = RedisServer().start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.cleanup()
