"""Backgrounded apps end to end (issue #6 acceptance): the gateway, configured through
[push.apns]/[push.fcm] like any deployment, wakes detached devices through the REAL aioapns
and firebase-admin talking to local fakes (tests/fake_push.py: APNs over HTTP/2 + TLS with a
certificate made for the test, FCM v1 plus its OAuth token endpoint); the apps are real
WebSocket clients and poll over HTTP. Nothing of the gateway is mocked."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from realtime.app import Gateway
from realtime.protocol import realtime_pb2 as pb

from .conftest import GatewayFactory, RawClient, api_post, make_token
from .fake_push import (
    FCM_UNREGISTERED,
    ApnsAnswer,
    ApnsRequest,
    FakeApns,
    FakeFcm,
    FcmRequest,
    PushPki,
    fake_apns,  # noqa: F401  (fixtures)
    fake_fcm,  # noqa: F401
    fcm_credentials,  # noqa: F401
    push_pki,  # noqa: F401
)
from .redis_server import RedisServer
from .test_background import http_poll

TOPIC = "com.example.chat"
KEY_ID = "KEY1234567"
TEAM_ID = "TEAM123456"
WAKE_DELAY = 0.3
CHAT = {"history_size": 100, "history_ttl": 600.0, "push": True, "publish": "token"}
ALERTS = {**CHAT, "push_notification": "New message"}


@pytest.fixture
def push_settings(
    fake_apns: FakeApns,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
    fcm_credentials: Path,  # noqa: F811
) -> dict[str, Any]:
    """[push] pointing the real SDKs at the fakes, as an operator would at a proxy."""
    return {
        "deadline": 5.0,
        "max_retries": 2,
        "retry_backoff": 0.05,
        "retry_backoff_max": 0.2,
        "apns": {
            "key_file": str(push_pki.apns_key_file),
            "key_id": KEY_ID,
            "team_id": TEAM_ID,
            "topic": TOPIC,
            "endpoint": f"127.0.0.1:{fake_apns.port}",
            "ca_file": str(push_pki.ca_file),
        },
        "fcm": {"service_account_file": str(fcm_credentials), "endpoint": fake_fcm.endpoint},
    }


def settings(push: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "namespaces": {"chat": CHAT, "alerts": ALERTS},
        "background": {"wake_delay": WAKE_DELAY, "wakes_per_hour": 3, "poll_page_size": 100},
        "push": push,
    }
    for key, value in overrides.items():
        config[key] = {**config.get(key, {}), **value}
    return config


@pytest.fixture
async def gateway(make_gateway: GatewayFactory, push_settings: dict[str, Any]) -> Gateway:
    return await make_gateway(**settings(push_settings))


@pytest.fixture
async def two_nodes(
    make_gateway: GatewayFactory, push_settings: dict[str, Any], redis_server: RedisServer
) -> tuple[Gateway, Gateway]:
    """Two gateways on one real redis-server, both configured for push."""
    broker = {"type": "redis", "redis_urls": [redis_server.url], "key_prefix": secrets.token_hex(4)}
    one = await make_gateway(**settings(push_settings), broker=broker)
    two = await make_gateway(**settings(push_settings), broker=broker)
    return one, two


class Phone:
    """One user's app on one device: its device token, its push token, its socket."""

    def __init__(self, provider: str, platform: str, user: str = "") -> None:
        self.user = user or "u-" + secrets.token_hex(3)
        self.device = "phone-" + secrets.token_hex(3)
        self.provider = provider
        self.platform = platform
        self.push_token = (
            secrets.token_hex(32) if provider == "apns" else "fcm:" + secrets.token_hex(16)
        )
        self.client: RawClient | None = None

    @property
    def jwt(self) -> str:
        return make_token(self.user, device=self.device)

    async def open(self, gateway: Gateway, clients: list[RawClient]) -> RawClient:
        self.client = await RawClient.open(gateway, token=self.jwt)
        clients.append(self.client)
        return self.client

    async def register(self) -> None:
        assert self.client is not None
        reply = await self.client.request(
            register_device=pb.RegisterDeviceRequest(
                provider=self.provider,
                token=self.push_token,
                environment="sandbox",
                app_id=TOPIC if self.provider == "apns" else "",
                platform=self.platform,
            )
        )
        assert not reply.HasField("error"), reply.error

    async def install(self, gateway: Gateway, clients: list[RawClient], channel: str) -> RawClient:
        """Open the app, register its push token, subscribe to `channel`."""
        app = await self.open(gateway, clients)
        await self.register()
        await app.subscribe(channel)
        return app

    async def background(self) -> None:
        assert self.client is not None
        reply = await self.client.request(
            app_state=pb.AppStateRequest(state=pb.AppStateRequest.STATE_BACKGROUND)
        )
        assert not reply.HasField("error"), reply.error
        await self.client.close()  # the OS suspends the app: its socket dies

    async def poll(self, gateway: Gateway, query: str = "") -> dict[str, Any]:
        status, body = await http_poll(gateway, self.jwt, query)
        assert status == 200, body
        return body


def pushes_to(phone: Phone, apns: FakeApns, fcm: FakeFcm) -> list[ApnsRequest] | list[FcmRequest]:
    if phone.provider == "apns":
        return apns.requests_for(phone.push_token)
    return fcm.requests_for(phone.push_token)


async def eventually(check: Callable[[], Any], what: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def publish_numbers(gateway: Gateway, channel: str, numbers: range) -> None:
    for n in numbers:
        status, body = await api_post(gateway, "publish", {"channel": channel, "data": {"n": n}})
        assert status == 200, body


async def metric(gateway: Gateway, name: str) -> float:
    """A sample's value from GET /metrics (0 when absent), as Prometheus would read it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def numbers(body: dict[str, Any], channel: str) -> list[int]:
    return [p["data"]["n"] for p in body["channels"][channel]["publications"]]


def assert_silent(phone: Phone, request: ApnsRequest | FcmRequest, secret_words: str) -> None:
    """A silent push: the wake hint only, none of the publications' content."""
    if isinstance(request, ApnsRequest):
        headers = request.headers
        assert headers["apns-push-type"] == "background"
        assert headers["apns-priority"] == "5"
        assert headers["apns-topic"] == TOPIC
        assert int(headers["apns-expiration"]) > time.time()
        assert request.body == {"aps": {"content-available": 1}, "t": "sync"}
        assert request.path == f"/3/device/{phone.push_token}"
        raw = request.raw_body
    else:
        message = request.body["message"]
        assert message["token"] == phone.push_token
        assert message["data"] == {"t": "sync"}
        assert "notification" not in message
        assert message["android"]["priority"] == "normal"
        assert message["android"]["ttl"] == "3600s"
        raw = json.dumps(request.body).encode()
    assert secret_words.encode() not in raw


@pytest.mark.parametrize(("provider", "platform"), [("apns", "ios"), ("fcm", "android")])
async def test_background_five_publications_one_silent_push_poll_then_foreground(
    gateway: Gateway,
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
    push_pki: PushPki,  # noqa: F811
    provider: str,
    platform: str,
) -> None:
    phone = Phone(provider, platform)
    app = await phone.install(gateway, clients, "chat/room")
    await publish_numbers(gateway, "chat/room", range(0, 1))
    assert (await app.publication()).pub.offset == 1
    await phone.background()
    # Five publications while away, each with words that must never reach a push service.
    for n in range(1, 6):
        data = {"n": n, "text": f"top secret {n}"}
        status, body = await api_post(gateway, "publish", {"channel": "chat/room", "data": data})
        assert status == 200, body
    pushes = await eventually(lambda: pushes_to(phone, fake_apns, fake_fcm), "the silent push")
    await asyncio.sleep(WAKE_DELAY * 4)  # time for a second wake, were one (wrongly) armed
    pushes = pushes_to(phone, fake_apns, fake_fcm)
    assert len(pushes) == 1
    assert_silent(phone, pushes[0], "top secret")
    if provider == "apns":
        # Token auth: an ES256 JWT from our team and key, which Apple would verify.
        scheme, bearer = pushes[0].headers["authorization"].split(" ", 1)
        assert scheme == "bearer"
        claims = jwt.decode(bearer, push_pki.apns_public_key, algorithms=["ES256"])
        assert claims["iss"] == TEAM_ID
        assert jwt.get_unverified_header(bearer)["kid"] == KEY_ID
    # Woken, the app polls: the five, in order, with the offsets the socket would have had.
    body = await phone.poll(gateway)
    room = body["channels"]["chat/room"]
    assert numbers(body, "chat/room") == [1, 2, 3, 4, 5]
    assert [p["offset"] for p in room["publications"]] == [2, 3, 4, 5, 6]
    assert room["recovered"] is True and body["more"] is False
    reached = room["position"]
    assert reached["offset"] == 6
    # Back in the foreground: reconnect and recover from the polled position.
    back = await phone.open(gateway, clients)
    since = pb.StreamPosition(offset=reached["offset"], epoch=reached["epoch"])
    result = await back.subscribe("chat/room", recover=True, since=since)
    assert result.recovered and list(result.publications) == []
    await publish_numbers(gateway, "chat/room", range(6, 7))
    live = await back.publication()
    assert live.pub.offset == 7
    with pytest.raises(TimeoutError):
        await back.publication(timeout=0.3)  # nothing twice
    assert await metric(gateway, 'realtime_push_wakes_total{outcome="sent"}') == 1
    assert await metric(gateway, 'realtime_push_wakes_total{outcome="coalesced"}') == 4
    assert await metric(gateway, f'realtime_push_sent_total{{provider="{provider}"}}') == 1


async def test_dropped_socket_wakes_after_the_grace_delay(
    gateway: Gateway,
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    phone = Phone("apns", "ios")
    app = await phone.install(gateway, clients, "chat/dropped")
    await app.close()  # no app_state: the network went
    await eventually(
        lambda: phone.user in {u for u, _ in gateway.node.background.local}, "the detach"
    )
    sent_at = time.monotonic()
    await publish_numbers(gateway, "chat/dropped", range(1, 6))
    pushes = await eventually(lambda: fake_apns.requests_for(phone.push_token), "the push")
    assert time.monotonic() - sent_at >= WAKE_DELAY * 0.9  # not before the grace delay
    await asyncio.sleep(WAKE_DELAY * 4)
    assert len(fake_apns.requests_for(phone.push_token)) == 1
    assert_silent(phone, pushes[0], '"n"')
    body = await phone.poll(gateway)
    assert numbers(body, "chat/dropped") == [1, 2, 3, 4, 5]


async def test_back_within_the_grace_delay_sends_nothing(
    make_gateway: GatewayFactory,
    push_settings: dict[str, Any],
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    gateway = await make_gateway(**settings(push_settings, background={"wake_delay": 2.0}))
    for how in ("dropped", "app_state"):
        phone = Phone("apns", "ios")
        app = await phone.open(gateway, clients)
        await phone.register()
        result = await app.subscribe("chat/" + how)
        if how == "app_state":
            await phone.background()
        else:
            await app.close()
        await eventually(
            lambda p=phone: (p.user, p.device) in gateway.node.background.local,  # type: ignore[misc]
            "the detach",
        )
        await publish_numbers(gateway, "chat/" + how, range(1, 4))
        back = await phone.open(gateway, clients)  # well within the 2 s grace delay
        since = pb.StreamPosition(offset=0, epoch=result.position.epoch)
        recovered = await back.subscribe("chat/" + how, recover=True, since=since)
        assert [p.offset for p in recovered.publications] == [1, 2, 3]
        await asyncio.sleep(2.6)  # past the grace delay
        assert fake_apns.requests_for(phone.push_token) == []
    assert await metric(gateway, 'realtime_push_wakes_total{outcome="cancelled"}') == 2
    assert await metric(gateway, 'realtime_push_wakes_total{outcome="sent"}') == 0


async def test_the_hourly_budget_holds_under_a_burst(
    make_gateway: GatewayFactory,
    push_settings: dict[str, Any],
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    gateway = await make_gateway(
        **settings(push_settings, background={"wakes_per_hour": 2, "wake_delay": 0.1})
    )
    phone = Phone("fcm", "android")
    await phone.install(gateway, clients, "chat/busy")
    await phone.background()
    # A burst of 60 publications over ~3 s: many grace periods, each could arm a wake.
    for n in range(60):
        await publish_numbers(gateway, "chat/busy", range(n, n + 1))
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert len(fake_fcm.requests_for(phone.push_token)) == 2
    assert await metric(gateway, 'realtime_push_wakes_total{outcome="sent"}') == 2
    assert await metric(gateway, 'realtime_push_wakes_total{outcome="over_budget"}') >= 1
    # Over budget the app misses nothing: its next poll has it all.
    body = await phone.poll(gateway)
    assert numbers(body, "chat/busy") == list(range(60))


@pytest.mark.parametrize("provider", ["apns", "fcm"])
async def test_an_unregistered_token_is_removed(
    gateway: Gateway,
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
    provider: str,
) -> None:
    phone = Phone(provider, "ios" if provider == "apns" else "android")
    if provider == "apns":
        # 410 with the time APNs found the token gone: after the app registered it.
        invalid_ms = int((time.time() + 1) * 1000)
        fake_apns.answer(phone.push_token, ApnsAnswer(410, "Unregistered", timestamp=invalid_ms))
    else:
        fake_fcm.answer(phone.push_token, FCM_UNREGISTERED)
    await phone.install(gateway, clients, "chat/uninstalled")
    await phone.background()
    await publish_numbers(gateway, "chat/uninstalled", range(1, 2))

    async def devices() -> list[dict[str, Any]]:
        status, body = await api_post(gateway, "devices", {"user": phone.user})
        assert status == 200, body
        found: list[dict[str, Any]] = body["devices"]
        return found

    assert len(await devices()) == 1
    await eventually(lambda: pushes_to(phone, fake_apns, fake_fcm), "the push")
    deadline = time.monotonic() + 10
    while await devices():
        assert time.monotonic() < deadline, "the token was not removed"
        await asyncio.sleep(0.05)
    assert (
        await metric(gateway, f'realtime_push_tokens_removed_total{{provider="{provider}"}}') == 1
    )


async def test_a_token_registered_after_apns_invalidated_it_stays(
    gateway: Gateway,
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    phone = Phone("apns", "ios")
    # APNs found the token invalid an hour ago; the app registered it (again) since.
    fake_apns.answer(
        phone.push_token,
        ApnsAnswer(410, "Unregistered", timestamp=int((time.time() - 3600) * 1000)),
    )
    await phone.install(gateway, clients, "chat/reinstalled")
    await phone.background()
    await publish_numbers(gateway, "chat/reinstalled", range(1, 2))
    await eventually(lambda: fake_apns.requests_for(phone.push_token), "the push")
    await asyncio.sleep(0.3)
    status, body = await api_post(gateway, "devices", {"user": phone.user})
    assert status == 200, body
    assert [d["token"] for d in body["devices"]] == [phone.push_token]


async def test_a_provider_outage_opens_the_breaker_and_the_gateway_stays_healthy(
    make_gateway: GatewayFactory,
    push_settings: dict[str, Any],
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    push = {**push_settings, "breaker_failures": 3, "breaker_cooldown": 60.0, "max_retries": 1}
    gateway = await make_gateway(**settings(push, background={"wake_delay": 0.05}))
    fake_apns.set_default(ApnsAnswer(503, "ServiceUnavailable"))  # APNs is down
    phones = [Phone("apns", "ios") for _ in range(8)]
    for i, phone in enumerate(phones):
        await phone.install(gateway, clients, f"chat/outage-{i}")
        await phone.background()
    for i in range(len(phones)):
        await publish_numbers(gateway, f"chat/outage-{i}", range(1, 2))
    await eventually(
        lambda: gateway.node.metrics.push_dropped.get(("apns", "breaker_open"), 0) >= 1,
        "wakes dropped by the open breaker",
    )
    assert await metric(gateway, 'realtime_push_breaker_state{provider="apns"}') == 2  # open
    # The breaker stops the pile-up: far fewer sends than 8 wakes x 2 attempts.
    assert len(fake_apns.requests) < 8 * 2
    # Meanwhile the gateway serves everyone else as usual, and says it is healthy.
    for path in ("/healthz", "/readyz"):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
    other = await RawClient.open(gateway, token=make_token("bystander"))
    clients.append(other)
    await other.subscribe("chat/alive")
    await publish_numbers(gateway, "chat/alive", range(1, 2))
    assert (await other.publication()).pub.offset == 1
    # FCM is a separate provider with its own breaker: its devices are still woken.
    android = Phone("fcm", "android")
    await android.install(gateway, clients, "chat/outage-fcm")
    await android.background()
    await publish_numbers(gateway, "chat/outage-fcm", range(1, 2))
    await eventually(lambda: fake_fcm.requests_for(android.push_token), "the FCM push")
    # Nothing was lost for the iPhones: their polls have the publication.
    body = await phones[0].poll(gateway)
    assert numbers(body, "chat/outage-0") == [1]


async def test_a_visible_notification_is_generic_and_collapsed_per_channel(
    gateway: Gateway,
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    phone = Phone("apns", "ios")
    await phone.install(gateway, clients, "alerts/orders")
    await phone.background()
    status, body = await api_post(
        gateway, "publish", {"channel": "alerts/orders", "data": {"text": "order 1234 shipped"}}
    )
    assert status == 200, body
    [request] = await eventually(lambda: fake_apns.requests_for(phone.push_token), "the push")
    assert request.headers["apns-push-type"] == "alert"
    assert request.headers["apns-priority"] == "10"
    assert request.headers["apns-collapse-id"].startswith("ch-")
    assert "orders" not in request.headers["apns-collapse-id"]
    assert request.body["aps"]["alert"] == {"body": "New message"}
    assert b"1234" not in request.raw_body


async def test_two_nodes_background_on_one_poll_on_the_other(
    two_nodes: tuple[Gateway, Gateway],
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
) -> None:
    one, two = two_nodes
    phone = Phone("apns", "ios")
    app = await phone.install(one, clients, "chat/cluster")
    await publish_numbers(two, "chat/cluster", range(0, 1))
    assert (await app.publication()).pub.offset == 1
    await phone.background()  # on node one
    await publish_numbers(two, "chat/cluster", range(1, 6))  # through node two
    await eventually(lambda: fake_apns.requests_for(phone.push_token), "the push")
    await asyncio.sleep(WAKE_DELAY * 4)
    [request] = fake_apns.requests_for(phone.push_token)
    assert_silent(phone, request, '"n"')
    body = await phone.poll(two)  # the poll reaches the other node
    assert numbers(body, "chat/cluster") == [1, 2, 3, 4, 5]
    reached = body["channels"]["chat/cluster"]["position"]
    # Foreground through node two: recovery continues from the polled position.
    back = await phone.open(two, clients)
    since = pb.StreamPosition(offset=reached["offset"], epoch=reached["epoch"])
    result = await back.subscribe("chat/cluster", recover=True, since=since)
    assert result.recovered and list(result.publications) == []
    # Attached again through node two, which tells node one to stop standing in for it.
    await eventually(lambda: not one.node.background.local, "node one letting go")
    await publish_numbers(one, "chat/cluster", range(6, 7))
    assert (await back.publication()).pub.offset == 7
    await asyncio.sleep(WAKE_DELAY * 2)
    assert len(fake_apns.requests_for(phone.push_token)) == 1
    status, body = await http_poll(one, phone.jwt)
    assert status == 404 and body["error"]["code"] == "no_detached_session"


async def test_stopping_drops_pending_wakes(
    make_gateway: GatewayFactory,
    push_settings: dict[str, Any],
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
    fake_fcm: FakeFcm,  # noqa: F811
) -> None:
    gateway = await make_gateway(**settings(push_settings, background={"wake_delay": 5.0}))
    phone = Phone("apns", "ios")
    await phone.install(gateway, clients, "chat/stopping")
    await phone.background()
    await publish_numbers(gateway, "chat/stopping", range(1, 2))
    pending = gateway.node.background.local[(phone.user, phone.device)].pending
    assert pending is not None and pending.timer is not None
    await asyncio.wait_for(gateway.stop(drain_timeout=0.5), 4)
    # No wake fires into a stopped node (its broker and push sender are closed).
    assert pending.timer.cancelled()
    assert not gateway.node.background.local and not gateway.node.background._tasks
    assert fake_apns.requests_for(phone.push_token) == []


async def test_the_startup_banner_says_how_apps_are_woken(gateway: Gateway) -> None:
    from realtime.cli import _banner

    [line] = [x for x in _banner(gateway.config, gateway, False).splitlines() if "push " in x]
    assert "apns (auth token, topic com.example.chat, host 127.0.0.1)" in line
    assert "fcm (project realtime-test, endpoint http://127.0.0.1:" in line
    assert f"wake after {WAKE_DELAY:g} s, 3/h per device; apps poll GET /v1/poll" in line


async def test_a_lost_release_is_caught_by_the_wake_check(
    two_nodes: tuple[Gateway, Gateway],
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
) -> None:
    one, two = two_nodes
    one.node.cluster.on("release_device", lost_release)  # as if the message were lost
    phone = Phone("apns", "ios")
    await phone.install(one, clients, "chat/lost")
    await phone.background()
    await phone.open(two, clients)  # back through node two
    store = two.node.broker.detached_sessions
    deadline = time.monotonic() + 10
    while await store.get(phone.user, phone.device) is not None:
        assert time.monotonic() < deadline, "node two did not attach the app"
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # time for a release to arrive, were it not lost
    assert (phone.user, phone.device) in one.node.background.local
    await publish_numbers(two, "chat/lost", range(1, 2))
    await eventually(lambda: not one.node.background.local, "node one's wake finding it back")
    assert one.node.metrics.wakes["cancelled"] == 1
    assert fake_apns.requests_for(phone.push_token) == []


async def lost_release(body: dict[str, Any]) -> dict[str, Any]:
    return {}


async def test_the_stand_ins_of_a_stopped_node_are_taken_over(
    two_nodes: tuple[Gateway, Gateway],
    clients: list[RawClient],
    fake_apns: FakeApns,  # noqa: F811
) -> None:
    """A node stopped for a deploy (or killed) leaves detached devices behind: another node
    takes them over and wakes them; a live node's are left alone."""
    one, two = two_nodes
    phones = [Phone("apns", "ios") for _ in range(3)]
    for phone in phones:
        await phone.install(one, clients, "chat/handover")
        await phone.background()
    stay = Phone("apns", "ios")
    await stay.install(two, clients, "chat/handover")
    await stay.background()
    assert await two.node.background.adopt_orphans() == 0  # node one is alive
    assert await one.node.background.adopt_orphans() == 0  # and so is node two
    await one.stop(drain_timeout=0.5)
    assert await two.node.background.adopt_orphans() == 3
    assert {(p.user, p.device) for p in phones} <= set(two.node.background.local)
    assert await two.node.background.adopt_orphans() == 0  # nothing left to take
    await publish_numbers(two, "chat/handover", range(1, 2))
    for phone in [*phones, stay]:
        await eventually(lambda p=phone: fake_apns.requests_for(p.push_token), "the push")  # type: ignore[misc]
    await asyncio.sleep(WAKE_DELAY * 2)
    assert all(len(fake_apns.requests_for(p.push_token)) == 1 for p in [*phones, stay])
    body = await phones[0].poll(two)
    assert numbers(body, "chat/handover") == [1]
