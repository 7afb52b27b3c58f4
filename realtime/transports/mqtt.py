"""MQTT over TCP: the MqttConnection of each connection is its asyncio.Protocol too.

Bytes in go to the connection's streaming decoder; packets out are queued on the connection
(it is its own outbound queue) and written once per loop tick, like WebSocket frames. No
task per connection, and no protocol object apart from the connection (idle memory counts).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

from realtime.core.mqtt_cluster import SessionSync
from realtime.core.mqtt_session import MqttConnection, MqttServer
from realtime.core.node import Node


class MqttProtocol(MqttConnection, asyncio.Protocol):
    __slots__ = ("transport",)

    def __init__(self, server: MqttServer) -> None:
        super().__init__(server)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        # pause_writing() fires when this many bytes wait in the socket buffer (see
        # OutboundQueue.overflow).
        self.transport.set_write_buffer_limits(high=self.limit)
        self.server.attach(self)

    def data_received(self, data: bytes) -> None:
        self.node.metrics.bytes_in += len(data)
        self.receive(data)

    def pause_writing(self) -> None:
        self.overflow()

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended()

    def write_payloads(self, payloads: list[bytes], size: int) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.node.metrics.bytes_out += size
        transport.write(payloads[0] if len(payloads) == 1 else b"".join(payloads))

    def close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def remote(self) -> str:
        # uvloop keeps the peer address in the transport: nothing is allocated until asked.
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


class MqttListener:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.server = MqttServer(node)
        store = node.broker.session_store
        if store is not None:  # sessions that devices can resume through any node
            self.server.sync = SessionSync(self.server, store)
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        self._server = await self.node.loop.create_server(
            lambda: MqttProtocol(self.server), host, port, backlog=4096, reuse_address=True
        )
        config = self.node.config.mqtt
        if config.tls_cert_file:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
            self._tls_server = await self.node.loop.create_server(
                lambda: MqttProtocol(self.server),
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
        while self.server.open_connections and self.node.loop.time() < deadline:
            await asyncio.sleep(0.05)
