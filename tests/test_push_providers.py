"""The push providers with the REAL aioapns and firebase-admin against local fakes.

tests/fake_push.py runs a fake APNs (HTTP/2 over TLS, certificate made here) and a fake FCM
(v1 send endpoint plus the OAuth token endpoint). These tests check what goes over the wire
(silent-push headers and body, data-only FCM messages), how every provider answer maps to
an outcome, deadlines, and the sender's retries, breaker, drops and token clean-up, with
the event loop never blocked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import firebase_admin
import jwt
import pytest
from aioapns.connection import APNsBaseClientProtocol, APNsProductionClientProtocol
from firebase_admin import messaging

from realtime.config import ConfigError, PushConfig, config_from_dict, load_config
from realtime.metrics import Metrics
from realtime.push.apns import ApnsProvider
from realtime.push.breaker import BreakerState
from realtime.push.fcm import FcmProvider
from realtime.push.messages import (
    Outcome,
    PushOutcome,
    Wake,
    collapse_id_for,
)
from realtime.push.sender import PushSender

from .fake_push import (
    FCM_BAD_TOKEN,
    FCM_BAD_TTL,
    FCM_INTERNAL,
    FCM_SENDER_ID_MISMATCH,
    FCM_UNAVAILABLE,
    FCM_UNREGISTERED,
    ApnsAnswer,
    FakeApns,
    FakeFcm,
    FcmAnswer,
    PushPki,
    fake_apns,  # noqa: F401  (fixtures)
    fake_fcm,  # noqa: F401
    fcm_credentials,  # noqa: F401
    fcm_quota_exceeded,
    push_pki,  # noqa: F401
)

TOPIC = "com.example.app"
KEY_ID = "KEY1234567"
TEAM_ID = "TEAM123456"
HINT = {"t": "sync", "ch": "chat/room1", "o": "123"}


# ----------------------------------------------------------------------------- helpers


def apns_provider(fake: FakeApns, pki: PushPki, **kwargs: Any) -> ApnsProvider:
    options: dict[str, Any] = {
        "topic": TOPIC,
        "key_file": str(pki.apns_key_file),
        "key_id": KEY_ID,
        "team_id": TEAM_ID,
        "host": "127.0.0.1",
        "port": fake.port,
        "ssl_context": pki.client_context(),
        "deadline": 5.0,
    }
    options.update(kwargs)
    return ApnsProvider(**options)


def fcm_provider(fake: FakeFcm, credentials: Path, **kwargs: Any) -> FcmProvider:
    options: dict[str, Any] = {
        "service_account_file": str(credentials),
        "endpoint": fake.endpoint,
        "deadline": 5.0,
    }
    options.update(kwargs)
    return FcmProvider(**options)


@pytest.fixture
async def apns(fake_apns: FakeApns, push_pki: PushPki) -> AsyncIterator[ApnsProvider]:  # noqa: F811
    provider = apns_provider(fake_apns, push_pki)
    await provider.start()
    try:
        yield provider
    finally:
        await provider.close()


@pytest.fixture
async def fcm(fake_fcm: FakeFcm, fcm_credentials: Path) -> AsyncIterator[FcmProvider]:  # noqa: F811
    provider = fcm_provider(fake_fcm, fcm_credentials)
    await provider.start()
    try:
        yield provider
    finally:
        await provider.close()


class Ticker:
    """A task that sleeps `interval` in a loop and notes the longest stall of the loop."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.max_gap = 0.0
        self.ticks = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = time.monotonic()
            await asyncio.sleep(self.interval)
            self.ticks += 1
            self.max_gap = max(self.max_gap, time.monotonic() - start - self.interval)

    async def __aenter__(self) -> Ticker:
        self._task = asyncio.create_task(self._run())
        await asyncio.sleep(0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


def loop_errors() -> list[dict[str, Any]]:
    """Collect what the running loop's exception handler would log (callbacks that raised)."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda loop, context: errors.append(context))
    return errors


async def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- values


def test_wake_values_are_checked() -> None:
    Wake("apns", "t", collapse_id="x" * 64)
    with pytest.raises(ValueError, match="64 bytes"):
        Wake("apns", "t", collapse_id="x" * 65)
    with pytest.raises(ValueError, match="provider"):
        Wake("webpush", "t")
    with pytest.raises(ValueError, match="strings"):
        Wake("fcm", "t", hint={"o": 123})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="aps"):
        Wake("apns", "t", hint={"aps": "x"})
    with pytest.raises(ValueError, match="kind"):
        Wake("apns", "t", kind="loud")
    assert collapse_id_for("chat/room1") == "chat/room1"
    long = "chat/" + "é" * 40
    assert len(collapse_id_for(long).encode()) <= 64
    assert collapse_id_for(long) == collapse_id_for(long) != collapse_id_for(long + "x")


def test_the_private_sdk_attributes_we_rely_on_still_exist() -> None:
    """The fakes redirect the SDKs through these; a new SDK version that drops them must
    fail here, not in production (pyproject bounds the versions)."""
    assert version("aioapns").split(".")[0] == "4"
    assert APNsProductionClientProtocol.APNS_SERVER == "api.push.apple.com"
    assert APNsProductionClientProtocol.APNS_PORT == 443
    assert issubclass(APNsProductionClientProtocol, APNsBaseClientProtocol)
    assert firebase_admin.__version__.split(".")[0] == "7"
    assert messaging._MessagingService.FCM_URL.endswith("/v1/projects/{0}/messages:send")
    assert callable(messaging._get_messaging_service)


# ----------------------------------------------------------------------------- APNs


async def test_apns_silent_push_headers_and_body(
    apns: ApnsProvider,
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
) -> None:
    wake = Wake(
        "apns",
        "a1b2c3",
        environment="sandbox",
        platform="ios",
        collapse_id="chat/room1",
        hint=HINT,
        ttl=600,
        registered_at=time.time(),
    )
    before = int(time.time())
    outcome = await apns.send(wake)
    assert outcome == PushOutcome.sent()
    [request] = fake_apns.requests
    headers = request.headers
    assert request.alpn == "h2"
    assert headers[":method"] == "POST"
    assert request.path == "/3/device/a1b2c3"
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert headers["apns-topic"] == TOPIC
    assert headers["apns-collapse-id"] == "chat/room1"
    assert before + 600 <= int(headers["apns-expiration"]) <= int(time.time()) + 600
    # Exactly content-available plus the hint: no alert, sound, badge or message content.
    assert request.body == {"aps": {"content-available": 1}, **HINT}
    # Token auth: an ES256 JWT signed with the .p8 key, naming the key and the team.
    scheme, token = headers["authorization"].split(" ", 1)
    assert scheme == "bearer"
    assert jwt.get_unverified_header(token)["kid"] == KEY_ID
    claims = jwt.decode(token, push_pki.apns_public_key, algorithms=["ES256"])
    assert claims["iss"] == TEAM_ID


async def test_apns_visible_push(apns: ApnsProvider, fake_apns: FakeApns) -> None:  # noqa: F811
    wake = Wake(
        "apns",
        "v1",
        kind="visible",
        title="Chat",
        body="New message",
        collapse_id="chat/room1",
        app_id="com.example.other",
        hint={"t": "sync", "ch": "chat/room1"},
    )
    assert (await apns.send(wake)).outcome is Outcome.SENT
    [request] = fake_apns.requests
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-topic"] == "com.example.other"  # the device's own app id
    assert request.headers["apns-collapse-id"] == "chat/room1"
    assert request.body == {
        "aps": {"alert": {"title": "Chat", "body": "New message"}, "thread-id": "chat/room1"},
        "t": "sync",
        "ch": "chat/room1",
    }


async def test_apns_visible_push_without_a_title(apns: ApnsProvider, fake_apns: FakeApns) -> None:  # noqa: F811
    wake = Wake("apns", "v2", kind="visible", body="New message", collapse_id="sync")
    assert (await apns.send(wake)).outcome is Outcome.SENT
    assert fake_apns.requests[0].body == {
        "aps": {"alert": {"body": "New message"}, "thread-id": "sync"}
    }


async def test_apns_certificate_auth(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
) -> None:
    provider = apns_provider(
        fake_apns,
        push_pki,
        key_file="",
        key_id="",
        team_id="",
        cert_file=str(push_pki.client_pem_file),
    )
    await provider.start()
    try:
        assert (await provider.send(Wake("apns", "c1", hint=HINT))).outcome is Outcome.SENT
    finally:
        await provider.close()
    [request] = fake_apns.requests
    assert "authorization" not in request.headers
    assert f"userId={TOPIC}" in request.client_subject
    assert request.headers["apns-push-type"] == "background"


async def test_apns_bad_key_file_is_refused_at_start(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
    tmp_path: Path,
) -> None:
    bad = tmp_path / "AuthKey.p8"
    bad.write_text("not a key")
    provider = apns_provider(fake_apns, push_pki, key_file=str(bad))
    with pytest.raises(ValueError, match="not a PEM private key"):
        await provider.start()


APNS_ANSWERS = [
    (ApnsAnswer(200), Outcome.SENT),
    (ApnsAnswer(410, "Unregistered", timestamp=int(time.time() * 1000)), Outcome.TOKEN_INVALID),
    (ApnsAnswer(400, "BadDeviceToken"), Outcome.TOKEN_INVALID),
    (ApnsAnswer(400, "DeviceTokenNotForTopic"), Outcome.TOKEN_INVALID),
    (ApnsAnswer(400, "BadTopic"), Outcome.CONFIG_ERROR),
    (ApnsAnswer(400, "TopicDisallowed"), Outcome.CONFIG_ERROR),
    (ApnsAnswer(403, "InvalidProviderToken"), Outcome.CONFIG_ERROR),
    (ApnsAnswer(403, "ExpiredProviderToken"), Outcome.CONFIG_ERROR),
    (ApnsAnswer(413, "PayloadTooLarge"), Outcome.CONFIG_ERROR),
    (ApnsAnswer(429, "TooManyRequests"), Outcome.RETRY),
    (ApnsAnswer(500, "InternalServerError"), Outcome.RETRY),
    (ApnsAnswer(503, "ServiceUnavailable"), Outcome.RETRY),
    (ApnsAnswer(400, "BadCollapseId"), Outcome.FAILED),
]


async def test_apns_answers_map_to_outcomes(apns: ApnsProvider, fake_apns: FakeApns) -> None:  # noqa: F811
    for i, (answer, _) in enumerate(APNS_ANSWERS):
        fake_apns.answer(f"tok{i}", answer)
    wakes = [Wake("apns", f"tok{i}", hint=HINT) for i in range(len(APNS_ANSWERS))]
    outcomes = await asyncio.gather(*(apns.send(w) for w in wakes))
    for (answer, expected), outcome in zip(APNS_ANSWERS, outcomes, strict=True):
        assert outcome.outcome is expected, (answer, outcome)
        assert outcome.status == answer.status
        assert outcome.reason == (answer.reason if answer.status != 200 else "")


async def test_apns_410_timestamp_rule(apns: ApnsProvider, fake_apns: FakeApns) -> None:  # noqa: F811
    invalidated = time.time() - 60
    fake_apns.set_default(ApnsAnswer(410, "Unregistered", timestamp=int(invalidated * 1000)))
    old = await apns.send(Wake("apns", "old", registered_at=invalidated - 3600))
    assert old.outcome is Outcome.TOKEN_INVALID
    # The app registered this token again after APNs invalidated it: keep it.
    fresh = await apns.send(Wake("apns", "fresh", registered_at=invalidated + 30))
    assert fresh.outcome is Outcome.FAILED
    assert fresh.reason == "Unregistered"
    # 410 without a timestamp: the token is gone.
    fake_apns.set_default(ApnsAnswer(410, "ExpiredToken"))
    assert (await apns.send(Wake("apns", "x", registered_at=time.time()))).outcome is (
        Outcome.TOKEN_INVALID
    )


async def test_apns_deadline_when_the_server_does_not_answer(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
) -> None:
    errors = loop_errors()
    provider = apns_provider(fake_apns, push_pki, deadline=0.5)
    await provider.start()
    fake_apns.answer("silent", ApnsAnswer(answer=False))
    fake_apns.answer("late", ApnsAnswer(200, delay=1.0))
    started = time.monotonic()
    outcomes = await asyncio.gather(
        provider.send(Wake("apns", "silent")), provider.send(Wake("apns", "late"))
    )
    assert time.monotonic() - started < 5
    for outcome in outcomes:
        assert outcome.outcome is Outcome.RETRY
        assert outcome.reason == "timeout"
    # The connection is still usable, and a late answer to a request we gave up on (or
    # closing the connection with one pending) upsets nothing.
    assert (await provider.send(Wake("apns", "ok"))).outcome is Outcome.SENT
    await asyncio.sleep(1.0)
    await provider.close()
    await asyncio.sleep(0.1)
    assert errors == []


async def test_apns_not_listening_is_temporary(push_pki: PushPki) -> None:  # noqa: F811
    provider = ApnsProvider(
        topic=TOPIC,
        key_file=str(push_pki.apns_key_file),
        key_id=KEY_ID,
        team_id=TEAM_ID,
        host="127.0.0.1",
        port=free_port(),
        ssl_context=push_pki.client_context(),
        deadline=0.5,
    )
    await provider.start()
    try:
        outcome = await provider.send(Wake("apns", "t"))
    finally:
        await provider.close()
    assert outcome.outcome is Outcome.RETRY
    assert outcome.reason in ("timeout", "connection")


async def test_apns_payload_over_4k_is_not_sent(apns: ApnsProvider, fake_apns: FakeApns) -> None:  # noqa: F811
    outcome = await apns.send(Wake("apns", "big", hint={"x": "y" * 5000}))
    assert outcome.outcome is Outcome.FAILED
    assert outcome.reason == "PayloadTooLarge"
    assert fake_apns.requests == []


# ----------------------------------------------------------------------------- FCM


async def test_fcm_silent_push_is_data_only(
    fcm: FcmProvider,
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    wake = Wake(
        "fcm", "android-token", platform="android", collapse_id="chat/room1", hint=HINT, ttl=600
    )
    assert await fcm.send(wake) == PushOutcome.sent()
    [request] = fake_fcm.requests
    assert request.path == "/v1/projects/realtime-test/messages:send"
    assert request.headers["authorization"].removeprefix("Bearer ") in fake_fcm.issued
    assert request.body == {
        "message": {
            "token": "android-token",
            "data": HINT,
            "android": {"priority": "normal", "ttl": "600s", "collapse_key": "chat/room1"},
        }
    }
    # The OAuth token came from the fake token endpoint, for the service account.
    [claims] = fake_fcm.token_requests
    assert claims["iss"] == "push@realtime-test.iam.gserviceaccount.com"
    assert "https://www.googleapis.com/auth/cloud-platform" in claims["scope"].split()


async def test_fcm_ios_gets_the_apns_silent_fields(
    fcm: FcmProvider,
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    wake = Wake("fcm", "ios-token", platform="ios", collapse_id="chat/room1", hint=HINT, ttl=600)
    before = int(time.time())
    assert (await fcm.send(wake)).outcome is Outcome.SENT
    message = fake_fcm.requests[0].body["message"]
    assert "notification" not in message
    assert message["data"] == HINT
    apns = message["apns"]
    headers = apns["headers"]
    assert headers["apns-push-type"] == "background"
    assert headers["apns-priority"] == "5"
    assert headers["apns-collapse-id"] == "chat/room1"
    assert before + 600 <= int(headers["apns-expiration"]) <= int(time.time()) + 600
    assert apns["payload"] == {"aps": {"content-available": 1}}


async def test_fcm_visible_notification(fcm: FcmProvider, fake_fcm: FakeFcm) -> None:  # noqa: F811
    wake = Wake(
        "fcm",
        "v",
        platform="android",
        kind="visible",
        title="Chat",
        body="New message",
        collapse_id="chat/room1",
        hint={"t": "sync"},
    )
    assert (await fcm.send(wake)).outcome is Outcome.SENT
    message = fake_fcm.requests[0].body["message"]
    assert message["notification"] == {"title": "Chat", "body": "New message"}
    assert message["android"]["priority"] == "high"
    assert message["android"]["notification"] == {"tag": "chat/room1"}
    assert message["data"] == {"t": "sync"}


async def test_fcm_visible_notification_on_ios(fcm: FcmProvider, fake_fcm: FakeFcm) -> None:  # noqa: F811
    wake = Wake(
        "fcm",
        "ios-v",
        platform="ios",
        kind="visible",
        body="New message",
        collapse_id="ch-1",
        hint={"t": "sync"},
    )
    assert (await fcm.send(wake)).outcome is Outcome.SENT
    message = fake_fcm.requests[0].body["message"]
    assert message["notification"] == {"body": "New message"}
    assert message["apns"]["headers"]["apns-push-type"] == "alert"
    assert message["apns"]["headers"]["apns-priority"] == "10"
    assert message["apns"]["payload"] == {
        "aps": {"alert": {"body": "New message"}, "thread-id": "ch-1"}
    }


async def test_fcm_answers_map_to_outcomes(
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    # 500/503: the SDK itself retries 4 times (backoff 0, 1, 2, 4 s): allow for it.
    provider = fcm_provider(fake_fcm, fcm_credentials, deadline=30.0)
    await provider.start()
    cases: dict[str, tuple[FcmAnswer, Outcome, str]] = {
        "ok": (FcmAnswer(), Outcome.SENT, ""),
        "unregistered": (FCM_UNREGISTERED, Outcome.TOKEN_INVALID, "UNREGISTERED"),
        "mismatch": (FCM_SENDER_ID_MISMATCH, Outcome.TOKEN_INVALID, "SENDER_ID_MISMATCH"),
        "bad-token": (FCM_BAD_TOKEN, Outcome.TOKEN_INVALID, "INVALID_ARGUMENT"),
        "bad-ttl": (FCM_BAD_TTL, Outcome.FAILED, "INVALID_ARGUMENT"),
        "quota": (fcm_quota_exceeded(7), Outcome.RETRY, "QUOTA_EXCEEDED"),
        "unavailable": (FCM_UNAVAILABLE, Outcome.RETRY, "UNAVAILABLE"),
        "internal": (FCM_INTERNAL, Outcome.RETRY, "INTERNAL"),
    }
    for token, (answer, _, _) in cases.items():
        fake_fcm.answer(token, answer)
    try:
        outcomes = await asyncio.gather(
            *(provider.send(Wake("fcm", token, platform="android")) for token in cases)
        )
    finally:
        await provider.close()
    for (token, (_, expected, reason)), outcome in zip(cases.items(), outcomes, strict=True):
        assert outcome.outcome is expected, (token, outcome)
        assert outcome.reason == reason, (token, outcome)
    by_token = dict(zip(cases, outcomes, strict=True))
    assert by_token["quota"].retry_after == 7.0  # Retry-After honoured
    assert len(fake_fcm.requests_for("quota")) == 1  # the SDK does not retry 429
    assert len(fake_fcm.requests_for("unavailable")) == 5  # it did retry 503
    assert len(fake_fcm.requests_for("unregistered")) == 1


async def test_fcm_deadline_when_the_server_does_not_answer(
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    provider = fcm_provider(fake_fcm, fcm_credentials, deadline=0.5)
    await provider.start()
    fake_fcm.answer("hang", FcmAnswer(answer=False))
    started = time.monotonic()
    try:
        outcome = await provider.send(Wake("fcm", "hang"))
        assert time.monotonic() - started < 5
        assert outcome.outcome is Outcome.RETRY
        assert outcome.reason == "timeout"
        assert (await provider.send(Wake("fcm", "ok"))).outcome is Outcome.SENT
    finally:
        await provider.close()


async def test_fcm_refused_service_account_is_a_config_error(
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    fake_fcm.token_refusal = "invalid_grant"
    provider = fcm_provider(fake_fcm, fcm_credentials)
    await provider.start()  # does not raise: the first send reports it
    try:
        outcome = await provider.send(Wake("fcm", "t"))
    finally:
        await provider.close()
    assert outcome.outcome is Outcome.CONFIG_ERROR
    assert outcome.reason == "oauth"
    assert fake_fcm.requests == []


async def test_fcm_never_blocks_the_loop_even_while_tokens_refresh(
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    # Every OAuth token request takes 0.6 s: any refresh made on the event loop would
    # stall the ticker by that much.
    fake_fcm.token_delay = 0.6
    # Tokens that are "stale" at once (google-auth refreshes them in its background thread)
    fake_fcm.token_lifetime = 200
    provider = fcm_provider(fake_fcm, fcm_credentials, deadline=5.0)
    async with Ticker() as ticker:
        await provider.start()
        try:
            for i in range(5):
                assert (await provider.send(Wake("fcm", f"a{i}"))).outcome is Outcome.SENT
            # ... then tokens about to expire (refreshed in our thread before a send).
            fake_fcm.token_lifetime = 30
            await eventually(lambda: len(fake_fcm.token_requests) >= 2)
            outcomes = await asyncio.gather(
                *(provider.send(Wake("fcm", f"b{i}")) for i in range(10))
            )
            assert [o for o in outcomes if o.outcome is not Outcome.SENT] == []
            # A third token comes either from our refresh (the second token was the short one)
            # or from google-auth's thread (it was issued before the lifetime changed, so it
            # is stale): which one depends on timing, that one does not.
            await eventually(lambda: len(fake_fcm.token_requests) >= 3)
        finally:
            await provider.close()
    assert ticker.ticks > 50
    assert ticker.max_gap < 0.4, ticker.max_gap


async def test_fcm_close_deletes_the_app(
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    provider = fcm_provider(fake_fcm, fcm_credentials)
    await provider.start()
    assert (await provider.send(Wake("fcm", "t"))).outcome is Outcome.SENT
    app = provider._app
    assert app is not None
    await provider.close()
    with pytest.raises(ValueError):
        firebase_admin.get_app(app.name)


# ----------------------------------------------------------------------------- sender


def sender_for(*providers: Any, **kwargs: Any) -> PushSender:
    options: dict[str, Any] = {
        "workers": 2,
        "retry_backoff": 0.05,
        "retry_backoff_max": 1.0,
        "breaker_failures": 5,
        "breaker_cooldown": 1.0,
    }
    options.update(kwargs)
    return PushSender(providers, Metrics(), **options)


async def test_sender_retries_with_backoff_then_sends(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
) -> None:
    unavailable = ApnsAnswer(503, "ServiceUnavailable")
    fake_apns.answer("t", unavailable, unavailable, ApnsAnswer(200))
    sender = sender_for(apns_provider(fake_apns, push_pki), max_retries=3, rand=lambda: 1.0)
    await sender.start()
    try:
        assert sender.submit(Wake("apns", "t", hint=HINT))
        await asyncio.wait_for(sender.wait_idle(), 10)
    finally:
        await sender.close()
    requests = fake_apns.requests_for("t")
    assert len(requests) == 3
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(requests)]
    # rand = 1: delays are exactly 0.05 then 0.1 s (timers may fire a hair early)
    assert gaps[0] >= 0.04
    assert gaps[1] >= 0.08
    metrics = sender.metrics
    assert metrics.push_sent["apns"] == 1
    assert metrics.push_errors[("apns", "ServiceUnavailable")] == 2
    assert sum(metrics.push_dropped.values()) == 0


def test_retry_delay_backoff_jitter_and_retry_after() -> None:
    sender = PushSender([], retry_backoff=1.0, retry_backoff_max=8.0, rand=lambda: 0.0)
    assert [sender.retry_delay(n, None) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    sender.rand = lambda: 1.0
    assert [sender.retry_delay(n, None) for n in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert sender.retry_delay(0, 30.0) == 30.0  # Retry-After wins when longer


async def test_sender_gives_up_after_max_retries(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
) -> None:
    fake_apns.answer("t", ApnsAnswer(429, "TooManyRequests"))
    sender = sender_for(apns_provider(fake_apns, push_pki), max_retries=2)
    await sender.start()
    try:
        sender.submit(Wake("apns", "t"))
        await asyncio.wait_for(sender.wait_idle(), 10)
    finally:
        await sender.close()
    assert len(fake_apns.requests_for("t")) == 3  # the first try and 2 retries
    assert sender.metrics.push_dropped[("apns", "retries_exhausted")] == 1
    assert sender.metrics.push_errors[("apns", "TooManyRequests")] == 3


async def test_sender_honours_fcm_retry_after(
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    fake_fcm.answer("q", fcm_quota_exceeded(1), FcmAnswer())
    sender = sender_for(fcm_provider(fake_fcm, fcm_credentials), max_retries=2)
    await sender.start()
    try:
        sender.submit(Wake("fcm", "q"))
        await asyncio.wait_for(sender.wait_idle(), 10)
    finally:
        await sender.close()
    first, second = fake_fcm.requests_for("q")
    assert second.received_at - first.received_at >= 0.9  # Retry-After: 1, not 0.05 s
    assert sender.metrics.push_sent["fcm"] == 1


async def test_breaker_opens_on_an_outage_and_closes_after_the_cooldown(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    fake_apns.set_default(ApnsAnswer(503, "ServiceUnavailable"))
    sender = sender_for(
        apns_provider(fake_apns, push_pki),
        fcm_provider(fake_fcm, fcm_credentials),
        max_retries=0,
        breaker_failures=3,
        breaker_cooldown=1.0,
    )
    await sender.start()
    try:
        async with Ticker() as ticker:
            for i in range(3):
                assert sender.submit(Wake("apns", f"t{i}"))
            await asyncio.wait_for(sender.wait_idle(), 10)
            assert sender.breaker_state("apns") is BreakerState.OPEN
            assert 'realtime_push_breaker_state{provider="apns"} 2' in sender.metrics.render()
            # While open: dropped at once, counted, nothing reaches APNs ...
            sent_before = len(fake_apns.requests)
            for i in range(20):
                assert not sender.submit(Wake("apns", f"x{i}"))
            assert sender.metrics.push_dropped[("apns", "breaker_open")] == 20
            assert len(fake_apns.requests) == sent_before
            # ... and the other provider is unaffected.
            assert sender.submit(Wake("fcm", "f1"))
            await asyncio.wait_for(sender.wait_idle(), 10)
            assert sender.metrics.push_sent["fcm"] == 1
            # APNs is back; after the cooldown one trial goes through and closes it.
            fake_apns.set_default(ApnsAnswer(200))
            await asyncio.sleep(1.1)
            assert sender.breaker_state("apns") is BreakerState.HALF_OPEN
            assert sender.submit(Wake("apns", "trial"))
            await asyncio.wait_for(sender.wait_idle(), 10)
            assert sender.breaker_state("apns") is BreakerState.CLOSED
            for i in range(5):
                assert sender.submit(Wake("apns", f"after{i}"))
            await asyncio.wait_for(sender.wait_idle(), 10)
        assert sender.metrics.push_sent["apns"] == 6
        assert ticker.max_gap < 0.4
    finally:
        await sender.close()


async def test_breaker_opens_when_the_provider_is_not_listening(
    push_pki: PushPki,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    apns = ApnsProvider(
        topic=TOPIC,
        key_file=str(push_pki.apns_key_file),
        key_id=KEY_ID,
        team_id=TEAM_ID,
        host="127.0.0.1",
        port=free_port(),
        ssl_context=push_pki.client_context(),
        deadline=0.3,
    )
    fcm = fcm_provider(fake_fcm, fcm_credentials, endpoint=f"http://127.0.0.1:{free_port()}")
    fcm.deadline = 0.3
    sender = sender_for(apns, fcm, max_retries=0, breaker_failures=2, breaker_cooldown=60.0)
    await sender.start()
    try:
        async with Ticker() as ticker:
            for i in range(4):
                sender.submit(Wake("apns", f"t{i}"))
                sender.submit(Wake("fcm", f"t{i}"))
            await asyncio.wait_for(sender.wait_idle(), 10)
        for name in ("apns", "fcm"):
            assert sender.breaker_state(name) is BreakerState.OPEN
            assert not sender.submit(Wake(name, "later"))
            dropped = sender.metrics.push_dropped
            # 2 failures opened it (a third may have been under way); the rest, and the
            # one submitted now, were dropped by the open breaker
            failed = dropped[(name, "retries_exhausted")]
            assert 2 <= failed <= 3, dict(dropped)
            assert dropped[(name, "breaker_open")] == 5 - failed, dict(dropped)
        assert ticker.max_gap < 0.4
    finally:
        await sender.close()


async def test_queue_bound_drops_are_counted(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
) -> None:
    sender = sender_for(apns_provider(fake_apns, push_pki), workers=1, queue_size=2)
    await sender.start()
    try:
        accepted = [sender.submit(Wake("apns", f"t{i}")) for i in range(5)]
        assert accepted == [True, True, False, False, False]
        assert sender.metrics.push_dropped[("apns", "queue_full")] == 3
        assert not sender.submit(Wake("fcm", "no-fcm-here"))
        assert sender.metrics.push_dropped[("fcm", "no_provider")] == 1
        await asyncio.wait_for(sender.wait_idle(), 10)
        assert sender.metrics.push_sent["apns"] == 2
    finally:
        await sender.close()


async def test_token_invalid_callback_once_per_bad_token(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    invalidated = time.time() - 60
    fake_apns.answer("bad", ApnsAnswer(400, "BadDeviceToken"))
    fake_apns.answer("gone", ApnsAnswer(410, "Unregistered", timestamp=int(invalidated * 1000)))
    fake_apns.answer("back", ApnsAnswer(410, "Unregistered", timestamp=int(invalidated * 1000)))
    fake_fcm.answer("unreg", FCM_UNREGISTERED)
    fake_fcm.answer("malformed", FCM_BAD_TOKEN)
    removed: list[tuple[str, str, str]] = []
    registered_before: dict[str, float] = {}
    started = time.time()

    async def on_token_invalid(provider: str, token: str, reason: str, before: float) -> None:
        await asyncio.sleep(0)
        removed.append((provider, token, reason))
        registered_before[token] = before

    sender = PushSender(
        [apns_provider(fake_apns, push_pki), fcm_provider(fake_fcm, fcm_credentials)],
        Metrics(),
        workers=3,
        on_token_invalid=on_token_invalid,
    )
    await sender.start()
    try:
        for wake in (
            Wake("apns", "bad", registered_at=invalidated - 10),
            Wake("apns", "gone", registered_at=invalidated - 10),
            Wake("apns", "back", registered_at=invalidated + 10),  # re-registered: kept
            Wake("apns", "good"),
            Wake("fcm", "unreg"),
            Wake("fcm", "malformed"),
            Wake("fcm", "good"),
        ):
            assert sender.submit(wake)
        await asyncio.wait_for(sender.wait_idle(), 10)
    finally:
        await sender.close()
    assert sorted(removed) == [
        ("apns", "bad", "BadDeviceToken"),
        ("apns", "gone", "Unregistered"),
        ("fcm", "malformed", "INVALID_ARGUMENT"),
        ("fcm", "unreg", "UNREGISTERED"),
    ]
    # Only registrations older than APNs' 410 timestamp go (a newer one is the app's again);
    # without a timestamp, those older than the send.
    assert registered_before["gone"] == pytest.approx(invalidated, abs=0.001)
    for token in ("bad", "unreg", "malformed"):
        assert started <= registered_before[token] <= time.time()
    metrics = sender.metrics
    assert metrics.push_tokens_removed == {"apns": 2, "fcm": 2}
    assert metrics.push_sent == {"apns": 1, "fcm": 1}
    # none of them was retried
    for token in ("bad", "gone", "back"):
        assert len(fake_apns.requests_for(token)) == 1
    assert len(fake_fcm.requests_for("unreg")) == 1
    text = metrics.render()
    assert 'realtime_push_tokens_removed_total{provider="apns"} 2' in text
    assert 'realtime_push_errors_total{provider="apns",reason="BadDeviceToken"} 1' in text
    assert 'realtime_push_sent_total{provider="fcm"} 1' in text


async def test_sender_uses_a_fixed_set_of_workers_and_never_blocks_the_loop(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    fake_apns.set_default(ApnsAnswer(200, delay=0.05))
    sender = sender_for(
        apns_provider(fake_apns, push_pki), fcm_provider(fake_fcm, fcm_credentials), workers=3
    )
    async with Ticker() as ticker:
        await sender.start()
        try:
            for i in range(100):
                assert sender.submit(Wake("apns" if i % 2 else "fcm", f"t{i}", hint=HINT))
            workers = [t for t in asyncio.all_tasks() if t.get_name().startswith("push-worker")]
            assert len(workers) == 3
            await asyncio.wait_for(sender.wait_idle(), 30)
        finally:
            await sender.close()
    assert sender.metrics.push_sent == {"apns": 50, "fcm": 50}
    assert ticker.max_gap < 0.4, ticker.max_gap
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("push-worker")]


async def test_close_drops_what_is_left_and_counts_it(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
) -> None:
    fake_apns.set_default(ApnsAnswer(answer=False))
    sender = sender_for(apns_provider(fake_apns, push_pki, deadline=30.0), workers=1)
    await sender.start()
    for i in range(4):
        sender.submit(Wake("apns", f"t{i}"))
    await eventually(lambda: len(fake_apns.requests) == 1)
    await sender.close()
    # the three queued and the one being sent
    assert sender.metrics.push_dropped[("apns", "closed")] == 4
    assert not sender.submit(Wake("apns", "late"))


# ----------------------------------------------------------------------------- config


def test_push_is_off_by_default_and_on_with_a_provider(
    push_pki: PushPki,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    assert not PushConfig().enabled
    config = config_from_dict(
        {
            "push": {
                "apns": {
                    "key_file": str(push_pki.apns_key_file),
                    "key_id": KEY_ID,
                    "team_id": TEAM_ID,
                    "topic": TOPIC,
                },
                "fcm": {"service_account_file": str(fcm_credentials)},
            }
        }
    )
    assert config.push.enabled
    sender = PushSender.from_config(config.push)
    assert set(sender.providers) == {"apns", "fcm"}
    apns = sender.providers["apns"]
    assert isinstance(apns, ApnsProvider)
    assert apns.topic == TOPIC
    assert apns.deadline == config.push.deadline
    only_fcm = config_from_dict({"push": {"fcm": {"service_account_file": str(fcm_credentials)}}})
    assert set(PushSender.from_config(only_fcm.push).providers) == {"fcm"}


def test_push_keys_from_the_environment(push_pki: PushPki) -> None:  # noqa: F811
    config = load_config(
        None,
        environ={
            "REALTIME_PUSH__APNS__CERT_FILE": str(push_pki.client_pem_file),
            "REALTIME_PUSH__APNS__TOPIC": TOPIC,
            "REALTIME_PUSH__WORKERS": "8",
        },
    )
    assert config.push.apns.cert_file == str(push_pki.client_pem_file)
    assert config.push.workers == 8
    assert config.push.enabled


def test_invalid_push_config_names_the_key(
    tmp_path: Path,
    push_pki: PushPki,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> None:
    key = str(push_pki.apns_key_file)
    not_json = tmp_path / "sa.json"
    not_json.write_text("{")
    other_json = tmp_path / "other.json"
    other_json.write_text(json.dumps({"type": "authorized_user"}))
    no_project = tmp_path / "np.json"
    data = json.loads(fcm_credentials.read_text())
    del data["project_id"]
    no_project.write_text(json.dumps(data))
    cases: list[tuple[dict[str, Any], str]] = [
        ({"deadline": 0}, "push.deadline: must be > 0"),
        ({"workers": 0}, "push.workers"),
        ({"queue_size": 0}, "push.queue_size"),
        ({"max_retries": -1}, "push.max_retries"),
        ({"retry_backoff": 2.0, "retry_backoff_max": 1.0}, "push.retry_backoff_max"),
        ({"breaker_failure_ratio": 1.5}, "push.breaker_failure_ratio"),
        ({"breaker_cooldown": 0}, "push.breaker_cooldown"),
        (
            {"apns": {"key_file": "/nope.p8", "key_id": "k", "team_id": "t", "topic": "a"}},
            "push.apns.key_file: '/nope.p8' is not a file: give the path of the .p8 key",
        ),
        ({"apns": {"key_file": key, "team_id": "t", "topic": "a"}}, "push.apns.key_id"),
        ({"apns": {"key_file": key, "key_id": "k", "topic": "a"}}, "push.apns.team_id"),
        (
            {"apns": {"key_file": key, "key_id": "k", "team_id": "t"}},
            "push.apns.topic: set the app's bundle id",
        ),
        ({"apns": {"key_id": "k", "team_id": "t"}}, "push.apns.key_file: key_id/team_id"),
        (
            {
                "apns": {
                    "key_file": key,
                    "key_id": "k",
                    "team_id": "t",
                    "topic": "a",
                    "cert_file": key,
                }
            },
            "push.apns.cert_file: set key_file .* not both",
        ),
        ({"apns": {"cert_file": "/nope.pem", "topic": "a"}}, "push.apns.cert_file: '/nope.pem'"),
        (
            {"fcm": {"service_account_file": "/nope.json"}},
            "push.fcm.service_account_file: '/nope.json' is not a file: download it",
        ),
        ({"fcm": {"service_account_file": str(not_json)}}, "not readable JSON"),
        ({"fcm": {"service_account_file": str(other_json)}}, "not a service-account key"),
        ({"fcm": {"service_account_file": str(no_project)}}, "push.fcm.project_id"),
        ({"fcm": {"project_id": "p"}}, "push.fcm.service_account_file: project_id is set"),
        ({"apns": {"topc": "a"}}, "push.apns.topc: unknown key; did you mean 'topic'"),
    ]
    for push, message in cases:
        with pytest.raises(ConfigError, match=message):
            config_from_dict({"push": push})
    # the project id may come from the config instead of the file
    config_from_dict(
        {"push": {"fcm": {"service_account_file": str(no_project), "project_id": "p"}}}
    )
