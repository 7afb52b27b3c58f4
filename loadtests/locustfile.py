"""Locust swarms against the realtime gateway. Details and profiles: loadtests/README.md.

User classes (mix them with `--mix "ChatUser:3 DeviceUser:1"`, class names at the end of
the command line, or the web UI's class picker):

- ChatUser      WebSocket (protobuf): connect with a token, subscribe to its room
                (--room-size users per room), type then publish every --publish-every
                seconds, ask who is present every --presence-every seconds, and every
                --reconnect-every seconds (on average) reconnect and recover from its last
                stream position.
- FeedUser      WebSocket, subscribe-only: one of --feed-channels channels; idle unless a
                FeedPublisher publishes.
- FeedPublisher WebSocket: publishes --feed-rate messages/s over the feed channels (fixed
                count 1 unless --mix says otherwise).
- DeviceUser    MQTT (paho): persistent session (clean_session=False unless
                --clean-session), telemetry at --device-rate messages/s with --qos 0 or 1
                to a topic it subscribes to, a retained-message check every
                --retained-every seconds, and a resume (reconnect, session present, no
                resubscribe) every --reconnect-every seconds.

Rows reported (type WS or MQTT): connect, subscribe, publish (until the reply / PUBACK),
typing, presence, recover, resume, retained, and `e2e`: a user's own publication coming
back to it. One not back within --e2e-timeout seconds is a failure (MessageLost), so loss
shows; FeedUsers report `e2e feed` per delivery (latency from the publisher's clock) and a
failure per offset missing in the stream. `gap` counts messages of others missing from a
chat room's offsets; `closed` connections the server or network ended.

With --max-fail-ratio / --max-loss-ratio / --max-p95-ms / --min-e2e set, the master (or
the standalone process) checks them when the run ends, prints one summary line
("loadtest summary: PASS ..." or "FAIL ...") and sets the exit code (0 or 3). Without
thresholds the line says "DONE" and locust's own exit code stands.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import secrets
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import gevent
from gevent.event import AsyncResult
from locust import User, constant, events, task
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import StatsEntry

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # clients.py, tokens.py
sys.path.insert(1, str(HERE.parent))  # realtime.protocol from a checkout

from clients import MqttSession, SessionClosed, WsSession  # noqa: E402
from tokens import TokenError, TokenSource  # noqa: E402

from realtime.protocol import realtime_pb2 as pb  # noqa: E402

log = logging.getLogger("loadtest")

EXIT_THRESHOLDS = 3  # exit code when a threshold is breached


class MessageLost(Exception):
    """A publication did not arrive within --e2e-timeout, or an offset is missing."""


class NotRecovered(Exception):
    """Resubscribing from the last position did not recover what was missed."""


class SessionLost(Exception):
    """A persistent MQTT session was not there on resume."""


class NotPresent(Exception):
    """A presence answer without the asking client in it."""


# ---------------------------------------------------------------------------- options


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    add = parser.add_argument
    # Gateway and tokens
    add("--ws-url", default="ws://127.0.0.1:8000/connection/websocket", help="WebSocket URL")
    add("--mqtt-url", default="mqtt://127.0.0.1:1883", help="MQTT URL (mqtt://host:port)")
    add("--token-file", default="", help="tokens, one per line (user i takes line i)")
    add(
        "--secret-file",
        default="",
        help="HS256 secret to mint tokens: gateway config, .realtime/dev-secrets.toml or a "
        "file with the secret (else $LOADTEST_HMAC_SECRET / $REALTIME_AUTH__HMAC_SECRET)",
    )
    add("--token-ttl", type=float, default=6 * 3600, help="seconds, minted tokens")
    add(
        "--run-id",
        default=secrets.token_hex(3),
        help="prefix of channels, topics and client ids (default: random per run)",
    )
    add("--mix", default="", help='weights "ChatUser:3 FeedUser:1" and fixed counts "X=1"')
    add("--request-timeout", type=float, default=10.0, help="seconds per command")
    add("--payload-bytes", type=int, default=100, help="size of published payloads")
    add("--e2e-timeout", type=float, default=5.0, help="seconds before a message is lost")
    add(
        "--reconnect-every",
        type=float,
        default=120.0,
        help="mean seconds between a ChatUser's reconnect with recovery / a DeviceUser's "
        "session resume (0: never)",
    )
    # Chat
    add("--room-size", type=int, default=50, help="ChatUsers per room")
    add("--publish-every", type=float, default=10.0, help="seconds between a ChatUser's messages")
    add("--typing-lead", type=float, default=1.0, help="seconds typing before each message")
    add("--presence-every", type=float, default=30.0, help="seconds between presence queries")
    # Feed
    add("--feed-channels", type=int, default=1, help="channels FeedUsers spread over")
    add("--feed-rate", type=float, default=1.0, help="messages/s per FeedPublisher, in total")
    # MQTT
    add("--qos", type=int, choices=(0, 1), default=1, help="QoS of telemetry")
    add("--device-rate", type=float, default=1.0, help="telemetry messages/s per device")
    add("--mqtt-version", choices=("3.1.1", "5"), default="3.1.1")
    add("--clean-session", action="store_true", help="no persistent sessions")
    add("--retained-every", type=float, default=60.0, help="mean seconds between checks")
    # Thresholds (negative: not checked)
    add("--max-fail-ratio", type=float, default=-1.0, help="failures / requests")
    add("--max-loss-ratio", type=float, default=-1.0, help="failed / all e2e rows")
    add("--max-p95-ms", type=float, default=-1.0, help="p95 of all e2e rows, ms")
    add("--min-e2e", type=int, default=-1, help="fewest e2e rows for a valid run")


def _apply_mix(environment: Environment, mix: str) -> None:
    weights: dict[str, tuple[str, int]] = {}
    for item in mix.replace(",", " ").split():
        for sep in (":", "="):
            name, found, value = item.partition(sep)
            if found:
                weights[name] = (sep, int(value))
                break
        else:
            weights[item] = (":", 1)
    known = {cls.__name__: cls for cls in environment.user_classes}
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise SystemExit(f"--mix: unknown user classes {unknown}; known: {sorted(known)}")
    for name, (sep, value) in weights.items():
        cls = known[name]
        cls.weight, cls.fixed_count = (value, 0) if sep == ":" else (0, value)
    environment.user_classes[:] = [known[name] for name in weights]


@events.init.add_listener
def _on_init(environment: Environment, **_kwargs: Any) -> None:
    options = environment.parsed_options
    if options is None:
        return
    if options.mix:
        _apply_mix(environment, options.mix)
    if not isinstance(environment.runner, (MasterRunner, WorkerRunner)):
        try:  # standalone: refuse to start without a token source
            _tokens(environment)
        except TokenError as exc:
            raise SystemExit(f"loadtest: {exc}") from None


_TOKEN_SOURCES: dict[tuple[str, str, float], TokenSource] = {}


def _tokens(environment: Environment) -> TokenSource:
    o = environment.parsed_options
    key = (o.token_file, o.secret_file, o.token_ttl)
    source = _TOKEN_SOURCES.get(key)
    if source is None:
        source = _TOKEN_SOURCES[key] = TokenSource(o.token_file, o.secret_file, o.token_ttl)
    return source


_COUNTERS: dict[str, itertools.count[int]] = {}


def _identity(environment: Environment, kind: str) -> tuple[str, int, int]:
    """(user id unique in the swarm, index across workers for grouping, local index)."""
    runner = environment.runner
    worker, workers = 0, 1
    if isinstance(runner, WorkerRunner):
        worker = max(runner.worker_index, 0)
        workers = max(int(environment.parsed_options.expect_workers or 1), worker + 1)
    local = next(_COUNTERS.setdefault(kind, itertools.count()))
    return f"{kind}-{worker}-{local}", local * workers + worker, local


# Pushes received by kind in this process (pub, typing, join, ...), for the summary line;
# workers send theirs to the master with each report.
RECEIVED: Counter[str] = Counter()
TOTAL_RECEIVED: Counter[str] = Counter()


@events.report_to_master.add_listener
def _report(client_id: str, data: dict[str, Any]) -> None:
    data["rt_received"] = dict(RECEIVED)
    RECEIVED.clear()


@events.worker_report.add_listener
def _worker_report(client_id: str, data: dict[str, Any]) -> None:
    TOTAL_RECEIVED.update(data.get("rt_received", {}))


# ---------------------------------------------------------------------------- helpers


def _ms(start: float, end: float | None = None) -> float:
    return ((time.perf_counter() if end is None else end) - start) * 1000.0


def _schedule(now: float, every: float, first: bool = False) -> float:
    """Next time for something done every `every` seconds (0: never); the first one at a
    random point of the interval, so that users do not act in lockstep."""
    if every <= 0:
        return math.inf
    return now + (random.uniform(0, every) if first else every)


def _poisson(now: float, mean: float) -> float:
    return now + random.expovariate(1.0 / mean) if mean > 0 else math.inf


def _payload(head: bytes, size: int) -> bytes:
    return head + b"x" * max(0, size - len(head))


class Pending:
    """Own publications on their way back: seq -> send time (perf_counter)."""

    def __init__(self) -> None:
        self.sent: dict[int, float] = {}

    def add(self, seq: int, at: float) -> None:
        self.sent[seq] = at

    def done(self, seq: int, now: float) -> float | None:
        at = self.sent.pop(seq, None)
        return None if at is None else (now - at) * 1000.0

    def expired(self, now: float, bound: float) -> list[float]:
        old = [seq for seq, at in self.sent.items() if now - at > bound]
        return [(now - self.sent.pop(seq)) * 1000.0 for seq in old]


class Stream:
    """Offsets seen on one channel (0: the channel keeps no history, nothing to check)."""

    __slots__ = ("epoch", "offset")

    def __init__(self) -> None:
        self.offset = 0
        self.epoch = ""

    def reset(self, position: pb.StreamPosition) -> None:
        self.offset = position.offset
        self.epoch = position.epoch

    def advance(self, offset: int) -> int:
        """How many offsets were skipped before `offset`; -1 for one already seen."""
        if offset == 0:
            return 0
        if self.offset and offset <= self.offset:
            return -1
        missing = offset - self.offset - 1 if self.offset else 0
        self.offset = offset
        return missing


class GatewayUser(User):
    abstract = True
    wait_time = constant(0)  # the task paces itself (sleeps until the next due action)
    request_type = "WS"
    kind = "chat"  # claims of minted tokens (loadtests/tokens.py)

    def fire(self, name: str, ms: float, exc: Exception | None = None, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=name,
            response_time=ms,
            response_length=length,
            exception=exc,
            context={},
        )

    def setup_identity(self) -> None:
        self.o = self.environment.parsed_options
        self.user_id, self.group_index, self.local_index = _identity(self.environment, self.kind)
        self.token = _tokens(self.environment).token(self.user_id, self.local_index, self.kind)
        self.pending = Pending()
        self.seq = 0
        self.retry_at = 0.0

    def expire(self) -> None:
        for age in self.pending.expired(time.perf_counter(), self.o.e2e_timeout):
            self.fire("e2e", age, MessageLost(f"not back within {self.o.e2e_timeout:g} s"))

    def drain(self, limit: float) -> None:
        """Wait (at most `limit` s) for own publications still on their way."""
        deadline = time.monotonic() + limit
        while self.pending.sent and time.monotonic() < deadline:
            gevent.sleep(0.02)
        self.expire()


# ---------------------------------------------------------------------------- WebSocket


class WsUser(GatewayUser):
    """A WebSocket connection subscribed to `self.channels`, resubscribing with recovery
    after any reconnect."""

    abstract = True
    gap_row = "gap"
    idle_step = 1.0

    def setup_channels(self, channels: list[str]) -> None:
        self.channels = channels
        self.streams = {channel: Stream() for channel in channels}
        self.tag = f"{self.o.run_id}.{self.user_id}".encode()
        self.session: WsSession | None = None
        self._subscribing: tuple[str, bool] | None = None

    def join(self, recover: bool) -> bool:
        """Connect and subscribe to every channel; False (reported) when it failed."""
        session = WsSession(self.o.ws_url, self.on_push, self.on_reply, self.on_close)
        start = time.perf_counter()
        try:
            session.open(self.token, self.o.request_timeout)
        except Exception as exc:
            self.fire("connect", _ms(start), exc)
            session.close()
            return False
        self.fire("connect", _ms(start))
        self.session = session
        for channel in self.channels:
            stream = self.streams[channel]
            request = pb.SubscribeRequest(channel=channel)
            recovering = recover and bool(stream.epoch)
            if recovering:
                request.recover = True
                request.since.offset = stream.offset
                request.since.epoch = stream.epoch
            name = "recover" if recovering else "subscribe"
            self._subscribing = (channel, recovering)
            start = time.perf_counter()
            try:
                reply = session.request(pb.Command(subscribe=request), self.o.request_timeout)
            except Exception as exc:
                self.fire(name, _ms(start), exc)
                session.close()
                self.session = None
                return False
            finally:
                self._subscribing = None
            if recovering and not reply.subscribe.recovered:
                self.fire(name, _ms(start), NotRecovered(f"{channel}: recovered false"))
            else:
                self.fire(name, _ms(start))
        return True

    def on_reply(self, reply: pb.Reply) -> None:
        """Reader greenlet: recovered publications before the live ones after them."""
        if self._subscribing is None or not reply.HasField("subscribe"):
            return
        channel, recovering = self._subscribing
        result = reply.subscribe
        now = time.perf_counter()
        if recovering and result.recovered:
            for publication in result.publications:
                self.on_pub(channel, publication, now)
        if result.position.epoch:
            self.streams[channel].reset(result.position)

    def on_push(self, push: pb.Push, kind: str, now: float) -> None:
        RECEIVED[kind] += 1
        if kind == "pub":
            self.on_pub(push.channel, push.pub, now)
        elif kind == "unsubscribe" and 2500 <= push.unsubscribe.code < 3000:
            session, self.session = self.session, None
            if session is not None:  # resubscribe with recovery, from a fresh connection
                gevent.spawn(session.close)  # not from this (the reader) greenlet

    def on_pub(self, channel: str, pub: pb.Publication, now: float) -> None:
        stream = self.streams.get(channel)
        if stream is None:
            return
        missing = stream.advance(pub.offset)
        if missing < 0:
            return  # seen already (a recovery overlapping live delivery)
        for _ in range(min(missing, 10_000)):
            self.fire(self.gap_row, 0, MessageLost(f"{channel}: offset missing"))
        self.on_data(pub.data, now)

    def on_data(self, data: bytes, now: float) -> None:
        prefix = self.tag + b":"
        if data.startswith(prefix):
            head = data[len(prefix) :]
            seq = int(head[: head.index(b":")])
            ms = self.pending.done(seq, now)
            if ms is not None:
                self.fire("e2e", ms, length=len(data))

    def on_close(self, reason: str) -> None:
        self.fire("closed", 0, SessionClosed(reason))
        self.session = None

    def ensure_session(self) -> bool:
        """Reconnect with recovery after a lost connection (with a jittered pause)."""
        if self.session is not None:
            return True
        now = time.monotonic()
        if now < self.retry_at:
            gevent.sleep(min(self.retry_at - now, 1.0))
            return False
        if not self.join(recover=True):
            self.retry_at = time.monotonic() + 1.0 + random.random()
            return False
        return True

    def publish(self, channel: str, data: bytes, seq: int) -> None:
        session = self.session
        if session is None:
            return
        self.pending.add(seq, time.perf_counter())
        start = time.perf_counter()
        try:
            request = pb.PublishRequest(channel=channel, data=data)
            session.request(pb.Command(publish=request), self.o.request_timeout)
        except Exception as exc:
            self.pending.sent.pop(seq, None)  # a refused publish is not a lost message
            self.fire("publish", _ms(start), exc)
            return
        self.fire("publish", _ms(start), length=len(data))

    def on_start(self) -> None:
        if not self.join(recover=False):
            self.retry_at = time.monotonic() + 1.0 + random.random()

    def on_stop(self) -> None:
        self.drain(min(self.o.e2e_timeout, 2.0))
        if self.session is not None:
            self.session.close()
            self.session = None


class ChatUser(WsUser):
    """A chat app user in a room of --room-size: types, publishes, asks who is there, and
    reconnects now and then, recovering what it missed from its last position."""

    kind = "chat"

    def on_start(self) -> None:
        self.setup_identity()
        room = self.group_index // max(1, self.o.room_size)
        self.room = f"chat/{self.o.run_id}-{room}"
        self.setup_channels([self.room])
        now = time.monotonic()
        self.next_publish = _schedule(now, self.o.publish_every, first=True)
        self.next_presence = _schedule(now, self.o.presence_every, first=True)
        self.next_reconnect = _poisson(now, self.o.reconnect_every)
        super().on_start()

    @task
    def step(self) -> None:
        self.expire()
        if not self.ensure_session():
            return
        now = time.monotonic()
        due = min(self.next_publish, self.next_presence, self.next_reconnect)
        if due > now:
            gevent.sleep(min(due - now, self.idle_step))
            return
        if due == self.next_reconnect:
            self.next_reconnect = _poisson(now, self.o.reconnect_every)
            self.reconnect()
        elif due == self.next_publish:
            self.next_publish = max(self.next_publish + self.o.publish_every, now)
            self.type_and_publish()
        else:
            self.next_presence = _schedule(now, self.o.presence_every)
            self.presence()

    def type_and_publish(self) -> None:
        session = self.session
        if session is None:
            return
        if self.o.typing_lead > 0:
            start = time.perf_counter()
            try:
                typing = pb.TypingRequest(channel=self.room, active=True)
                session.request(pb.Command(typing=typing), self.o.request_timeout)
                self.fire("typing", _ms(start))
            except Exception as exc:
                self.fire("typing", _ms(start), exc)
            gevent.sleep(self.o.typing_lead)
        self.seq += 1
        self.publish(
            self.room, _payload(b"%s:%d:" % (self.tag, self.seq), self.o.payload_bytes), self.seq
        )

    def presence(self) -> None:
        session = self.session
        if session is None:
            return
        start = time.perf_counter()
        try:
            reply = session.request(
                pb.Command(presence=pb.PresenceRequest(channel=self.room)), self.o.request_timeout
            )
        except Exception as exc:
            self.fire("presence", _ms(start), exc)
            return
        if session.client_id not in reply.presence.clients:
            self.fire("presence", _ms(start), NotPresent(f"{self.room}: self not listed"))
        else:
            self.fire("presence", _ms(start), length=len(reply.presence.clients))

    def reconnect(self) -> None:
        self.drain(1.0)
        if self.session is not None:
            self.session.close()
            self.session = None
        if not self.join(recover=True):
            self.retry_at = time.monotonic() + 1.0 + random.random()


class FeedUser(WsUser):
    """Subscribe-only: one feed channel; reports each delivery's latency (`e2e feed`,
    from the publisher's wall clock in the payload) and each missing offset as a failure."""

    kind = "feed"
    gap_row = "e2e feed"
    idle_step = 5.0

    def on_start(self) -> None:
        self.setup_identity()
        channel = self.group_index % max(1, self.o.feed_channels)
        self.setup_channels([f"feed/{self.o.run_id}-{channel}"])
        super().on_start()

    def on_data(self, data: bytes, now: float) -> None:
        if data.startswith(b"F:"):
            parts = data.split(b":", 4)
            latency = (time.time_ns() - int(parts[3])) / 1e6
            self.fire("e2e feed", max(latency, 0.0), length=len(data))

    @task
    def step(self) -> None:
        if self.ensure_session():
            gevent.sleep(self.idle_step)


class FeedPublisher(WsUser):
    """Publishes --feed-rate messages/s round robin over the feed channels, subscribed to
    them itself (its own copies: `e2e`)."""

    kind = "publisher"
    fixed_count = 1

    def on_start(self) -> None:
        self.setup_identity()
        count = max(1, self.o.feed_channels)
        self.setup_channels([f"feed/{self.o.run_id}-{i}" for i in range(count)])
        self.next_publish = time.monotonic()
        super().on_start()

    def on_data(self, data: bytes, now: float) -> None:
        if data.startswith(b"F:" + self.tag + b":"):
            seq = int(data.split(b":", 3)[2])
            ms = self.pending.done(seq, now)
            if ms is not None:
                self.fire("e2e", ms, length=len(data))

    @task
    def step(self) -> None:
        self.expire()
        if not self.ensure_session():
            return
        if self.o.feed_rate <= 0:
            gevent.sleep(self.idle_step)
            return
        now = time.monotonic()
        if self.next_publish > now:
            gevent.sleep(min(self.next_publish - now, self.idle_step))
            return
        interval = 1.0 / self.o.feed_rate
        self.next_publish = max(self.next_publish + interval, now - 1.0)  # catch up <= 1 s
        self.seq += 1
        channel = self.channels[self.seq % len(self.channels)]
        head = b"F:%s:%d:%d:" % (self.tag, self.seq, time.time_ns())
        self.publish(channel, _payload(head, self.o.payload_bytes), self.seq)


# ---------------------------------------------------------------------------- MQTT


class DeviceUser(GatewayUser):
    """An MQTT device: persistent session, telemetry to a topic it is subscribed to,
    retained state, and resumes that must find the session (and its subscription)."""

    request_type = "MQTT"
    kind = "device"

    def on_start(self) -> None:
        self.setup_identity()
        o = self.o
        base = f"iot/{o.run_id}/{self.user_id}"
        self.topic = f"{base}/t"
        self.state_topic = f"{base}/state"
        self.published_at: dict[int, float] = {}
        self.retained: tuple[bytes, AsyncResult] | None = None
        self.retained_set = False
        self.session = MqttSession(
            o.mqtt_url,
            f"lt-{o.run_id}-{self.user_id}",
            self.user_id,
            self.token,
            version=o.mqtt_version,
            clean=o.clean_session,
            on_message=self.on_message,
            on_close=self.on_close,
        )
        self.session.puback_callback = self.on_puback
        self.subscribed = False
        now = time.monotonic()
        self.interval = 1.0 / o.device_rate if o.device_rate > 0 else 0.0
        self.next_publish = _schedule(now, self.interval, first=True)
        self.next_retained = _poisson(now, o.retained_every)
        self.next_reconnect = _poisson(now, o.reconnect_every)
        self.connect("connect")

    def connect(self, name: str) -> bool:
        start = time.perf_counter()
        try:
            present = self.session.connect(self.o.request_timeout)
        except Exception as exc:
            self.fire(name, _ms(start), exc)
            self.retry_at = time.monotonic() + 1.0 + random.random()
            return False
        if name == "resume" and not self.o.clean_session and not present:
            self.fire(name, _ms(start), SessionLost("CONNACK session present = 0"))
            self.subscribed = False
        else:
            self.fire(name, _ms(start))
        if self.o.clean_session:
            self.subscribed = False
        if not self.subscribed:
            start = time.perf_counter()
            try:
                self.session.subscribe(self.topic, self.o.qos, self.o.request_timeout)
            except Exception as exc:
                self.fire("subscribe", _ms(start), exc)
                self.session.disconnect()
                self.retry_at = time.monotonic() + 1.0 + random.random()
                return False
            self.fire("subscribe", _ms(start))
            self.subscribed = True
        return True

    def on_message(self, msg: Any, now: float) -> None:
        RECEIVED["mqtt"] += 1
        if msg.topic == self.topic:
            seq = int(msg.payload[: msg.payload.index(b":")])
            ms = self.pending.done(seq, now)
            if ms is not None:
                self.fire("e2e", ms, length=len(msg.payload))
        elif msg.topic == self.state_topic and self.retained is not None:
            nonce, waiter = self.retained
            if msg.retain and msg.payload == nonce and not waiter.ready():
                waiter.set(now)

    def on_puback(self, mid: int, now: float) -> None:
        start = self.published_at.pop(mid, None)
        if start is not None:
            self.fire("publish q1", (now - start) * 1000.0)

    def on_close(self, reason: str) -> None:
        self.fire("closed", 0, SessionClosed(reason))

    @task
    def step(self) -> None:
        self.expire()
        self.session.tick()
        now = time.monotonic()
        if not self.session.connected:
            if now < self.retry_at:
                gevent.sleep(min(self.retry_at - now, 1.0))
            elif not self.connect("resume"):
                self.retry_at = time.monotonic() + 1.0 + random.random()
            return
        due = min(self.next_publish, self.next_retained, self.next_reconnect)
        if due > now:
            gevent.sleep(min(due - now, 1.0))
            return
        if due == self.next_reconnect:
            self.next_reconnect = _poisson(now, self.o.reconnect_every)
            self.drain(1.0)
            self.session.disconnect()
            self.connect("resume")
        elif due == self.next_publish:
            self.next_publish = max(self.next_publish + self.interval, now - 1.0)
            self.telemetry()
        else:
            self.next_retained = _poisson(now, self.o.retained_every)
            self.retained_check()

    def telemetry(self) -> None:
        self.seq += 1
        payload = _payload(b"%d:" % self.seq, self.o.payload_bytes)
        start = time.perf_counter()
        self.pending.add(self.seq, start)
        try:
            mid = self.session.publish(self.topic, payload, self.o.qos)
        except Exception as exc:
            self.pending.sent.pop(self.seq, None)
            self.fire(f"publish q{self.o.qos}", _ms(start), exc)
            return
        if self.o.qos:
            self.published_at[mid] = start
        else:
            self.fire("publish q0", _ms(start), length=len(payload))

    def retained_check(self) -> None:
        """Set a retained message, subscribe to its topic: it must come with retain=1."""
        nonce = b"state-%d-%d" % (self.seq, random.getrandbits(32))
        waiter: AsyncResult = AsyncResult()
        self.retained = (nonce, waiter)
        start = time.perf_counter()
        try:
            self.session.publish(self.state_topic, nonce, 1, retain=True)
            self.retained_set = True
            self.session.subscribe(self.state_topic, 1, self.o.request_timeout)
            arrived = waiter.get(timeout=self.o.e2e_timeout)
            self.fire("retained", (arrived - start) * 1000.0, length=len(nonce))
        except gevent.Timeout:
            self.fire("retained", _ms(start), MessageLost("retained message not delivered"))
        except Exception as exc:
            self.fire("retained", _ms(start), exc)
        finally:
            self.retained = None
        try:
            self.session.unsubscribe(self.state_topic, self.o.request_timeout)
        except Exception as exc:
            self.fire("unsubscribe", 0, exc)

    def on_stop(self) -> None:
        if self.session.connected:
            self.drain(min(self.o.e2e_timeout, 2.0))
            if self.retained_set:  # clear it: retained messages outlive the run otherwise
                self.session.publish(self.state_topic, b"", 1, retain=True)
                gevent.sleep(0.05)
            self.session.disconnect()


# ---------------------------------------------------------------------------- thresholds


def summarize(environment: Environment) -> tuple[bool, str]:
    """Check the thresholds that were given; one summary line."""
    o = environment.parsed_options
    stats = environment.stats
    total = stats.total
    e2e = StatsEntry(stats, "e2e (all)", "", use_response_times_cache=False)
    for entry in stats.entries.values():
        if entry.name.startswith("e2e"):
            e2e.extend(entry)
    loss = e2e.num_failures / e2e.num_requests if e2e.num_requests else 0.0
    p95 = e2e.get_response_time_percentile(0.95) if e2e.num_requests else 0.0
    received = RECEIVED + TOTAL_RECEIVED
    problems = []
    if o.max_fail_ratio >= 0 and total.fail_ratio > o.max_fail_ratio:
        problems.append(f"fail ratio {total.fail_ratio:.4f} > {o.max_fail_ratio:g}")
    if o.max_loss_ratio >= 0 and loss > o.max_loss_ratio:
        problems.append(f"loss ratio {loss:.4f} > {o.max_loss_ratio:g}")
    if o.max_p95_ms >= 0 and (p95 or 0) > o.max_p95_ms:
        problems.append(f"p95 e2e {p95:g} ms > {o.max_p95_ms:g} ms")
    if o.min_e2e >= 0 and e2e.num_requests < o.min_e2e:
        problems.append(f"{e2e.num_requests} e2e messages < {o.min_e2e}")
    verdict = "FAIL" if problems else "PASS" if _thresholds_given(o) else "DONE"
    line = (
        f"loadtest summary: {verdict} requests={total.num_requests} "
        f"failures={total.num_failures} fail_ratio={total.fail_ratio:.4f} "
        f"e2e={e2e.num_requests} lost={e2e.num_failures} loss_ratio={loss:.4f} "
        f"p95_e2e_ms={p95 or 0:g} pushes_received={sum(received.values())} "
        f"thresholds: fail_ratio<={o.max_fail_ratio:g} loss_ratio<={o.max_loss_ratio:g} "
        f"p95_e2e_ms<={o.max_p95_ms:g} min_e2e>={o.min_e2e} (negative: unchecked)"
    )
    if problems:
        line += " | " + "; ".join(problems)
    return not problems, line


def _thresholds_given(o: Any) -> bool:
    return max(o.max_fail_ratio, o.max_loss_ratio, o.max_p95_ms, float(o.min_e2e)) >= 0


@events.quitting.add_listener
def _on_quitting(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return  # the master (or the standalone process) judges the whole swarm
    ok, line = summarize(environment)
    print(line, flush=True)
    if _thresholds_given(environment.parsed_options):
        environment.process_exit_code = 0 if ok else EXIT_THRESHOLDS
