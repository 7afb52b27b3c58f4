"""Asyncio client of the realtime gateway (WebSocket, subprotocol ``realtime.v1.proto``).

async with Client("wss://gateway/ws", get_token=fetch_token) as client:
    sub = await client.subscribe("news")
    async for pub in sub:
        ...
"""

from realtime.client.client import SUBPROTOCOL, Client
from realtime.client.errors import DisconnectedError, RealtimeError, SubscriptionClosedError
from realtime.client.models import Publication, StreamPosition
from realtime.client.subscription import Subscription
from realtime.protocol.framing import FrameError, encode_delimited, split_delimited

__all__ = [
    "SUBPROTOCOL",
    "Client",
    "DisconnectedError",
    "FrameError",
    "Publication",
    "RealtimeError",
    "StreamPosition",
    "Subscription",
    "SubscriptionClosedError",
    "encode_delimited",
    "split_delimited",
]
