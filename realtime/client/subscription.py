"""A subscription to one channel: a queue of publications fed by the client's reader.

Deltas: a subscription made with ``delta=True`` asks the server for Fossil deltas
(``SubscribeRequest.delta = "fossil"``). It keeps the data of the last publication it
took in as the base, applies each delta to it (``apply_delta`` checks Fossil's checksum,
so a wrong base is detected) and queues the full data, so the application sees ordinary
publications. A delta that does not apply (no base, a wrong base, or an offset that is
not the last one + 1) is never delivered: it is counted in ``delta_failures``, logged
once, and the subscription resubscribes (unsubscribe, then subscribe) with recovery from
its last good position, even when made with ``recover=False``; the server sends the first
missed publication in full. If that recovery fails, ``on_recovery_failed`` is called as
after a reconnect. In namespaces with ``join_leave`` the others see a leave and a join.

Channel events: ``on_join``/``on_leave`` (a :class:`ClientInfo`, in namespaces with
``join_leave``) and ``on_typing`` (a :class:`Typing`, namespaces with ``typing``) are
called synchronously by the client's reader, in stream order with the publications'
arrival; they must not block. Events may arrive before ``subscribe()`` returns, so pass
the callbacks to ``subscribe`` rather than setting the attributes afterwards.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from realtime.client.errors import DisconnectedError, SubscriptionClosedError
from realtime.client.models import ClientInfo, Publication, StreamPosition, Typing
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.delta import FOSSIL, DeltaError, apply_delta

if TYPE_CHECKING:
    from realtime.client.client import Client

__all__ = ["Subscription"]

logger = logging.getLogger("realtime.client")

_E = TypeVar("_E")


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
    history), ``processed`` the last one the application took out of the queue,
    ``recovered`` the outcome of the last (re)subscribe. ``on_recovery_failed``
    is called with the subscription when a resubscribe after a reconnect could not
    recover the missed publications: the application should reload its state. The same
    goes when the server ends the subscription asking for a resubscribe (an
    ``unsubscribe`` push with a code in 2500-2999, e.g. a stream gap after Redis
    restarted): the subscription stays open and resubscribes with recovery by itself.
    ``dropped`` counts publications discarded because the queue was full
    (``max_queue``; the oldest is dropped).

    With ``delta`` (see the module docstring) ``deltas_applied`` counts publications that
    came as a delta and ``delta_failures`` the deltas that did not apply (each one leads
    to a resubscribe). ``on_join``, ``on_leave`` and ``on_typing`` receive the channel's
    presence and typing events; exceptions they raise are logged.
    """

    def __init__(
        self,
        client: Client,
        channel: str,
        *,
        recover: bool,
        since: StreamPosition | None,
        max_queue: int,
        delta: bool = False,
        on_join: Callable[[ClientInfo], None] | None = None,
        on_leave: Callable[[ClientInfo], None] | None = None,
        on_typing: Callable[[Typing], None] | None = None,
    ) -> None:
        self.channel = channel
        self.delta = delta
        self.position: StreamPosition | None = since
        self.recovered = False
        self.recoverable = False
        self.dropped = 0
        self.deltas_applied = 0
        self.delta_failures = 0
        self.on_recovery_failed: Callable[[Subscription], None] | None = None
        self.on_join = on_join
        self.on_leave = on_leave
        self.on_typing = on_typing
        self._client = client
        self._recover = recover
        self._epoch = since.epoch if since is not None else ""
        self._max_queue = max(1, max_queue)
        # Queued publications with the epoch of the stream they belong to.
        self._queue: deque[tuple[Publication, str]] = deque()
        self._buffer: list[pb.Publication] = []
        self._event = asyncio.Event()
        self._state = _State.NEW
        self._end: Callable[[], Exception] | None = None
        self._ended_by_user = False
        self._overflowing = False
        # Delta base: the full data of the publication at offset _base_offset.
        self._base: bytes | None = None
        self._base_offset = 0
        # A resubscribe after a delta failure is pending: recover even without `recover`
        # and report a failed recovery.
        self._resyncing = False
        # Until the unsubscribe of a resync is answered, pushes belong to the old server
        # subscription (deltas against the lost base): drop them.
        self._discarding = False
        # Delta failures since the last delta that applied (backs off repeated resyncs).
        self._resync_streak = 0

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
        return self._queue.popleft()[0]

    def get_nowait(self) -> Publication | None:
        """The next queued publication, or None when none is queued."""
        return self._queue.popleft()[0] if self._queue else None

    def qsize(self) -> int:
        return len(self._queue)

    @property
    def processed(self) -> StreamPosition | None:
        """The position up to which the application has taken publications out (with
        :meth:`get`, :meth:`get_nowait` or iteration): ``position`` when nothing is
        queued, else the one just before the first queued publication. None for a
        channel without history. :meth:`Client.background` reports it by default, so
        that what is still queued when the app closes the client comes back in a poll.
        """
        if self._queue:
            first, epoch = self._queue[0]
            if first.offset:
                return StreamPosition(first.offset - 1, epoch)
        return self.position

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
        return (self._recover or self._resyncing) and self.position is not None

    def _reports_recovery(self) -> bool:
        """Whether a failed recovery of the next resubscribe goes to on_recovery_failed."""
        return self._recover or self._resyncing

    def _subscribe_request(self, recover: bool) -> pb.SubscribeRequest:
        request = pb.SubscribeRequest(channel=self.channel, recover=recover)
        if recover and self.position is not None:
            request.since.CopyFrom(self.position.to_pb())
        if self.delta:
            request.delta = FOSSIL
        return request

    def _on_publication(self, publication: pb.Publication) -> None:
        if self._discarding:
            return
        if self._state is _State.ACTIVE:
            self._deliver(publication)
        elif self._state is not _State.CLOSED:
            # The subscribe reply has not been applied yet: keep the live publications
            # until the recovered ones are delivered.
            if len(self._buffer) >= self._max_queue:
                del self._buffer[0]
                self._count_drop()
            self._buffer.append(publication)

    def _on_event(self, push: pb.Push, kind: str | None) -> None:
        """A join, leave or typing push for this channel."""
        if self._state is _State.CLOSED:
            return
        if kind == "typing":
            if self.on_typing is not None:
                self._call(self.on_typing, Typing.from_pb(self.channel, push.typing))
        elif kind == "join":
            if self.on_join is not None:
                self._call(self.on_join, ClientInfo.from_pb(push.join))
        elif kind == "leave" and self.on_leave is not None:
            self._call(self.on_leave, ClientInfo.from_pb(push.leave))

    def _call(self, callback: Callable[[_E], None], event: _E) -> None:
        try:
            callback(event)
        except Exception:
            logger.exception("subscription %r: error in event callback %r", self.channel, callback)

    def _apply_result(self, result: pb.SubscribeResult, requested_recover: bool) -> None:
        # The server starts every (re)subscription with a full publication.
        self._base = None
        self._resyncing = False
        self._discarding = False
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
            if not self._deliver(publication):
                return  # resubscribing: what follows is built on the failed delta
        if top is not None and (self.position is None or top.offset > self.position.offset):
            self.position = StreamPosition(top.offset, self._epoch)
        buffered, self._buffer = self._buffer, []
        for publication in buffered:
            if not self._deliver(publication):
                return
        self._state = _State.ACTIVE

    def _deliver(self, publication: pb.Publication) -> bool:
        """Queue one publication; False when it was a delta that did not apply (the
        subscription is resubscribing from then on)."""
        offset = publication.offset
        if offset and self.position is not None and offset <= self.position.offset:
            return True  # already delivered (recovered and live copies overlap)
        data = publication.data
        if publication.delta:
            problem = self._delta_problem(offset)
            if problem is None:
                assert self._base is not None
                try:
                    data = apply_delta(self._base, publication.data)
                except DeltaError as exc:
                    problem = str(exc)
            if problem is not None:
                self._delta_failed(offset, problem)
                return False
            self.deltas_applied += 1
            self._resync_streak = 0
        if self.delta:
            self._base, self._base_offset = data, offset
        if offset:
            self.position = StreamPosition(offset, self._epoch)
        if len(self._queue) >= self._max_queue:
            self._queue.popleft()
            self._count_drop()
        else:
            self._overflowing = False
        self._queue.append((Publication.from_pb(self.channel, publication, data), self._epoch))
        self._event.set()
        return True

    def _delta_problem(self, offset: int) -> str | None:
        if not self.delta:
            return "a delta on a subscription that did not ask for deltas"
        if self._base is None:
            return "no base publication to apply it to"
        last = self.position.offset if self.position is not None else 0
        if not offset or offset != self._base_offset + 1 or offset != last + 1:
            return f"offset {offset} does not follow the base's ({self._base_offset})"
        return None

    def _delta_failed(self, offset: int, problem: str) -> None:
        self.delta_failures += 1
        self._resync_streak += 1
        position = self.position.offset if self.position is not None else None
        logger.warning(
            "subscription %r: delta publication %d not applied (%s); resubscribing from %s",
            self.channel,
            offset,
            problem,
            position,
        )
        self._base = None
        self._buffer = []
        self._state = _State.SUBSCRIBING
        self._resyncing = True
        self._discarding = True
        self._client._resync(self)

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
        # The connection is gone, and with it the server's subscription.
        self._discarding = False
        # NEW subscriptions belong to a subscribe() call that sends (or fails) by itself.
        if self._state in (_State.ACTIVE, _State.SUBSCRIBING):
            self._state = _State.SUBSCRIBING

    def _ended_for_resubscribe(self) -> bool:
        """The server ended the subscription with a resubscribe code (publications may
        have been lost on the way): recover from the last position, even without
        ``recover``, and report a failed recovery. True when a resubscribe must be sent;
        False when one is on its way already (or the subscription is not active)."""
        if self._state is not _State.ACTIVE:
            if self._state is _State.SUBSCRIBING:
                self._resyncing = True
            return False
        self._base = None
        self._buffer = []
        self._discarding = False
        self._resyncing = True
        self._state = _State.SUBSCRIBING
        return True

    def _unsubscribed_for_resync(self, reply: pb.Reply) -> None:
        """The unsubscribe of a resync was answered: later pushes are the new
        subscription's (kept until its reply is applied)."""
        self._discarding = False
        self._buffer = []

    def _finish(self, end: Callable[[], Exception], *, by_user: bool) -> None:
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._end = end
        self._ended_by_user = by_user
        self._buffer = []
        self._event.set()
