"""One client connection's protocol state: connect, commands, replies, close.

Transport-agnostic: a transport hands in decoded-able frames (`receive`) and gets back
writes through its `SessionTransport`. Commands of one connection run in order, in one
task that exists only while commands are waiting (an idle connection has no task).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Protocol

from realtime.auth import AuthError, Principal
from realtime.config import parse_version
from realtime.core.broker import BrokerUnavailable, StreamPosition
from realtime.core.hub import WireFormat
from realtime.core.ratelimit import TokenBucket
from realtime.core.replies import pb_client_info
from realtime.core.writer import Outbound, Sink
from realtime.log import event
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codec import Codec
from realtime.protocol.codes import Action, CloseCode, ErrorCode, ProtocolError
from realtime.protocol.framing import FrameError

if TYPE_CHECKING:
    from realtime.core.node import Node

log = logging.getLogger("realtime.session")

CONNECTING, CONNECTED, CLOSING, CLOSED = range(4)


class SessionTransport(Sink, Protocol):
    def close(self, code: int, reason: str) -> None:
        """Send a close frame after what is queued, then close the connection."""
        ...


class Session:
    __slots__ = (
        "bucket",
        "channels",
        "client_name",
        "client_platform",
        "client_version",
        "codec",
        "detached",
        "expires_at",
        "handshake_token",
        "id",
        "last_rx",
        "node",
        "outbound",
        "principal",
        "queue",
        "rejected",
        "remote",
        "runner",
        "shut_out",
        "state",
        "transport",
        "wire",
    )

    def __init__(
        self,
        node: Node,
        transport: SessionTransport,
        codec: Codec,
        wire: WireFormat,
        *,
        handshake_token: str = "",
        remote: str = "",
    ) -> None:
        self.id = secrets.token_urlsafe(9)
        self.node = node
        self.transport = transport
        self.codec = codec
        self.wire = wire
        self.handshake_token = handshake_token
        self.remote = remote
        self.state = CONNECTING
        self.principal: Principal | None = None
        self.channels: set[str] = set()
        self.detached = False  # the app said it went to the background (app_state)
        # Closed by us with a code that says "do not reconnect" (forbidden, invalid token,
        # flood, ...): its place is not kept for a backgrounded app either.
        self.shut_out = False
        self.queue: list[pb.Command] = []
        self.runner: asyncio.Task[None] | None = None
        self.outbound = Outbound(
            transport, node.flusher, node.config.limits.max_queue_bytes, self._on_overflow
        )
        now = node.loop.time()
        self.last_rx = now
        limits = node.config.limits
        self.bucket = TokenBucket(limits.commands_per_second, limits.command_burst, now)
        self.rejected = 0
        self.expires_at = 0.0
        self.client_name = self.client_version = self.client_platform = ""

    @property
    def user(self) -> str:
        return self.principal.user if self.principal is not None else ""

    # ------------------------------------------------------------------ input

    def receive(self, frame: bytes) -> None:
        """One complete WebSocket data message from the client."""
        if self.state >= CLOSING:
            return
        node = self.node
        node.metrics.bytes_in += len(frame)
        try:
            commands = self.codec.decode_commands(frame)
        except FrameError as exc:
            self.close(CloseCode.BAD_REQUEST, f"malformed frame: {exc}")
            return
        node.metrics.messages_in += len(commands)
        self.queue.extend(commands)
        if self.runner is None:
            self.runner = node.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.queue and self.state < CLOSING:
                batch, self.queue = self.queue, []
                for command in batch:
                    if self.state >= CLOSING:
                        break
                    await self._execute(command)
        finally:
            self.runner = None

    async def _execute(self, command: pb.Command) -> None:
        kind = command.WhichOneof("request")
        try:
            if self.state == CONNECTING:
                if kind != "connect":
                    self.fail(
                        command.id,
                        ProtocolError(ErrorCode.NOT_CONNECTED, "send connect first"),
                        close=CloseCode.BAD_REQUEST,
                    )
                    return
                await self._connect(command.id, command.connect)
                return
            if kind != "ping" and kind != "connect":
                retry_ms = self.bucket.take(self.node.loop.time())
                if retry_ms:
                    self.rejected += 1
                    if self.rejected >= self.node.config.limits.flood_close_after:
                        self.close(CloseCode.FLOOD, "far past the command rate limit")
                        return
                    raise ProtocolError(
                        ErrorCode.TOO_MANY_REQUESTS,
                        "command rate limit exceeded",
                        temporary=True,
                        retry_after_ms=retry_ms,
                        action=Action.RETRY,
                    )
                self.rejected = 0
            if kind == "publish":
                req = command.publish
                result = await self.node.client_publish(self, req)
                self.reply(command.id, pb.Reply(publish=result))
            elif kind == "subscribe":
                await self._subscribe(command.id, command.subscribe)
            elif kind == "unsubscribe":
                await self.node.unsubscribe(self, command.unsubscribe.channel)
                self.reply(command.id, pb.Reply(unsubscribe=pb.UnsubscribeResult()))
            elif kind == "history":
                history = await self.node.client_history(self, command.history)
                self.reply(command.id, pb.Reply(history=history))
            elif kind == "ping":
                self.reply(command.id, pb.Reply(ping=pb.PingResult()))
            elif kind == "refresh":
                self._refresh(command.id, command.refresh.token)
            elif kind == "presence":
                await self._presence(command.id, command.presence.channel)
            elif kind == "presence_stats":
                await self._presence_stats(command.id, command.presence_stats.channel)
            elif kind == "typing":
                typing = command.typing
                forwarded = await self.node.client_typing(self, typing.channel, typing.active)
                self.reply(command.id, pb.Reply(typing=pb.TypingResult(throttled=not forwarded)))
            elif kind == "user_status":
                await self._user_status(command.id, list(command.user_status.users))
            elif kind == "app_state":
                app_req = command.app_state
                given = {
                    channel: StreamPosition(p.offset, p.epoch)
                    for channel, p in app_req.positions.items()
                }
                background = app_req.state == pb.AppStateRequest.STATE_BACKGROUND
                app_state = await self.node.app_state(self, background, given)
                self.reply(command.id, pb.Reply(app_state=app_state))
            elif kind == "register_device":
                assert self.principal is not None
                await self.node.register_device(self.principal, command.register_device)
                self.reply(command.id, pb.Reply(register_device=pb.RegisterDeviceResult()))
            elif kind == "unregister_device":
                assert self.principal is not None
                await self.node.unregister_device(self.principal)
                self.reply(command.id, pb.Reply(unregister_device=pb.UnregisterDeviceResult()))
            elif kind == "connect":
                raise ProtocolError(ErrorCode.ALREADY_CONNECTED, "already connected")
            else:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_COMMAND, "unknown command: this server speaks realtime.v1"
                )
        except ProtocolError as exc:
            self.fail(command.id, exc)
        except BrokerUnavailable as exc:
            self.fail(
                command.id,
                ProtocolError(
                    ErrorCode.BROKER_UNAVAILABLE,
                    str(exc),
                    temporary=True,
                    retry_after_ms=int(exc.retry_after * 1000),
                    action=Action.RETRY,
                ),
            )
        except Exception:
            log.exception("command_failed", extra={"fields": {"client": self.id, "kind": kind}})
            self.fail(command.id, ProtocolError(ErrorCode.INTERNAL, "internal error", True))

    # ------------------------------------------------------------------ commands

    async def _connect(self, command_id: int, req: pb.ConnectRequest) -> None:
        node = self.node
        try:
            principal = node.verifier.verify(req.token or self.handshake_token)
        except AuthError as exc:
            node.metrics.connections_refused["expired" if exc.expired else "token"] += 1
            if exc.expired:
                error = ProtocolError(
                    ErrorCode.TOKEN_EXPIRED, str(exc), action=Action.REFRESH_TOKEN
                )
                self.fail(command_id, error, close=CloseCode.TOKEN_EXPIRED)
            else:
                error = ProtocolError(ErrorCode.UNAUTHORIZED, str(exc))
                self.fail(command_id, error, close=CloseCode.INVALID_TOKEN)
            return
        minimum = node.min_versions.get(req.platform)
        if minimum is not None:
            version = parse_version(req.version)
            if version is None or version < minimum:
                node.metrics.connections_refused["app_version"] += 1
                wanted = ".".join(map(str, minimum))
                error = ProtocolError(
                    ErrorCode.APP_VERSION_TOO_OLD,
                    f"{req.platform} app version {req.version or '(none)'} is below {wanted}",
                    action=Action.UPDATE_APP,
                )
                self.fail(command_id, error, close=CloseCode.APP_VERSION_TOO_OLD)
                return
        self.principal = principal
        self.client_name, self.client_version = req.name, req.version
        self.client_platform = req.platform
        self.state = CONNECTED
        node.register(self)
        config = node.config.client
        self.reply(
            command_id,
            pb.Reply(
                connect=pb.ConnectResult(
                    client=self.id,
                    version=node.version,
                    node=node.name,
                    ping_interval=config.ping_interval,
                    pong_timeout=config.pong_timeout,
                    expires_in=self._expires_in(principal),
                )
            ),
        )
        event(
            log,
            "client_connected",
            logging.DEBUG,
            client=self.id,
            user=principal.user,
            remote=self.remote,
            app=req.name,
            version=req.version,
            platform=req.platform,
        )

    def _expires_in(self, principal: Principal) -> int:
        if not principal.expires_at:
            self.expires_at = 0.0
            return 0
        remaining = max(1, int(principal.expires_at - self.node.wall_time()))
        self.expires_at = self.node.loop.time() + remaining
        self.node.watch_expiry(self)
        return remaining

    def _refresh(self, command_id: int, token: str) -> None:
        try:
            principal = self.node.verifier.verify(token)
        except AuthError as exc:
            code = ErrorCode.TOKEN_EXPIRED if exc.expired else ErrorCode.UNAUTHORIZED
            raise ProtocolError(code, str(exc), action=Action.REFRESH_TOKEN) from None
        if self.principal is None or principal.user != self.principal.user:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "refresh token is for another user")
        self.principal = principal
        expires_in = self._expires_in(principal)
        self.reply(command_id, pb.Reply(refresh=pb.RefreshResult(expires_in=expires_in)))

    async def _subscribe(self, command_id: int, req: pb.SubscribeRequest) -> None:
        since = None
        if req.recover and req.HasField("since"):
            since = StreamPosition(req.since.offset, req.since.epoch)
        result, backlog = await self.node.subscribe(self, req.channel, since, req.delta)
        if self.state >= CLOSING:
            return
        self.reply(command_id, pb.Reply(subscribe=result))
        wire = self.wire
        for pub in backlog:
            self.outbound.push(
                wire.encode_publication(
                    req.channel, pub.offset, pub.data, pub.user, pub.client, pub.tags
                )
            )

    async def _presence(self, command_id: int, channel: str) -> None:
        entries = await self.node.presence_list(channel, self.principal)
        result = pb.PresenceResult()
        for client, entry in entries.items():
            result.clients[client].CopyFrom(pb_client_info(entry))
        self.reply(command_id, pb.Reply(presence=result))

    async def _presence_stats(self, command_id: int, channel: str) -> None:
        stats = await self.node.presence_stats(channel, self.principal)
        result = pb.PresenceStatsResult(clients=stats.clients, users=stats.users)
        self.reply(command_id, pb.Reply(presence_stats=result))

    async def _user_status(self, command_id: int, users: list[str]) -> None:
        statuses = await self.node.user_status(users, self.principal)
        result = pb.UserStatusResult(
            statuses=[
                pb.UserStatus(user=s.user, online=s.online, last_seen=int(s.last_seen))
                for s in statuses
            ]
        )
        self.reply(command_id, pb.Reply(user_status=result))

    # ------------------------------------------------------------------ output

    def reply(self, command_id: int, reply: pb.Reply) -> None:
        if command_id == 0 or self.state >= CLOSING:
            return
        reply.id = command_id
        self.node.metrics.messages_out += 1
        self.outbound.push(self.wire.frame(self.codec.encode_reply(reply)))

    def fail(self, command_id: int, error: ProtocolError, close: CloseCode | None = None) -> None:
        self.node.metrics.errors[int(error.code)] += 1
        if command_id:
            reply = pb.Reply(
                id=command_id,
                error=pb.Error(
                    code=error.code,
                    message=error.message,
                    temporary=error.temporary,
                    retry_after_ms=error.retry_after_ms,
                    action=int(error.action),  # type: ignore[arg-type]
                ),
            )
            self.reply(command_id, reply)
        if close is not None:
            self.close(close, error.message)

    def push_raw(self, payload: bytes) -> None:
        """Queue an already-framed message (pings, shared pushes)."""
        if self.state < CLOSING:
            self.outbound.push(payload)

    def close(self, code: CloseCode, reason: str, reconnect_after_ms: int = 0) -> None:
        """Tell the client why (Disconnect push), then close with `code`."""
        if self.state >= CLOSING:
            return
        self.shut_out = not code.reconnect
        reason = reason[:120]
        disconnect = pb.Disconnect(
            code=code,
            reason=reason,
            reconnect=code.reconnect,
            reconnect_after_ms=reconnect_after_ms,
        )
        push = pb.Reply(push=pb.Push(disconnect=disconnect))
        self.outbound.push(self.wire.frame(self.codec.encode_reply(push)))
        self.outbound.flush_now()
        self.state = CLOSING
        self.outbound.closed = True
        self.node.metrics.disconnects[int(code)] += 1
        level = logging.DEBUG if code in (CloseCode.SHUTDOWN,) else logging.INFO
        event(
            log,
            "client_closed",
            level,
            client=self.id,
            user=self.user,
            code=int(code),
            reason=reason,
        )
        self.transport.close(code, reason)

    def _on_overflow(self) -> None:
        # Called from inside a fan-out loop: close later, never mutate the hub from here.
        self.node.loop.call_soon(self._close_slow)

    def _close_slow(self) -> None:
        if self.state >= CLOSING:
            return
        self.state = CLOSING
        self.node.metrics.disconnects[int(CloseCode.SLOW)] += 1
        event(
            log,
            "client_closed",
            logging.INFO,
            client=self.id,
            user=self.user,
            code=int(CloseCode.SLOW),
            reason="slow consumer: outbound queue full",
        )
        self.transport.close(CloseCode.SLOW, "slow consumer")

    def connection_lost(self) -> None:
        """The transport is gone (after a close or a network failure)."""
        if self.state == CLOSED:
            return
        self.state = CLOSED
        self.outbound.closed = True
        if self.runner is not None:
            self.runner.cancel()
        self.queue.clear()
        self.node.unregister(self)
