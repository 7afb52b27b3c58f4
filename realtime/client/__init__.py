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

Mobile apps in the background (token with a ``device`` claim):

    await client.register_device("apns", push_token, app_id="com.example.chat")
    state = await client.background()       # Backgrounded(positions, detach_ttl)
    await client.close()
    # woken: what was missed, page by page (PollError on an error answer)
    async for page in Client(url, token=token).poll_pages():
        handle(page.publications)           # [Publication] with offsets
        positions.update(page.positions)
    # foreground: a new client subscribes with since=positions[channel]
"""

from realtime.client.client import SUBPROTOCOL, Client
from realtime.client.errors import (
    DisconnectedError,
    PollError,
    RealtimeError,
    SubscriptionClosedError,
)
from realtime.client.models import (
    Backgrounded,
    ChannelPoll,
    ClientInfo,
    PollResult,
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
    "Backgrounded",
    "ChannelPoll",
    "Client",
    "ClientInfo",
    "DisconnectedError",
    "FrameError",
    "PollError",
    "PollResult",
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
