"""This node among the broker's nodes: its listing with its load, and requests to others.

Nodes find each other through the broker: every node lists itself (`Broker.register_node`)
every `broker.node_announce_interval` seconds with its load, and a listing that was not
renewed for `broker.node_ttl` seconds is gone (the node died). Control messages travel
through the broker's pub/sub like publications, so they can be lost like them: every
request has a timeout, and a caller that gets no answer goes on with what it has.

A request names a kind; this node's answer comes from the handler registered for that kind
(`on`), and travels back as a `REPLY` with the request's number. `broadcast` asks every
node, this one included, and gathers the answers of the nodes listed at the time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from realtime.core.broker import REPLY, Broker, BrokerUnavailable, ControlMessage
from realtime.log import event

log = logging.getLogger("realtime.cluster")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _Gathering:
    """Answers to one broadcast, until every expected node answered."""

    __slots__ = ("answers", "done", "expected")

    def __init__(self, expected: set[str]) -> None:
        self.expected = expected
        self.answers: dict[str, dict[str, Any]] = {}
        self.done = asyncio.Event()

    def add(self, node_id: str, body: dict[str, Any]) -> None:
        self.answers[node_id] = body
        if self.expected <= self.answers.keys():
            self.done.set()


class Cluster:
    def __init__(
        self,
        broker: Broker,
        name: str,
        load: Callable[[], dict[str, Any]],
        *,
        announce_interval: float,
        node_ttl: float,
        request_timeout: float,
    ) -> None:
        self.broker = broker
        self.node_id = broker.node_id
        self.name = name
        self.load = load
        self.announce_interval = announce_interval
        self.node_ttl = node_ttl
        self.request_timeout = request_timeout
        self.started_at = time.time()
        self._handlers: dict[str, Handler] = {}
        self._requests: dict[int, asyncio.Future[dict[str, Any]] | _Gathering] = {}
        self._next_request = 1
        self._next_announce = 0.0
        self._cpu_mark = (time.monotonic(), time.process_time())
        self._cpu = 0.0
        # Node ids listed at the last look, and when each listing was renewed (unix time).
        self._listed: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on(self, kind: str, handler: Handler) -> None:
        self._handlers[kind] = handler

    # ------------------------------------------------------------------ listing

    def info(self) -> dict[str, Any]:
        """This node and its load, as `nodes` lists it."""
        now_mono, now_cpu = time.monotonic(), time.process_time()
        mark_mono, mark_cpu = self._cpu_mark
        if now_mono - mark_mono >= 1.0:
            self._cpu = (now_cpu - mark_cpu) / (now_mono - mark_mono)
            self._cpu_mark = (now_mono, now_cpu)
        now = time.time()
        return {
            "node_id": self.node_id,
            "name": self.name,
            "started_at": round(self.started_at, 3),
            "updated_at": round(now, 3),
            "uptime": round(now - self.started_at, 1),
            "cpu": round(self._cpu, 3),  # CPUs used since the last listing (1.0 = one core)
            "rss_bytes": _rss_bytes(),
            **self.load(),
        }

    async def announce(self, now: float) -> None:
        """From the node's housekeeping, once a second: renew the listing when due."""
        if now < self._next_announce:
            return
        self._next_announce = now + self.announce_interval
        try:
            await self.broker.register_node(self.info(), self.node_ttl)
        except BrokerUnavailable:
            self._next_announce = now + 1.0  # try again soon

    async def nodes(self) -> list[dict[str, Any]]:
        listed = await self.broker.nodes()
        self._listed = {n["node_id"]: float(n.get("updated_at", 0.0)) for n in listed}
        listed.sort(key=lambda n: (str(n.get("name", "")), str(n["node_id"])))
        return listed

    async def is_listed(self, node_id: str) -> bool:
        """Whether `node_id` renewed its listing lately (a dead node's owner claims are
        not waited for)."""
        if node_id not in self._listed:
            await self.nodes()
        updated = self._listed.get(node_id)
        return updated is not None and time.time() - updated < self.node_ttl

    async def leave(self) -> None:
        with contextlib.suppress(BrokerUnavailable):  # else the listing expires by itself
            await self.broker.unregister_node()

    # ------------------------------------------------------------------ requests

    def _number(self) -> int:
        number = self._next_request
        self._next_request += 1
        return number

    async def request(
        self, target: str, kind: str, body: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any] | None:
        """Ask node `target`; its answer, or None when none came in time."""
        number = self._number()
        answer: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[number] = answer
        try:
            await self.broker.send_control(ControlMessage(kind, self.node_id, target, number, body))
            return await asyncio.wait_for(answer, timeout or self.request_timeout)
        except (TimeoutError, BrokerUnavailable):
            return None
        finally:
            self._requests.pop(number, None)

    async def tell(self, target: str, kind: str, body: dict[str, Any]) -> None:
        """Send node `target` a message that wants no answer (it may be lost). Raises
        BrokerUnavailable when it cannot be sent."""
        await self.broker.send_control(ControlMessage(kind, self.node_id, target, 0, body))

    async def broadcast(
        self, kind: str, body: dict[str, Any], timeout: float | None = None
    ) -> tuple[dict[str, dict[str, Any]], list[str]]:
        """Ask every node: (answers by node id, listed nodes that did not answer in time).
        Raises BrokerUnavailable when the message cannot be sent."""
        expected = {n["node_id"] for n in await self.nodes()} | {self.node_id}
        number = self._number()
        gathering = self._requests[number] = _Gathering(expected)
        try:
            await self.broker.send_control(ControlMessage(kind, self.node_id, "", number, body))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(gathering.done.wait(), timeout or self.request_timeout)
        finally:
            self._requests.pop(number, None)
        missing = sorted(expected - gathering.answers.keys())
        return dict(gathering.answers), missing

    # ------------------------------------------------------------------ receiving

    def handle(self, message: ControlMessage) -> None:
        """From the broker: a control message for this node (or every node)."""
        if message.target not in ("", self.node_id):
            return
        if message.kind == REPLY:
            waiting = self._requests.get(message.request)
            body = message.body or {}
            if isinstance(waiting, _Gathering):
                waiting.add(message.sender, body)
            elif waiting is not None and not waiting.done():
                waiting.set_result(body)
            return
        handler = self._handlers.get(message.kind)
        if handler is None:
            event(log, "control_unknown", logging.WARNING, kind=message.kind, sender=message.sender)
            return
        task = asyncio.get_running_loop().create_task(self._answer(handler, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, handler: Handler, message: ControlMessage) -> None:
        try:
            body = await handler(message.body or {})
        except Exception:
            log.exception("control_failed", extra={"fields": {"kind": message.kind}})
            body = {"error": "failed"}
        if not message.request:
            return
        reply = ControlMessage(REPLY, self.node_id, message.sender, message.request, body)
        with contextlib.suppress(BrokerUnavailable):  # else the asker times out
            await self.broker.send_control(reply)
