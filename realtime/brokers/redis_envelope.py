"""The inter-node envelope: publications and channel events as msgpack, as they travel
through Redis pub/sub and sit in channel streams and retained keys.

A publication is one msgpack array ``[0, offset, epoch, data, user, client, tags, meta]``.
The publish script knows the offset and epoch only inside Redis, so the node sends the bytes
around them (`PUBLICATION_HEAD` and `publication_tail`) and the script puts
``cmsgpack.pack(offset, epoch)`` in between: the stream entry and the pub/sub message are the
same bytes, decoded the same way by every node.

An event (join, leave, typing) is ``[1, kind, active, entry]`` and a presence entry
``[client, user, device, info, transport]``. A control message between nodes is
``[2, kind, sender, target, request, body]``.

`meta` crosses nodes when it is an `MqttMeta`: ``[qos, retain]``, or with 5.0 properties
``[qos, retain, payload_format_indicator, message_expiry_interval, content_type,
response_topic, correlation_data, user_properties]`` -- the properties a subscriber is
forwarded (`mqtt_session._forwarded_properties`). Subscription identifiers and topic aliases
belong to the receiving side and are not carried; any other kind of meta object stays on
its node (the remote node sees None, as for a WebSocket publication).
"""

from __future__ import annotations

from typing import Any

import msgpack  # type: ignore[import-untyped]

from realtime.core.broker import ChannelEvent, ControlMessage, PresenceEntry, Publication
from realtime.core.mqtt_session import MqttMeta
from realtime.mqtt.packets import Properties

PUBLICATION, EVENT, CONTROL = 0, 1, 2
# fixarray of 8 elements, then the kind: what precedes the offset in a publication.
PUBLICATION_HEAD = b"\x98\x00"

_packb = msgpack.packb
_unpackb = msgpack.unpackb

# One shared MqttMeta per (qos, retain) for publications without properties: never modified.
_PLAIN_META = {
    (qos, retain): MqttMeta(qos, bool(retain), None) for qos in range(3) for retain in (0, 1)
}


def pack_meta(meta: object) -> list[Any] | None:
    if not isinstance(meta, MqttMeta):
        return None
    props = meta.properties
    if props is None:
        return [meta.qos, meta.retain]
    return [
        meta.qos,
        meta.retain,
        props.payload_format_indicator,
        props.message_expiry_interval,
        props.content_type,
        props.response_topic,
        props.correlation_data,
        [list(pair) for pair in props.user_properties],
    ]


def unpack_meta(raw: list[Any] | None) -> MqttMeta | None:
    if raw is None:
        return None
    qos, retain = raw[0], bool(raw[1])
    if len(raw) == 2:
        return _PLAIN_META.get((qos, retain)) or MqttMeta(qos, retain, None)
    props = Properties(
        payload_format_indicator=raw[2],
        message_expiry_interval=raw[3],
        content_type=raw[4],
        response_topic=raw[5],
        correlation_data=raw[6],
        user_properties=[(str(k), str(v)) for k, v in raw[7]],
    )
    return MqttMeta(qos, retain, props)


def publication_tail(
    data: bytes, user: str, client: str, tags: dict[str, str] | None, meta: object
) -> bytes:
    """The bytes after offset and epoch (an array's elements without its header)."""
    packed: bytes = _packb([data, user, client, tags or None, pack_meta(meta)])
    return packed[1:]  # drop the fixarray(5) header


def publication_message(
    offset: int,
    epoch: str,
    data: bytes,
    user: str,
    client: str,
    tags: dict[str, str] | None,
    meta: object,
) -> bytes:
    packed: bytes = _packb(
        [PUBLICATION, offset, epoch, data, user, client, tags or None, pack_meta(meta)]
    )
    return packed


def pack_publication(pub: Publication) -> bytes:
    return publication_message(pub.offset, "", pub.data, pub.user, pub.client, pub.tags, pub.meta)


def pack_entry(entry: PresenceEntry) -> list[Any]:
    return [entry.client, entry.user, entry.device, entry.info, entry.transport]


def unpack_entry(raw: list[Any]) -> PresenceEntry:
    return PresenceEntry(raw[0], raw[1], raw[2], raw[3], raw[4])


def entry_bytes(entry: PresenceEntry) -> bytes:
    packed: bytes = _packb(pack_entry(entry))
    return packed


def entry_from_bytes(data: bytes) -> PresenceEntry:
    return unpack_entry(_unpackb(data))


def event_message(event: ChannelEvent) -> bytes:
    packed: bytes = _packb([EVENT, event.kind, event.active, pack_entry(event.entry)])
    return packed


def control_message(message: ControlMessage) -> bytes:
    packed: bytes = _packb(
        [CONTROL, message.kind, message.sender, message.target, message.request, message.body]
    )
    return packed


def decode(message: bytes) -> Publication | ChannelEvent | ControlMessage:
    """A pub/sub message or stream entry back into what the handler takes."""
    raw = _unpackb(message)
    kind = raw[0]
    if kind == PUBLICATION:
        _, offset, epoch, data, user, client, tags, meta = raw
        return Publication(offset, data, user, client, tags, unpack_meta(meta), epoch)
    if kind == EVENT:
        _, kind, active, entry = raw
        return ChannelEvent(kind, unpack_entry(entry), active)
    _, kind, sender, target, request, body = raw
    return ControlMessage(kind, sender, target, request, body)


def decode_publication(message: bytes) -> Publication:
    item = decode(message)
    if not isinstance(item, Publication):
        raise ValueError("not a publication")
    return item
