"""Wires the parts together: config -> broker -> node -> listeners; start, drain, stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from realtime.api.server_api import ServerApi
from realtime.brokers.memory import MemoryBroker
from realtime.config import Config
from realtime.core.broker import Broker, BrokerUnavailable
from realtime.core.node import Node
from realtime.log import event
from realtime.push.sender import PushSender, providers_configured
from realtime.transports.http import HttpServer
from realtime.transports.mqtt import MqttListener
from realtime.transports.websocket import WEBSOCKET_PATH, WebSocketServer

log = logging.getLogger("realtime.app")


def make_broker(config: Config) -> Broker:
    if config.broker.type == "memory":
        return MemoryBroker()
    if config.broker.type == "redis":
        # Imported here: a node on the memory broker never loads the Redis client.
        from realtime.brokers.redis import RedisBroker

        return RedisBroker(config.broker)
    raise ValueError(f"unknown broker type {config.broker.type!r}")


class Gateway:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.config = config
        self.loop = loop or asyncio.get_running_loop()
        self.node = Node(config, make_broker(config), self.loop)
        self.websocket = WebSocketServer(self.node)
        self.api = ServerApi(self.node)
        self.http = HttpServer(self.api.handle, max_body=config.api.max_body_bytes)
        self.mqtt = MqttListener(self.node) if config.mqtt.enabled else None
        if self.mqtt is not None:
            self.websocket.carry_mqtt(self.mqtt.server)
        self.push = self._push_sender()
        self._stopped = asyncio.Event()
        self._stopping = False

    def _push_sender(self) -> PushSender | None:
        """The push sender when a provider is configured; wakes of backgrounded apps go
        to it, and the tokens it finds invalid leave the registry."""
        if not providers_configured(self.config.push):
            return None
        registry = self.node.broker.device_registry

        async def token_invalid(
            provider: str, token: str, reason: str, registered_before: float
        ) -> None:
            removed = False
            with contextlib.suppress(BrokerUnavailable):  # else the next wake finds it again
                removed = await registry.remove_token(provider, token, registered_before)
            event(log, "push_token_removed", provider=provider, reason=reason, removed=removed)

        sender = PushSender.from_config(
            self.config.push, self.node.metrics, on_token_invalid=token_invalid
        )
        self.node.background.sink = sender
        return sender

    async def start(self) -> None:
        await self.node.start()
        if self.push is not None:
            await self.push.start()
        server = self.config.server
        await self.websocket.start(server.host, server.port)
        await self.http.start(self.config.api.host, self.config.api.port)
        if self.mqtt is not None:
            await self.mqtt.start(self.config.mqtt.host, self.config.mqtt.port)
        event(
            log,
            "gateway_started",
            node=self.node.name,
            websocket=f"ws://{server.host}:{self.websocket.port}{WEBSOCKET_PATH}",
            mqtt=f"mqtt://{self.config.mqtt.host}:{self.mqtt.port}" if self.mqtt else "off",
            api=f"http://{self.config.api.host}:{self.http.port}",
            broker=self.node.broker.name,
            push=",".join(providers_configured(self.config.push)) or "off",
            config=self.config.source,
        )

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Graceful: stop accepting, tell clients to reconnect elsewhere, drain, close."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        timeout = self.config.server.drain_timeout if drain_timeout is None else drain_timeout
        open_connections = len(self.websocket.connections)
        event(log, "gateway_draining", connections=open_connections, timeout=timeout)
        self.websocket.stop_accepting()
        if self.mqtt is not None:
            self.mqtt.stop_accepting()
        self.node.begin_drain()
        if self.mqtt is not None:
            await self.mqtt.drain(timeout)
        aborted = await self.websocket.drain(timeout)
        await self.http.stop()
        if self.push is not None:
            await self.push.close(drain=1.0)
        await self.node.stop()
        event(log, "gateway_stopped", drained=open_connections - aborted, aborted=aborted)
        self._stopped.set()
