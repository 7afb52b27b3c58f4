"""Gateway clients for locust users: blocking calls that yield to gevent.

- `WsSession`: the WebSocket protocol (realtime.v1.proto) on websocket-client, with one
  reader greenlet per socket that answers the server's pings, resolves replies by command
  id and hands pushes to the user.
- `MqttSession`: a paho-mqtt client driven by one gevent read loop per socket (paho's own
  loops rely on select(), which stops working past ~330 sockets in one process).

Both set TCP_NODELAY (without it Nagle adds ~40 ms to small writes). Nothing here reports
to locust: the users do (loadtests/locustfile.py). Import only under locust (gevent).
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import itertools
import socket
import termios
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import gevent
import gevent.socket
import paho.mqtt.client as mqtt
import websocket
from gevent.event import AsyncResult
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.framing import encode_varint, split_delimited

SUBPROTOCOL = "realtime.v1.proto"
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
_PING_RAW = pb.Command(ping=pb.PingRequest()).SerializeToString()
_PING = encode_varint(len(_PING_RAW)) + _PING_RAW


class ReplyError(Exception):
    """The gateway answered a command with an error."""

    def __init__(self, error: pb.Error) -> None:
        super().__init__(f"error {error.code}: {error.message}")
        self.code = error.code


class SessionClosed(ConnectionError):
    """The connection ended (the message says how: close code, reason or exception)."""


class WsSession:
    """One WebSocket connection speaking the gateway's protobuf protocol.

    `on_push(push, kind, received_at)` runs in the reader greenlet for every push but
    pings (answered here); `on_reply(reply)` runs there too, before the command's waiter
    is woken, so that a subscribe reply's recovered publications are handled before the
    live ones that follow it. `on_close(reason)` runs once when the connection ends
    without `close()` having been called.
    """

    def __init__(
        self,
        url: str,
        on_push: Callable[[pb.Push, str, float], None],
        on_reply: Callable[[pb.Reply], None] | None = None,
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.url = url
        self.on_push = on_push
        self.on_reply = on_reply
        self.on_close = on_close
        self.ws: websocket.WebSocket | None = None
        self.client_id = ""
        self.closed = False
        self.close_reason = ""
        self._closing = False
        self._ids = itertools.count(1)
        self._waiters: dict[int, AsyncResult] = {}
        self._reader: gevent.Greenlet | None = None

    def open(self, token: str, timeout: float) -> pb.ConnectResult:
        """Handshake and `connect` command; raises on refusal or timeout."""
        self.ws = websocket.create_connection(
            self.url,
            timeout=timeout,
            subprotocols=[SUBPROTOCOL],
            sockopt=NODELAY,
            skip_utf8_validation=True,
            enable_multithread=True,
        )
        if self.ws.getsubprotocol() != SUBPROTOCOL:
            self.ws.close()
            raise SessionClosed(f"server did not select {SUBPROTOCOL}")
        self.ws.settimeout(None)
        self._reader = gevent.spawn(self._read)
        connect = pb.ConnectRequest(token=token, name="locust", version="1.0", platform="load")
        reply = self.request(pb.Command(connect=connect), timeout)
        self.client_id = reply.connect.client
        return reply.connect

    def request(self, command: pb.Command, timeout: float) -> pb.Reply:
        """Send a command and wait for its reply; ReplyError when it is an error."""
        if self.closed or self.ws is None:
            raise SessionClosed(self.close_reason or "not connected")
        command.id = next(self._ids)
        waiter = AsyncResult()
        self._waiters[command.id] = waiter
        raw = command.SerializeToString()
        try:
            self.ws.send_bytes(encode_varint(len(raw)) + raw)
            reply: pb.Reply = waiter.get(timeout=timeout)
        except gevent.Timeout:
            raise TimeoutError(f"no reply within {timeout:g} s") from None
        except websocket.WebSocketException as exc:
            raise SessionClosed(f"send failed: {exc}") from None
        finally:
            self._waiters.pop(command.id, None)
        if reply.HasField("error"):
            raise ReplyError(reply.error)
        return reply

    def send(self, command: pb.Command) -> None:
        """Fire and forget (id 0: no reply)."""
        if self.ws is None or self.closed:
            return
        raw = command.SerializeToString()
        self.ws.send_bytes(encode_varint(len(raw)) + raw)

    def close(self) -> None:
        """Close on purpose (normal closure); `on_close` is not called."""
        self._closing = True
        if self._reader is not None:
            self._reader.kill(block=True)  # it is the only one reading the socket
        if self.ws is not None and not self.closed:
            with contextlib.suppress(Exception):  # already gone
                self.ws.send_close()  # 1000, then the socket is shut down in _finish
        self._finish("closed by the client")

    def _finish(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        for waiter in self._waiters.values():
            waiter.set_exception(SessionClosed(reason))
        self._waiters.clear()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.shutdown()
        if not self._closing and self.on_close is not None:
            self.on_close(reason)

    def _read(self) -> None:
        reason = "connection closed"
        ws = self.ws
        assert ws is not None
        try:
            while True:
                opcode, data = ws.recv_data()
                now = time.perf_counter()
                if opcode == websocket.ABNF.OPCODE_BINARY:
                    for raw in split_delimited(data):
                        self._dispatch(pb.Reply.FromString(raw), now)
                elif opcode == websocket.ABNF.OPCODE_CLOSE:
                    code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                    reason = f"closed by the server: {code} {data[2:].decode(errors='replace')}"
                    break
                else:
                    reason = f"unexpected frame opcode {opcode}"
                    break
        except gevent.GreenletExit:
            return  # close() finishes
        except Exception as exc:  # every error must reach the stats, as a close
            reason = f"connection lost: {type(exc).__name__}: {exc}"
        self._finish(reason)

    def _dispatch(self, reply: pb.Reply, now: float) -> None:
        if reply.id:
            if self.on_reply is not None:
                self.on_reply(reply)
            waiter = self._waiters.get(reply.id)
            if waiter is not None:
                waiter.set(reply)
            return
        if not reply.HasField("push"):
            return
        push = reply.push
        kind = push.WhichOneof("event") or ""
        if kind == "ping":
            if self.ws is not None:
                self.ws.send_bytes(_PING)
            return
        self.on_push(push, kind, now)


def parse_mqtt_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "tcp"):
        raise ValueError(f"--mqtt-url {url}: use mqtt://host:port")
    return parts.hostname or "127.0.0.1", parts.port or 1883


class MqttSession:
    """A paho client with a gevent read loop. `on_message(msg, received_at)` runs in the
    loop greenlet; `on_close(reason)` when the connection ends without `disconnect()`."""

    def __init__(
        self,
        url: str,
        client_id: str,
        username: str,
        token: str,
        *,
        version: str = "3.1.1",
        clean: bool = False,
        session_expiry: int = 600,
        keepalive: int = 60,
        on_message: Callable[[mqtt.MQTTMessage, float], None],
        on_close: Callable[[str], None] | None = None,
    ) -> None:
        self.host, self.port = parse_mqtt_url(url)
        self.v5 = version == "5"
        self.clean = clean
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.on_message = on_message
        self.on_close = on_close
        self.connected = False
        self._closing = False
        self._loop: gevent.Greenlet | None = None
        self._connack: AsyncResult | None = None
        self._acks: dict[int, AsyncResult] = {}
        self.puback_callback: Callable[[int, float], None] | None = None
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self.v5 else clean,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
        )
        client.username_pw_set(username, token)
        client.on_socket_open = _nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_suback
        client.on_unsubscribe = self._on_unsuback
        self.client = client
        self._started = False

    # ------------------------------------------------------------------ connection

    def connect(self, timeout: float) -> bool:
        """Connect (or reconnect with the same client id); True when the server had a
        session for it (CONNACK session present)."""
        self._closing = False
        self._connack = AsyncResult()
        if not self._started:
            self._started = True
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0 if self.clean else self.session_expiry
                self.client.connect(
                    self.host,
                    self.port,
                    self.keepalive,
                    clean_start=self.clean,
                    properties=props,
                )
            else:
                self.client.connect(self.host, self.port, self.keepalive)
        else:
            self.client.reconnect()
        self._loop = gevent.spawn(self._run)
        try:
            present, reason = self._connack.get(timeout=timeout)
        except gevent.Timeout:
            self._abort()
            raise TimeoutError(f"no CONNACK within {timeout:g} s") from None
        except Exception:
            self._abort()
            raise
        if reason:
            self._abort()
            raise SessionClosed(f"CONNACK refused: {reason}")
        self.connected = True
        return bool(present)

    def disconnect(self) -> None:
        """A clean DISCONNECT: a persistent session stays on the server."""
        self._closing = True
        self._stop_loop()
        self.connected = False
        with contextlib.suppress(Exception):
            self.client.disconnect()  # writes DISCONNECT and closes the socket right away
        self._fail_waiters("disconnected")

    def _stop_loop(self) -> None:
        # Wait for it to end: a loop woken by its socket just before the kill would
        # otherwise run once more, on the next connection's state.
        loop, self._loop = self._loop, None
        if loop is not None and loop is not gevent.getcurrent():
            loop.kill(block=True)

    def _abort(self) -> None:
        self._closing = True
        self._stop_loop()
        with contextlib.suppress(Exception):
            self.client._sock_close()

    def _run(self) -> None:
        """Read packets while the socket lasts. Keep-alive is `tick()`'s job, so that this
        loop can wait on one reused watcher without a timer per wait."""
        client = self.client
        reason = "connection closed"
        sock = client.socket()
        if sock is None:
            return
        fd = sock.fileno()
        hub = gevent.get_hub()
        watcher = hub.loop.io(fd, 1)
        streak = 0
        try:
            while client.socket() is sock:
                # paho reads one packet per call: while bytes are waiting, read on without
                # a round through the hub (a busy hub would delay the next packet), but
                # let the others run now and then.
                if _pending_bytes(fd) and streak < 50:
                    streak += 1
                else:
                    streak = 0
                    hub.wait(watcher)
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    break
                if client.want_write() and client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                    break
        except gevent.GreenletExit:
            return
        except Exception as exc:
            reason = f"connection lost: {type(exc).__name__}: {exc}"
        finally:
            watcher.close()
        if self._loop is gevent.getcurrent():  # not a loop of an earlier connection
            self._lost(reason)

    def tick(self) -> None:
        """From the user's greenlet, about once a second: PINGREQ when due, and the end of
        a connection whose PINGRESP did not come (paho closes the socket then)."""
        if not self.connected:
            return
        sock = self.client.socket()
        self.client.loop_misc()
        if sock is not None and self.client.socket() is not sock:
            self._stop_loop()
            self._lost("keep-alive: no PINGRESP")

    def _lost(self, reason: str) -> None:
        was_connected = self.connected
        self.connected = False
        self._fail_waiters(reason)
        if self._connack is not None and not self._connack.ready():
            self._connack.set_exception(SessionClosed(reason))
        if was_connected and not self._closing and self.on_close is not None:
            self.on_close(reason)

    def _fail_waiters(self, reason: str) -> None:
        for waiter in self._acks.values():
            if not waiter.ready():
                waiter.set_exception(SessionClosed(reason))
        self._acks.clear()

    # ------------------------------------------------------------------ operations

    def subscribe(self, topic: str, qos: int, timeout: float) -> int:
        """SUBSCRIBE and wait for the SUBACK; returns the granted QoS."""
        result, mid = self.client.subscribe(topic, qos)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise SessionClosed(f"subscribe failed: {mqtt.error_string(result)}")
        codes = self._wait_ack(mid, timeout)
        if not codes or codes[0].is_failure:
            raise ReplyError(
                pb.Error(code=codes[0].value if codes else 0, message="SUBACK refused")
            )
        return int(codes[0].value)

    def unsubscribe(self, topic: str, timeout: float) -> None:
        result, mid = self.client.unsubscribe(topic)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise SessionClosed(f"unsubscribe failed: {mqtt.error_string(result)}")
        self._wait_ack(mid, timeout)

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> int:
        """Queue and write a PUBLISH; returns its mid (PUBACK: `puback_callback`)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise SessionClosed(f"publish failed: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def _wait_ack(self, mid: int, timeout: float) -> Any:
        waiter = self._acks.setdefault(mid, AsyncResult())
        try:
            return waiter.get(timeout=timeout)
        except gevent.Timeout:
            raise TimeoutError(f"no acknowledgement within {timeout:g} s") from None
        finally:
            self._acks.pop(mid, None)

    # ------------------------------------------------------------------ paho callbacks

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self._connack is not None and not self._connack.ready():
            failed = reason.is_failure if hasattr(reason, "is_failure") else bool(reason)
            self._connack.set((flags.session_present, str(reason) if failed else ""))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if not self._closing:
            self._lost(f"disconnected: {reason}")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.on_message(msg, time.perf_counter())

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if self.puback_callback is not None:
            self.puback_callback(mid, time.perf_counter())

    def _on_suback(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        waiter = self._acks.setdefault(mid, AsyncResult())
        if not waiter.ready():
            waiter.set(codes)

    def _on_unsuback(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        self._on_suback(client, userdata, mid, codes, props)


def _pending_bytes(fd: int) -> int:
    buffer = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buffer)
    return buffer[0]


def _nodelay(client: Any, userdata: Any, sock: Any) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
