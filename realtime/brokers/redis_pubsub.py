"""One Redis instance's pub/sub connection: subscriptions, the read loop, reconnects.

The connection is a plain asyncio protocol with hiredis' reader: bytes arrive in
`data_received`, replies are parsed there, and messages go into a bounded queue that a
loop callback drains in batches of `BATCH` (yielding to the node's other connections in
between). When the node falls behind, messages past `queue_size` are dropped and counted
rather than left to pile up in Redis (which would cut the connection at its output-buffer
limit); the channels of dropped messages are reported as a stream gap (`gap`, once per
channel per drain), so their subscribers are told to recover. One queue per instance, in
arrival order: a channel lives on one instance, so its order holds.

Subscriptions: each Redis channel name has flags (`WANTED` by the node, `SENT` on this
connection, `ACTIVE` once Redis confirmed). Subscribes made in one loop tick go out as one
SUBSCRIBE and their callers wait for the confirmation, so nothing published after
`subscribe` returns is missed. Unsubscribes wait `unsubscribe_delay` seconds (a client
that reconnects or resubscribes at once costs nothing) and go out together. Patterns
(MQTT wildcard filters) work the same way with PSUBSCRIBE.

A channel that is both subscribed exactly and matched by patterns arrives once per
subscription; the reader keeps one copy, deciding in stream order (confirmations and
messages come over the same connection): the exact copy when the channel is `ACTIVE`,
else the copy of the smallest active pattern whose filter matches.

When the connection drops, the instance counts as down (commands fail at once with
`BrokerUnavailable`), and reconnects with full-jitter exponential backoff, resubscribing
everything wanted. Whatever was published meanwhile never reached this node: each channel
wanted across the drop is reported as a stream gap (`gap`) once Redis confirmed its
subscription on the new connection. Patterns are not reported (MQTT filters, QoS 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, cast

import hiredis

from realtime.core.topics import FilterTrie
from realtime.log import event

log = logging.getLogger("realtime.redis")

WANTED, SENT, ACTIVE = 1, 2, 4
BATCH = 256  # messages handled per loop callback
NAMES_PER_COMMAND = 1000  # channels per SUBSCRIBE / UNSUBSCRIBE
HEALTH_IDLE = 10.0  # seconds without traffic before a PING checks the connection
BACKOFF_BASE = 0.1


def pack_command(*args: bytes | str | int) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            arg = arg.encode()
        elif isinstance(arg, int):
            arg = str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(out)


class Address:
    """Where a Redis instance listens, from a redis://, rediss:// or unix:// URL."""

    def __init__(self, url: str, params: dict[str, Any]) -> None:
        self.url = url
        self.host: str = params.get("host", "localhost")
        self.port: int = int(params.get("port", 6379))
        self.path: str = params.get("path", "")
        self.db = int(params.get("db", 0))
        self.username: str | None = params.get("username")
        self.password: str | None = params.get("password")
        self.tls = url.startswith("rediss://")
        # Its identity on the hash ring and in logs (never the password).
        where = self.path or f"{self.host}:{self.port}"
        self.name = f"{where}/{self.db}"


class _Protocol(asyncio.Protocol):
    def __init__(self, shard: PubSubShard) -> None:
        self.shard = shard
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()
        self.lost: asyncio.Future[None] = shard.loop.create_future()
        self.replies: deque[Any] = deque()  # during the handshake only
        self.handshake: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        self.shard.received(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        if self.handshake is not None and not self.handshake.done():
            self.handshake.set_exception(ConnectionError("connection closed during handshake"))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


class PubSubShard:
    def __init__(
        self,
        address: Address,
        channel_prefix: bytes,
        filters: FilterTrie[str, bytes],
        dispatch: Callable[[str, bytes], None],
        loop: asyncio.AbstractEventLoop,
        *,
        gap: Callable[[list[str]], None] | None = None,
        queue_size: int,
        unsubscribe_delay: float,
        connect_timeout: float,
        command_timeout: float,
        reconnect_max_delay: float,
    ) -> None:
        self.address = address
        self.loop = loop
        self.prefix = channel_prefix
        self.filters = filters  # the broker's MQTT filters -> their Redis pattern
        self.dispatch = dispatch
        self.gap = gap  # channels (without prefix) whose publications may have been lost
        self.queue_size = queue_size
        self.unsubscribe_delay = unsubscribe_delay
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.channels: dict[bytes, int] = {}  # Redis channel -> flags
        self.patterns: dict[bytes, int] = {}  # Redis pattern -> flags
        self._dirty: set[bytes] = set()  # channels whose WANTED and SENT differ
        self._dirty_patterns: set[bytes] = set()
        self._released: dict[bytes, float] = {}  # unwanted since (loop time)
        self._waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._release_handle: asyncio.TimerHandle | None = None
        self.queue: deque[tuple[bytes, bytes]] = deque()
        self._lost: set[bytes] = set()  # channels of dropped messages, until the next drain
        # Channels wanted across a lost connection, until their subscription is confirmed
        # again; then they are reported as a gap.
        self._gap_pending: set[bytes] = set()
        self._gap_ready: list[bytes] = []  # confirmed again: reported in the next tick
        self._gap_handle: asyncio.Handle | None = None
        self._was_up = False
        self._drain_handle: asyncio.Handle | None = None
        self.protocol: _Protocol | None = None  # the connection, once ready
        self.up = False
        self.closed = False
        self.next_attempt = 0.0  # loop time of the next reconnect attempt while down
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._last_rx = 0.0
        self._ping_sent = 0.0
        # Counters (exported as metrics by the broker).
        self.dropped = 0  # messages dropped because the queue was full
        self.messages = 0
        self.reconnects = 0
        self.handler_errors = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._task = self.loop.create_task(self._run())

    async def wait_up(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self.up

    async def close(self) -> None:
        self.closed = True
        for handle in (
            self._flush_handle,
            self._release_handle,
            self._drain_handle,
            self._gap_handle,
        ):
            if handle is not None:
                handle.cancel()
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._wake_waiters(None)

    async def _run(self) -> None:
        attempt = 0
        failing = False
        while not self.closed:
            try:
                protocol = await self._connect()
            except (OSError, TimeoutError, ConnectionError, hiredis.ProtocolError) as exc:
                if not failing:
                    event(
                        log,
                        "redis_unreachable",
                        logging.WARNING,
                        redis=self.address.name,
                        error=str(exc) or type(exc).__name__,
                    )
                failing = True
            else:
                if failing or self.reconnects:
                    event(
                        log,
                        "redis_reconnected",
                        redis=self.address.name,
                        channels=sum(1 for f in self.channels.values() if f & WANTED),
                        patterns=len(self.patterns),
                    )
                failing = False
                attempt = 0
                await protocol.lost
                self._down()
                if self.closed:
                    return
                self.reconnects += 1
                event(log, "redis_disconnected", logging.WARNING, redis=self.address.name)
            delay = random.uniform(0, min(self.reconnect_max_delay, BACKOFF_BASE * 2**attempt))
            attempt = min(attempt + 1, 30)
            self.next_attempt = self.loop.time() + delay
            await asyncio.sleep(delay)

    async def _connect(self) -> _Protocol:
        address = self.address
        protocol = _Protocol(self)

        async def open_connection() -> None:
            if address.path:
                await self.loop.create_unix_connection(lambda: protocol, address.path)
            else:
                context = ssl.create_default_context() if address.tls else None
                await self.loop.create_connection(
                    lambda: protocol, address.host, address.port, ssl=context
                )
            if address.password is not None:
                auth: tuple[str, ...] = (address.password,)
                if address.username:
                    auth = (address.username, address.password)
                await self._handshake(protocol, pack_command("AUTH", *auth))

        try:
            await asyncio.wait_for(open_connection(), self.connect_timeout)
        except BaseException:
            if protocol.transport is not None:
                protocol.transport.abort()
            raise
        self.protocol = protocol
        self.up = True
        self._last_rx = self.loop.time()
        self._ping_sent = 0.0
        # Everything wanted goes out again on the new connection.
        self._dirty = {name for name, flags in self.channels.items() if flags & WANTED}
        if self._was_up:
            self._gap_pending |= self._dirty
        self._was_up = True
        self._dirty_patterns = {name for name, flags in self.patterns.items() if flags & WANTED}
        self._flush()
        self._connected.set()
        return protocol

    async def _handshake(self, protocol: _Protocol, command: bytes) -> None:
        protocol.handshake = self.loop.create_future()
        protocol.write(command)
        await protocol.handshake
        reply = protocol.replies.popleft()
        protocol.handshake = None
        if isinstance(reply, hiredis.ReplyError):
            raise ConnectionError(f"redis refused the connection: {reply}")

    def _down(self) -> None:
        self.up = False
        self.protocol = None
        self._connected.clear()
        for table in (self.channels, self.patterns):
            for name in list(table):
                flags = table[name] & WANTED
                if flags:
                    table[name] = flags
                else:
                    del table[name]
        self._released.clear()
        # Callers waiting for a confirmation: their subscription stays wanted and is made
        # again on reconnect; what they would read next fails while Redis is down.
        self._wake_waiters(None)

    def _wake_waiters(self, name: bytes | None) -> None:
        if name is None:
            waiting = [f for futures in self._waiters.values() for f in futures]
            self._waiters.clear()
        else:
            waiting = self._waiters.pop(name, [])
        for future in waiting:
            if not future.done():
                future.set_result(None)

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, name: bytes, pattern: bool = False) -> None:
        """Want `name`; returns once Redis confirmed it (or at once while Redis is down:
        it is subscribed on reconnect)."""
        table = self.patterns if pattern else self.channels
        flags = table.get(name, 0)
        table[name] = flags | WANTED
        self._released.pop(name, None)
        if flags & (SENT | ACTIVE) == SENT | ACTIVE or not self.up:
            return
        if not flags & SENT:  # never sent, or an unsubscribe is on its way: (re)subscribe
            (self._dirty_patterns if pattern else self._dirty).add(name)
            self._schedule_flush()
        future: asyncio.Future[None] = self.loop.create_future()
        self._waiters.setdefault(name, []).append(future)
        try:
            await asyncio.wait_for(future, self.command_timeout)
        except TimeoutError:
            # Still wanted: it becomes active when Redis answers, or on reconnect.
            event(log, "redis_subscribe_slow", logging.WARNING, redis=self.address.name)

    def unsubscribe(self, name: bytes, pattern: bool = False) -> None:
        """No longer wanted: unsubscribed after `unsubscribe_delay` unless wanted again."""
        table = self.patterns if pattern else self.channels
        flags = table.get(name)
        if flags is None or not flags & WANTED:
            return
        flags &= ~WANTED
        if not pattern:
            self._gap_pending.discard(name)
        if not flags:
            del table[name]
            (self._dirty_patterns if pattern else self._dirty).discard(name)
            return
        table[name] = flags
        self._released[name] = self.loop.time()
        if self._release_handle is None:
            self._release_handle = self.loop.call_later(self.unsubscribe_delay, self._release)

    def wanted(self, pattern: bool = False) -> list[bytes]:
        table = self.patterns if pattern else self.channels
        return [name for name, flags in table.items() if flags & WANTED]

    def is_active(self, name: bytes, pattern: bool = False) -> bool:
        table = self.patterns if pattern else self.channels
        return bool(table.get(name, 0) & ACTIVE)

    def _release(self) -> None:
        self._release_handle = None
        now = self.loop.time()
        due = now - self.unsubscribe_delay
        later: float | None = None
        for name, since in list(self._released.items()):
            if since > due:
                later = since if later is None else min(later, since)
                continue
            del self._released[name]
            for table, dirty in (
                (self.channels, self._dirty),
                (self.patterns, self._dirty_patterns),
            ):
                if name in table and not table[name] & WANTED:
                    dirty.add(name)
        if later is not None:
            delay = max(later + self.unsubscribe_delay - now, 0.01)
            self._release_handle = self.loop.call_later(delay, self._release)
        self._flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send what the wanted sets need: one (P)SUBSCRIBE and one (P)UNSUBSCRIBE each."""
        self._flush_handle = None
        protocol = self.protocol
        if protocol is None:
            return
        for table, dirty, on, off in (
            (self.channels, self._dirty, b"SUBSCRIBE", b"UNSUBSCRIBE"),
            (self.patterns, self._dirty_patterns, b"PSUBSCRIBE", b"PUNSUBSCRIBE"),
        ):
            if not dirty:
                continue
            add: list[bytes] = []
            drop: list[bytes] = []
            for name in dirty:
                flags = table.get(name, 0)
                if flags & WANTED and not flags & SENT:
                    table[name] = flags | SENT
                    add.append(name)
                elif flags & SENT and not flags & WANTED:
                    table[name] = flags & ~SENT
                    drop.append(name)
            dirty.clear()
            for command, names in ((on, add), (off, drop)):
                for i in range(0, len(names), NAMES_PER_COMMAND):
                    protocol.write(pack_command(command, *names[i : i + NAMES_PER_COMMAND]))

    def _confirmed(self, table: dict[bytes, int], name: bytes, active: bool) -> None:
        flags = table.get(name)
        if flags is None:
            return
        if active:
            table[name] = flags | ACTIVE
            self._wake_waiters(name)
            if table is self.channels and name in self._gap_pending:
                self._gap_pending.discard(name)
                self._gap_ready.append(name)
                if self._gap_handle is None:
                    self._gap_handle = self.loop.call_soon(self._report_ready)
        else:
            flags &= ~ACTIVE
            if flags & WANTED and not flags & SENT:
                # Wanted again while the unsubscribe was on its way: subscribe again.
                (self._dirty_patterns if table is self.patterns else self._dirty).add(name)
                self._schedule_flush()
            if flags:
                table[name] = flags
            else:
                del table[name]

    # ------------------------------------------------------------------ reading

    def received(self, protocol: _Protocol) -> None:
        """Parse what arrived; runs in the protocol's data_received, never waits."""
        self._last_rx = self.loop.time()
        self._ping_sent = 0.0
        reader = protocol.reader
        prefix_len = len(self.prefix)
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError:
                log.exception("redis_protocol_error")
                if protocol.transport is not None:
                    protocol.transport.abort()
                return
            if reply is False:
                return
            if protocol.handshake is not None:
                protocol.replies.append(reply)
                if not protocol.handshake.done():
                    protocol.handshake.set_result(None)
                continue
            if not isinstance(reply, list):
                if isinstance(reply, hiredis.ReplyError):
                    event(log, "redis_error_reply", logging.WARNING, error=str(reply))
                continue
            kind = reply[0]
            if kind == b"message":
                self._enqueue(reply[1], reply[2])
            elif kind == b"pmessage":
                name = reply[2]
                if self.channels.get(name, 0) & ACTIVE:
                    continue  # the exact subscription's copy came as a "message"
                if self._owner(name[prefix_len:].decode()) == reply[1]:
                    self._enqueue(name, reply[3])
            elif kind == b"subscribe":
                self._confirmed(self.channels, reply[1], True)
            elif kind == b"unsubscribe":
                self._confirmed(self.channels, reply[1], False)
            elif kind == b"psubscribe":
                self._confirmed(self.patterns, reply[1], True)
            elif kind == b"punsubscribe":
                self._confirmed(self.patterns, reply[1], False)
            # b"pong": liveness only

    def _owner(self, channel: str) -> bytes | None:
        """The active pattern whose copy of a message on `channel` is kept."""
        best: bytes | None = None
        patterns = self.patterns
        for members in self.filters.match(channel):
            for pattern in members.values():
                if patterns.get(pattern, 0) & ACTIVE and (best is None or pattern < best):
                    best = pattern
        return best

    def _enqueue(self, name: bytes, data: bytes) -> None:
        self.messages += 1
        if len(self.queue) >= self.queue_size:
            self.dropped += 1
            self._lost.add(name)
            return
        self.queue.append((name, data))
        if self._drain_handle is None:
            self._drain_handle = self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_handle = None
        queue, dispatch = self.queue, self.dispatch
        prefix_len = len(self.prefix)
        for _ in range(min(BATCH, len(queue))):
            name, data = queue.popleft()
            try:
                dispatch(name[prefix_len:].decode(), data)
            except Exception:
                self.handler_errors += 1
                if self.handler_errors <= 10 or self.handler_errors % 1000 == 0:
                    log.exception("redis_message_failed", extra={"fields": {"count": 1}})
        if self._lost:
            lost, self._lost = self._lost, set()
            self._report_gap(lost)
        if queue and not self.closed:
            self._drain_handle = self.loop.call_soon(self._drain)

    def _report_ready(self) -> None:
        self._gap_handle = None
        ready, self._gap_ready = self._gap_ready, []
        self._report_gap(ready)

    def _report_gap(self, names: Iterable[bytes]) -> None:
        if self.gap is None or self.closed:
            return
        prefix_len = len(self.prefix)
        try:
            self.gap([name[prefix_len:].decode() for name in names])
        except Exception:
            self.handler_errors += 1
            log.exception("redis_stream_gap_failed")

    # ------------------------------------------------------------------ health

    def check(self, now: float) -> None:
        """Once a second: PING an idle connection, drop one that does not answer."""
        protocol = self.protocol
        if protocol is None:
            return
        if self._ping_sent:
            if now - self._ping_sent > self.command_timeout + 1.0 and protocol.transport:
                event(log, "redis_not_answering", logging.WARNING, redis=self.address.name)
                protocol.transport.abort()
        elif now - self._last_rx > HEALTH_IDLE:
            self._ping_sent = now
            protocol.write(pack_command("PING"))

    def retry_after(self) -> float:
        return max(0.1, self.next_attempt - self.loop.time())


def escape_glob(text: str) -> str:
    """`text` literally in a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def filter_pattern(prefix: str, topic_filter: str) -> str:
    """A Redis glob pattern matching at least the channels an MQTT filter matches (`+` and
    `#` become `*`, which also crosses levels: the reader checks the filter itself)."""
    levels = topic_filter.split("/")
    # "a/#" -> "a*": "a" itself matches too.
    body = _levels_glob(levels[:-1]) + "*" if levels[-1] == "#" else _levels_glob(levels)
    return escape_glob(prefix) + body


def _levels_glob(levels: Iterable[str]) -> str:
    return "/".join("*" if level == "+" else escape_glob(level) for level in levels)
