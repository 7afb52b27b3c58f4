"""WebSocket transport: websockets' sans-I/O ServerProtocol on an asyncio.Protocol.

websockets parses the handshake and inbound frames (RFC 6455, masks, control frames,
size limits); outbound data bypasses it. Server frames are unmasked, so a publication is
framed once and the same frame goes to every subscriber; the frames a connection collected
during one loop tick go out in one `transport.write`. Slow readers are caught by the
transport's own high-water mark (`pause_writing`), at no cost per write. No task per
connection: an idle connection is this object, the sans-I/O parser and its session.

The same port answers plain `GET /healthz` and `GET /readyz` (for load balancers),
`GET /v1/poll` (backgrounded apps fetch what they missed, `core/poll.py`), and carries MQTT
over WebSocket (subprotocol `mqtt`) when the MQTT listener is enabled.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from collections.abc import Coroutine, Sequence
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from realtime.auth import AuthError
from realtime.core.broker import BrokerUnavailable, StreamPosition
from realtime.core.mqtt_session import MqttConnection, MqttServer
from realtime.core.node import Node
from realtime.core.poll import NoDetachedSession, PollRefused, PollResult, poll
from realtime.core.replies import pb_publications
from realtime.core.session import Session
from realtime.log import event
from realtime.metrics import Metrics
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codec import (
    CODECS,
    JSON,
    JSON_SUBPROTOCOL,
    PROTO_SUBPROTOCOL,
    Codec,
    message_to_obj,
)
from realtime.protocol.codes import ErrorCode, ProtocolError
from realtime.protocol.wsframe import OP_BINARY, OP_TEXT, frame_header

log = logging.getLogger("realtime.websocket")

WEBSOCKET_PATH = "/connection/websocket"
POLL_PATH = "/v1/poll"
MQTT_PATH = "/mqtt"  # what MQTT-over-WebSocket clients use by default
MQTT_SUBPROTOCOL = Subprotocol("mqtt")
SUBPROTOCOLS = [Subprotocol(PROTO_SUBPROTOCOL), Subprotocol(JSON_SUBPROTOCOL)]
HANDSHAKE_TIMEOUT = 10.0
CLOSE_TIMEOUT = 3.0

# websockets logs every closed connection at INFO; connections are not events worth a line.
_quiet_logger = logging.getLogger("realtime.websocket.protocol")
_quiet_logger.setLevel(logging.WARNING)


class WebSocketWire:
    """The hub's wire format for WebSocket connections of one codec: whole frames."""

    __slots__ = ("codec", "opcode")

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.opcode = OP_BINARY if codec.binary else OP_TEXT

    def frame(self, message: bytes) -> bytes:
        return frame_header(self.opcode, len(message)) + message

    def encode_publication(
        self,
        channel: str,
        offset: int,
        data: bytes,
        user: str,
        client: str,
        tags: dict[str, str] | None,
        delta: bool = False,
    ) -> bytes:
        return self.frame(
            self.codec.encode_publication(channel, offset, data, user, client, tags, delta)
        )

    def encode_reply(self, reply: pb.Reply) -> bytes:
        return self.frame(self.codec.encode_reply(reply))


WIRES = {name: WebSocketWire(codec) for name, codec in CODECS.items()}
_NO_HEADERS = Headers()


def _select_subprotocol(
    protocol: ServerProtocol, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    available = protocol.available_subprotocols or ()
    for name in offered:
        if name in available:
            return name
    # No subprotocol offered (simple tools, curl-like clients): JSON, which humans can read.
    return None


def _handshake_token(request: Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    query = parse_qs(urlsplit(request.path).query)
    return query.get("token", [""])[-1]


def _error(code: str, message: str, **more: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **more}}


def parse_poll_query(query: dict[str, list[str]]) -> tuple[float, int, dict[str, StreamPosition]]:
    """`wait`, `limit` and `since` (repeated `<channel>:<offset>:<epoch>`) of a poll."""
    try:
        wait = float(query.get("wait", ["0"])[-1])
        limit = int(query.get("limit", ["0"])[-1])
        since: dict[str, StreamPosition] = {}
        for item in query.get("since", []):
            channel, offset, epoch = item.rsplit(":", 2)
            since[channel] = StreamPosition(int(offset), epoch)
    except ValueError:
        raise ValueError(
            "wait is seconds, limit a number, since <channel>:<offset>:<epoch> (repeatable)"
        ) from None
    if not wait >= 0 or limit < 0 or any(not 0 <= p.offset < 2**63 for p in since.values()):
        raise ValueError("wait, limit and offsets must be numbers >= 0 (offsets below 2^63)")
    return wait, limit, since


def poll_body(result: PollResult) -> dict[str, Any]:
    channels: dict[str, Any] = {}
    for channel, found in result.channels.items():
        pubs = [message_to_obj(p) for p in pb_publications(found.publications)]
        channels[channel] = {
            "publications": pubs,
            "position": {"offset": found.position.offset, "epoch": found.position.epoch},
            "recovered": found.recovered,
        }
    return {"channels": channels, "more": result.more}


_http_date: tuple[int, str] = (0, "")


def _date_header() -> str:
    """The HTTP Date, formatted once a second (polls answer thousands a second)."""
    global _http_date
    now = int(time.time())
    if _http_date[0] != now:
        _http_date = (now, email.utils.formatdate(now, usegmt=True))
    return _http_date[1]


def _json_response(status: int, body: dict[str, Any]) -> Response:
    """A JSON answer that ends the connection (what `protocol.reject` builds, without its
    plain-text body and header rewrites: polls are answered this way)."""
    payload = json.dumps(body).encode()
    headers = Headers(
        [
            ("Date", _date_header()),
            ("Connection", "close"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status, HTTPStatus(status).phrase, headers, payload)


class MqttOverWebSocket(MqttConnection):
    """An MQTT connection carried by a WebSocket connection: its bytes out go as binary
    frames."""

    __slots__ = ("connection",)

    def __init__(self, server: MqttServer, connection: WebSocketConnection) -> None:
        super().__init__(server)
        self.connection = connection

    def write_payloads(self, payloads: list[bytes], size: int) -> None:
        body = payloads[0] if len(payloads) == 1 else b"".join(payloads)
        self.connection.write_payloads([frame_header(OP_BINARY, size) + body], size)

    def close_transport(self) -> None:
        self.connection.close(1000, "")

    @property
    def remote(self) -> str:
        return self.connection.remote


class WebSocketConnection(asyncio.Protocol):
    __slots__ = (
        "_fragments",
        "_timer",
        "metrics",
        "mqtt",
        "protocol",
        "remote",
        "server",
        "session",
        "transport",
    )

    def __init__(self, server: WebSocketServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.protocol = ServerProtocol(
            subprotocols=server.subprotocols,
            select_subprotocol=_select_subprotocol,
            origins=server.origins,
            max_size=server.node.config.limits.max_frame_bytes,
            logger=_quiet_logger,
        )
        self.session: Session | None = None
        self.mqtt: MqttOverWebSocket | None = None
        self.metrics: Metrics = server.node.metrics
        self._fragments: list[bytes] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.remote = ""

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCPTransport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        # pause_writing() fires when this many bytes wait in the socket buffer: that client
        # is too slow (see Outbound.overflow).
        self.transport.set_write_buffer_limits(high=self.server.node.config.limits.max_queue_bytes)
        peer = transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.server.connections.add(self)
        self._timer = self.server.loop.call_later(HANDSHAKE_TIMEOUT, self._abort)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        protocol.receive_data(data)
        session = self.session
        if session is not None:
            session.last_rx = self.server.loop.time()
        for ev in protocol.events_received():
            if isinstance(ev, Frame):
                self._frame(ev)
            elif isinstance(ev, Request):
                self._handshake(ev)
        self._write_protocol_output()

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.outbound.overflow()
        elif self.mqtt is not None:
            self.mqtt.overflow()

    def eof_received(self) -> bool | None:
        self.protocol.receive_eof()
        self._write_protocol_output()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.server.connections.discard(self)
        if self.session is not None:
            self.session.connection_lost()
        elif self.mqtt is not None:
            self.mqtt.ended()

    # ------------------------------------------------------------------ handshake

    def _handshake(self, request: Request) -> None:
        protocol = self.protocol
        node = self.server.node
        path = urlsplit(request.path).path
        if path == POLL_PATH:
            if self._timer is not None:  # a long poll may wait longer than a handshake
                self._timer.cancel()
            wait_bound = node.config.background.poll_max_wait + node.config.broker.command_timeout
            self._timer = self.server.loop.call_later(wait_bound + 5.0, self._abort)
            self.server.spawn(self._poll(request))
            return
        if path in ("/healthz", "/readyz"):
            ok = path == "/healthz" or node.ready
            response = _json_response(200 if ok else 503, {"status": "ok" if ok else "not ready"})
        elif path != WEBSOCKET_PATH and path != MQTT_PATH:
            response = _json_response(
                404,
                {"error": {"code": "not_found", "message": f"WebSocket path is {WEBSOCKET_PATH}"}},
            )
        elif node.draining:
            node.metrics.connections_refused["draining"] += 1
            response = _json_response(
                503,
                {"error": {"code": "draining", "message": "node is shutting down; reconnect"}},
            )
        elif len(node.sessions) >= node.config.server.max_connections:
            node.metrics.connections_refused["max_connections"] += 1
            response = _json_response(
                503,
                {"error": {"code": "max_connections", "message": "node is full; try another"}},
            )
        else:
            response = protocol.accept(request)
        protocol.send_response(response)
        if response.status_code != 101:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # websockets' parser generator keeps the request alive for the whole connection:
        # drop its headers (~2.5 KB per idle connection) once we are done with them.
        token = _handshake_token(request)
        request.headers = _NO_HEADERS
        if protocol.subprotocol == MQTT_SUBPROTOCOL and self.server.mqtt is not None:
            self.mqtt = MqttOverWebSocket(self.server.mqtt, self)
            self.server.mqtt.attach(self.mqtt)
            return
        codec = CODECS.get(protocol.subprotocol or "", JSON)
        self.session = Session(
            node,
            self,
            codec,
            WIRES[codec.name],
            handshake_token=token,
            remote=self.remote,
        )
        node.attach(self.session)

    async def _poll(self, request: Request) -> None:
        node = self.server.node
        status, body = 200, {}
        try:
            principal = node.verifier.verify(_handshake_token(request))
            wait, limit, since = parse_poll_query(parse_qs(urlsplit(request.path).query))
            result = await poll(node, principal, since, wait=wait, limit=limit)
            body = poll_body(result)
            found = any(c.publications for c in result.channels.values())
            node.metrics.polls["ok" if found else "empty"] += 1
        except AuthError as exc:
            status, body = 401, _error("unauthorized", str(exc))
        except ValueError as exc:
            status, body = 400, _error("bad_request", str(exc))
        except NoDetachedSession as exc:
            status, body = 404, _error("no_detached_session", exc.message)
        except PollRefused as exc:
            busy = exc.code == ErrorCode.NOT_AVAILABLE
            status = 503 if busy else 429
            code = "busy" if busy else "too_many_requests"
            body = _error(code, exc.message, retry_after_ms=exc.retry_after_ms)
        except ProtocolError as exc:
            status, body = 400, _error(exc.code.name.lower(), exc.message)
        except BrokerUnavailable as exc:
            retry_ms = int(exc.retry_after * 1000)
            status, body = 503, _error("unavailable", str(exc), retry_after_ms=retry_ms)
        except Exception:
            log.exception("poll_failed")
            status, body = 500, _error("internal", "internal error")
        if status != 200:
            node.metrics.polls[f"error_{status}"] += 1
        if self.transport is None or self.transport.is_closing():
            return  # the app gave up waiting
        self.protocol.send_response(_json_response(status, body))
        self._write_protocol_output()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.server.loop.call_later(CLOSE_TIMEOUT, self._abort)

    # ------------------------------------------------------------------ frames

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = bytes(frame.data)
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                self._message(data)
            else:
                self._fragments = [data]
        elif opcode is Opcode.CONT and self._fragments is not None:
            self._fragments.append(data)
            if frame.fin:
                data = b"".join(self._fragments)
                self._fragments = None
                self._message(data)
        # PING is answered by the protocol; PONG and CLOSE need nothing more here.

    def _message(self, data: bytes) -> None:
        if self.session is not None:
            self.session.receive(data)
        elif self.mqtt is not None:
            self.mqtt.receive(data)

    # ------------------------------------------------------------------ output

    def _write_protocol_output(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for chunk in self.protocol.data_to_send():
            if chunk:
                transport.write(chunk)
            else:  # EOF marker: the closing handshake is done
                transport.close()
                return
        if self.protocol.close_expected() and self.protocol.state is State.CLOSED:
            transport.close()

    def write_payloads(self, payloads: list[bytes], size: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.metrics.bytes_out += size
        transport.write(payloads[0] if len(payloads) == 1 else b"".join(payloads))

    def close(self, code: int, reason: str) -> None:
        protocol = self.protocol
        if self.transport is None or protocol.state is not State.OPEN:
            self._abort()
            return
        protocol.send_close(code, reason)
        self._write_protocol_output()
        # Wait for the client's close frame, but not forever (a slow client may never read).
        if self._timer is None:
            self._timer = self.server.loop.call_later(CLOSE_TIMEOUT, self._abort)

    def _abort(self) -> None:
        self._timer = None
        if self.transport is not None:
            self.transport.abort()


class WebSocketServer:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.loop = node.loop
        self.connections: set[WebSocketConnection] = set()
        self.mqtt: MqttServer | None = None
        self.subprotocols = list(SUBPROTOCOLS)
        origins = node.config.server.allowed_origins
        self.origins: list[Any] | None = [*origins, None] if origins else None
        self._server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """A task of a connection's (a poll), kept referenced until it ends."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def carry_mqtt(self, mqtt: MqttServer) -> None:
        """Accept MQTT over WebSocket (subprotocol `mqtt`) for this MQTT server."""
        self.mqtt = mqtt
        self.subprotocols.append(MQTT_SUBPROTOCOL)

    async def start(self, host: str, port: int) -> None:
        self._server = await self.loop.create_server(
            lambda: WebSocketConnection(self), host, port, backlog=4096, reuse_address=True
        )

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()

    async def drain(self, timeout: float) -> int:
        """After begin_drain: wait until clients closed, abort the rest; returns how many
        had to be aborted."""
        deadline = self.loop.time() + timeout
        while self.connections and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.connections)
        for connection in left:
            connection._abort()
        if left:
            event(log, "drain_timeout", logging.WARNING, aborted=len(left))
        return len(left)
