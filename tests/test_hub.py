"""The hub's filter subscribers (MQTT sessions) and the broker's wildcard/retained support."""

from __future__ import annotations

from realtime.brokers.memory import MemoryBroker
from realtime.core.broker import Publication
from realtime.core.hub import Hub


class Member:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, list[object]]] = []

    def deliver(self, channel: str, pub: Publication, matched: list[object]) -> None:
        self.got.append((channel, pub.data, sorted(matched, key=str)))


def test_overlapping_filters_deliver_once_with_every_match() -> None:
    hub = Hub()
    a, b = Member(), Member()
    hub.add_filter("rooms/#", a, 1)
    hub.add_filter("rooms/+", a, 2)
    hub.add_filter("rooms/7", a, 0)
    hub.add_filter("rooms/8", b, 0)
    hub.handle_publication("rooms/7", Publication(0, b"x"))
    hub.handle_publication("rooms/8", Publication(0, b"y"))
    hub.handle_publication("other", Publication(0, b"z"))
    assert a.got == [("rooms/7", b"x", [0, 1, 2]), ("rooms/8", b"y", [1, 2])]
    assert b.got == [("rooms/8", b"y", [0])]
    assert hub.remove_filter("rooms/#", a) and not hub.remove_filter("rooms/#", a)
    hub.handle_publication("rooms/7/deeper", Publication(0, b"w"))
    assert len(a.got) == 2


async def test_broker_wildcard_subscriptions_and_retained() -> None:
    broker = MemoryBroker()
    hub = Hub()
    member = Member()
    hub.add_filter("sensors/+/temp", member, 1)
    await broker.start(hub)
    await broker.publish("sensors/1/temp", b"1")  # node not subscribed yet: not delivered
    await broker.subscribe("sensors/+/temp")
    await broker.publish("sensors/2/temp", b"2")
    await broker.unsubscribe("sensors/+/temp")
    await broker.publish("sensors/3/temp", b"3")
    assert [data for _, data, _ in member.got] == [b"2"]

    await broker.set_retained("sensors/1/temp", Publication(0, b"21"))
    await broker.set_retained("sensors/2/temp", Publication(0, b"22"))
    await broker.set_retained("sensors/2/temp", Publication(0, b"23"))  # replace
    assert [(c, p.data) for c, p in await broker.retained("sensors/+/temp")] == [
        ("sensors/1/temp", b"21"),
        ("sensors/2/temp", b"23"),
    ]
    await broker.set_retained("sensors/1/temp", Publication(0, b""))  # clear
    assert [c for c, _ in await broker.retained("sensors/#")] == ["sensors/2/temp"]
    assert [c for c, _ in await broker.retained("sensors/2/temp")] == ["sensors/2/temp"]


async def test_outbound_queue_is_made_per_tick_and_dropped_on_overflow() -> None:
    """`Outbound` (WebSocket sessions): no list while idle, one flush per tick joining what
    was pushed, and past its limit one overflow callback and nothing written after."""
    import asyncio

    from realtime.core.writer import FlushScheduler, Outbound

    class Sink:
        def __init__(self) -> None:
            self.writes: list[tuple[list[bytes], int]] = []

        def write_payloads(self, payloads: list[bytes], size: int) -> None:
            self.writes.append((payloads, size))

    sink, overflows = Sink(), []
    outbound = Outbound(
        sink, FlushScheduler(asyncio.get_running_loop()), 10, lambda: overflows.append(1)
    )
    assert outbound.items is None
    outbound.push(b"abc")
    outbound.push(b"de")
    await asyncio.sleep(0)
    assert sink.writes == [([b"abc", b"de"], 5)] and outbound.items is None
    outbound.push(b"x" * 8)
    outbound.push(b"y" * 8)  # 16 bytes queued in this tick: over the limit
    outbound.push(b"z")
    await asyncio.sleep(0)
    outbound.overflow()  # the transport's high-water mark, later: reported once only
    assert overflows == [1] and outbound.closed and len(sink.writes) == 1
