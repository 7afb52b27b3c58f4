"""A subscription to one channel: a queue of publications fed by the client's reader."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from realtime.client.errors import DisconnectedError, SubscriptionClosedError
from realtime.client.models import Publication, StreamPosition
from realtime.protocol import realtime_pb2 as pb

if TYPE_CHECKING:
    from realtime.client.client import Client

__all__ = ["Subscription"]

logger = logging.getLogger("realtime.client")


class _State(enum.Enum):
    NEW = "new"  # first subscribe in flight
    SUBSCRIBING = "subscribing"  # waiting for (or in) a resubscribe after a reconnect
    ACTIVE = "active"
    CLOSED = "closed"


class Subscription:
    """Publications of one channel, in stream order, without duplicates.

    Iterate with ``async for pub in sub`` or call :meth:`get`. Iteration stops after
    :meth:`unsubscribe` or :meth:`Client.close` (once the queued publications are
    consumed); it raises :class:`SubscriptionClosedError` when the server ended the
    subscription and :class:`DisconnectedError` when the client gave up reconnecting.

    ``position`` is the last stream position seen (``None`` for a channel without
    history), ``recovered`` the outcome of the last (re)subscribe. ``on_recovery_failed``
    is called with the subscription when a resubscribe after a reconnect could not
    recover the missed publications: the application should reload its state.
    ``dropped`` counts publications discarded because the queue was full
    (``max_queue``; the oldest is dropped).
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        *,
        recover: bool,
        since: StreamPosition | None,
        max_queue: int,
    ) -> None:
        self.channel = channel
        self.position: StreamPosition | None = since
        self.recovered = False
        self.recoverable = False
        self.dropped = 0
        self.on_recovery_failed: Callable[[Subscription], None] | None = None
        self._client = client
        self._recover = recover
        self._epoch = since.epoch if since is not None else ""
        self._max_queue = max(1, max_queue)
        self._queue: deque[Publication] = deque()
        self._buffer: list[pb.Publication] = []
        self._event = asyncio.Event()
        self._state = _State.NEW
        self._end: Callable[[], Exception] | None = None
        self._ended_by_user = False
        self._overflowing = False

    def __repr__(self) -> str:
        return (
            f"<Subscription {self.channel!r} {self._state.value} position={self.position} "
            f"queued={len(self._queue)}>"
        )

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    # ------------------------------------------------------------------ consumer side

    async def get(self, timeout: float | None = None) -> Publication:
        """The next publication; waits up to ``timeout`` seconds (TimeoutError)."""
        async with asyncio.timeout(timeout):
            while not self._queue:
                if self._end is not None:
                    raise self._end()
                self._event.clear()
                await self._event.wait()
        return self._queue.popleft()

    def get_nowait(self) -> Publication | None:
        """The next queued publication, or None when none is queued."""
        return self._queue.popleft() if self._queue else None

    def qsize(self) -> int:
        return len(self._queue)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Publication:
        try:
            return await self.get()
        except (SubscriptionClosedError, DisconnectedError):
            if self._ended_by_user:
                raise StopAsyncIteration from None
            raise

    async def unsubscribe(self) -> None:
        """Stop receiving publications; iteration ends once the queue is consumed."""
        await self._client._unsubscribe(self)

    # ------------------------------------------------------------------ client side
    # Everything below runs synchronously in the client's reader, so the order of
    # replies and pushes in the stream is the order of delivery.

    def _wants_recovery(self) -> bool:
        return self._recover and self.position is not None

    def _subscribe_request(self, recover: bool) -> pb.SubscribeRequest:
        request = pb.SubscribeRequest(channel=self.channel, recover=recover)
        if recover and self.position is not None:
            request.since.CopyFrom(self.position.to_pb())
        return request

    def _on_publication(self, publication: pb.Publication) -> None:
        if self._state is _State.ACTIVE:
            self._deliver(publication)
        elif self._state is not _State.CLOSED:
            # The subscribe reply has not been applied yet: keep the live publications
            # until the recovered ones are delivered.
            if len(self._buffer) >= self._max_queue:
                del self._buffer[0]
                self._count_drop()
            self._buffer.append(publication)

    def _apply_result(self, result: pb.SubscribeResult, requested_recover: bool) -> None:
        self.recoverable = result.recoverable
        self.recovered = requested_recover and result.recovered
        top = result.position if result.HasField("position") else None
        if top is not None and (top.offset or top.epoch):
            if top.epoch != self._epoch:
                # Another generation of the stream: offsets start over.
                self.position = None
                self._epoch = top.epoch
        else:
            top = None
        for publication in result.publications:
            self._deliver(publication)
        if top is not None and (self.position is None or top.offset > self.position.offset):
            self.position = StreamPosition(top.offset, self._epoch)
        buffered, self._buffer = self._buffer, []
        for publication in buffered:
            self._deliver(publication)
        self._state = _State.ACTIVE

    def _deliver(self, publication: pb.Publication) -> None:
        offset = publication.offset
        if offset:
            if self.position is not None and offset <= self.position.offset:
                return  # already delivered (recovered and live copies overlap)
            self.position = StreamPosition(offset, self._epoch)
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._count_drop()
        else:
            self._overflowing = False
        self._queue.append(Publication.from_pb(self.channel, publication))
        self._event.set()

    def _count_drop(self) -> None:
        self.dropped += 1
        if not self._overflowing:
            self._overflowing = True
            logger.warning(
                "subscription %r: queue full (%d), dropping the oldest publications",
                self.channel,
                self._max_queue,
            )

    def _await_resubscribe(self) -> None:
        # NEW subscriptions belong to a subscribe() call that sends (or fails) by itself.
        if self._state in (_State.ACTIVE, _State.SUBSCRIBING):
            self._state = _State.SUBSCRIBING

    def _finish(self, end: Callable[[], Exception], *, by_user: bool) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._end = end
        self._ended_by_user = by_user
        self._buffer = []
        self._event.set()
