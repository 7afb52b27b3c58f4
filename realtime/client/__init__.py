"""Asyncio client of the realtime gateway (WebSocket, subprotocol ``realtime.v1.proto``).

async with Client("wss://gateway/ws", get_token=fetch_token) as client:
    sub = await client.subscribe("news")
    async for pub in sub:
        ...

Deltas are transparent: ``await client.subscribe("feed/top", delta=True)`` asks for Fossil
deltas, and the subscription hands out full data. Presence and typing:

    sub = await client.subscribe("chat/room", on_join=..., on_leave=..., on_typing=...)
    present = await client.presence("chat/room")        # {client id: ClientInfo}
    stats = await client.presence_stats("chat/room")    # PresenceStats(clients, users)
    forwarded = await client.typing("chat/room")        # False when throttled
    statuses = await client.user_status(["bob", "eve"]) # [UserStatus(user, online, last_seen)]
"""

from realtime.client.client import SUBPROTOCOL, Client
from realtime.client.errors import DisconnectedError, RealtimeError, SubscriptionClosedError
from realtime.client.models import (
    ClientInfo,
    PresenceStats,
    Publication,
    StreamPosition,
    Typing,
    UserStatus,
)
from realtime.client.subscription import Subscription
from realtime.protocol.framing import FrameError, encode_delimited, split_delimited

__all__ = [
    "SUBPROTOCOL",
    "Client",
    "ClientInfo",
    "DisconnectedError",
    "FrameError",
    "PresenceStats",
    "Publication",
    "RealtimeError",
    "StreamPosition",
    "Subscription",
    "SubscriptionClosedError",
    "Typing",
    "UserStatus",
    "encode_delimited",
    "split_delimited",
]
