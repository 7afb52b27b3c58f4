"""Asyncio client of the realtime gateway (subprotocol ``realtime.v1.proto``).

One task per client (the *supervisor*) owns the WebSocket: it reads every frame,
dispatches replies to the futures of pending commands and pushes to subscriptions, and
reconnects when the connection is lost. Small helper tasks run only while connected
(token refresh, resubscribe after a reconnect or after a delta that did not apply) and
are cancelled with the connection.

Beyond publish/subscribe the client speaks the presence and typing commands:
:meth:`Client.presence`, :meth:`Client.presence_stats`, :meth:`Client.typing` and
:meth:`Client.user_status` return the dataclasses of :mod:`realtime.client.models` and
raise :class:`RealtimeError` when the server refuses (e.g. ``NOT_AVAILABLE`` where the
namespace has no presence or typing). Join, leave and typing pushes reach the callbacks
given to :meth:`Client.subscribe` (``on_join``, ``on_leave``, ``on_typing``; also settable
as attributes of the :class:`Subscription`). ``subscribe(..., delta=True)`` receives
Fossil deltas and hands out full data (see :mod:`realtime.client.subscription`).

Mobile apps in the background (the README's lifecycle): :meth:`Client.register_device`
and :meth:`Client.unregister_device` manage the device's push token,
:meth:`Client.background` and :meth:`Client.foreground` send ``app_state``, and
:meth:`Client.poll` / :meth:`Client.poll_pages` fetch what the app missed with
``GET /v1/poll`` on the WebSocket URL's host and port (an HTTP/1.1 request of
:mod:`realtime.client.poll`; they work on a client that is closed or never connected).
The positions a poll reaches are ``since`` for :meth:`Client.subscribe` in the foreground.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from google.protobuf.message import DecodeError
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.protocol import State as WsState
from websockets.typing import Subprotocol

from realtime import __version__
from realtime.client.errors import DisconnectedError, RealtimeError, SubscriptionClosedError
from realtime.client.models import (
    Backgrounded,
    ClientInfo,
    PollResult,
    PresenceStats,
    Publication,
    StreamPosition,
    Typing,
    UserStatus,
)
from realtime.client.policy import (
    DisconnectInfo,
    ReconnectDecision,
    backoff_delay,
    decide_after_close,
    decide_after_error,
    decide_after_http_status,
    reconnect_delay,
    refresh_delay,
)
from realtime.client.poll import (
    POLL_PATH,
    MalformedAnswer,
    PollTarget,
    http_get,
    parse_poll_answer,
    poll_error,
    poll_query,
)
from realtime.client.subscription import Subscription, _State
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import Action, ErrorCode, is_resubscribe_code
from realtime.protocol.framing import FrameError, encode_delimited, split_delimited

__all__ = ["SUBPROTOCOL", "Client"]

logger = logging.getLogger("realtime.client")

SUBPROTOCOL: Final = Subprotocol("realtime.v1.proto")

# How long to wait for the server's close frame when closing.
_CLOSE_TIMEOUT = 2.0
# Largest incoming WebSocket message (a frame may batch many replies, history may be big).
_MAX_FRAME = 64 * 1024 * 1024
_MAX_ID = 0xFFFFFFFF

_Handler = Callable[[pb.Reply], None]


class _ConnState(enum.Enum):
    IDLE = "idle"  # never connected, or gave up reconnecting
    CONNECTING = "connecting"  # connect() in progress
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"  # close() was called: final


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[pb.Reply] | None
    # Applied synchronously by the reader, before any later reply or push is handled.
    handler: _Handler | None


@dataclass(slots=True)
class _Established:
    ws: ClientConnection
    result: pb.ConnectResult
    # Replies that came in the same frame after the connect reply.
    leftovers: list[pb.Reply]


@dataclass(slots=True)
class _Lost:
    code: int | None
    reason: str
    disconnect: DisconnectInfo | None


class _HandshakeClosed(Exception):
    """The connection closed before the connect reply."""

    def __init__(self, code: int | None, reason: str, disconnect: DisconnectInfo | None) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.disconnect = disconnect


class _ConnectRefused(Exception):
    """The server answered connect with an error (and then maybe closed with a code)."""

    def __init__(self, error: RealtimeError, close_code: int | None) -> None:
        super().__init__(error, close_code)
        self.error = error
        self.close_code = close_code


class _ProtocolViolation(Exception):
    """The server sent something that is not a valid frame of this subprotocol."""


def _disconnect_info(push: pb.Disconnect) -> DisconnectInfo:
    return DisconnectInfo(push.code, push.reason, push.reconnect, push.reconnect_after_ms)


def _retrieve(task: asyncio.Task[Any]) -> None:
    # Done callback: mark a helper task's exception as retrieved (helpers log their own).
    if not task.cancelled():
        task.exception()


class Client:
    """A connection to the gateway that survives reconnects.

    Use as ``async with Client(url, token=...) as client:`` or call :meth:`connect` and
    :meth:`close`. Commands issued while reconnecting wait for the connection (up to
    ``command_timeout``); after :meth:`close` they raise :class:`DisconnectedError`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: Callable[[], Awaitable[str]] | None = None,
        name: str = "realtime-python",
        version: str = __version__,
        platform: str = "python",
        reconnect: bool = True,
        backoff_min: float = 0.2,
        backoff_max: float = 20.0,
        command_timeout: float = 10.0,
        max_queue: int = 10000,
    ) -> None:
        self.url = url
        self.name = name
        self.version = version
        self.platform = platform
        self.reconnect = reconnect
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.command_timeout = command_timeout
        self.max_queue = max_queue
        self.client_id: str | None = None
        self.on_connect: Callable[[], None] | None = None
        self.on_disconnect: Callable[[int | None, str, bool], None] | None = None

        self._token = token
        self._get_token = get_token
        self._force_new_token = False
        self._expires_at: float | None = None  # loop time the token expires
        self._refresh_at: float | None = None  # loop time of the next scheduled refresh
        self._refresh_wakeup = asyncio.Event()
        self._refresh_task: asyncio.Task[None] | None = None

        self._state = _ConnState.IDLE
        self._state_changed = asyncio.Event()
        self._last_code: int | None = None
        self._last_reason = "not connected"
        self._ws: ClientConnection | None = None
        self._silence_timeout: float | None = None
        self._disconnect_push: DisconnectInfo | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._helpers: set[asyncio.Task[None]] = set()
        self._pending: dict[int, _Pending] = {}
        self._last_id = 0
        self._subs: dict[str, Subscription] = {}
        # background() was answered on this connection (foreground() not yet): a lost
        # connection is not re-established.
        self._backgrounded = False

    # ------------------------------------------------------------------ public API

    @property
    def connected(self) -> bool:
        return self._state is _ConnState.CONNECTED

    @property
    def backgrounded(self) -> bool:
        """:meth:`background` was answered and :meth:`foreground` not yet: the client
        does not reconnect by itself."""
        return self._backgrounded

    @property
    def subscriptions(self) -> dict[str, Subscription]:
        """The live subscriptions by channel (a copy)."""
        return dict(self._subs)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the connection and send ``connect``.

        Makes one attempt (plus one with a fresh token from ``get_token`` when the token
        was refused). Raises :class:`RealtimeError` when the server answers ``connect``
        with an error, :class:`DisconnectedError` when the connection could not be
        opened or was closed during the handshake. Once connected, the client
        reconnects by itself.
        """
        state = self._state
        if state is _ConnState.CLOSED:
            raise DisconnectedError(None, "client closed", False)
        if state is _ConnState.CONNECTED:
            return
        if state in (_ConnState.CONNECTING, _ConnState.RECONNECTING):
            loop = asyncio.get_running_loop()
            await self._wait_connected(loop.time() + self.command_timeout)
            return
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            # It gave up and is finishing (e.g. connect() scheduled from on_disconnect).
            if supervisor is asyncio.current_task():
                raise RuntimeError("connect() cannot run in the client's own task")
            await asyncio.gather(supervisor, return_exceptions=True)
            if self._state is not _ConnState.IDLE:
                return await self.connect()
        self._set_state(_ConnState.CONNECTING)
        try:
            established = await self._connect_first()
        except BaseException:
            if self._state is _ConnState.CONNECTING:
                self._set_state(_ConnState.IDLE)
            raise
        if self._state is not _ConnState.CONNECTING:  # close() ran meanwhile
            await self._close_ws(established.ws)
            raise DisconnectedError(None, "client closed", False)
        self._activate(established)
        self._supervisor = asyncio.create_task(
            self._supervise(established), name=f"realtime-client {self.url}"
        )

    async def close(self) -> None:
        """Close the connection, end every subscription and stop all background tasks."""
        if self._state is _ConnState.CLOSED:
            return
        was_up = self._state in (_ConnState.CONNECTED, _ConnState.RECONNECTING)
        self._set_state(_ConnState.CLOSED)
        self._last_code, self._last_reason = None, "client closed"
        current = asyncio.current_task()
        tasks = [t for t in (self._supervisor, *self._helpers) if t is not None]
        tasks = [t for t in tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        ws, self._ws = self._ws, None
        self._fail_pending(functools.partial(DisconnectedError, None, "client closed", False))
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:
            sub._finish(
                functools.partial(DisconnectedError, None, "client closed", False), by_user=True
            )
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if ws is not None:
            await self._close_ws(ws)
        if was_up:
            self._emit_disconnect(None, "client closed", False)

    async def subscribe(
        self,
        channel: str,
        *,
        recover: bool = True,
        since: StreamPosition | None = None,
        delta: bool = False,
        on_join: Callable[[ClientInfo], None] | None = None,
        on_leave: Callable[[ClientInfo], None] | None = None,
        on_typing: Callable[[Typing], None] | None = None,
    ) -> Subscription:
        """Subscribe to ``channel``.

        With ``since``, ask for the publications after that position (they are queued
        first; check ``sub.recovered``). ``recover`` also controls whether the
        subscription recovers the missed publications after a reconnect.

        ``delta``: receive publications as Fossil deltas where the server makes them
        smaller; the subscription applies them, so ``Publication.data`` is always the
        full payload. The namespace must allow deltas (else :class:`RealtimeError`
        ``NOT_AVAILABLE``).

        ``on_join``/``on_leave`` get a :class:`ClientInfo` when a connection joins or
        leaves the channel (namespaces with ``join_leave``), ``on_typing`` a
        :class:`Typing` when someone else starts or stops typing (namespaces with
        ``typing``). They are called by the client's reader and must not block; events
        may come before this method returns.
        """
        existing = self._subs.get(channel)
        if existing is not None and not existing.closed:
            raise RealtimeError(ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}")
        self._check_usable()
        sub = Subscription(
            self,
            channel,
            recover=recover,
            since=since,
            max_queue=self.max_queue,
            delta=delta,
            on_join=on_join,
            on_leave=on_leave,
            on_typing=on_typing,
        )
        self._subs[channel] = sub
        wire_recover = recover and since is not None
        command = pb.Command(subscribe=sub._subscribe_request(wire_recover))
        handler = functools.partial(self._apply_subscribe, sub, wire_recover, False)
        try:
            await self._request(command, handler)
        except BaseException as exc:
            if self._subs.get(channel) is sub:
                del self._subs[channel]
            reason = str(exc) or type(exc).__name__
            sub._finish(
                functools.partial(SubscriptionClosedError, channel, None, reason), by_user=True
            )
            raise
        return sub

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        idempotency_key: str = "",
        tags: dict[str, str] | None = None,
    ) -> StreamPosition:
        """Publish ``data`` on ``channel``; returns its stream position (offset 0 when
        the channel keeps no history)."""
        request = pb.PublishRequest(
            channel=channel, data=data, idempotency_key=idempotency_key, tags=tags or {}
        )
        reply = await self._request(pb.Command(publish=request))
        return StreamPosition.from_pb(reply.publish.position)

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None = None,
        limit: int = 0,
        reverse: bool = False,
    ) -> tuple[list[Publication], StreamPosition]:
        """Publications after ``since`` (or the latest ones) and the stream position."""
        request = pb.HistoryRequest(channel=channel, limit=limit, reverse=reverse)
        if since is not None:
            request.since.CopyFrom(since.to_pb())
        reply = await self._request(pb.Command(history=request))
        result = reply.history
        publications = [Publication.from_pb(channel, p) for p in result.publications]
        return publications, StreamPosition.from_pb(result.position)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        """Who is in ``channel`` (namespace with presence; needs subscribe permission),
        by client id."""
        reply = await self._request(pb.Command(presence=pb.PresenceRequest(channel=channel)))
        return {client: ClientInfo.from_pb(info) for client, info in reply.presence.clients.items()}

    async def presence_stats(self, channel: str) -> PresenceStats:
        """How many connections and distinct users are in ``channel``."""
        request = pb.PresenceStatsRequest(channel=channel)
        reply = await self._request(pb.Command(presence_stats=request))
        stats = reply.presence_stats
        return PresenceStats(clients=stats.clients, users=stats.users)

    async def typing(self, channel: str, active: bool = True) -> bool:
        """Tell the channel this user is typing (``active``) or stopped.

        Returns False when the server throttled the event (the same user typed there
        less than the namespace's ``typing_throttle`` ago: the earlier event still
        holds), True otherwise (forwarded; a stop while not typing is a no-op that also
        answers True). Call it again every few seconds while the user types:
        receivers expire an indicator that is not renewed. Needs a subscription to the
        channel (else :class:`RealtimeError` ``NOT_SUBSCRIBED``).
        """
        request = pb.TypingRequest(channel=channel, active=active)
        reply = await self._request(pb.Command(typing=request))
        return not reply.typing.throttled

    async def user_status(self, users: Iterable[str]) -> list[UserStatus]:
        """Online status and last-seen time of ``users``, in the order asked."""
        if isinstance(users, str | bytes):
            raise TypeError("users must be an iterable of user ids, not a single string")
        request = pb.UserStatusRequest(users=list(users))
        reply = await self._request(pb.Command(user_status=request))
        return [UserStatus.from_pb(status) for status in reply.user_status.statuses]

    # ------------------------------------------------------------------ mobile apps

    async def register_device(
        self,
        provider: str,
        token: str,
        *,
        environment: str = "production",
        app_id: str = "",
        platform: str = "",
    ) -> None:
        """Register this device's push token so that the gateway can wake the app while
        it is in the background (once per install or token change).

        ``provider`` is ``"apns"`` (``token`` the device token in hex, ``environment``
        ``"production"`` or ``"sandbox"``, ``app_id`` the bundle id) or ``"fcm"`` (the
        registration token). The connection's token needs a ``device`` claim (else
        :class:`RealtimeError` ``DEVICE_REQUIRED``); a bad provider, token or environment
        is ``BAD_REQUEST``.
        """
        request = pb.RegisterDeviceRequest(
            provider=provider,
            token=token,
            environment=environment,
            app_id=app_id,
            platform=platform,
        )
        await self._request(pb.Command(register_device=request))

    async def unregister_device(self) -> None:
        """Forget this device's push token (logout): the app is no longer woken."""
        await self._request(pb.Command(unregister_device=pb.UnregisterDeviceRequest()))

    async def background(
        self, positions: Mapping[str, StreamPosition] | None = None
    ) -> Backgrounded:
        """Tell the gateway the app goes to the background (iOS
        ``sceneDidEnterBackground``, Android ``onStop``).

        ``positions``: what the app has processed of each channel; by default each
        subscription's :attr:`Subscription.processed` (what the application took out of
        its queue). Channels left out get the last position the gateway sent. The
        gateway keeps them in a detached session (``detach_ttl`` seconds), wakes the app
        with a silent push when something is published on its channels, and serves
        :meth:`poll` from them. Returns the positions kept and ``detach_ttl``. Needs a
        token with a ``device`` claim (else :class:`RealtimeError` ``DEVICE_REQUIRED``).

        Then close the client (the OS suspends the app and its socket dies anyway). From
        the answer on, the client does not reconnect by itself: a new connection of the
        device would end the detached session and cancel the wake. If the connection is
        lost while backgrounded, the client stops as with ``reconnect=False``
        (subscriptions end with :class:`DisconnectedError`). While the socket lives it
        still delivers publications (a poll returns them again: dedupe by offset). On
        coming back, :meth:`foreground` on a socket that survived; else a new client (or
        :meth:`connect`) and :meth:`subscribe` with ``since=`` the positions polled to.
        """
        if positions is None:
            positions = {
                channel: position
                for channel, sub in self._subs.items()
                if (position := sub.processed) is not None
            }
        request = pb.AppStateRequest(state=pb.AppStateRequest.STATE_BACKGROUND)
        for channel, position in positions.items():
            request.positions[channel].CopyFrom(position.to_pb())
        reply = await self._request(pb.Command(app_state=request), self._went_background)
        return Backgrounded.from_pb(reply.app_state)

    async def foreground(self) -> None:
        """The app is back in the foreground on a socket that survived: the gateway ends
        the detached session and cancels a pending wake; the client reconnects by itself
        again. (A new connection of the device does the same on the gateway's side.)"""
        request = pb.AppStateRequest(state=pb.AppStateRequest.STATE_FOREGROUND)
        await self._request(pb.Command(app_state=request), self._came_foreground)

    def _went_background(self, reply: pb.Reply) -> None:
        # In the reader, before a close that follows the reply is handled.
        self._backgrounded = True

    def _came_foreground(self, reply: pb.Reply) -> None:
        self._backgrounded = False

    async def poll(
        self,
        since: Mapping[str, StreamPosition] | None = None,
        *,
        wait: float = 0.0,
        limit: int = 0,
    ) -> PollResult:
        """``GET /v1/poll``: what a backgrounded app missed on its channels.

        Sent to the WebSocket URL's host and port (TLS for ``wss://``) with the client's
        token (from ``get_token`` when there is none yet, and a fresh one after a 401),
        on a connection of its own: it needs no :meth:`connect`, and works after
        :meth:`close`. The device must be detached (:meth:`background`, or its socket
        dropped).

        ``since``: the app's own positions (they win over those the gateway kept);
        ``wait``: seconds to wait for a publication when there is none (long polling,
        capped by the gateway's ``background.poll_max_wait``); ``limit``: at most that
        many publications (the gateway's ``poll_page_size`` at most). When the answer
        says ``more``, poll again from its positions (:meth:`poll_pages` does).

        Raises :class:`PollError` when the gateway answers an error (``error``:
        ``unauthorized``, ``device_required``, ``bad_request``, ``no_detached_session``,
        ``too_many_requests``, ``busy``, ``unavailable``; ``retry_after_ms``),
        :class:`DisconnectedError` when the gateway cannot be reached or its answer is
        not a poll's, TimeoutError after ``wait + command_timeout`` seconds.
        """
        target = PollTarget.from_ws_url(self.url)
        query = poll_query(since, wait, limit)
        path = POLL_PATH + ("?" + query if query else "")
        timeout = self.command_timeout + (wait if 0 < wait < math.inf else 0.0)
        token_refetched = False
        while True:
            headers = {
                "Authorization": f"Bearer {await self._obtain_token()}",
                "Accept": "application/json",
                "User-Agent": f"{self.name}/{self.version} realtime-python/{__version__}",
            }
            try:
                async with asyncio.timeout(None if wait == math.inf else timeout):
                    status, body = await http_get(target, path, headers, max_body=_MAX_FRAME)
                if status == 200:
                    return parse_poll_answer(body)
            except TimeoutError:
                raise
            except (OSError, MalformedAnswer) as exc:
                reason = str(exc) or type(exc).__name__
                raise DisconnectedError(None, f"poll: {reason}", False) from exc
            error = poll_error(status, body)
            if error.status == 401 and self._can_refresh_token() and not token_refetched:
                token_refetched = self._force_new_token = True
                continue
            raise error

    async def poll_pages(
        self,
        since: Mapping[str, StreamPosition] | None = None,
        *,
        wait: float = 0.0,
        limit: int = 0,
    ) -> AsyncIterator[PollResult]:
        """:meth:`poll` while the answer says ``more``: each page as it comes, every
        later one from the positions the one before reached (and without ``wait``).

        ``async for page in client.poll_pages(): handle(page.publications)``. Handle each
        page before asking for the next: if one fails (:class:`PollError`, e.g.
        ``too_many_requests`` past the device's ``poll_burst``), poll again later from
        the positions of the last page handled.
        """
        positions = dict(since or {})
        while True:
            page = await self.poll(positions, wait=wait, limit=limit)
            yield page
            if not page.more:
                return
            positions.update(page.positions)
            wait = 0.0

    async def refresh(self, token: str) -> int:
        """Replace the connection's token; returns the new ``expires_in`` (0: never).

        The token is also used for later reconnects.
        """
        reply = await self._request(pb.Command(refresh=pb.RefreshRequest(token=token)))
        expires_in = reply.refresh.expires_in
        self._token = token
        self._set_expiry(expires_in)
        return expires_in

    async def ping(self) -> None:
        """Round trip to the server."""
        await self._request(pb.Command(ping=pb.PingRequest()))

    # ------------------------------------------------------------------ state

    def _set_state(self, state: _ConnState) -> None:
        self._state = state
        # Wake everyone waiting for a change, then arm a fresh event.
        self._state_changed.set()
        self._state_changed = asyncio.Event()

    def _check_usable(self) -> None:
        if self._state is _ConnState.CLOSED:
            raise DisconnectedError(None, "client closed", False)
        if self._state is _ConnState.IDLE:
            raise DisconnectedError(self._last_code, self._last_reason, False)

    async def _wait_connected(self, deadline: float) -> ClientConnection:
        loop = asyncio.get_running_loop()
        while True:
            self._check_usable()
            if self._state is _ConnState.CONNECTED and self._ws is not None:
                return self._ws
            event = self._state_changed
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DisconnectedError(
                    self._last_code, f"not connected: {self._last_reason}", True
                )
            try:
                async with asyncio.timeout(remaining):
                    await event.wait()
            except TimeoutError:
                pass

    def _next_id(self) -> int:
        while True:
            self._last_id = self._last_id % _MAX_ID + 1
            if self._last_id not in self._pending:
                return self._last_id

    # ------------------------------------------------------------------ commands

    async def _request(self, command: pb.Command, handler: _Handler | None = None) -> pb.Reply:
        """Send ``command`` once connected and wait for its reply, all within
        ``command_timeout`` (DisconnectedError if still not connected by then,
        TimeoutError if the reply is late)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.command_timeout
        ws = await self._wait_connected(deadline)
        command.id = self._next_id()
        future: asyncio.Future[pb.Reply] = loop.create_future()
        self._pending[command.id] = _Pending(future, handler)
        try:
            async with asyncio.timeout_at(deadline):
                try:
                    await ws.send(encode_delimited([command.SerializeToString()]))
                except ConnectionClosed as exc:
                    raise self._disconnected_error(exc) from None
                return await future
        finally:
            self._pending.pop(command.id, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved, whoever raised what

    def _disconnected_error(self, exc: ConnectionClosed) -> DisconnectedError:
        code = exc.rcvd.code if exc.rcvd is not None else None
        reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
        return DisconnectedError(code, reason, self.reconnect)

    def _fail_pending(self, make_error: Callable[[], Exception]) -> None:
        pending, self._pending = self._pending, {}
        for entry in pending.values():
            if entry.future is not None and not entry.future.done():
                entry.future.set_exception(make_error())

    async def _unsubscribe(self, sub: Subscription) -> None:
        if sub.closed:
            return
        channel = sub.channel
        sub._finish(
            functools.partial(SubscriptionClosedError, channel, None, "unsubscribed"), by_user=True
        )
        if self._subs.get(channel) is sub:
            del self._subs[channel]
        if self._state is not _ConnState.CONNECTED:
            return  # the server forgets subscriptions with the connection
        command = pb.Command(unsubscribe=pb.UnsubscribeRequest(channel=channel))
        try:
            await self._request(command)
        except DisconnectedError:
            pass
        except RealtimeError as exc:
            if exc.code != ErrorCode.NOT_SUBSCRIBED:
                raise

    # ------------------------------------------------------------------ connecting

    async def _obtain_token(self) -> str:
        if self._get_token is not None:
            loop = asyncio.get_running_loop()
            expired = self._expires_at is not None and loop.time() >= self._expires_at
            if self._token is None or self._force_new_token or expired:
                async with asyncio.timeout(self.command_timeout):
                    token = await self._get_token()
                self._token = token
                self._force_new_token = False
                self._expires_at = None
        return self._token or ""

    def _can_refresh_token(self) -> bool:
        return self._get_token is not None

    async def _connect_first(self) -> _Established:
        token_refetched = False
        while True:
            try:
                return await self._establish()
            except _ConnectRefused as exc:
                decision = self._decide_error(exc.error)
                if decision.new_token and not token_refetched:
                    token_refetched = self._force_new_token = True
                    continue
                raise exc.error from None
            except _HandshakeClosed as exc:
                decision = decide_after_close(
                    exc.code, exc.disconnect, can_refresh_token=self._can_refresh_token()
                )
                if decision.new_token and not token_refetched:
                    token_refetched = self._force_new_token = True
                    continue
                raise DisconnectedError(exc.code, exc.reason, decision.reconnect) from None
            except InvalidStatus as exc:
                status = exc.response.status_code
                decision = decide_after_http_status(
                    status, can_refresh_token=self._can_refresh_token()
                )
                if decision.new_token and not token_refetched:
                    token_refetched = self._force_new_token = True
                    continue
                raise DisconnectedError(None, str(exc), decision.reconnect) from exc
            except _ProtocolViolation as exc:
                raise DisconnectedError(None, str(exc), False) from exc
            except InvalidURI as exc:
                raise DisconnectedError(None, str(exc), False) from exc
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                reason = str(exc) or type(exc).__name__
                raise DisconnectedError(None, reason, True) from exc

    def _decide_error(self, exc: RealtimeError) -> ReconnectDecision:
        return decide_after_error(
            exc.code,
            temporary=exc.temporary,
            retry_after_ms=exc.retry_after_ms,
            action=exc.action,
            can_refresh_token=self._can_refresh_token(),
        )

    async def _establish(self) -> _Established:
        """Open a WebSocket and run the connect command on it."""
        token = await self._obtain_token()
        ws = await ws_connect(
            self.url,
            subprotocols=[SUBPROTOCOL],
            open_timeout=self.command_timeout,
            ping_interval=None,  # the protocol has its own pings
            close_timeout=_CLOSE_TIMEOUT,
            max_size=_MAX_FRAME,
            user_agent_header=f"{self.name}/{self.version} realtime-python/{__version__}",
        )
        disconnect: DisconnectInfo | None = None
        try:
            if ws.subprotocol != SUBPROTOCOL:
                raise _ProtocolViolation(
                    f"server did not accept subprotocol {SUBPROTOCOL} (got {ws.subprotocol})"
                )
            request = pb.ConnectRequest(
                token=token, name=self.name, version=self.version, platform=self.platform
            )
            command = pb.Command(id=self._next_id(), connect=request)
            async with asyncio.timeout(self.command_timeout):
                await ws.send(encode_delimited([command.SerializeToString()]))
                while True:
                    replies = self._parse(await ws.recv())
                    for index, reply in enumerate(replies):
                        if reply.id == command.id:
                            if reply.HasField("error"):
                                raise RealtimeError.from_pb(reply.error)
                            return _Established(ws, reply.connect, replies[index + 1 :])
                        if reply.HasField("push") and reply.push.HasField("disconnect"):
                            disconnect = _disconnect_info(reply.push.disconnect)
        except ConnectionClosed as exc:
            ws.transport.abort()
            code = exc.rcvd.code if exc.rcvd is not None else None
            reason = exc.rcvd.reason if exc.rcvd is not None else "connection lost"
            if disconnect is not None and not reason:
                reason = disconnect.reason
            raise _HandshakeClosed(code, reason, disconnect) from None
        except RealtimeError as exc:
            # Let the server's close frame (if it sends one) arrive, then go.
            await self._close_ws(ws)
            close_code = ws.close_code
            if close_code in (1000, 1005, 1006):  # our own close echoed, or none
                close_code = None
            raise _ConnectRefused(exc, close_code) from None
        except _ProtocolViolation:
            await self._close_ws(ws, 1002, "protocol error")
            raise
        except BaseException:
            ws.transport.abort()
            raise

    @staticmethod
    def _parse(data: str | bytes) -> list[pb.Reply]:
        if not isinstance(data, bytes):
            raise _ProtocolViolation("text frame on the binary subprotocol")
        try:
            return [pb.Reply.FromString(message) for message in split_delimited(data)]
        except (FrameError, DecodeError) as exc:
            raise _ProtocolViolation(f"malformed frame: {exc}") from exc

    async def _close_ws(self, ws: ClientConnection, code: int = 1000, reason: str = "") -> None:
        try:
            await ws.close(code, reason)
        except Exception:  # a close must not fail the caller
            logger.debug("error closing the WebSocket", exc_info=True)
            ws.transport.abort()

    def _activate(self, established: _Established) -> None:
        """The connect reply arrived: the session is up."""
        result = established.result
        self._ws = established.ws
        self._disconnect_push = None
        self._backgrounded = False  # a new connection attaches the device again
        self.client_id = result.client
        self._silence_timeout = (
            float(result.ping_interval + result.pong_timeout) if result.ping_interval else None
        )
        self._last_code, self._last_reason = None, "connected"
        self._set_state(_ConnState.CONNECTED)
        self._set_expiry(result.expires_in)
        resubscribe = [s for s in self._subs.values() if s._state is _State.SUBSCRIBING]
        if resubscribe:
            self._spawn(self._resubscribe_all(resubscribe), "resubscribe")
        logger.info("connected to %s as %s", self.url, result.client)
        self._emit(self.on_connect)

    # ------------------------------------------------------------------ supervisor

    async def _supervise(self, established: _Established) -> None:
        try:
            while True:
                lost = await self._read(established.ws, established.leftovers)
                decision = decide_after_close(
                    lost.code, lost.disconnect, can_refresh_token=self._can_refresh_token()
                )
                # Backgrounded: a new connection would end the detached session.
                will_reconnect = self.reconnect and decision.reconnect and not self._backgrounded
                await self._session_down(lost, will_reconnect)
                if not will_reconnect:
                    self._give_up(lost.code, lost.reason)
                    self._emit_disconnect(lost.code, lost.reason, False)
                    return
                self._emit_disconnect(lost.code, lost.reason, True)
                next_session = await self._reconnect(decision)
                if next_session is None:
                    return
                established = next_session
                self._activate(established)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: do not leave the application waiting forever
            logger.exception("realtime client supervisor failed")
            ws, self._ws = self._ws, None
            if ws is not None:
                ws.transport.abort()
            await self._cancel_helpers()
            if self._state is not _ConnState.CLOSED:
                self._give_up(None, "internal client error")

    async def _read(self, ws: ClientConnection, leftovers: list[pb.Reply]) -> _Lost:
        """Read and dispatch frames until the connection is lost."""
        if self._dispatch_all(leftovers):
            await self._pong(ws)
        while True:
            try:
                async with asyncio.timeout(self._silence_timeout):
                    data = await ws.recv()
            except TimeoutError:
                ws.transport.abort()
                reason = f"nothing received for {self._silence_timeout:g}s"
                logger.info("connection to %s is silent: %s", self.url, reason)
                return _Lost(None, reason, None)
            except ConnectionClosed as exc:
                disconnect = self._disconnect_push
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else ""
                if not reason:
                    reason = disconnect.reason if disconnect is not None else "connection lost"
                return _Lost(code, reason, disconnect)
            try:
                replies = self._parse(data)
            except _ProtocolViolation as exc:
                logger.warning("closing the connection to %s: %s", self.url, exc)
                await self._close_ws(ws, 1002, "protocol error")
                return _Lost(None, str(exc), None)
            if self._dispatch_all(replies):
                await self._pong(ws)

    async def _pong(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # the next recv() reports it
            await ws.send(encode_delimited([pb.Command(ping=pb.PingRequest()).SerializeToString()]))

    def _dispatch_all(self, replies: list[pb.Reply]) -> bool:
        """Handle replies in order; True when a server ping needs an answer."""
        ping = False
        for reply in replies:
            ping = self._dispatch(reply) or ping
        return ping

    def _dispatch(self, reply: pb.Reply) -> bool:
        if reply.id:
            entry = self._pending.pop(reply.id, None)
            if entry is None:
                logger.debug("reply to unknown or abandoned command %d", reply.id)
                return False
            future = entry.future
            if reply.HasField("error"):
                if future is not None and not future.done():
                    future.set_exception(RealtimeError.from_pb(reply.error))
                return False
            if entry.handler is not None:
                try:
                    entry.handler(reply)
                except Exception as exc:
                    logger.exception("error applying reply %d", reply.id)
                    if future is not None and not future.done():
                        future.set_exception(exc)
                    return False
            if future is not None and not future.done():
                future.set_result(reply)
            return False
        if reply.HasField("error"):
            logger.warning("server error: %s", RealtimeError.from_pb(reply.error))
            return False
        if not reply.HasField("push"):
            return False
        push = reply.push
        event = push.WhichOneof("event")
        if event == "ping":
            return True
        if event == "pub":
            sub = self._subs.get(push.channel)
            if sub is not None:
                sub._on_publication(push.pub)
        elif event in ("join", "leave", "typing"):
            sub = self._subs.get(push.channel)
            if sub is not None:
                sub._on_event(push, event)
        elif event == "unsubscribe":
            sub = self._subs.get(push.channel)
            if sub is not None and is_resubscribe_code(push.unsubscribe.code):
                # The server ended it because publications may have been lost on the way:
                # subscribe again, recovering from the last position.
                if sub._ended_for_resubscribe():
                    self._resubscribe_soon(sub)
                return False
            sub = self._subs.pop(push.channel, None)
            if sub is not None:
                channel, code, reason = push.channel, push.unsubscribe.code, push.unsubscribe.reason
                sub._finish(
                    functools.partial(SubscriptionClosedError, channel, code, reason), by_user=False
                )
        elif event == "disconnect":
            self._disconnect_push = _disconnect_info(push.disconnect)
        return False

    async def _session_down(self, lost: _Lost, will_reconnect: bool) -> None:
        ws, self._ws = self._ws, None
        if ws is not None and ws.state is not WsState.CLOSED:
            ws.transport.abort()
        self._last_code, self._last_reason = lost.code, lost.reason
        self._set_state(_ConnState.RECONNECTING if will_reconnect else _ConnState.IDLE)
        await self._cancel_helpers()
        self._fail_pending(
            functools.partial(DisconnectedError, lost.code, lost.reason, will_reconnect)
        )
        for sub in self._subs.values():
            sub._await_resubscribe()
        logger.info(
            "disconnected from %s (code %s, %s)%s",
            self.url,
            lost.code,
            lost.reason,
            ", reconnecting" if will_reconnect else "",
        )

    async def _reconnect(self, decision: ReconnectDecision) -> _Established | None:
        attempt = 0
        min_delay = decision.min_delay
        token_refetched = decision.new_token
        self._force_new_token = self._force_new_token or decision.new_token
        while True:
            delay = reconnect_delay(
                attempt, self.backoff_min, self.backoff_max, min_delay=min_delay
            )
            await asyncio.sleep(delay)
            attempt += 1
            code: int | None = None
            reason: str
            try:
                return await self._establish()
            except _ConnectRefused as exc:
                decision = self._decide_error(exc.error)
                code, reason = exc.close_code, str(exc.error)
            except _HandshakeClosed as exc:
                decision = decide_after_close(
                    exc.code, exc.disconnect, can_refresh_token=self._can_refresh_token()
                )
                code, reason = exc.code, exc.reason
            except InvalidStatus as exc:
                decision = decide_after_http_status(
                    exc.response.status_code, can_refresh_token=self._can_refresh_token()
                )
                reason = str(exc)
            except _ProtocolViolation as exc:
                decision, reason = ReconnectDecision(False), str(exc)
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                decision, reason = ReconnectDecision(True), str(exc) or type(exc).__name__
            except Exception as exc:  # get_token failures, bugs: keep trying, loudly
                logger.warning("reconnect attempt failed", exc_info=True)
                decision, reason = ReconnectDecision(True), str(exc) or type(exc).__name__
            logger.info("reconnect attempt %d to %s failed: %s", attempt, self.url, reason)
            if decision.new_token:
                if token_refetched:
                    decision = ReconnectDecision(False)
                else:
                    token_refetched = self._force_new_token = True
            if not decision.reconnect:
                self._give_up(code, reason)
                self._emit_disconnect(code, reason, False)
                return None
            self._last_reason = reason
            min_delay = decision.min_delay

    def _give_up(self, code: int | None, reason: str) -> None:
        """Stop for good (until the next connect()): end subscriptions and waiters."""
        self._last_code, self._last_reason = code, reason
        if self._state is not _ConnState.CLOSED:
            self._set_state(_ConnState.IDLE)
        self._fail_pending(functools.partial(DisconnectedError, code, reason, False))
        subs = list(self._subs.values())
        self._subs.clear()
        for sub in subs:
            sub._finish(functools.partial(DisconnectedError, code, reason, False), by_user=False)

    # ------------------------------------------------------------------ helpers

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"realtime-client {name}")
        self._helpers.add(task)
        task.add_done_callback(self._helpers.discard)
        task.add_done_callback(_retrieve)
        return task

    async def _cancel_helpers(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in self._helpers if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _emit(self, callback: Callable[[], None] | None) -> None:
        if callback is None:
            return
        try:
            callback()
        except Exception:
            logger.exception("error in callback %r", callback)

    def _emit_disconnect(self, code: int | None, reason: str, will_reconnect: bool) -> None:
        callback = self.on_disconnect
        if callback is None:
            return
        try:
            callback(code, reason, will_reconnect)
        except Exception:
            logger.exception("error in on_disconnect callback")

    # ------------------------------------------------------------------ token refresh

    def _set_expiry(self, expires_in: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._expires_at = now + expires_in if expires_in > 0 else None
        if expires_in > 0 and self._get_token is not None:
            self._refresh_at = now + refresh_delay(expires_in)
        else:
            self._refresh_at = None
        self._refresh_wakeup.set()
        if self._refresh_at is not None and (
            self._refresh_task is None or self._refresh_task.done()
        ):
            self._refresh_task = self._spawn(self._refresh_loop(), "token refresh")

    async def _refresh_loop(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while self._refresh_at is not None and self._get_token is not None:
            delay = self._refresh_at - loop.time()
            if delay > 0:
                self._refresh_wakeup.clear()
                try:
                    async with asyncio.timeout(delay):
                        await self._refresh_wakeup.wait()
                except TimeoutError:
                    pass
                continue
            try:
                async with asyncio.timeout(self.command_timeout):
                    token = await self._get_token()
                await self.refresh(token)  # reschedules through _set_expiry
                attempt = 0
            except asyncio.CancelledError:
                raise
            except DisconnectedError:
                return  # reconnecting: the connect reply will schedule the next refresh
            except Exception as exc:
                retry = backoff_delay(attempt, max(self.backoff_min, 1.0), self.backoff_max)
                if isinstance(exc, RealtimeError):
                    retry = max(retry, exc.retry_after_ms / 1000)
                attempt += 1
                logger.warning("token refresh failed (%s); retrying in %.1fs", exc, retry)
                self._refresh_at = loop.time() + retry

    # ------------------------------------------------------------------ resubscribe

    def _apply_subscribe(
        self, sub: Subscription, requested_recover: bool, report_failure: bool, reply: pb.Reply
    ) -> None:
        if sub.closed or self._subs.get(sub.channel) is not sub:
            return
        sub._apply_result(reply.subscribe, requested_recover)
        if report_failure and not sub.recovered and sub.on_recovery_failed is not None:
            try:
                sub.on_recovery_failed(sub)
            except Exception:
                logger.exception("error in on_recovery_failed callback")

    async def _resubscribe_all(self, subs: list[Subscription]) -> None:
        """After a reconnect: resubscribe in one frame, then retry the failures."""
        ws = self._ws
        if ws is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.command_timeout
        batch: list[tuple[Subscription, int, asyncio.Future[pb.Reply]]] = []
        frame: list[bytes] = []
        for sub in subs:
            recover = sub._wants_recovery()
            command = pb.Command(id=self._next_id(), subscribe=sub._subscribe_request(recover))
            future: asyncio.Future[pb.Reply] = loop.create_future()
            handler = functools.partial(
                self._apply_subscribe, sub, recover, sub._reports_recovery()
            )
            self._pending[command.id] = _Pending(future, handler)
            batch.append((sub, command.id, future))
            frame.append(command.SerializeToString())
        try:
            await ws.send(encode_delimited(frame))
        except ConnectionClosed:
            return  # the supervisor fails the futures
        finally:
            for _, _, future in batch:
                future.add_done_callback(_retrieve_future)
        await asyncio.gather(
            *(self._finish_resubscribe(sub, id_, fut, deadline) for sub, id_, fut in batch)
        )

    async def _finish_resubscribe(
        self,
        sub: Subscription,
        command_id: int,
        future: asyncio.Future[pb.Reply],
        deadline: float,
    ) -> None:
        recover = sub._wants_recovery()
        error: RealtimeError | None
        try:
            async with asyncio.timeout_at(deadline):
                await future
            return
        except RealtimeError as exc:
            error = exc
        except TimeoutError:
            error = None
        except DisconnectedError:
            return
        finally:
            self._pending.pop(command_id, None)
        await self._retry_subscribe(sub, recover, error)

    async def _retry_subscribe(
        self, sub: Subscription, recover: bool, error: RealtimeError | None
    ) -> None:
        """Subscribe again after a failed (``error``) or timed-out (None) attempt, until
        it succeeds, the refusal is final, or the subscription or connection ends."""
        attempt = 0
        while not sub.closed and self._subs.get(sub.channel) is sub:
            delay = 0.0
            if error is not None and error.code == ErrorCode.ALREADY_SUBSCRIBED:
                # A timed-out attempt went through after all: start over to get the
                # recovered publications that came with it.
                try:
                    await self._request(
                        pb.Command(unsubscribe=pb.UnsubscribeRequest(channel=sub.channel))
                    )
                except DisconnectedError:
                    return
                except (RealtimeError, TimeoutError):
                    pass
                if attempt:
                    delay = backoff_delay(attempt, self.backoff_min, self.backoff_max)
                attempt += 1
            elif error is not None and (
                error.action == Action.RESUBSCRIBE or error.code == ErrorCode.UNRECOVERABLE_POSITION
            ):
                recover = False  # reported through on_recovery_failed
            elif (
                error is None
                or error.temporary
                or error.action
                in (
                    Action.RETRY,
                    Action.RECONNECT,
                )
            ):
                delay = backoff_delay(attempt, self.backoff_min, self.backoff_max)
                if error is not None:
                    delay = max(delay, error.retry_after_ms / 1000)
                attempt += 1
            else:
                logger.warning("resubscribe to %r refused: %s", sub.channel, error)
                del self._subs[sub.channel]
                channel, code, reason = sub.channel, error.code, error.message
                sub._finish(
                    functools.partial(SubscriptionClosedError, channel, code, reason), by_user=False
                )
                return
            if delay:
                await asyncio.sleep(delay)
                if sub.closed or self._subs.get(sub.channel) is not sub:
                    return
            finished, error = await self._send_subscribe(sub, recover)
            if finished:
                return

    async def _send_subscribe(
        self, sub: Subscription, recover: bool
    ) -> tuple[bool, RealtimeError | None]:
        """One subscribe attempt: (True, None) when it went through or the connection is
        gone (the reconnect takes over), else (False, the refusal or None on a timeout)."""
        command = pb.Command(subscribe=sub._subscribe_request(recover))
        handler = functools.partial(self._apply_subscribe, sub, recover, sub._reports_recovery())
        try:
            await self._request(command, handler)
        except RealtimeError as exc:
            return False, exc
        except TimeoutError:
            return False, None
        except DisconnectedError:
            pass
        return True, None

    # ------------------------------------------------------------------ delta resync

    def _resync(self, sub: Subscription) -> None:
        """A delta did not apply (called by the reader): resubscribe ``sub`` with
        recovery from its last good position. While reconnecting there is nothing to
        do: the reconnect resubscribes it."""
        if self._state is _ConnState.CONNECTED and self._subs.get(sub.channel) is sub:
            self._spawn(self._resync_task(sub), f"resync {sub.channel}")

    def _resubscribe_soon(self, sub: Subscription) -> None:
        """The server ended ``sub`` asking for a resubscribe with recovery (called by the
        reader). While reconnecting there is nothing to do: the reconnect resubscribes it."""
        if self._state is _ConnState.CONNECTED and self._subs.get(sub.channel) is sub:
            self._spawn(self._subscribe_again(sub), f"resubscribe {sub.channel}")

    async def _resync_task(self, sub: Subscription) -> None:
        if sub._resync_streak > 1:  # the server keeps sending deltas that do not apply
            await asyncio.sleep(
                backoff_delay(sub._resync_streak - 2, self.backoff_min, self.backoff_max)
            )
        if sub.closed or self._subs.get(sub.channel) is not sub:
            return
        command = pb.Command(unsubscribe=pb.UnsubscribeRequest(channel=sub.channel))
        try:
            await self._request(command, sub._unsubscribed_for_resync)
        except DisconnectedError:
            return
        except (RealtimeError, TimeoutError) as exc:
            # NOT_SUBSCRIBED: the server ended it meanwhile (its push ends `sub`); a late
            # unsubscribe makes the subscribe below fail with ALREADY_SUBSCRIBED, which
            # the retry handles.
            logger.debug("resync of %r: unsubscribe failed: %r", sub.channel, exc)
            sub._discarding = False
        await self._subscribe_again(sub)

    async def _subscribe_again(self, sub: Subscription) -> None:
        """Subscribe ``sub`` again (the server's subscription is gone), with recovery
        when it wants it; retried until it succeeds or the refusal is final."""
        if sub.closed or self._subs.get(sub.channel) is not sub:
            return
        recover = sub._wants_recovery()
        finished, error = await self._send_subscribe(sub, recover)
        if not finished:
            await self._retry_subscribe(sub, recover, error)


def _retrieve_future(future: asyncio.Future[pb.Reply]) -> None:
    if not future.cancelled():
        future.exception()
