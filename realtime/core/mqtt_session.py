"""MQTT 3.1.1 / 5.0 sessions in the hub: devices and WebSocket apps share channels.

An MQTT topic is a channel name. A device's subscriptions are filter subscriptions in the
hub (`+` and `#` allowed), so it receives WebSocket, server-API and MQTT publications alike;
its publications go through `Node.publish` like everyone else's, with history and positions
where the namespace keeps them.

Protocol rules kept here (the codec in `realtime.mqtt` checks the bytes):

- the JWT is the CONNECT password; a second CONNECT with the same client id takes the
  session over only after it authenticated;
- ACLs on subscribe (the token must cover the whole filter), on publish, on the will, and
  on every retained message delivered;
- QoS 0/1/2 both ways, delivered at min(publication QoS, granted QoS); publications from
  WebSocket or the server API count as QoS 1;
- last will on every abnormal end (keep-alive expiry included), after the 5.0 will delay;
- keep-alive enforced at 1.5x.

Not yet (issue #3 continues): persistent sessions and offline queues (clean_start=false is
served as a new session each time, session_present=0), shared subscriptions (refused with
0x9E), outbound topic aliases, message expiry, TLS and MQTT over WebSocket.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from typing import TYPE_CHECKING, Protocol

from realtime.auth import AuthError, Principal
from realtime.core.broker import BrokerUnavailable, Publication
from realtime.core.ratelimit import TokenBucket
from realtime.core.topics import channel_error
from realtime.core.writer import Outbound, Sink
from realtime.log import event
from realtime.mqtt.codec import PacketDecoder, encode, encode_publish
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
    from realtime.core.node import Node

log = logging.getLogger("realtime.mqtt")

# Publications from WebSocket clients and the server API reach devices at this QoS at most.
NON_MQTT_QOS = 1


class MqttMeta:
    """What an MQTT publication carries besides its payload (Publication.meta)."""

    __slots__ = ("properties", "qos", "retain")

    def __init__(self, qos: int, retain: bool, properties: Properties | None) -> None:
        self.qos = qos
        self.retain = retain
        self.properties = properties


class SubscriptionValue:
    """One subscription of a session, as stored in the hub's filter trie."""

    __slots__ = ("identifier", "options")

    def __init__(self, options: SubscriptionOptions, identifier: int | None) -> None:
        self.options = options
        self.identifier = identifier


class MqttTransport(Sink, Protocol):
    def close(self) -> None: ...


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


class MqttSession:
    __slots__ = (
        "_acks",
        "bucket",
        "client_id",
        "closed",
        "connected",
        "decoder",
        "failure",
        "inbound_aliases",
        "inflight",
        "keep_alive",
        "last_rx",
        "max_outgoing_packet",
        "next_packet_id",
        "node",
        "outbound",
        "pending",
        "principal",
        "queue",
        "receive_maximum",
        "remote",
        "runner",
        "server",
        "session_expiry",
        "subscriptions",
        "transport",
        "version",
        "will",
    )

    def __init__(self, server: MqttServer, transport: MqttTransport, remote: str) -> None:
        node = server.node
        config = node.config.mqtt
        self.server = server
        self.node = node
        self.transport = transport
        self.remote = remote
        self.decoder = PacketDecoder(server=True, max_packet_size=config.max_packet_size)
        self.outbound = Outbound(
            transport, node.flusher, node.config.limits.max_queue_bytes, self._on_overflow
        )
        self.version = 4
        self.client_id = ""
        self.principal: Principal | None = None
        self.connected = False
        self.closed = False
        self.keep_alive = 0
        self.will: Will | None = None  # cleared by a normal DISCONNECT
        self.session_expiry = 0
        self.last_rx = node.loop.time()
        self.subscriptions: dict[str, SubscriptionValue] = {}
        self.inbound_aliases: dict[int, str] = {}
        self.inflight: dict[int, int] = {}  # outbound packet id -> QoS (2: until PUBCOMP)
        self._acks: set[int] = set()  # inbound QoS 2 ids awaiting PUBREL
        # QoS 1/2 deliveries waiting for the device's receive maximum.
        self.pending: deque[tuple[str, Publication, int, Properties | None]] = deque()
        self.next_packet_id = 1
        self.receive_maximum = config.receive_maximum
        self.max_outgoing_packet = 268_435_460
        self.bucket = TokenBucket(config.publishes_per_second, config.publish_burst, self.last_rx)
        self.queue: list[Packet] = []
        self.runner: asyncio.Task[None] | None = None
        # A decoding error, acted on after the packets that came before it.
        self.failure: MqttError | None = None

    # ------------------------------------------------------------------ input

    def receive(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = self.node.loop.time()
        try:
            packets = self.decoder.feed(data)
        except MqttError as exc:
            # The spec has the packets before the fault processed, in order, first.
            packets = exc.packets
            self.failure = exc
        self.queue.extend(packets)
        if self.runner is None:
            self.runner = self.node.loop.create_task(self._run())

    async def _run(self) -> None:
        try:
            while self.queue and not self.closed:
                batch, self.queue = self.queue, []
                for packet in batch:
                    if self.closed:
                        break
                    await self._handle(packet)
            if self.failure is not None:
                raise self.failure
        except MqttError as exc:
            self._protocol_failure(exc.reason_code, exc.message)
        except Exception:
            log.exception("mqtt_session_failed", extra={"fields": {"client_id": self.client_id}})
            self._protocol_failure(ReasonCode.UNSPECIFIED_ERROR, "internal error")
        finally:
            self.runner = None

    async def _handle(self, packet: Packet) -> None:
        if isinstance(packet, Publish):
            await self._publish(packet)
        elif isinstance(packet, PubAck | PubComp):
            self._acked(packet.packet_id)
        elif isinstance(packet, PubRec):
            if self.inflight.get(packet.packet_id) == 2 and packet.reason_code < 0x80:
                self._send(PubRel(packet.packet_id))
            else:
                self._acked(packet.packet_id)
        elif isinstance(packet, PubRel):
            self._acks.discard(packet.packet_id)
            self._send(PubComp(packet.packet_id))
        elif isinstance(packet, Subscribe):
            await self._subscribe(packet)
        elif isinstance(packet, Unsubscribe):
            await self._unsubscribe(packet)
        elif isinstance(packet, PingReq):
            self._send(PingResp())
        elif isinstance(packet, Connect):
            await self._connect(packet)
        elif isinstance(packet, Disconnect):
            if packet.reason_code != ReasonCode.DISCONNECT_WITH_WILL_MESSAGE:
                self.will = None
            self.close()
        else:  # AUTH: no enhanced authentication methods are offered
            raise MqttError(ReasonCode.PROTOCOL_ERROR, "AUTH without an authentication method")

    # ------------------------------------------------------------------ connect

    async def _connect(self, packet: Connect) -> None:
        node, config = self.node, self.node.config.mqtt
        self.version = self.decoder.version or 4
        v5 = self.version == MQTT_5
        principal = await self._authenticate(packet)
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
        self.client_id = client_id
        self.principal = principal
        self.keep_alive = packet.keep_alive
        server_keep_alive = None
        if config.max_keep_alive and (
            not self.keep_alive or self.keep_alive > config.max_keep_alive
        ):
            self.keep_alive = server_keep_alive = config.max_keep_alive
        self.will = packet.will
        props = packet.properties
        if props is not None:
            if props.receive_maximum:
                self.receive_maximum = min(self.receive_maximum, props.receive_maximum)
            if props.maximum_packet_size:
                self.max_outgoing_packet = props.maximum_packet_size
            self.session_expiry = props.session_expiry_interval or 0
        self.server.register(self)  # takes over an existing session of this client id
        self.connected = True
        ack_props = None
        if v5:
            ack_props = Properties(
                receive_maximum=config.receive_maximum,
                maximum_packet_size=config.max_packet_size,
                topic_alias_maximum=config.topic_alias_maximum,
                retain_available=1,
                wildcard_subscription_available=1,
                subscription_identifier_available=1,
                shared_subscription_available=0,
            )
            if assigned:
                ack_props.assigned_client_identifier = assigned
            if server_keep_alive is not None:
                ack_props.server_keep_alive = server_keep_alive
        self._send(ConnAck(session_present=False, reason_code=0, properties=ack_props))
        node.metrics.connections_accepted += 1
        event(
            log,
            "mqtt_connected",
            logging.DEBUG,
            client_id=client_id,
            user=principal.user,
            version=self.version,
            remote=self.remote,
        )

    async def _authenticate(self, packet: Connect) -> Principal | None:
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
        }
        if self.version == MQTT_5:
            props = Properties(reason_string=reason[:100])
            self._send(ConnAck(reason_code=v5_codes[code], properties=props))
        else:
            self._send(ConnAck(reason_code=code))
        event(log, "mqtt_refused", logging.INFO, remote=self.remote, reason=reason)
        self.will = None
        self.close()

    # ------------------------------------------------------------------ publish in

    async def _publish(self, packet: Publish) -> None:
        topic = packet.topic
        props = packet.properties
        v5 = self.version == MQTT_5
        if props is not None and props.topic_alias is not None:
            alias = props.topic_alias
            if not 0 < alias <= self.node.config.mqtt.topic_alias_maximum:
                raise MqttError(ReasonCode.TOPIC_ALIAS_INVALID, f"topic alias {alias}")
            if topic:
                self.inbound_aliases[alias] = topic
            else:
                known = self.inbound_aliases.get(alias)
                if known is None:
                    raise MqttError(ReasonCode.PROTOCOL_ERROR, f"unknown topic alias {alias}")
                topic = known
            props.topic_alias = None
        qos = packet.qos
        if qos == 2 and packet.packet_id in self._acks:
            self._send(PubRec(packet.packet_id))  # a re-sent QoS 2 PUBLISH: already taken
            return
        if qos and len(self._acks) + (qos == 1) > self.node.config.mqtt.receive_maximum:
            raise MqttError(ReasonCode.RECEIVE_MAXIMUM_EXCEEDED, "too many unacknowledged")
        code = await self._accept_publication(topic, packet, props)
        if qos == 1:
            self._send(PubAck(packet.packet_id, code if v5 else 0))
        elif qos == 2:
            if code < 0x80:
                self._acks.add(packet.packet_id)
            self._send(PubRec(packet.packet_id, code if v5 else 0))

    async def _accept_publication(
        self, topic: str, packet: Publish, props: Properties | None
    ) -> int:
        """Publish into the hub; returns the 5.0 reason code for the acknowledgement."""
        node = self.node
        assert self.principal is not None
        if channel_error(topic) is not None:
            return ReasonCode.TOPIC_NAME_INVALID
        if not node.may_publish(self.principal, topic):
            return ReasonCode.NOT_AUTHORIZED
        if self.bucket.take(node.loop.time()):
            return ReasonCode.QUOTA_EXCEEDED
        if props is not None and props.payload_format_indicator == 1:
            try:
                packet.payload.decode()
            except UnicodeDecodeError:
                return ReasonCode.PAYLOAD_FORMAT_INVALID
        meta = MqttMeta(packet.qos, packet.retain, props)
        try:
            await node.publish(
                topic,
                packet.payload,
                user=self.principal.user,
                client=self.client_id,
                source="mqtt",
                meta=meta,
            )
            if packet.retain:
                pub = Publication(
                    0, packet.payload, self.principal.user, self.client_id, None, meta
                )
                await node.broker.set_retained(topic, pub)
        except BrokerUnavailable:
            return ReasonCode.SERVER_UNAVAILABLE
        return ReasonCode.SUCCESS

    # ------------------------------------------------------------------ subscribe

    async def _subscribe(self, packet: Subscribe) -> None:
        node, config = self.node, self.node.config.mqtt
        assert self.principal is not None
        v5 = self.version == MQTT_5
        identifiers = packet.properties.subscription_identifiers if packet.properties else []
        identifier = identifiers[0] if identifiers else None
        codes: list[int] = []
        retained_for: list[tuple[str, SubscriptionValue]] = []
        for topic_filter, options in packet.subscriptions:
            if v5 and split_shared(topic_filter) is not None:
                codes.append(ReasonCode.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED)
                continue
            if not node.may_subscribe_filter(self.principal, topic_filter):
                codes.append(ReasonCode.NOT_AUTHORIZED if v5 else 0x80)
                continue
            existed = topic_filter in self.subscriptions
            if not existed and len(self.subscriptions) >= config.max_subscriptions:
                codes.append(ReasonCode.QUOTA_EXCEEDED if v5 else 0x80)
                continue
            value = SubscriptionValue(options, identifier)
            self.subscriptions[topic_filter] = value
            node.hub.add_filter(topic_filter, self, value)
            if not existed:
                await node.subscribe_filter(topic_filter)
            codes.append(options.qos)
            if options.retain_handling == 0 or (options.retain_handling == 1 and not existed):
                retained_for.append((topic_filter, value))
        self._send(SubAck(packet.packet_id, codes))
        for topic_filter, value in retained_for:
            for channel, pub in await node.broker.retained(topic_filter):
                # ACLs apply to retained messages too, topic by topic.
                if self.principal is not None and node.may_subscribe(self.principal, channel):
                    self._deliver(
                        channel,
                        pub,
                        value.options.qos,
                        retain=True,
                        identifiers=[value.identifier] if value.identifier else [],
                    )

    async def _unsubscribe(self, packet: Unsubscribe) -> None:
        codes: list[int] = []
        for topic_filter in packet.topic_filters:
            if self.subscriptions.pop(topic_filter, None) is None:
                codes.append(ReasonCode.NO_SUBSCRIPTION_EXISTED)
                continue
            self.node.hub.remove_filter(topic_filter, self)
            await self.node.unsubscribe_filter(topic_filter)
            codes.append(ReasonCode.SUCCESS)
        self._send(UnsubAck(packet.packet_id, codes if self.version == MQTT_5 else []))

    # ------------------------------------------------------------------ delivery out

    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        """From the hub: one publication, with every subscription of ours it matched."""
        if not self.connected:
            return
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
        if granted < 0:
            return
        self._deliver(channel, pub, min(granted, source_qos), retain, identifiers)

    def _deliver(
        self, channel: str, pub: Publication, qos: int, retain: bool, identifiers: list[int]
    ) -> None:
        props = _forwarded_properties(pub.meta, identifiers) if self.version == MQTT_5 else None
        if qos == 0:
            packet = encode_publish(channel, pub.data, 0, retain, False, 0, self.version, props)
            if len(packet) <= self.max_outgoing_packet:
                self.outbound.push(packet)
            return
        if len(self.inflight) >= self.receive_maximum:
            if len(self.pending) >= self.node.config.mqtt.max_queued_messages:
                self.node.metrics.errors[int(ReasonCode.QUOTA_EXCEEDED)] += 1
                return  # dropped: the device is not acknowledging (counted)
            self.pending.append((channel, pub, qos, props))
            return
        self._send_qos(channel, pub.data, qos, retain, props)

    def _send_qos(
        self, channel: str, data: bytes, qos: int, retain: bool, props: Properties | None
    ) -> None:
        packet_id = self._packet_id()
        packet = encode_publish(channel, data, qos, retain, False, packet_id, self.version, props)
        if len(packet) > self.max_outgoing_packet:
            return
        self.inflight[packet_id] = qos
        self.outbound.push(packet)

    def _packet_id(self) -> int:
        packet_id = self.next_packet_id
        while packet_id in self.inflight:
            packet_id = packet_id % 65535 + 1
        self.next_packet_id = packet_id % 65535 + 1
        return packet_id

    def _acked(self, packet_id: int) -> None:
        if self.inflight.pop(packet_id, None) is None:
            return
        while self.pending and len(self.inflight) < self.receive_maximum:
            item = self.pending.popleft()
            if isinstance(item, tuple):
                channel, pub, qos, props = item
                self._send_qos(channel, pub.data, qos, False, props)

    # ------------------------------------------------------------------ output and end

    def _send(self, packet: Packet) -> None:
        if not self.closed:
            self.outbound.push(encode(packet, self.version))

    def _protocol_failure(self, code: ReasonCode, message: str) -> None:
        """A malformed packet or a protocol violation: 5.0 says why, then the end."""
        if self.closed:
            return
        if self.connected and self.version == MQTT_5:
            self._send(Disconnect(code, Properties(reason_string=message[:100])))
        elif not self.connected and code == ReasonCode.UNSUPPORTED_PROTOCOL_VERSION:
            self._send(ConnAck(reason_code=ConnectReturnCode.UNACCEPTABLE_PROTOCOL_VERSION))
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
        """Server-initiated end (takeover, shutdown, keep-alive)."""
        if self.closed:
            return
        if self.version == MQTT_5 and self.connected:
            self._send(Disconnect(code, Properties(reason_string=reason[:100])))
        self.close()

    def close(self) -> None:
        """Flush what is queued and close; the will (if still set) follows in _end."""
        if self.closed:
            return
        self.outbound.flush_now()
        self.closed = True
        self.outbound.closed = True
        self.transport.close()

    def _on_overflow(self) -> None:
        self.node.loop.call_soon(self.disconnect, ReasonCode.QUOTA_EXCEEDED, "slow consumer")

    def connection_lost(self) -> None:
        self.closed = True
        self.outbound.closed = True
        self.server.unregister(self)
        self.node.loop.create_task(self._end())

    async def _end(self) -> None:
        node = self.node
        for topic_filter in list(self.subscriptions):
            node.hub.remove_filter(topic_filter, self)
            await node.unsubscribe_filter(topic_filter)
        self.subscriptions.clear()
        if self.will is None or not self.connected:
            return
        # 5.0: the will waits for its delay or the end of the session, whichever is first.
        delay = self.will.properties.will_delay_interval if self.will.properties else None
        delay = min(delay or 0, self.session_expiry)
        if delay:
            node.loop.call_later(delay, lambda: node.loop.create_task(self._publish_will()))
        else:
            await self._publish_will()

    async def _publish_will(self) -> None:
        will, principal = self.will, self.principal
        if will is None or principal is None:
            return
        if self.client_id in self.server.sessions:
            return  # the device came back before the will delay ran out
        if channel_error(will.topic) or not self.node.may_publish(principal, will.topic):
            return
        meta = MqttMeta(will.qos, will.retain, will.properties)
        try:
            await self.node.publish(
                will.topic,
                will.payload,
                user=principal.user,
                client=self.client_id,
                source="mqtt_will",
                meta=meta,
            )
            if will.retain:
                pub = Publication(0, will.payload, principal.user, self.client_id, None, meta)
                await self.node.broker.set_retained(will.topic, pub)
        except BrokerUnavailable:
            log.warning("mqtt_will_lost", extra={"fields": {"client_id": self.client_id}})
            return
        event(log, "mqtt_will_published", logging.DEBUG, client_id=self.client_id, topic=will.topic)


class MqttServer:
    """The node's MQTT sessions by client id; keep-alive checks."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.sessions: dict[str, MqttSession] = {}
        self.connections: set[MqttSession] = set()
        node.tickers.append(self.tick)
        node.metrics.gauge(
            "mqtt_connections", "Connected MQTT sessions.", lambda: len(self.sessions)
        )

    def attach(self, session: MqttSession) -> None:
        self.connections.add(session)

    def register(self, session: MqttSession) -> None:
        previous = self.sessions.get(session.client_id)
        if previous is not None and previous is not session:
            event(log, "mqtt_session_taken_over", logging.INFO, client_id=session.client_id)
            previous.disconnect(ReasonCode.SESSION_TAKEN_OVER, "another connection took over")
        self.sessions[session.client_id] = session

    def unregister(self, session: MqttSession) -> None:
        self.connections.discard(session)
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]

    def tick(self, now: float) -> None:
        deadline = self.node.config.client.connect_timeout
        for session in list(self.connections):
            if not session.connected:
                if now - session.last_rx > deadline:
                    session.close()
            elif session.keep_alive and now - session.last_rx > 1.5 * session.keep_alive:
                session.disconnect(ReasonCode.KEEP_ALIVE_TIMEOUT, "keep-alive expired")

    def shutdown(self) -> None:
        """Drain: 5.0 devices are told why; wills follow the spec (the connection ends)."""
        for session in list(self.connections):
            session.disconnect(ReasonCode.SERVER_SHUTTING_DOWN, "server shutting down")
