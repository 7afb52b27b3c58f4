"""MQTT over TCP: an asyncio.Protocol per connection around an MqttConnection.

Bytes in go to the session's streaming decoder; packets out are queued on its Outbound
and written once per loop tick, like WebSocket frames. No task per connection.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from realtime.core.mqtt_session import MqttConnection, MqttServer
from realtime.core.node import Node
from realtime.metrics import Metrics


class MqttProtocol(asyncio.Protocol):
    __slots__ = ("listener", "metrics", "session", "transport")

    def __init__(self, listener: MqttListener) -> None:
        self.listener = listener
        self.metrics: Metrics = listener.node.metrics
        self.transport: asyncio.Transport | None = None
        self.session: MqttConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        node = self.listener.node
        self.transport.set_write_buffer_limits(high=node.config.limits.max_queue_bytes)
        peer = transport.get_extra_info("peername")
        remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.session = MqttConnection(self.listener.server, self, remote)
        self.listener.server.attach(self.session)

    def data_received(self, data: bytes) -> None:
        self.metrics.bytes_in += len(data)
        if self.session is not None:
            self.session.receive(data)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.outbound.overflow()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.connection_lost()

    # Sink
    def write_payloads(self, payloads: list[bytes], size: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.metrics.bytes_out += size
        transport.write(payloads[0] if len(payloads) == 1 else b"".join(payloads))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class MqttListener:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.server = MqttServer(node)
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await self.node.loop.create_server(
            lambda: MqttProtocol(self), host, port, backlog=4096, reuse_address=True
        )
        config = self.node.config.mqtt
        if config.tls_cert_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
            self._tls_server = await self.node.loop.create_server(
                lambda: MqttProtocol(self),
                host,
                config.tls_port,
                ssl=context,
                backlog=4096,
                reuse_address=True,
            )

    @property
    def tls_port(self) -> int | None:
        if self._tls_server is None:
            return None
        port: int = self._tls_server.sockets[0].getsockname()[1]
        return port

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def stop_accepting(self) -> None:
        for server in (self._server, self._tls_server):
            if server is not None:
                server.close()

    async def drain(self, timeout: float) -> None:
        self.server.shutdown()
        deadline = self.node.loop.time() + timeout
        while self.server.connections and self.node.loop.time() < deadline:
            await asyncio.sleep(0.05)
