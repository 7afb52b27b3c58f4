"""Faults of a cluster, for real (issue #5): gateway *processes* (`realtime serve`) joined
by a real `redis-server`, a numbered stream of publications made through the server API,
and Python `Client`s (this process) consuming it while Redis or a node dies.

The publisher publishes sequence numbers 1..N to one channel, one at a time and in order,
each with the idempotency key ``s<n>``. A 503 (Redis down) is retried after its
``retry_after_ms`` hint, a dropped connection (node gone) at once, always with the same
number and key: no number is skipped, and a retry within one epoch is never published
twice. The publisher keeps every answer: seq -> (epoch, offset).

Each subscriber records, in consumption order, ``(offset, seq)`` of every publication it
got, and how many times ``on_recovery_failed`` was called.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
from dataclasses import dataclass, field
from typing import Any

import pytest

from realtime.client import Client, RealtimeError, StreamPosition, Subscription
from tests.conftest import API_KEY, make_token
from tests.gateway_process import GatewayProcess, start_gateway_process

CHANNEL = "feed/stream"
HISTORY = 20_000
WAIT = 45.0  # generous bound on any single wait


# ----------------------------------------------------------------------------- processes


async def start_node(redis_url: str, prefix: str, name: str) -> GatewayProcess:
    return await start_gateway_process(
        redis_url,
        prefix,
        name,
        REALTIME_BROKER__RECONNECT_MAX_DELAY="0.5",
        REALTIME_NAMESPACES__FEED__HISTORY_SIZE=str(HISTORY),
        REALTIME_NAMESPACES__FEED__HISTORY_TTL="300",
    )


# ----------------------------------------------------------------------------- publisher


class ApiConnection:
    """A keep-alive HTTP/1.1 connection to one node's server API."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, endpoint: str, body: Any) -> tuple[int, dict[str, Any]]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        payload = json.dumps(body).encode()
        head = (
            f"POST /api/v1/{endpoint} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nX-API-Key: {API_KEY}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + payload)
            raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
            lines = raw.decode().split("\r\n")
            status = int(lines[0].split()[1])
            headers = dict(
                (k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in lines[1:])
            )
            length = int(headers.get("content-length", "0"))
            data = await asyncio.wait_for(self.reader.readexactly(length), 10)
            if headers.get("connection", "").lower() == "close":
                self.close()
        except BaseException:
            self.close()
            raise
        return status, json.loads(data) if data else {}

    def close(self) -> None:
        if self.writer is not None:
            self.writer.transport.abort()
        self.reader = self.writer = None


@dataclass
class Publisher:
    port: int
    results: dict[int, tuple[str, int]] = field(default_factory=dict)  # seq -> (epoch, offset)
    # Seqs whose first attempt failed after it was sent: it may have been published.
    uncertain: set[int] = field(default_factory=set)
    unavailable: int = 0  # 503 answers
    duplicates: int = 0
    api: ApiConnection | None = None

    async def publish(self, seq: int) -> None:
        """Publish `seq` until it is accepted; never skips it."""
        if self.api is None:
            self.api = ApiConnection(self.port)
        api = self.api
        body = {"channel": CHANNEL, "data": {"n": seq}, "idempotency_key": f"s{seq}"}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            assert loop.time() < deadline, f"publish of {seq} not accepted within {WAIT} s"
            try:
                status, answer = await api.post("publish", body)
            except (OSError, asyncio.IncompleteReadError, TimeoutError):
                self.uncertain.add(seq)
                await asyncio.sleep(0.05)
                continue
            if status == 503:
                self.unavailable += 1
                # The 503 may follow a command that reached Redis before it died.
                self.uncertain.add(seq)
                hint = answer.get("error", {}).get("retry_after_ms", 1000)
                await asyncio.sleep(min(hint, 2000) / 1000)
                continue
            assert status == 200, (seq, status, answer)
            position = answer["position"]
            self.duplicates += bool(answer.get("duplicate"))
            self.results[seq] = (position["epoch"], position["offset"])
            return

    def epochs(self) -> list[str]:
        """The stream's epochs in the order the publisher saw them."""
        seen: list[str] = []
        for seq in sorted(self.results):
            epoch = self.results[seq][0]
            if not seen or seen[-1] != epoch:
                assert epoch not in seen, f"epoch {epoch} came back at seq {seq}"
                seen.append(epoch)
        return seen

    def tops(self) -> dict[str, int]:
        tops: dict[str, int] = {}
        for epoch, offset in self.results.values():
            tops[epoch] = max(tops.get(epoch, 0), offset)
        return tops


# ----------------------------------------------------------------------------- subscribers


@dataclass
class Consumer:
    """One subscriber; `got` lists (offset, seq) in consumption order, across the
    incarnations of its client (churn closes a client and opens a new one)."""

    name: str
    urls: list[str]  # urls[0] first; the next one after a node dies
    got: list[tuple[int, int]] = field(default_factory=list)
    recovery_failed: int = 0
    not_recovered_on_resume: int = 0
    dropped: int = 0
    incarnations: int = 0
    subscribe_retries: int = 0
    client: Client | None = None
    sub: Subscription | None = None
    task: asyncio.Task[None] | None = None

    async def start(self, since: StreamPosition | None = None) -> None:
        self.incarnations += 1
        client = Client(
            self.urls[0],
            token=make_token(self.name, subscribe=["feed/#"]),
            backoff_min=0.05,
            backoff_max=0.5,
            command_timeout=10.0,
            max_queue=100_000,
        )
        client.on_disconnect = self._on_disconnect
        await client.connect()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            try:
                sub = await client.subscribe(CHANNEL, recover=True, since=since)
                break
            except RealtimeError as exc:
                # Error 115 (temporary): Redis was down, or this node's pooled command
                # connection died with it; retry after the hint, as an app would.
                if not exc.temporary or loop.time() > deadline:
                    raise
                self.subscribe_retries += 1
                await asyncio.sleep(max(exc.retry_after_ms / 1000, 0.05))
        if since is not None and not sub.recovered:
            self.not_recovered_on_resume += 1
        sub.on_recovery_failed = self._on_recovery_failed
        self.client, self.sub = client, sub
        self.task = asyncio.create_task(self._consume(sub))

    def _on_disconnect(self, code: int | None, reason: str, will_reconnect: bool) -> None:
        # The client reconnects to `client.url`, read at every attempt: when its node is
        # gone, point it at the next one.
        client = self.client
        if client is not None and will_reconnect and len(self.urls) > 1:
            client.url = self.urls[1]

    def _on_recovery_failed(self, sub: Subscription) -> None:
        self.recovery_failed += 1

    async def _consume(self, sub: Subscription) -> None:
        async for pub in sub:
            self.got.append((pub.offset, json.loads(pub.data)["n"]))

    async def churn(self) -> None:
        """Close the client (as an app going away) and come back from its position."""
        await self.suspend()
        await self.resume()

    async def suspend(self) -> None:
        assert self.client is not None and self.sub is not None and self.task is not None
        await self.client.close()
        await self.task  # drains what was queued
        self.dropped += self.sub.dropped

    async def resume(self) -> None:
        assert self.sub is not None
        await self.start(since=self.sub.position)

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 5)
        if self.sub is not None:
            self.dropped += self.sub.dropped


async def wait_until_all_got(consumers: list[Consumer], last: int, timeout: float) -> None:
    """Until every subscriber consumed seq `last` (the publisher's final one)."""

    def done(c: Consumer) -> bool:
        return bool(c.got) and c.got[-1][1] == last and c.sub is not None and not c.sub.qsize()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not all(done(c) for c in consumers):
        if loop.time() > deadline:
            state = [
                (
                    c.name,
                    len(c.got),
                    c.got[:1],
                    c.got[-1:],
                    c.recovery_failed,
                    c.sub and c.sub.position,
                )
                for c in consumers
            ]
            raise AssertionError(f"not every subscriber got seq {last} within {timeout} s: {state}")
        await asyncio.sleep(0.05)


async def stop_all(consumers: list[Consumer], nodes: list[GatewayProcess]) -> None:
    for consumer in consumers:
        with contextlib.suppress(Exception):
            await consumer.stop()
    for node in nodes:
        await node.kill()


# ----------------------------------------------------------------------------- 1. Redis


@pytest.mark.parametrize(
    "subscribers",
    [
        "resume",
        "connected",
    ],
)
async def test_redis_killed_and_restarted_mid_stream(
    make_redis_server: Any, subscribers: str
) -> None:
    """Redis (no persistence) is SIGKILLed and restarted after publication N/2 of N.

    ``resume``: the subscribers close their clients before the kill and come back, from
    their last position, 500 publications after the restart (recovery must fail:
    ``recovered=false``). ``connected``: they stay connected through it (their nodes
    stay up; the nodes' Redis connections drop and come back).

    Its data is gone: the stream restarts in a new epoch at offset 1. Invariant, for every
    subscriber (publication -> epoch by the publisher's answer for its seq; a seq whose
    publish was uncertain and not answered with that offset belongs to the epoch that
    died):

    - within an epoch, the offsets it got are strictly increasing by exactly 1 (in
      order, no duplicate, no gap), and each offset carries the seq the publisher was
      answered for it;
    - each epoch is one contiguous run, epochs in the publisher's order;
    - a run that does not start at offset 1 (it missed the start of its epoch) is
      matched by a failed recovery (``on_recovery_failed`` after a reconnect, or
      ``recovered=false`` answered to a subscribe from a position): runs not starting
      at 1 <= failed recoveries;
    - the last epoch's run ends at the publisher's last offset (nothing lost after the
      recovery), and nothing was dropped from the client's queue.
    """
    total = 10_000
    redis = make_redis_server()
    prefix = "cf" + secrets.token_hex(4)
    nodes: list[GatewayProcess] = []
    consumers: list[Consumer] = []
    try:
        nodes.append(await start_node(redis.url, prefix, "a"))
        nodes.append(await start_node(redis.url, prefix, "b"))
        for i in range(6):
            consumer = Consumer(f"u{i}", [nodes[i % 2].url])
            await consumer.start()
            consumers.append(consumer)
        publisher = Publisher(nodes[0].api_port)
        for seq in range(1, total + 1):
            await publisher.publish(seq)
            if seq == total // 2:
                if subscribers == "resume":
                    for consumer in consumers:
                        await consumer.suspend()
                redis.restart()  # SIGKILL, then a new empty redis-server on the port
            if seq == total // 2 + 500 and subscribers == "resume":
                for consumer in consumers:
                    await consumer.resume()
        epochs = publisher.epochs()
        tops = publisher.tops()
        last_epoch = epochs[-1]
        assert len(epochs) == 2, (epochs, tops)
        await wait_until_all_got(consumers, total, 20.0)
        await stop_all(consumers, nodes)
        by_seq = publisher.results
        report = []
        for consumer in consumers:
            runs: list[tuple[str, list[tuple[int, int]]]] = []
            for offset, seq in consumer.got:
                epoch, answered = by_seq[seq]
                if answered != offset:
                    assert seq in publisher.uncertain, (consumer.name, offset, seq, by_seq[seq])
                    epoch = epochs[epochs.index(epoch) - 1]
                if not runs or runs[-1][0] != epoch:
                    runs.append((epoch, []))
                runs[-1][1].append((offset, seq))
            summary = [(e[:8], r[0], r[-1], len(r)) for e, r in runs]
            report.append(
                (consumer.name, summary, consumer.recovery_failed, consumer.subscribe_retries)
            )
            assert [e for e, _ in runs] == [e for e in epochs if e in {x for x, _ in runs}], (
                consumer.name,
                summary,
            )
            late_starts = 0
            for epoch, run in runs:
                offsets = [o for o, _ in run]
                bad = [(a, b) for a, b in itertools.pairwise(offsets) if b != a + 1]
                assert not bad, (consumer.name, epoch, "not consecutive", bad[:10], summary)
                for offset, seq in run:
                    if by_seq[seq] != (epoch, offset):
                        assert seq in publisher.uncertain, (consumer.name, epoch, offset, seq)
                late_starts += offsets[0] != 1
            failed_recoveries = consumer.recovery_failed + consumer.not_recovered_on_resume
            assert late_starts <= failed_recoveries, (
                consumer.name,
                "a run starts after offset 1 without a failed recovery",
                summary,
                consumer.recovery_failed,
                consumer.not_recovered_on_resume,
            )
            if subscribers == "resume":
                assert consumer.not_recovered_on_resume == 1, consumer.name
            assert runs[-1][0] == last_epoch and runs[-1][1][-1][0] == tops[last_epoch], (
                consumer.name,
                summary,
            )
            assert consumer.dropped == 0, (consumer.name, consumer.dropped)
        print(report, "503s:", publisher.unavailable, "uncertain:", sorted(publisher.uncertain))
    finally:
        await stop_all(consumers, nodes)


# ----------------------------------------------------------------------------- 2. a node


async def test_a_node_killed_mid_stream(make_redis_server: Any) -> None:
    """Node A is SIGKILLed after publication N/2 of N (published through node B); A's
    subscribers reconnect to B (their client's URL is switched to B's when the
    connection drops) and recover; meanwhile some subscribers of both nodes churn (close
    their client and open a new one subscribing from their last position).

    One epoch throughout (Redis never stops), history (20,000) covers every gap.
    Invariant, for every subscriber across its client's reconnects and its incarnations:
    the offsets it got are exactly 1..N in order (nothing lost, nothing doubled), each
    with the seq the publisher was answered for that offset; no ``on_recovery_failed``,
    every resume from a position answered ``recovered=true``, nothing dropped.
    """
    total = 10_000
    redis = make_redis_server()
    prefix = "cf" + secrets.token_hex(4)
    nodes: list[GatewayProcess] = []
    consumers: list[Consumer] = []
    try:
        node_a = await start_node(redis.url, prefix, "a")
        nodes.append(node_a)
        node_b = await start_node(redis.url, prefix, "b")
        nodes.append(node_b)
        for i in range(4):
            consumer = Consumer(f"a{i}", [node_a.url, node_b.url])
            await consumer.start()
            consumers.append(consumer)
        for i in range(2):
            consumer = Consumer(f"b{i}", [node_b.url])
            await consumer.start()
            consumers.append(consumer)
        churners = [consumers[0], consumers[4]]  # one on A (before it dies), one on B
        publisher = Publisher(node_b.api_port)
        churn_at = {total // 5: churners, total // 2 + 500: churners[1:], total * 4 // 5: churners}
        for seq in range(1, total + 1):
            await publisher.publish(seq)
            if seq == total // 2:
                await node_a.kill()
            for consumer in churn_at.get(seq, []):
                if consumer.urls[0] == node_a.url and node_a.process.returncode is not None:
                    consumer.urls = consumer.urls[1:]
                await consumer.churn()
        epochs = publisher.epochs()
        assert len(epochs) == 1, epochs
        top = publisher.tops()[epochs[0]]
        assert top == total and publisher.duplicates == 0, (top, publisher.duplicates)
        await wait_until_all_got(consumers, total, 20.0)
        await stop_all(consumers, nodes)
        expected = [(offset, seq) for seq, (_, offset) in sorted(publisher.results.items())]
        assert [o for o, _ in expected] == list(range(1, total + 1))
        for consumer in consumers:
            if consumer.got != expected:
                offsets = [o for o, _ in consumer.got]
                bad = [(a, b) for a, b in itertools.pairwise(offsets) if b != a + 1]
                raise AssertionError(
                    (consumer.name, len(consumer.got), offsets[:3], offsets[-3:], bad[:10])
                )
            assert consumer.recovery_failed == 0, consumer.name
            assert consumer.not_recovered_on_resume == 0, consumer.name
            assert consumer.dropped == 0, consumer.name
        assert [c.incarnations for c in churners] == [3, 4], [c.incarnations for c in churners]
        # A's subscribers that did not churn got to B by reconnecting (URL switched).
        assert all(c.client and c.client.url == node_b.url for c in consumers[1:4])
    finally:
        await stop_all(consumers, nodes)
