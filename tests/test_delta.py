"""Fossil delta pushes over real WebSocket connections, decoded with the Fossil library."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.app import Gateway
from realtime.protocol import realtime_pb2 as pb
from realtime.protocol.codes import ErrorCode
from realtime.protocol.delta import DeltaError, apply_delta, make_delta
from tests.conftest import GatewayFactory, RawClient, make_token, publish

DELTA_CONFIG: dict[str, Any] = {
    "namespaces": {
        "feed": {"history_size": 100, "delta": True, "publish": "token"},
        "chat": {"history_size": 100},  # deltas not offered
    },
}


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(**DELTA_CONFIG)


def document(version: int) -> dict[str, Any]:
    """A ~2 KB feed document of which each version changes a little."""
    return {
        "version": version,
        "items": [
            {"id": i, "title": f"Item number {i}", "score": version if i == version % 30 else i}
            for i in range(30)
        ],
    }


class Receiver:
    """What a delta-aware app does: keep the last full payload, apply deltas to it."""

    def __init__(self, client: RawClient) -> None:
        self.client = client
        self.base: bytes | None = None
        self.offset = 0
        self.deltas = 0
        self.wire_bytes = 0

    def take(self, pub: pb.Publication) -> bytes:
        self.wire_bytes += len(pub.data)
        if pub.delta:
            assert self.base is not None and pub.offset == self.offset + 1
            data = apply_delta(self.base, pub.data)
            self.deltas += 1
        else:
            data = pub.data
        self.base, self.offset = data, pub.offset
        return data

    async def next(self) -> bytes:
        return self.take((await self.client.publication()).pub)


async def test_delta_and_full_subscribers_on_one_channel(gateway: Gateway) -> None:
    delta_client = await RawClient.open(gateway)
    json_delta_client = await RawClient.open(gateway, fmt="json")
    full_client = await RawClient.open(gateway)
    await delta_client.subscribe("feed/1", delta="fossil")
    await json_delta_client.subscribe("feed/1", delta="fossil")
    await full_client.subscribe("feed/1")
    receivers = [Receiver(c) for c in (delta_client, json_delta_client, full_client)]
    sent = []
    for version in range(10):
        sent.append(await publish_doc(gateway, "feed/1", version))
    for receiver in receivers:
        got = [await receiver.next() for _ in sent]
        assert [json.loads(g) for g in got] == [json.loads(s) for s in sent]
    delta_rx, json_rx, full_rx = receivers
    # The first after subscribe is full; the 9 later ones are deltas.
    assert delta_rx.deltas == 9 and json_rx.deltas == 9
    assert full_rx.deltas == 0
    assert delta_rx.wire_bytes < full_rx.wire_bytes / 5
    metrics = await metrics_text(gateway)
    assert "realtime_delta_deliveries_total 18" in metrics


async def publish_doc(gateway: Gateway, channel: str, version: int) -> bytes:
    await publish(gateway, channel, document(version))
    return json.dumps(document(version), separators=(",", ":")).encode()


async def metrics_text(gateway: Gateway) -> str:
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    raw = await reader.read()
    writer.close()
    return raw.decode()


async def test_a_delta_is_sent_only_when_smaller(gateway: Gateway) -> None:
    client = await RawClient.open(gateway)
    await client.subscribe("feed/2", delta="fossil")
    receiver = Receiver(client)
    await publish(gateway, "feed/2", "x" * 100)
    await receiver.next()
    # Nothing in common with the previous payload: the delta would be larger.
    await publish(gateway, "feed/2", "completely different")
    pub = (await client.publication()).pub
    assert not pub.delta and json.loads(pub.data) == "completely different"


async def test_recovery_with_deltas(gateway: Gateway) -> None:
    client = await RawClient.open(gateway)
    result = await client.subscribe("feed/3", delta="fossil")
    receiver = Receiver(client)
    await publish_doc(gateway, "feed/3", 0)
    await receiver.next()
    position = pb.StreamPosition(offset=receiver.offset, epoch=result.position.epoch)
    await client.close()
    missed = [await publish_doc(gateway, "feed/3", v) for v in range(1, 6)]
    # Reconnect and recover: the first missed one is full, the rest are deltas.
    client = await RawClient.open(gateway)
    result = await client.subscribe("feed/3", delta="fossil", recover=True, since=position)
    assert result.recovered
    flags = [pub.delta for pub in result.publications]
    assert flags == [False, True, True, True, True]
    receiver = Receiver(client)
    got = [receiver.take(pub) for pub in result.publications]
    assert got == missed
    # Live publications go on: the first after (re)subscribe is full, then deltas.
    live = [await publish_doc(gateway, "feed/3", v) for v in (6, 7)]
    pubs = [(await client.publication()).pub for _ in live]
    assert [p.delta for p in pubs] == [False, True]
    assert [receiver.take(p) for p in pubs] == live


async def test_delta_errors(gateway: Gateway) -> None:
    client = await RawClient.open(gateway)
    reply = await client.request(subscribe=pb.SubscribeRequest(channel="feed/4", delta="zstd"))
    assert reply.error.code == ErrorCode.BAD_REQUEST
    assert "unknown delta type 'zstd'" in reply.error.message
    reply = await client.request(subscribe=pb.SubscribeRequest(channel="chat/4", delta="fossil"))
    assert reply.error.code == ErrorCode.NOT_AVAILABLE
    # Neither failed attempt left a subscription behind.
    await client.subscribe("feed/4", delta="fossil")
    await client.subscribe("chat/4")


async def test_a_client_detects_a_delta_that_does_not_apply(gateway: Gateway) -> None:
    """A corrupt base on the receiving side is detected (Fossil checks the result's length
    and checksum); the app resubscribes with recovery and gets the data in full."""
    client = await RawClient.open(gateway, token=make_token("reader"))
    result = await client.subscribe("feed/5", delta="fossil")
    receiver = Receiver(client)
    await publish_doc(gateway, "feed/5", 0)
    await receiver.next()
    assert receiver.base is not None
    receiver.base = receiver.base.replace(b"Item", b"Itex")  # the corruption
    await publish_doc(gateway, "feed/5", 1)
    pub = (await client.publication()).pub
    assert pub.delta
    with pytest.raises(DeltaError):
        apply_delta(receiver.base, pub.data)
    await client.request(unsubscribe=pb.UnsubscribeRequest(channel="feed/5"))
    since = pb.StreamPosition(offset=pub.offset - 1, epoch=result.position.epoch)
    result = await client.subscribe("feed/5", delta="fossil", recover=True, since=since)
    (again,) = result.publications
    assert not again.delta and json.loads(again.data) == document(1)


@settings(max_examples=300, deadline=None)
@given(base=st.binary(max_size=600), data=st.binary(max_size=600))
def test_make_and_apply_delta_round_trip(base: bytes, data: bytes) -> None:
    delta = make_delta(base, data)
    if delta is not None:
        assert len(delta) < len(data)
        assert apply_delta(base, delta) == data


@settings(max_examples=500, deadline=None)
@given(base=st.binary(max_size=300), garbage=st.binary(max_size=300))
def test_apply_delta_refuses_garbage_cleanly(base: bytes, garbage: bytes) -> None:
    with contextlib.suppress(DeltaError):
        apply_delta(base, garbage)
