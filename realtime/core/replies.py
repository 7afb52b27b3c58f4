"""Protobuf messages made from the core's values (publications, positions, presence)."""

from __future__ import annotations

import json
from collections.abc import Iterable

from realtime.core.broker import PresenceEntry, Publication, StreamPosition
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.delta import make_delta


def pb_position(position: StreamPosition) -> pb.StreamPosition:
    return pb.StreamPosition(offset=position.offset, epoch=position.epoch)


def pb_publications(pubs: Iterable[Publication], *, deltas: bool = False) -> list[pb.Publication]:
    """Publications for a reply. With `deltas`, the first is full and each later one is a
    delta against the one before it, where that is smaller."""
    out = []
    previous: Publication | None = None
    for pub in pubs:
        data, is_delta = pub.data, False
        if deltas and previous is not None and pub.offset == previous.offset + 1:
            delta = make_delta(previous.data, pub.data)
            if delta is not None:
                data, is_delta = delta, True
        item = pb.Publication(offset=pub.offset, data=data, tags=pub.tags, delta=is_delta)
        if pub.user or pub.client:
            item.info.user = pub.user
            item.info.client = pub.client
        out.append(item)
        previous = pub
    return out


def pb_client_info(entry: PresenceEntry) -> pb.ClientInfo:
    info = pb.ClientInfo(
        user=entry.user, client=entry.client, device=entry.device, transport=entry.transport
    )
    if entry.info:
        info.info = json.dumps(entry.info, separators=(",", ":")).encode()
    return info
