"""MQTT 3.1.1 / 5.0 sessions in the hub: devices and WebSocket apps share channels.

An MQTT topic is a channel name. A device's subscriptions are filter subscriptions in the
hub (`+` and `#` allowed), so it receives WebSocket, server-API and MQTT publications alike;
its publications go through `Node.publish` like everyone else's, with history and positions
where the namespace keeps them.

Two objects per device:

- `SessionState` is the MQTT session: subscriptions (it is the hub member), messages in
  flight, the queue. It outlives the connection when the session is persistent (3.1.1
  clean_session=false, 5.0 session expiry), queueing QoS 1/2 publications (bounded in count
  and bytes) until the device returns or the session expires.
- `MqttConnection` is one network connection speaking for it: CONNECT, auth, packets, and
  its outbound queue. Its subclass is the transport side: the TCP protocol
  (`transports/mqtt.py`) or the WebSocket carrier, so a connection is one Python object.

Protocol rules kept here (the codec in `realtime.mqtt` checks the bytes):

- the JWT is the CONNECT password; a second CONNECT with the same client id takes the
  session over only after it authenticated;
- ACLs on subscribe (the token must cover the whole filter), on publish, on the will, and
  on every retained message delivered;
- QoS 0/1/2 both ways, delivered at min(publication QoS, granted QoS); publications from
  WebSocket or the server API count as QoS 1; unacknowledged messages are re-sent with DUP
  when a persistent session resumes;
- last will on every abnormal end (keep-alive expiry included), after the 5.0 will delay
  or at the end of the session, whichever comes first; not if the device came back;
- keep-alive enforced at 1.5x, counted in the server's once-a-second ticks (so up to ~2 s
  late, never early); 5.0 message expiry on queued messages;
- shared subscriptions (`$share/group/filter`, also accepted from 3.1.1 devices as
  mosquitto and EMQX do): each publication goes to one member, round robin, preferring
  connected members; no retained messages on a shared subscribe (5.0 4.8.2);
- topic aliases both ways (5.0): inbound up to `mqtt.topic_alias_maximum`, outbound up to
  what the device's CONNECT allows.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING

from realtime.auth import AuthError, Principal
from realtime.core.broker import BrokerUnavailable, PresenceEntry, Publication
from realtime.core.ratelimit import TokenBucket
from realtime.core.topics import channel_error, is_exact
from realtime.core.writer import OutboundQueue
from realtime.log import event
from realtime.mqtt.codec import MAX_PACKET_SIZE, PacketDecoder, encode, encode_publish
from realtime.mqtt.errors import MqttError
from realtime.mqtt.packets import (
    MQTT_5,
    ConnAck,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    SubscriptionOptions,
    UnsubAck,
    Unsubscribe,
    Will,
)
from realtime.mqtt.reason_codes import ConnectReturnCode, ReasonCode
from realtime.mqtt.topics import split_shared

if TYPE_CHECKING:
    from realtime.core.mqtt_cluster import SessionSync
    from realtime.core.node import Node

log = logging.getLogger("realtime.mqtt")

# Publications from WebSocket clients and the server API reach devices at this QoS at most.
NON_MQTT_QOS = 1
NEVER_EXPIRES = 0xFFFFFFFF
DEFAULT_RECEIVE_MAXIMUM = 65535  # 5.0: a device's when it sets none (and 3.1.1's)


class MqttMeta:
    """What an MQTT publication carries besides its payload (Publication.meta)."""

    __slots__ = ("properties", "qos", "retain")

    def __init__(self, qos: int, retain: bool, properties: Properties | None) -> None:
        self.qos = qos
        self.retain = retain
        self.properties = properties


_QOS0 = MqttMeta(0, False, None)  # shared: most device publications carry nothing else


class SubscriptionValue:
    """One subscription of a session, as stored in the hub's filter trie."""

    __slots__ = ("identifier", "options")

    def __init__(self, options: SubscriptionOptions, identifier: int | None) -> None:
        self.options = options
        self.identifier = identifier


# The value of every subscription with default options and no identifier (all of 3.1.1's),
# shared: it is never modified.
_PLAIN = tuple(SubscriptionValue(SubscriptionOptions(qos), None) for qos in range(3))


def subscription_value(options: SubscriptionOptions, identifier: int | None) -> SubscriptionValue:
    plain = _PLAIN[options.qos]
    if identifier is None and options == plain.options:
        return plain
    return SubscriptionValue(options, identifier)


class Message:
    """A QoS 1/2 delivery in flight or queued for a device."""

    __slots__ = ("channel", "data", "expires_at", "props", "qos", "released", "retain")

    def __init__(
        self,
        channel: str,
        data: bytes,
        qos: int,
        retain: bool,
        props: Properties | None,
        expires_at: float,
    ) -> None:
        self.channel = channel
        self.data = data
        self.qos = qos
        self.retain = retain
        self.props = props
        self.expires_at = expires_at  # 0: never (5.0 message expiry)
        self.released = False  # QoS 2: PUBREC received, PUBREL sent


# Shared by sessions with nothing in flight; never written to: `_transmit` swaps in a dict
# of the session's own first.
_NO_MESSAGES: dict[int, Message] = {}

_FORWARDED = (
    "payload_format_indicator",
    "message_expiry_interval",
    "content_type",
    "response_topic",
    "correlation_data",
)


def _forwarded_properties(meta: object, identifiers: list[int]) -> Properties | None:
    """The 5.0 properties a subscriber receives: the publisher's, plus its subscription ids."""
    source = meta.properties if isinstance(meta, MqttMeta) else None
    if source is None and not identifiers:
        return None
    props = Properties(subscription_identifiers=identifiers)
    if source is not None:
        for name in _FORWARDED:
            setattr(props, name, getattr(source, name))
        props.user_properties = list(source.user_properties)
    return props


class SharedGroup:
    """`$share/{name}/{filter}`: one hub member for the group; each publication goes to one
    member session, round robin, preferring connected ones."""

    __slots__ = ("members", "name", "topic_filter", "turn")

    def __init__(self, name: str, topic_filter: str) -> None:
        self.name = name
        self.topic_filter = topic_filter
        self.members: dict[SessionState, SubscriptionValue] = {}
        self.turn = 0

    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        members = list(self.members.items())
        if not members:
            return
        count = len(members)
        start = self.turn % count
        self.turn = start + 1
        chosen = members[start]
        for i in range(count):
            candidate = members[(start + i) % count]
            if candidate[0].connection is not None:
                chosen = candidate
                self.turn = (start + i) % count + 1
                break
        state, value = chosen
        state.deliver(channel, pub, [value])


class _Pending(deque[Message]):
    """QoS 1/2 messages queued for a device, and their bytes."""

    __slots__ = ("size",)

    def __init__(self) -> None:
        super().__init__()
        self.size = 0


class SessionState:
    """One device's MQTT session; the hub delivers to it whether or not it is connected."""

    __slots__ = (
        "awaiting_release",
        "client_id",
        "connection",
        "delayed_will",
        "expires_at",
        "expiry",
        "inflight",
        "next_packet_id",
        "pending",
        "principal",
        "server",
        "subscriptions",
    )

    def __init__(self, server: MqttServer, client_id: str, principal: Principal) -> None:
        self.server = server
        self.client_id = client_id
        self.principal = principal
        self.connection: MqttConnection | None = None
        # The session's filters, in order. A tuple: most devices have one or two, where a
        # dict costs ~180 bytes; each one's value lives in the hub (or its shared group).
        self.subscriptions: tuple[str, ...] = ()
        # Created on first use: most devices never need them (idle memory counts).
        self.inflight = _NO_MESSAGES  # by outbound packet id
        self.awaiting_release: set[int] | None = None  # inbound QoS 2 ids before PUBREL
        self.pending: _Pending | None = None
        self.next_packet_id = 1
        self.expiry = 0  # seconds the session outlives its connection
        self.expires_at = 0.0
        self.delayed_will: tuple[Will, asyncio.TimerHandle] | None = None  # 5.0 will delay

    # ------------------------------------------------------------------ hub member

    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        """From the hub: one publication, with every subscription of ours it matched."""
        meta = pub.meta
        source_qos = meta.qos if isinstance(meta, MqttMeta) else NON_MQTT_QOS
        granted = -1
        identifiers: list[int] = []
        retain = False
        own = pub.client == self.client_id
        for value in matched:
            assert isinstance(value, SubscriptionValue)
            options = value.options
            if own and options.no_local:
                continue
            granted = max(granted, options.qos)
            if value.identifier:
                identifiers.append(value.identifier)
            if options.retain_as_published and isinstance(meta, MqttMeta) and meta.retain:
                retain = True
        if granted >= 0:
            self.send(channel, pub, min(granted, source_qos), retain, identifiers)

    def send(
        self, channel: str, pub: Publication, qos: int, retain: bool, identifiers: list[int]
    ) -> None:
        connection = self.connection
        v5 = connection is None or connection.version == MQTT_5
        props = _forwarded_properties(pub.meta, identifiers) if v5 else None
        if qos == 0:
            if connection is not None:
                negotiated = connection.negotiated
                if (
                    props is None
                    and not retain
                    and (negotiated is None or not negotiated.alias_maximum)
                ):
                    # The common case: the same bytes for every plain subscriber.
                    connection.push_raw(self.server.qos0_packet(channel, pub, connection.version))
                else:
                    connection.write_publish(channel, pub.data, 0, retain, 0, props)
            return  # QoS 0 is not queued for an absent device
        expires_at = 0.0
        if props is not None and props.message_expiry_interval:
            expires_at = self.server.node.loop.time() + props.message_expiry_interval
        message = Message(channel, pub.data, qos, retain, props, expires_at)
        if connection is not None and len(self.inflight) < connection.receive_maximum:
            self._transmit(connection, message)
        else:
            self._enqueue(message)

    def _enqueue(self, message: Message) -> None:
        config = self.server.node.config.mqtt
        size = len(message.data)
        pending = self.pending
        if pending is None:
            pending = self.pending = _Pending()
        if (
            len(pending) >= config.max_queued_messages
            or pending.size + size > config.max_queued_bytes
        ):
            self.server.node.metrics.errors[int(ReasonCode.QUOTA_EXCEEDED)] += 1
            return  # dropped: the device is away or not acknowledging (counted)
        pending.append(message)
        pending.size += size
        sync = self.server.sync
        if sync is not None and self.connection is None:
            sync.queued(self, message)  # kept in the store too: the device may come back elsewhere

    def requeue(self, message: Message) -> None:
        """Put `message` first in the queue (handed over from another node)."""
        pending = self.pending
        if pending is None:
            pending = self.pending = _Pending()
        pending.appendleft(message)
        pending.size += len(message.data)

    def _transmit(self, connection: MqttConnection, message: Message, dup: bool = False) -> None:
        packet_id = self._packet_id()
        if self.inflight is _NO_MESSAGES:
            self.inflight = {}
        self.inflight[packet_id] = message
        connection.write_message(message, packet_id, dup)

    def _packet_id(self) -> int:
        packet_id = self.next_packet_id
        while packet_id in self.inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        return packet_id

    def acknowledged(self, packet_id: int) -> None:
        if self.inflight.pop(packet_id, None) is not None:
            self.drain()

    def drain(self) -> None:
        """Send queued messages while the device's receive maximum allows."""
        connection = self.connection
        if connection is None:
            return
        now = self.server.node.loop.time()
        pending = self.pending
        while pending and len(self.inflight) < connection.receive_maximum:
            message = pending.popleft()
            pending.size -= len(message.data)
            if message.expires_at:
                remaining = int(message.expires_at - now)
                if remaining <= 0:
                    continue  # 5.0 message expiry: never deliver it late
                if message.props is not None:
                    message.props.message_expiry_interval = remaining
            self._transmit(connection, message)

    def resume(self, connection: MqttConnection) -> None:
        """A connection took this session (new or resumed): re-send what is unacknowledged."""
        self.connection = connection
        node = self.server.node
        for topic_filter in self.subscriptions:
            if is_exact(topic_filter):  # present again where it subscribed to the topic itself
                node.presence_join_soon(topic_filter, self.presence_entry())
        if self.delayed_will is not None:
            self.delayed_will[1].cancel()
            self.delayed_will = None
        for packet_id, message in self.inflight.items():
            if message.released:
                connection.send_packet(PubRel(packet_id))
            else:
                connection.write_message(message, packet_id, dup=True)
        self.drain()
        if self.server.sync is not None:
            self.server.sync.changed(self)  # connected here now; its stored queue is void

    def presence_entry(self) -> PresenceEntry:
        principal = self.principal
        return PresenceEntry(
            self.client_id, principal.user, principal.device, principal.info or None, "mqtt"
        )

    def detach(self, will: Will | None) -> None:
        """The connection ended: keep the session for its expiry, or end it now."""
        self.connection = None
        node = self.server.node
        for topic_filter in self.subscriptions:
            if is_exact(topic_filter):  # an offline device is present nowhere
                node.presence_leave(topic_filter, self.client_id)
        loop = self.server.node.loop
        if self.expiry:
            self.expires_at = loop.time() + self.expiry if self.expiry != NEVER_EXPIRES else 0
        delay = will.properties.will_delay_interval if will and will.properties else None
        if will is not None:
            wait = min(delay or 0, self.expiry)
            if wait:
                self.delayed_will = (will, loop.call_later(wait, self._will_due))
            else:
                self.server.publish_will(self, will)
        if not self.expiry:
            self.server.end(self)
        elif self.server.sync is not None:
            self.server.sync.changed(self)  # stored with its messages, for any node

    def _will_due(self) -> None:
        delayed, self.delayed_will = self.delayed_will, None
        if delayed is not None:
            self.server.publish_will(self, delayed[0])


class _Negotiated:
    """What a 5.0 device asked for in its CONNECT (receive maximum, maximum packet size,
    topic alias maximum), and the topic aliases in use both ways. Made when first needed:
    most devices ask for none of it (idle memory counts)."""

    __slots__ = (
        "alias_maximum",
        "inbound_aliases",
        "max_packet",
        "outbound_aliases",
        "receive_maximum",
    )

    def __init__(self) -> None:
        self.receive_maximum = DEFAULT_RECEIVE_MAXIMUM  # for our QoS 1/2 sends
        self.max_packet = MAX_PACKET_SIZE  # fixed header included
        self.alias_maximum = 0  # how many topic aliases the device accepts from us
        self.outbound_aliases: dict[str, int] = {}
        self.inbound_aliases: dict[int, str] = {}


class MqttConnection(OutboundQueue):
    """One network connection of a device: decoder, CONNECT, packets, keep-alive.

    It is its own outbound queue, and a subclass is its transport side (`write_payloads`,
    `close_transport`, `remote`): the TCP protocol, or the WebSocket carrier. One object per
    connection, with nothing else created until it is needed: idle memory counts.
    """

    __slots__ = (
        "allowed",
        "bucket",
        "decoder",
        "keep_alive",
        "negotiated",
        "node",
        "queue",
        "runner",
        "rx_tick",
        "server",
        "state",
        "version",
        "will",
    )

    def __init__(self, server: MqttServer) -> None:
        node = server.node
        super().__init__(self, node.flusher, node.config.limits.max_queue_bytes)
        self.server = server
        self.node = node
        # A decoding error stays in the decoder (`error`), acted on after the packets that
        # came before it.
        self.decoder = PacketDecoder(server=True, max_packet_size=node.config.mqtt.max_packet_size)
        self.version = 4
        self.state: SessionState | None = None  # set once CONNECT is accepted
        self.keep_alive = 0
        self.will: Will | None = None  # cleared by a normal DISCONNECT
        self.rx_tick = server.ticks  # the server tick of the last bytes received
        # topic -> may this device publish there (the principal is fixed per connection).
        self.allowed: dict[str, bool] | None = None
        self.negotiated: _Negotiated | None = None
        self.bucket: TokenBucket | None = None  # made at the first PUBLISH
        self.queue: list[Packet] | None = None  # packets waiting for the runner
        self.runner: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ transport side

    def write_payloads(self, payloads: list[bytes], size: int) -> None:
        """Write flushed output (`payloads`, `size` bytes in all) to the transport."""
        raise NotImplementedError

    def close_transport(self) -> None:
        raise NotImplementedError

    @property
    def remote(self) -> str:
        """The peer's address, for log lines (asked of the transport, never stored)."""
        raise NotImplementedError

    @property
    def receive_maximum(self) -> int:
        """The device's (5.0): how many QoS 1/2 messages we may have in flight to it."""
        negotiated = self.negotiated
        return negotiated.receive_maximum if negotiated is not None else DEFAULT_RECEIVE_MAXIMUM

    @property
    def connected(self) -> bool:
        return self.state is not None

    @property
    def principal(self) -> Principal | None:
        # The session's: a connection that took it over has the same user.
        return self.state.principal if self.state is not None else None

    @property
    def client_id(self) -> str:
        return self.state.client_id if self.state is not None else ""

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes) -> None:
        if self.closed:
            return
        self.rx_tick = self.server.ticks
        decoder = self.decoder
        try:
            packets = decoder.feed(data)
        except MqttError as exc:
            # The spec has the packets before the fault processed, in order, first.
            packets = exc.packets
        if self.runner is None:
            # Handle at once what needs no waiting (QoS 0 publishes on a broker that can
            # publish without waiting, pings, acks): no task, no coroutine per message.
            done = 0
            for packet in packets:
                if not self._handle_now(packet):
                    break
                done += 1
            if done:
                packets = packets[done:]
            if not packets and decoder.error is None:
                return
        if self.queue is None:
            self.queue = packets  # a fresh list from the decoder: ours to keep
        else:
            self.queue.extend(packets)
        if self.runner is None:
            self.runner = self.node.loop.create_task(self._run())

    def _rate_limited(self) -> bool:
        now = self.node.loop.time()
        bucket = self.bucket
        if bucket is None:
            config = self.node.config.mqtt
            bucket = self.bucket = TokenBucket(
                config.publishes_per_second, config.publish_burst, now
            )
        return bucket.take(now) > 0

    def _handle_now(self, packet: Packet) -> bool:
        """Handle `packet` synchronously if it can be; False when it needs the runner."""
        state = self.state
        if self.closed or state is None:
            return False
        if isinstance(packet, Publish):
            if (
                packet.qos
                or packet.retain
                or packet.properties is not None
                or not self.node.broker.publishes_at_once
            ):
                return False
            return self._publish_now(packet, state)
        if isinstance(packet, PubAck):
            state.acknowledged(packet.packet_id)
            return True
        if isinstance(packet, PingReq):
            self.send_packet(PingResp())
            return True
        return False

    def _publish_now(self, packet: Publish, state: SessionState) -> bool:
        node, topic = self.node, packet.topic
        allowed = self.allowed.get(topic) if self.allowed is not None else None
        if allowed is None:
            return False  # first time on this topic: the full checks, in the runner
        if not allowed:
            node.metrics.errors[int(ReasonCode.NOT_AUTHORIZED)] += 1
            return True  # QoS 0: nothing to answer; dropped and counted like the runner
        if self._rate_limited():
            return True
        node.publish_nowait(
            topic,
            packet.payload,
            user=state.principal.user,
            client=state.client_id,
            source="mqtt",
            meta=_QOS0,
        )
        return True

    async def _run(self) -> None:
        try:
            while self.queue and not self.closed:
                batch, self.queue = self.queue, None
                for packet in batch:
                    if self.closed:
                        break
                    await self._handle(packet)
            if self.decoder.error is not None:
                raise self.decoder.error
        except MqttError as exc:
            self._protocol_failure(exc.reason_code, exc.message)
        except Exception:
            log.exception("mqtt_session_failed", extra={"fields": {"client_id": self.client_id}})
            self._protocol_failure(ReasonCode.UNSPECIFIED_ERROR, "internal error")
        finally:
            self.runner = None

    async def _handle(self, packet: Packet) -> None:
        state = self.state
        if isinstance(packet, Publish):
            await self._publish(packet)
        elif isinstance(packet, PubAck | PubComp):
            if state is not None:
                state.acknowledged(packet.packet_id)
        elif isinstance(packet, PubRec):
            message = state.inflight.get(packet.packet_id) if state is not None else None
            if message is not None and message.qos == 2 and packet.reason_code < 0x80:
                message.released = True
                self.send_packet(PubRel(packet.packet_id))
            elif state is not None:
                state.acknowledged(packet.packet_id)
        elif isinstance(packet, PubRel):
            if state is not None and state.awaiting_release:
                state.awaiting_release.discard(packet.packet_id)
            self.send_packet(PubComp(packet.packet_id))
        elif isinstance(packet, Subscribe):
            await self._subscribe(packet)
        elif isinstance(packet, Unsubscribe):
            await self._unsubscribe(packet)
        elif isinstance(packet, PingReq):
            self.send_packet(PingResp())
        elif isinstance(packet, Connect):
            await self._connect(packet)
        elif isinstance(packet, Disconnect):
            if packet.reason_code != ReasonCode.DISCONNECT_WITH_WILL_MESSAGE:
                self.will = None
            expiry = packet.properties.session_expiry_interval if packet.properties else None
            if state is not None and expiry is not None:
                if state.expiry == 0 and expiry:
                    raise MqttError(ReasonCode.PROTOCOL_ERROR, "session expiry set after 0")
                state.expiry = self._capped_expiry(expiry)
            self.close()
        else:  # AUTH: no enhanced authentication methods are offered
            raise MqttError(ReasonCode.PROTOCOL_ERROR, "AUTH without an authentication method")

    # ------------------------------------------------------------------ connect

    def _capped_expiry(self, wanted: int) -> int:
        cap = self.node.config.mqtt.max_session_expiry
        return min(wanted, cap) if wanted != NEVER_EXPIRES or not cap else cap

    async def _connect(self, packet: Connect) -> None:
        config = self.node.config.mqtt
        self.version = self.decoder.version or 4
        v5 = self.version == MQTT_5
        if self.server.open_connections > config.max_connections:
            self.node.metrics.connections_refused["mqtt_max_connections"] += 1
            self._refuse(ConnectReturnCode.SERVER_UNAVAILABLE, "too many connections; try later")
            return
        principal = self._authenticate(packet)
        if principal is None:
            return
        client_id = packet.client_id
        assigned = ""
        if not client_id:
            if not v5 and not packet.clean_start:
                self._refuse(
                    ConnectReturnCode.IDENTIFIER_REJECTED, "empty client id needs a clean session"
                )
                return
            client_id = assigned = "auto-" + secrets.token_urlsafe(12)
        elif client_id == principal.user:
            client_id = principal.user  # one string, not two: devices often use their id for both
        self.keep_alive = self.server.shared_int(packet.keep_alive)
        server_keep_alive = None
        cap = config.max_keep_alive
        if cap and (not self.keep_alive or self.keep_alive > cap):
            self.keep_alive = server_keep_alive = cap
        self.will = packet.will
        props = packet.properties
        if v5:
            expiry = props.session_expiry_interval or 0 if props is not None else 0
        else:
            expiry = 0 if packet.clean_start else NEVER_EXPIRES
        if props is not None and (
            props.receive_maximum or props.maximum_packet_size or props.topic_alias_maximum
        ):
            negotiated = self.negotiated = _Negotiated()
            if props.receive_maximum:
                negotiated.receive_maximum = props.receive_maximum
            if props.maximum_packet_size:
                negotiated.max_packet = props.maximum_packet_size
            if props.topic_alias_maximum:
                negotiated.alias_maximum = props.topic_alias_maximum
        # Only now, authenticated, may this connection touch an existing session, and only
        # one of its own user: a token for someone else must not kick or wipe theirs.
        capped = self._capped_expiry(expiry)
        try:
            taken = await self.server.take(client_id, principal, packet.clean_start, capped > 0)
        except BrokerUnavailable as exc:
            event(log, "mqtt_session_store_unavailable", logging.WARNING, error=str(exc))
            self._refuse(ConnectReturnCode.SERVER_UNAVAILABLE, "sessions unavailable; try later")
            return
        if taken is None:
            self._refuse(ConnectReturnCode.IDENTIFIER_REJECTED, "client id in use by another user")
            return
        state, present = taken
        state.expiry = capped
        if self.closed:  # the socket went while the session was fetched
            state.detach(None)
            return
        self.state = state
        self.server.connecting.pop(self, None)
        ack_props = None
        if v5:
            ack_props = Properties(
                receive_maximum=config.receive_maximum,
                maximum_packet_size=config.max_packet_size,
                topic_alias_maximum=config.topic_alias_maximum,
                retain_available=1,
                wildcard_subscription_available=1,
                subscription_identifier_available=1,
                shared_subscription_available=1,
            )
            if assigned:
                ack_props.assigned_client_identifier = assigned
            if server_keep_alive is not None:
                ack_props.server_keep_alive = server_keep_alive
            if state.expiry != expiry:
                ack_props.session_expiry_interval = state.expiry
        self.send_packet(ConnAck(session_present=present, reason_code=0, properties=ack_props))
        state.resume(self)
        self.node.presence.user_connected(principal.user)
        self.node.metrics.connections_accepted += 1
        event(
            log,
            "mqtt_connected",
            logging.DEBUG,
            client_id=client_id,
            user=principal.user,
            version=self.version,
            resumed=present,
            remote=self.remote,
        )

    def _authenticate(self, packet: Connect) -> Principal | None:
        node = self.node
        if packet.password:
            try:
                return node.verifier.verify(packet.password.decode(errors="replace"))
            except AuthError as exc:
                node.metrics.connections_refused["mqtt_token"] += 1
                self._refuse(ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD, str(exc))
                return None
        if node.config.mqtt.allow_anonymous:
            return Principal(user=f"anonymous:{packet.client_id or 'device'}")
        node.metrics.connections_refused["mqtt_anonymous"] += 1
        self._refuse(ConnectReturnCode.NOT_AUTHORIZED, "a token is required as the password")
        return None

    def _refuse(self, code: ConnectReturnCode, reason: str) -> None:
        v5_codes = {
            ConnectReturnCode.IDENTIFIER_REJECTED: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
            ConnectReturnCode.BAD_USER_NAME_OR_PASSWORD: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
            ConnectReturnCode.NOT_AUTHORIZED: ReasonCode.NOT_AUTHORIZED,
            ConnectReturnCode.SERVER_UNAVAILABLE: ReasonCode.SERVER_BUSY,
        }
        if self.version == MQTT_5:
            props = Properties(reason_string=reason[:100])
            self.send_packet(ConnAck(reason_code=v5_codes[code], properties=props))
        else:
            self.send_packet(ConnAck(reason_code=code))
        event(log, "mqtt_refused", logging.INFO, remote=self.remote, reason=reason)
        self.will = None
        self.close()

    # ------------------------------------------------------------------ publish in

    async def _publish(self, packet: Publish) -> None:
        state = self.state
        assert state is not None
        topic = packet.topic
        props = packet.properties
        if props is not None and props.topic_alias is not None:
            alias = props.topic_alias
            if not 0 < alias <= self.node.config.mqtt.topic_alias_maximum:
                raise MqttError(ReasonCode.TOPIC_ALIAS_INVALID, f"topic alias {alias}")
            negotiated = self.negotiated
            if negotiated is None:
                negotiated = self.negotiated = _Negotiated()
            if topic:
                negotiated.inbound_aliases[alias] = topic
            else:
                known = negotiated.inbound_aliases.get(alias)
                if known is None:
                    raise MqttError(ReasonCode.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                topic = known
            props.topic_alias = None
        qos = packet.qos
        v5 = self.version == MQTT_5
        awaiting = state.awaiting_release
        if qos == 2 and awaiting is not None and packet.packet_id in awaiting:
            self.send_packet(PubRec(packet.packet_id))  # a re-sent QoS 2 PUBLISH: already taken
            return
        if qos == 2 and awaiting and len(awaiting) >= self.node.config.mqtt.receive_maximum:
            raise MqttError(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED, "too many unacknowledged")
        code = await self._accept_publication(topic, packet, props)
        if qos == 1:
            self.send_packet(PubAck(packet.packet_id, code if v5 else 0))
        elif qos == 2:
            if code < 0x80:
                if state.awaiting_release is None:
                    state.awaiting_release = set()
                state.awaiting_release.add(packet.packet_id)
            self.send_packet(PubRec(packet.packet_id, code if v5 else 0))

    async def _accept_publication(
        self, topic: str, packet: Publish, props: Properties | None
    ) -> int:
        """Publish into the hub; returns the 5.0 reason code for the acknowledgement."""
        node, principal = self.node, self.principal
        assert principal is not None
        cache = self.allowed
        if cache is None:
            cache = self.allowed = {}
        allowed = cache.get(topic)
        if allowed is None:
            if channel_error(topic) is not None:
                return ReasonCode.TOPIC_NAME_INVALID
            allowed = node.may_publish(principal, topic)
            if len(cache) >= 256:
                cache.clear()
            cache[topic] = allowed
        if not allowed:
            # 3.1.1 cannot say no to a PUBLISH: count it, so refusals are visible.
            node.metrics.errors[int(ReasonCode.NOT_AUTHORIZED)] += 1
            return ReasonCode.NOT_AUTHORIZED
        if self._rate_limited():
            return ReasonCode.QUOTA_EXCEEDED
        if props is not None and props.payload_format_indicator == 1:
            try:
                packet.payload.decode()
            except UnicodeDecodeError:
                return ReasonCode.PAYLOAD_FORMAT_INVALID
        meta = MqttMeta(packet.qos, packet.retain, props)
        user = principal.user
        try:
            await node.publish(
                topic, packet.payload, user=user, client=self.client_id, source="mqtt", meta=meta
            )
            if packet.retain:
                pub = Publication(0, packet.payload, user, self.client_id, None, meta)
                await node.broker.set_retained(topic, pub)
        except BrokerUnavailable:
            return ReasonCode.SERVER_UNAVAILABLE
        return ReasonCode.SUCCESS

    # ------------------------------------------------------------------ subscribe

    async def _subscribe(self, packet: Subscribe) -> None:
        node, config = self.node, self.node.config.mqtt
        state, principal = self.state, self.principal
        assert state is not None and principal is not None
        v5 = self.version == MQTT_5
        identifiers = packet.properties.subscription_identifiers if packet.properties else []
        identifier = identifiers[0] if identifiers else None
        codes: list[int] = []
        retained_for: list[tuple[str, SubscriptionValue]] = []
        for topic_filter, options in packet.subscriptions:
            shared = split_shared(topic_filter)
            target = shared[1] if shared is not None else topic_filter
            if shared is not None and (not shared[0] or not target):
                codes.append(ReasonCode.TOPIC_FILTER_INVALID if v5 else 0x80)
                continue
            if not node.may_subscribe_filter(principal, target):
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)
                continue
            existed = topic_filter in state.subscriptions
            if not existed and len(state.subscriptions) >= config.max_subscriptions:
                codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else 0x80)
                continue
            if shared is not None and options.no_local:
                raise MqttError(ReasonCode.PROTOCOL_ERROR, "no local on a shared subscription")
            value = subscription_value(options, identifier)
            if not existed:
                state.subscriptions += (topic_filter,)
            codes.append(options.qos)
            if shared is not None:
                await self.server.join_group(shared[0], target, state, value)
                continue  # no retained messages on a shared subscribe
            node.hub.add_filter(topic_filter, state, value)
            if not existed:
                await node.subscribe_filter(topic_filter)
                if is_exact(topic_filter):  # a device is present where it subscribed exactly
                    await node.presence_join(topic_filter, state.presence_entry())
            if options.retain_handling == 0 or (options.retain_handling == 1 and not existed):
                retained_for.append((topic_filter, value))
        self.send_packet(SubAck(packet.packet_id, codes))
        if self.server.sync is not None:
            self.server.sync.changed(state)
        for topic_filter, value in retained_for:
            ids = [value.identifier] if value.identifier else []
            for channel, pub in await node.broker.retained(topic_filter):
                # ACLs apply to retained messages too, topic by topic.
                if node.may_subscribe(principal, channel):
                    meta = pub.meta
                    qos = meta.qos if isinstance(meta, MqttMeta) else NON_MQTT_QOS
                    state.send(channel, pub, min(qos, value.options.qos), True, ids)

    async def _unsubscribe(self, packet: Unsubscribe) -> None:
        state = self.state
        assert state is not None
        codes: list[int] = []
        for topic_filter in packet.topic_filters:
            if topic_filter not in state.subscriptions:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            state.subscriptions = tuple(f for f in state.subscriptions if f != topic_filter)
            await self.server.drop_subscription(state, topic_filter)
            codes.append(ReasonCode.SUCCESS)
        self.send_packet(UnsubAck(packet.packet_id, codes if self.version == MQTT_5 else []))
        if self.server.sync is not None:
            self.server.sync.changed(state)

    # ------------------------------------------------------------------ output

    def send_packet(self, packet: Packet) -> None:
        if not self.closed:
            self.push(encode(packet, self.version))

    def push_raw(self, packet: bytes) -> None:
        negotiated = self.negotiated
        if not self.closed and (negotiated is None or len(packet) <= negotiated.max_packet):
            self.push(packet)

    def write_publish(
        self,
        channel: str,
        data: bytes,
        qos: int,
        retain: bool,
        packet_id: int,
        props: Properties | None,
        dup: bool = False,
    ) -> None:
        if self.closed:
            return
        topic = channel
        negotiated = self.negotiated
        if negotiated is not None and negotiated.alias_maximum:
            topic, props = self._aliased(negotiated, channel, props)
        packet = encode_publish(topic, data, qos, retain, dup, packet_id, self.version, props)
        # 5.0: never above the device's maximum
        if negotiated is None or len(packet) <= negotiated.max_packet:
            self.push(packet)

    @staticmethod
    def _aliased(
        negotiated: _Negotiated, channel: str, props: Properties | None
    ) -> tuple[str, Properties | None]:
        """5.0 outbound topic alias: the topic once, then only its number."""
        outbound = negotiated.outbound_aliases
        alias = outbound.get(channel)
        known = alias is not None
        if alias is None:
            if len(outbound) >= negotiated.alias_maximum:
                return channel, props
            alias = outbound[channel] = len(outbound) + 1
        aliased = Properties() if props is None else copy.copy(props)
        aliased.topic_alias = alias
        return ("" if known else channel), aliased

    def write_message(self, message: Message, packet_id: int, dup: bool = False) -> None:
        props = message.props if self.version == MQTT_5 else None
        self.write_publish(
            message.channel, message.data, message.qos, message.retain, packet_id, props, dup
        )

    # ------------------------------------------------------------------ end

    def _protocol_failure(self, code: ReasonCode, message: str) -> None:
        """A malformed packet or a protocol violation: 5.0 says why, then the end."""
        if self.closed:
            return
        if self.connected and self.version == MQTT_5:
            self.send_packet(Disconnect(code, Properties(reason_string=message[:100])))
        elif not self.connected and code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            self.send_packet(ConnAck(reason_code=ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION))
        event(
            log,
            "mqtt_protocol_error",
            logging.INFO,
            client_id=self.client_id,
            remote=self.remote,
            reason=message,
            code=int(code),
        )
        self.close()

    def disconnect(self, code: ReasonCode, reason: str) -> None:
        """Server-initiated end (takeover, shutdown, keep-alive, slow reader)."""
        if self.closed:
            return
        if self.version == MQTT_5 and self.connected:
            self.send_packet(Disconnect(code, Properties(reason_string=reason[:100])))
        self.close()

    def close(self) -> None:
        """Flush what is queued and close; the session and will follow in `ended`."""
        if self.closed:
            return
        self.flush_now()
        self.closed = True
        self.close_transport()

    def overflowed(self) -> None:
        # A slow reader: its output is dropped already; close at the next tick, not in the
        # middle of a fan-out.
        self.node.loop.call_soon(self.close_transport)

    def ended(self) -> None:
        """The transport is gone (closed by either side)."""
        self.closed = True
        if self.runner is not None:
            self.runner.cancel()
        self.server.detach(self)
        state = self.state
        if state is not None:
            self.node.presence.user_disconnected(state.principal.user)
            if state.connection is self:
                state.detach(self.will)


class MqttServer:
    """The node's MQTT sessions by client id: takeover, expiry, wills, keep-alive."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.sessions: dict[str, SessionState] = {}
        # Connections before their CONNECT is accepted (a dict, not a set: less than half the
        # memory per entry); the others are found through their sessions.
        self.connecting: dict[MqttConnection, None] = {}
        self.open_connections = 0
        # Seconds, counted by `tick`. A connection notes the count at its last packet: an int
        # shared by every connection heard from in the same second, where a time of its own
        # would be a float per connection (idle memory counts).
        self.ticks = 0
        self._ints: dict[int, int] = {}
        self.groups: dict[tuple[str, str], SharedGroup] = {}
        # One publication's QoS 0 packets, per version, while the hub fans it out.
        self._cached: Publication | None = None
        self._cached_packets: dict[int, bytes] = {}
        # Sessions in the broker's store, for a multi-node broker (set by the listener).
        self.sync: SessionSync | None = None
        node.mqtt = self
        node.tickers.append(self.tick)
        node.metrics.gauge(
            "mqtt_connections", "Open MQTT connections.", lambda: self.open_connections
        )
        node.metrics.gauge(
            "mqtt_sessions", "MQTT sessions, connected or kept.", lambda: len(self.sessions)
        )

    def shared_int(self, value: int) -> int:
        """`value`, as one object per value for up to 1,024 values (keep-alives: devices
        use a handful, and an int above 256 is 32 bytes of each connection's memory)."""
        ints = self._ints
        shared = ints.get(value)
        if shared is None:
            if len(ints) >= 1024:
                return value
            shared = ints[value] = value
        return shared

    def attach(self, connection: MqttConnection) -> None:
        self.open_connections += 1
        self.connecting[connection] = None

    def detach(self, connection: MqttConnection) -> None:
        """The connection is gone (`attach` was called for it, once)."""
        self.open_connections -= 1
        self.connecting.pop(connection, None)

    async def take(
        self, client_id: str, principal: Principal, clean_start: bool, persistent: bool
    ) -> tuple[SessionState, bool] | None:
        """The session for an authenticated CONNECT: (state, session present), or None
        when the client id is another user's. Raises BrokerUnavailable when the session
        store cannot be reached for a session that must be kept."""
        state = self.sessions.get(client_id)
        if state is not None and state.principal.user != principal.user:
            return None
        sync = self.sync
        claim = None
        if sync is not None:
            try:
                claim = await sync.claim(client_id, principal)
            except BrokerUnavailable:
                if persistent or not clean_start:
                    raise
                # A throwaway session needs nothing stored: the device may connect.
            else:
                if claim is None:
                    return None
            state = self.sessions.get(client_id)  # while we waited
        if state is not None:
            self.close_for_takeover(state)
            if clean_start:
                await self._discard(state)
                state = None
        if state is not None:
            state.principal = principal
            return state, True
        state = SessionState(self, client_id, principal)
        self.sessions[client_id] = state
        if sync is None or claim is None or not claim.owner:
            return state, False
        # Another node has (or had) it.
        if clean_start:
            await sync.take_from(claim.owner, client_id)
            return state, False
        await sync.subscribe(state, claim.subscriptions)
        await sync.take_from(claim.owner, client_id)
        present = await sync.load(state)
        return state, present or claim.exists

    def close_for_takeover(self, state: SessionState) -> None:
        """A new connection takes the session: the old one ends (its will per the rules)."""
        old = state.connection
        if old is None:
            return
        event(log, "mqtt_session_taken_over", logging.INFO, client_id=state.client_id)
        state.connection = None  # the old connection must not detach it
        will = old.will
        old.will = None
        old.disconnect(ReasonCode.SESSION_TAKEN_OVER, "another connection took over")
        # 5.0: a will with a delay is not sent when the session goes on right away.
        if will is not None and not (will.properties and will.properties.will_delay_interval):
            self.publish_will(state, will)

    async def forget(self, state: SessionState) -> None:
        """Drop the session here without ending it: another node carries on with it."""
        if self.sessions.get(state.client_id) is state:
            del self.sessions[state.client_id]
        for topic_filter in state.subscriptions:
            await self.drop_subscription(state, topic_filter)
        state.subscriptions = ()
        state.pending = None
        state.inflight = _NO_MESSAGES

    def disconnect_user(self, user: str, reason: str) -> int:
        """Close every connection of `user`'s devices; how many."""
        connections = [
            state.connection
            for state in self.sessions.values()
            if state.connection is not None and state.principal.user == user
        ]
        for connection in connections:
            connection.disconnect(ReasonCode.ADMINISTRATIVE_ACTION, reason)
        return len(connections)

    def qos0_packet(self, channel: str, pub: Publication, version: int) -> bytes:
        if self._cached is not pub:
            self._cached = pub
            self._cached_packets = {}
        packet = self._cached_packets.get(version)
        if packet is None:
            packet = encode_publish(channel, pub.data, 0, False, False, 0, version)
            self._cached_packets[version] = packet
        return packet

    async def join_group(
        self, name: str, topic_filter: str, state: SessionState, value: SubscriptionValue
    ) -> None:
        group = self.groups.get((name, topic_filter))
        if group is None:
            group = self.groups[(name, topic_filter)] = SharedGroup(name, topic_filter)
            self.node.hub.add_filter(topic_filter, group, None)
            await self.node.subscribe_filter(topic_filter)
        group.members[state] = value

    async def drop_subscription(self, state: SessionState, topic_filter: str) -> None:
        shared = split_shared(topic_filter)
        if shared is None:
            self.node.hub.remove_filter(topic_filter, state)
            if is_exact(topic_filter):
                self.node.presence_leave(topic_filter, state.client_id)
            await self.node.unsubscribe_filter(topic_filter)
            return
        group = self.groups.get(shared)
        if group is None:
            return
        group.members.pop(state, None)
        if not group.members:
            del self.groups[shared]
            self.node.hub.remove_filter(group.topic_filter, group)
            await self.node.unsubscribe_filter(group.topic_filter)

    def end(self, state: SessionState) -> None:
        self.node.loop.create_task(self._discard(state))

    async def _discard(self, state: SessionState) -> None:
        if self.sessions.get(state.client_id) is state:
            del self.sessions[state.client_id]
            if self.sync is not None:
                self.sync.ended(state.client_id)
        if state.delayed_will is not None:  # the session ends before the will delay: publish now
            will, timer = state.delayed_will
            timer.cancel()
            state.delayed_will = None
            self.publish_will(state, will)
        for topic_filter in state.subscriptions:
            await self.drop_subscription(state, topic_filter)
        state.subscriptions = ()
        state.pending = None
        state.inflight = _NO_MESSAGES

    def publish_will(self, state: SessionState, will: Will) -> None:
        self.node.loop.create_task(self._publish_will(state, will))

    async def _publish_will(self, state: SessionState, will: Will) -> None:
        node, principal = self.node, state.principal
        if channel_error(will.topic) or not node.may_publish(principal, will.topic):
            return
        meta = MqttMeta(will.qos, will.retain, will.properties)
        try:
            await node.publish(
                will.topic,
                will.payload,
                user=principal.user,
                client=state.client_id,
                source="mqtt_will",
                meta=meta,
            )
            if will.retain:
                pub = Publication(0, will.payload, principal.user, state.client_id, None, meta)
                await node.broker.set_retained(will.topic, pub)
        except BrokerUnavailable:
            log.warning("mqtt_will_lost", extra={"fields": {"client_id": state.client_id}})
            return
        event(log, "mqtt_will_published", logging.DEBUG, client_id=state.client_id)

    def tick(self, now: float) -> None:
        deadline = self.node.config.client.connect_timeout
        self.ticks += 1
        ticks = self.ticks
        # A connection's last bytes came after tick `rx_tick`, and ticks are at least a second
        # apart: `ticks - rx_tick - 1` is a lower bound of its silence in seconds.
        for late in [c for c in self.connecting if ticks - c.rx_tick - 1 > deadline]:
            late.close()
        silent: list[MqttConnection] = []
        expired: list[SessionState] = []
        for state in self.sessions.values():
            connection = state.connection
            if connection is None:
                if state.expires_at and state.expires_at <= now:
                    expired.append(state)
            elif (
                connection.keep_alive
                and ticks - connection.rx_tick - 1 > 1.5 * connection.keep_alive
            ):
                silent.append(connection)
        for connection in silent:
            connection.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep-alive expired")
        for state in expired:
            self.end(state)
        if self.sync is not None:
            self.sync.tick(now)

    def shutdown(self) -> None:
        """Drain: 5.0 devices are told why; their connections end (wills per the spec)."""
        connections = list(self.connecting)
        for state in self.sessions.values():
            if state.connection is not None:
                connections.append(state.connection)
        for connection in connections:
            connection.disconnect(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down")
