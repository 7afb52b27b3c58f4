"""Typed settings from a TOML file plus environment overrides.

The dataclass defaults below are the embedded default configuration; `config/gateway.toml`
spells every one of them out with comments (a test keeps the two equal). Environment
variables override the file: ``REALTIME_<SECTION>__<KEY>``, for example
``REALTIME_SERVER__PORT=9000`` or ``REALTIME_NAMESPACES__CHAT__HISTORY_SIZE=100``; values
are read as TOML literals when they parse as one, else as strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "REALTIME_"
JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512")
SUBSCRIBE_POLICIES = ("token", "authenticated")
PUBLISH_POLICIES = ("none", "token", "authenticated")
USER_STATUS_POLICIES = ("none", "authenticated")


class ConfigError(ValueError):
    """Invalid configuration; the message names the key and says what to do."""


@dataclass
class ServerConfig:
    # Public listener for WebSocket clients (and GET /healthz, /readyz).
    host: str = "0.0.0.0"
    port: int = 8000
    # Name of this node in logs, metrics and connect replies ("" = host name).
    node_name: str = ""
    max_connections: int = 100_000
    # Graceful shutdown: clients are told to reconnect after a random delay up to
    # reconnect_jitter seconds; outbound buffers get drain_timeout seconds to empty.
    drain_timeout: float = 10.0
    reconnect_jitter: float = 5.0
    # Allowed Origin headers for browser clients; empty = any origin.
    allowed_origins: list[str] = field(default_factory=list)


@dataclass
class ApiConfig:
    # The server API for backends. Loopback by default: expose it only behind your network.
    host: str = "127.0.0.1"
    port: int = 8001
    # Required: requests carry it as "Authorization: apikey <key>" or "X-API-Key".
    key: str = ""
    max_body_bytes: int = 1_048_576


@dataclass
class AuthConfig:
    # Pinned JWT algorithm: tokens signed with any other are refused.
    algorithm: str = "HS256"
    hmac_secret: str = ""
    # PEM public key for RS*/ES*, inline or in a file.
    public_key: str = ""
    public_key_file: str = ""
    audience: str = ""
    issuer: str = ""
    require_exp: bool = True
    leeway: float = 5.0


@dataclass
class ClientConfig:
    # Minimum app version per platform, e.g. { ios = "3.2.0", android = "3.1.0" }; older
    # apps are refused with action "update_app" and close code 3503.
    min_version: dict[str, str] = field(default_factory=dict)
    connect_timeout: float = 10.0
    ping_interval: int = 25
    pong_timeout: int = 10


@dataclass
class LimitsConfig:
    # Largest inbound WebSocket message; larger ones close the connection with 1009.
    max_frame_bytes: int = 65_536
    max_subscriptions: int = 256
    # Outbound bytes queued for one connection; past this it is closed with 3001 (slow).
    max_queue_bytes: int = 1_048_576
    # Token buckets: commands per connection, publishes per user (across their connections).
    commands_per_second: float = 50.0
    command_burst: int = 100
    user_publishes_per_second: float = 20.0
    user_publish_burst: int = 40
    # Consecutive rate-limited commands after which the connection is closed (3504).
    flood_close_after: int = 200


@dataclass
class MqttConfig:
    # MQTT 3.1.1 and 5.0 devices in the same hub (over TCP, TLS, and WebSocket on the public
    # port with subprotocol "mqtt").
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = 1883
    # MQTT over TLS on tls_port when a certificate and key (PEM files) are configured.
    tls_port: int = 8883
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # Devices without a token (CONNECT without password) get only what namespaces grant
    # to "authenticated" clients.
    allow_anonymous: bool = False
    max_packet_size: int = 1_048_576
    # Cap on the keep-alive a device may ask for (0: any); sent as server keep-alive (5.0).
    max_keep_alive: int = 0
    # QoS 1/2 messages a device may have unacknowledged towards us (5.0 receive maximum),
    # and that we keep unacknowledged towards it; more wait in a queue of this many.
    receive_maximum: int = 100
    max_queued_messages: int = 1000
    max_queued_bytes: int = 1_048_576
    # Persistent sessions (3.1.1 clean_session=false, 5.0 session expiry) are kept at most
    # this many seconds after the device went away.
    max_session_expiry: int = 86_400
    topic_alias_maximum: int = 32
    max_subscriptions: int = 256
    max_connections: int = 100_000
    publishes_per_second: float = 100.0
    publish_burst: int = 200


@dataclass
class PresenceConfig:
    # A presence entry (and a user's online mark) lives this many seconds after its last
    # refresh; nodes refresh their clients' entries every ttl / 3 seconds. So when a node
    # dies without cleaning up, its clients leave presence within ttl seconds.
    ttl: float = 60.0
    # Who may ask for users' online status and last-seen time over a client connection:
    # "authenticated" (any connected client) or "none" (only the server API).
    user_status: str = "authenticated"
    max_users_per_query: int = 200
    # How long a user's last-seen time is kept after they went offline.
    last_seen_ttl: float = 2_592_000.0


@dataclass
class BrokerConfig:
    # "memory": one node alone, nothing to run beside it. "redis": many nodes joined by
    # Redis (pub/sub between nodes, streams for history, presence, user status, retained).
    type: str = "memory"
    # redis: one URL per Redis instance (redis://[user:password@]host:port/db, rediss://
    # for TLS, unix:///path). Channels are spread over them by consistent hashing; every
    # node must list the same instances (order does not matter).
    redis_urls: list[str] = field(default_factory=lambda: ["redis://127.0.0.1:6379/0"])
    # Prefix of every key and pub/sub channel: gateways of different clusters sharing a
    # Redis need different prefixes (pub/sub ignores the database number).
    key_prefix: str = "rt"
    # Seconds to wait for a connection, and for a command's answer. While an instance is
    # unreachable, what needs it fails at once with a temporary error (retry hint) and
    # the node reconnects with jittered exponential backoff up to reconnect_max_delay.
    connect_timeout: float = 2.0
    command_timeout: float = 5.0
    reconnect_max_delay: float = 5.0
    # Pub/sub messages waiting to be handled, per instance; past this the node has fallen
    # behind and drops them (counted; subscribers see the gap in offsets and recover).
    pubsub_queue_size: int = 100_000
    # Seconds a channel stays subscribed in Redis after its last local subscriber left
    # (a client that comes straight back costs no UNSUBSCRIBE + SUBSCRIBE).
    unsubscribe_delay: float = 2.0
    # Every this many seconds a node compares what it received of its subscribed channels
    # (those with history) with the streams' tops in Redis, a batch at a time; a channel
    # still behind at the next check lost publications on the way, and its subscribers
    # are told to resubscribe with recovery (code 2500). 0 turns the checks off.
    position_check_interval: float = 40.0
    # Command connections per Redis instance; more concurrent commands wait for one (up
    # to command_timeout) instead of failing.
    connections_per_instance: int = 64
    # Nodes list themselves (with their load) every node_announce_interval seconds; a node
    # not heard from for node_ttl seconds is taken for dead (its MQTT sessions are taken
    # over without asking it). control_timeout: seconds a node waits for another's answer.
    node_announce_interval: float = 5.0
    node_ttl: float = 15.0
    control_timeout: float = 2.0


@dataclass
class ApnsConfig:
    # Token auth (recommended): the .p8 key from the Apple developer account (Keys), its
    # key id and your team id. Or certificate auth: cert_file, one PEM file holding the
    # push certificate and its private key. Set one of the two.
    key_file: str = ""
    key_id: str = ""
    team_id: str = ""
    cert_file: str = ""
    # The app's bundle id (apns-topic); a device registered with an app id uses its own.
    topic: str = ""
    # "host:port" to send to instead of Apple's servers (an egress proxy, a test server);
    # ca_file: PEM CA certificates trusted for it instead of the system's.
    endpoint: str = ""
    ca_file: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.key_file or self.cert_file)


@dataclass
class FcmConfig:
    # The Firebase service-account JSON (Project settings > Service accounts).
    service_account_file: str = ""
    # "" = the project_id in that file.
    project_id: str = ""
    # Base URL to send to instead of https://fcm.googleapis.com (an egress proxy, a test
    # server). The OAuth token endpoint is the file's token_uri.
    endpoint: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.service_account_file)


@dataclass
class PushConfig:
    # Push providers that wake backgrounded apps. Off unless [push.apns] or [push.fcm]
    # is configured. Seconds one send may take (connection included) before it is
    # given up and retried.
    deadline: float = 10.0
    # Sending tasks, and wakes waiting (queued or to be retried) past which new ones are
    # dropped (counted in push_dropped_total).
    workers: int = 4
    queue_size: int = 10_000
    # Temporary errors (timeouts, 429, 5xx) are retried this many times, after
    # retry_backoff * 2^n seconds (with jitter, at most retry_backoff_max, at least the
    # provider's Retry-After).
    max_retries: int = 3
    retry_backoff: float = 1.0
    retry_backoff_max: float = 60.0
    # Circuit breaker per provider: it opens after breaker_failures failures in a row, or
    # when breaker_failure_ratio of at least breaker_min_requests sends in the last
    # breaker_window seconds failed (0 = no ratio rule); while open, wakes for that
    # provider are dropped at once; after breaker_cooldown seconds one trial send decides.
    breaker_failures: int = 5
    breaker_failure_ratio: float = 0.5
    breaker_window: float = 60.0
    breaker_min_requests: int = 20
    breaker_cooldown: float = 30.0
    # Device push tokens neither used (a connect with the token's device claim) nor
    # registered again for this many days are removed, once a day (0: kept until the
    # provider says they are invalid or the app unregisters).
    token_max_idle_days: int = 60
    apns: ApnsConfig = field(default_factory=ApnsConfig)
    fcm: FcmConfig = field(default_factory=FcmConfig)

    @property
    def enabled(self) -> bool:
        return self.apns.configured or self.fcm.configured


@dataclass
class LogConfig:
    level: str = "info"
    # "json": one JSON object per line; "text": key=value lines for humans.
    format: str = "text"


@dataclass
class NamespaceConfig:
    # Publications kept per channel (0 = no history, no positions, no recovery).
    history_size: int = 0
    history_ttl: float = 300.0
    # How long an idle stream keeps its epoch and offset after its history expired.
    history_meta_ttl: float = 86_400.0
    # "token": the token's `subscribe` claim must match; "authenticated": any client.
    subscribe: str = "token"
    # "token": the token's `publish` claim must match (a token without one publishes
    # nowhere); "none": only the server API publishes; "authenticated": any client.
    publish: str = "token"
    # A publish repeating an idempotency key within this many seconds is not repeated.
    idempotency_window: float = 300.0
    # Presence: who is subscribed to a channel (WebSocket clients and MQTT devices
    # subscribed to the exact topic), queried with presence / presence_stats.
    presence: bool = False
    # Push join and leave events to the channel's subscribers (needs presence).
    join_leave: bool = False
    # ...but not to the subscribers on a node where the channel has more than this many
    # (every join goes to every subscriber: a big room would cost N^2 pushes). 0: no limit.
    join_leave_max_subscribers: int = 1000
    # Typing indicators: forwarded at most once per typing_throttle seconds per user and
    # channel; receivers are told typing stopped when not renewed within typing_timeout.
    typing: bool = False
    typing_throttle: float = 2.0
    typing_timeout: float = 6.0
    # Subscribers may ask for Fossil deltas (subscribe with delta "fossil"). Needs
    # history_size > 0: positions let a client notice a lost base and resubscribe.
    delta: bool = False
    # Backgrounded apps ([background]): a publication here wakes a detached device with a
    # silent push (no content; the app polls). push_notification: a generic visible text
    # instead ("New message"), collapsed per channel, not sent during push_quiet_hours
    # ("22:00-07:00", UTC; the silent wake still goes).
    push: bool = False
    push_notification: str = ""
    push_quiet_hours: str = ""


@dataclass
class BackgroundConfig:
    # An app in the background (app_state) or whose socket dropped keeps its channels and
    # positions this many seconds (its detached session), for wakes and GET /v1/poll.
    detach_ttl: float = 86_400.0
    # Seconds between the first publication for a detached device and its wake: coming
    # back (or a later publication) within them sends nothing more.
    wake_delay: float = 10.0
    # Wakes per device per hour at most (iOS throttles background pushes beyond 2-3);
    # over budget nothing is sent: the next poll or foreground catches up.
    wakes_per_hour: int = 3
    # GET /v1/poll: longest wait for a publication (long polling), publications per page.
    poll_max_wait: float = 30.0
    poll_page_size: int = 100
    # Polls per device: poll_rate a second on average, poll_burst at once (a wake's few
    # pages); beyond, 429 with retry_after_ms. Polls being served on this node at most
    # (long polls hold theirs); beyond, 503.
    poll_rate: float = 0.5
    poll_burst: int = 10
    max_polls_in_flight: int = 10_000


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    push: PushConfig = field(default_factory=PushConfig)
    background: BackgroundConfig = field(default_factory=BackgroundConfig)
    log: LogConfig = field(default_factory=LogConfig)
    # Channel "chat/room1" uses namespace "chat" when one is configured, else "default".
    namespaces: dict[str, NamespaceConfig] = field(
        default_factory=lambda: {"default": NamespaceConfig()}
    )
    # Set by `serve --dev`: secrets were generated for local development.
    dev: bool = False
    source: str = "built-in defaults"


# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (or only defaults), apply environment overrides, validate."""
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        source = str(path)
    env = os.environ if environ is None else environ
    overrides = _env_overrides(env)
    for keys, value in overrides:
        table = raw
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{'.'.join(keys)}: environment override conflicts with file")
        table[keys[-1]] = value
    return config_from_dict(raw, source + (" + environment" if overrides else ""))


def config_from_dict(raw: dict[str, Any], source: str = "dict") -> Config:
    """Build and validate a Config from parsed TOML (or any dict of the same shape)."""
    config: Config = _build(Config, raw, "")
    config.namespaces.setdefault("default", NamespaceConfig())
    config.source = source
    validate(config)
    return config


def _env_overrides(env: Mapping[str, str]) -> list[tuple[list[str], Any]]:
    out = []
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            continue
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out.append((keys, value))
    return out


def _build(cls: type[Any], table: Any, path: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{path or 'config'}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("dev", "source")}
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{path}.{key}" if path else key
        if key not in known:
            close = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key{hint} (known: {', '.join(known)})")
        values[key] = _coerce(hints[key], value, where)
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(typing.cast(type[Any], hint), value, where)
    if origin is dict:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table")
        return {str(k): _coerce(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list")
        return [_coerce(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(hint, types.UnionType):
        raise ConfigError(f"{where}: unsupported type")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {hint}")


# ----------------------------------------------------------------------------- validation

_NAMESPACE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_version(text: str) -> tuple[int, ...] | None:
    """'3.2.10' -> (3, 2, 10); a suffix like '-beta' is ignored; None when unparseable."""
    match = re.match(r"^v?(\d+(?:\.\d+)*)", text.strip())
    if not match:
        return None
    return tuple(int(part) for part in match.group(1).split("."))


def validate(config: Config) -> None:
    def need(condition: bool, key: str, message: str) -> None:
        if not condition:
            raise ConfigError(f"{key}: {message}")

    for key, port in (("server.port", config.server.port), ("api.port", config.api.port)):
        need(0 <= port <= 65535, key, f"{port} is not a TCP port")
    need(config.server.drain_timeout >= 0, "server.drain_timeout", "must be >= 0")
    need(config.server.reconnect_jitter >= 0, "server.reconnect_jitter", "must be >= 0")
    need(config.server.max_connections > 0, "server.max_connections", "must be > 0")
    need(
        config.auth.algorithm in JWT_ALGORITHMS,
        "auth.algorithm",
        f"{config.auth.algorithm!r} is not one of {', '.join(JWT_ALGORITHMS)}",
    )
    if config.auth.algorithm.startswith("HS"):
        need(
            not config.auth.hmac_secret or len(config.auth.hmac_secret) >= 32,
            "auth.hmac_secret",
            "must be at least 32 characters (generate one: python -c "
            "'import secrets; print(secrets.token_urlsafe(32))')",
        )
    need(config.auth.leeway >= 0, "auth.leeway", "must be >= 0")
    for platform, version in config.client.min_version.items():
        need(
            parse_version(version) is not None,
            f"client.min_version.{platform}",
            f"{version!r} is not a version like 2.4.1",
        )
    need(config.client.ping_interval >= 1, "client.ping_interval", "must be >= 1 second")
    need(config.client.pong_timeout >= 1, "client.pong_timeout", "must be >= 1 second")
    need(config.client.connect_timeout > 0, "client.connect_timeout", "must be > 0")
    limits = config.limits
    need(limits.max_frame_bytes >= 256, "limits.max_frame_bytes", "must be >= 256")
    need(limits.max_subscriptions >= 1, "limits.max_subscriptions", "must be >= 1")
    need(limits.max_queue_bytes >= 4096, "limits.max_queue_bytes", "must be >= 4096")
    need(limits.commands_per_second > 0, "limits.commands_per_second", "must be > 0")
    need(limits.command_burst >= 1, "limits.command_burst", "must be >= 1")
    need(limits.user_publishes_per_second > 0, "limits.user_publishes_per_second", "must be > 0")
    need(limits.user_publish_burst >= 1, "limits.user_publish_burst", "must be >= 1")
    need(limits.flood_close_after >= 1, "limits.flood_close_after", "must be >= 1")
    _validate_broker(config.broker, need)
    _validate_push(config.push, need)
    mqtt = config.mqtt
    need(0 <= mqtt.port <= 65535, "mqtt.port", f"{mqtt.port} is not a TCP port")
    need(0 <= mqtt.tls_port <= 65535, "mqtt.tls_port", f"{mqtt.tls_port} is not a TCP port")
    need(
        bool(mqtt.tls_cert_file) == bool(mqtt.tls_key_file),
        "mqtt.tls_cert_file",
        "set both tls_cert_file and tls_key_file, or neither",
    )
    need(
        64 <= mqtt.max_packet_size <= 268_435_460,
        "mqtt.max_packet_size",
        "must be between 64 and 268435460",
    )
    need(0 <= mqtt.max_keep_alive <= 65535, "mqtt.max_keep_alive", "must be 0..65535")
    need(1 <= mqtt.receive_maximum <= 65535, "mqtt.receive_maximum", "must be 1..65535")
    need(mqtt.max_queued_messages >= 0, "mqtt.max_queued_messages", "must be >= 0")
    need(mqtt.max_queued_bytes >= 0, "mqtt.max_queued_bytes", "must be >= 0")
    need(mqtt.max_session_expiry >= 0, "mqtt.max_session_expiry", "must be >= 0")
    need(0 <= mqtt.topic_alias_maximum <= 65535, "mqtt.topic_alias_maximum", "must be 0..65535")
    need(mqtt.max_subscriptions >= 1, "mqtt.max_subscriptions", "must be >= 1")
    need(mqtt.max_connections >= 1, "mqtt.max_connections", "must be >= 1")
    need(mqtt.publishes_per_second > 0, "mqtt.publishes_per_second", "must be > 0")
    need(mqtt.publish_burst >= 1, "mqtt.publish_burst", "must be >= 1")
    background = config.background
    need(background.detach_ttl > 0, "background.detach_ttl", "must be > 0")
    need(background.wake_delay >= 0, "background.wake_delay", "must be >= 0")
    need(background.wakes_per_hour >= 0, "background.wakes_per_hour", "must be >= 0")
    need(background.poll_max_wait >= 0, "background.poll_max_wait", "must be >= 0")
    need(background.poll_page_size >= 1, "background.poll_page_size", "must be >= 1")
    need(background.poll_rate > 0, "background.poll_rate", "must be > 0 polls a second")
    need(background.poll_burst >= 1, "background.poll_burst", "must be >= 1")
    need(background.max_polls_in_flight >= 1, "background.max_polls_in_flight", "must be >= 1")
    presence = config.presence
    need(presence.ttl >= 3, "presence.ttl", "must be >= 3 seconds")
    need(
        presence.user_status in USER_STATUS_POLICIES,
        "presence.user_status",
        f"must be one of {', '.join(USER_STATUS_POLICIES)}",
    )
    need(presence.max_users_per_query >= 1, "presence.max_users_per_query", "must be >= 1")
    need(presence.last_seen_ttl > 0, "presence.last_seen_ttl", "must be > 0")
    need(
        config.log.level in ("debug", "info", "warning", "error"),
        "log.level",
        "must be debug, info, warning or error",
    )
    need(config.log.format in ("json", "text"), "log.format", "must be json or text")
    for name, ns in config.namespaces.items():
        key = f"namespaces.{name}"
        need(bool(_NAMESPACE_NAME.match(name)), key, "name may use letters, digits, _ . -")
        need(ns.history_size >= 0, f"{key}.history_size", "must be >= 0")
        need(ns.history_ttl > 0, f"{key}.history_ttl", "must be > 0")
        need(ns.history_meta_ttl > 0, f"{key}.history_meta_ttl", "must be > 0")
        need(ns.idempotency_window > 0, f"{key}.idempotency_window", "must be > 0")
        need(
            ns.subscribe in SUBSCRIBE_POLICIES,
            f"{key}.subscribe",
            f"must be one of {', '.join(SUBSCRIBE_POLICIES)}",
        )
        need(
            ns.publish in PUBLISH_POLICIES,
            f"{key}.publish",
            f"must be one of {', '.join(PUBLISH_POLICIES)}",
        )
        need(
            ns.presence or not ns.join_leave,
            f"{key}.join_leave",
            "needs presence = true in the same namespace",
        )
        need(ns.join_leave_max_subscribers >= 0, f"{key}.join_leave_max_subscribers", ">= 0")
        need(ns.typing_throttle >= 0, f"{key}.typing_throttle", "must be >= 0")
        need(
            ns.typing_timeout > ns.typing_throttle,
            f"{key}.typing_timeout",
            "must be greater than typing_throttle (renewals must arrive before expiry)",
        )
        need(
            not ns.delta or ns.history_size > 0,
            f"{key}.delta",
            "needs history_size > 0 (deltas rely on positions to detect a lost base)",
        )
        need(
            not ns.push_quiet_hours or parse_quiet_hours(ns.push_quiet_hours) is not None,
            f"{key}.push_quiet_hours",
            'must look like "22:00-07:00" (UTC)',
        )


def parse_quiet_hours(text: str) -> tuple[int, int] | None:
    """ "22:00-07:00" -> (start, end) in minutes of the day (UTC), or None when invalid."""
    match = re.fullmatch(r"(\d\d):(\d\d)-(\d\d):(\d\d)", text.strip())
    if match is None:
        return None
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59:
        return None
    return h1 * 60 + m1, h2 * 60 + m2


def _validate_push(push: PushConfig, need: Callable[[bool, str, str], None]) -> None:
    need(push.deadline > 0, "push.deadline", "must be > 0 seconds")
    need(1 <= push.workers <= 256, "push.workers", "must be 1..256")
    need(push.queue_size >= 1, "push.queue_size", "must be >= 1")
    need(push.max_retries >= 0, "push.max_retries", "must be >= 0")
    need(push.retry_backoff > 0, "push.retry_backoff", "must be > 0 seconds")
    need(
        push.retry_backoff_max >= push.retry_backoff,
        "push.retry_backoff_max",
        "must be >= push.retry_backoff",
    )
    need(push.breaker_failures >= 1, "push.breaker_failures", "must be >= 1")
    need(
        0 <= push.breaker_failure_ratio <= 1,
        "push.breaker_failure_ratio",
        "must be between 0 and 1 (0 turns the ratio rule off)",
    )
    need(push.breaker_window > 0, "push.breaker_window", "must be > 0 seconds")
    need(push.breaker_min_requests >= 1, "push.breaker_min_requests", "must be >= 1")
    need(push.breaker_cooldown > 0, "push.breaker_cooldown", "must be > 0 seconds")
    need(push.token_max_idle_days >= 0, "push.token_max_idle_days", "must be >= 0 (0: never)")
    apns = push.apns
    need(
        not (apns.key_file and apns.cert_file),
        "push.apns.cert_file",
        "set key_file (token auth) or cert_file (certificate auth), not both",
    )
    if apns.key_file:
        need(
            Path(apns.key_file).is_file(),
            "push.apns.key_file",
            f"{apns.key_file!r} is not a file: give the path of the .p8 key downloaded "
            "from the Apple developer account (Certificates, IDs & Profiles > Keys)",
        )
        need(bool(apns.key_id), "push.apns.key_id", "token auth needs the key's 10-character id")
        need(bool(apns.team_id), "push.apns.team_id", "token auth needs your 10-character team id")
    else:
        need(
            not (apns.key_id or apns.team_id),
            "push.apns.key_file",
            "key_id/team_id are set: also set key_file (the .p8 key) for token auth",
        )
    if apns.cert_file:
        need(
            Path(apns.cert_file).is_file(),
            "push.apns.cert_file",
            f"{apns.cert_file!r} is not a file: give a PEM file with the APNs push "
            "certificate and its private key",
        )
    if apns.configured:
        need(
            bool(apns.topic),
            "push.apns.topic",
            "set the app's bundle id (for example com.example.app)",
        )
    if apns.endpoint:
        host, _, port = apns.endpoint.rpartition(":")
        need(
            bool(host) and port.isdigit() and 0 < int(port) < 65536,
            "push.apns.endpoint",
            f"{apns.endpoint!r} is not host:port (for example apns-proxy.internal:443)",
        )
    if apns.ca_file:
        need(
            Path(apns.ca_file).is_file(),
            "push.apns.ca_file",
            f"{apns.ca_file!r} is not a file: give a PEM file of CA certificates",
        )
    fcm = push.fcm
    if fcm.endpoint:
        need(
            fcm.endpoint.startswith(("https://", "http://")),
            "push.fcm.endpoint",
            f"{fcm.endpoint!r} is not a URL (for example https://fcm-proxy.internal)",
        )
    if fcm.service_account_file:
        problem, project = _service_account_error(fcm.service_account_file)
        need(problem is None, "push.fcm.service_account_file", str(problem))
        need(
            bool(fcm.project_id or project),
            "push.fcm.project_id",
            "the service-account file names no project_id: set it here",
        )
    else:
        need(
            not fcm.project_id,
            "push.fcm.service_account_file",
            "project_id is set: also set the service-account JSON file",
        )


def _service_account_error(path: str) -> tuple[str | None, str]:
    """(what is wrong with a Firebase service-account file or None, its project id)."""
    import json

    where = Path(path)
    hint = "download it from the Firebase console (Project settings > Service accounts)"
    if not where.is_file():
        return f"{path!r} is not a file: {hint}", ""
    try:
        data = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{path!r} is not readable JSON ({exc}): {hint}", ""
    if not isinstance(data, dict) or data.get("type") != "service_account":
        return f'{path!r} is not a service-account key (no "type": "service_account"): {hint}', ""
    missing = [k for k in ("private_key", "client_email", "token_uri") if not data.get(k)]
    if missing:
        return f"{path!r} lacks {', '.join(missing)}: {hint}", ""
    return None, str(data.get("project_id") or "")


BROKER_TYPES = ("memory", "redis")
_KEY_PREFIX = re.compile(r"^[A-Za-z0-9_.:{}-]+$")


def _validate_broker(broker: BrokerConfig, need: Callable[[bool, str, str], None]) -> None:
    need(
        broker.type in BROKER_TYPES,
        "broker.type",
        f"{broker.type!r} is not one of {', '.join(BROKER_TYPES)}",
    )
    if broker.type != "redis":
        return
    need(bool(broker.redis_urls), "broker.redis_urls", "list at least one Redis URL")
    seen: set[str] = set()
    for i, url in enumerate(broker.redis_urls):
        key = f"broker.redis_urls[{i}]"
        problem, where = _redis_url_error(url)
        need(problem is None, key, f"{url!r}: {problem}")
        need(where not in seen, key, f"{url!r}: the same Redis instance is listed twice")
        seen.add(where)
    need(
        bool(_KEY_PREFIX.match(broker.key_prefix)),
        "broker.key_prefix",
        "must be non-empty: letters, digits and _ . : { } -",
    )
    need(broker.connect_timeout > 0, "broker.connect_timeout", "must be > 0")
    need(broker.command_timeout > 0, "broker.command_timeout", "must be > 0")
    need(broker.reconnect_max_delay > 0, "broker.reconnect_max_delay", "must be > 0")
    need(broker.pubsub_queue_size >= 1, "broker.pubsub_queue_size", "must be >= 1")
    need(broker.unsubscribe_delay >= 0, "broker.unsubscribe_delay", "must be >= 0")
    need(
        broker.position_check_interval >= 0,
        "broker.position_check_interval",
        "must be >= 0 (0 turns the checks off)",
    )
    need(broker.connections_per_instance >= 1, "broker.connections_per_instance", "must be >= 1")
    need(broker.node_announce_interval >= 1, "broker.node_announce_interval", "must be >= 1")
    need(
        broker.node_ttl > broker.node_announce_interval,
        "broker.node_ttl",
        "must be longer than broker.node_announce_interval",
    )
    need(broker.control_timeout > 0, "broker.control_timeout", "must be > 0")


def _redis_url_error(url: str) -> tuple[str | None, str]:
    """(what is wrong with a Redis URL or None, the instance it names)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"not a URL ({exc})", url
    if parts.scheme == "unix":
        if not parts.path:
            return "unix:// needs a socket path, e.g. unix:///run/redis.sock", url
        return None, parts.path
    if parts.scheme not in ("redis", "rediss"):
        return "use redis://host:port/db, rediss:// (TLS) or unix:///path", url
    if not parts.hostname:
        return "no host, e.g. redis://127.0.0.1:6379/0", url
    db = parts.path.strip("/") or "0"
    if not db.isdigit():
        return f"the database {db!r} is not a number", url
    return None, f"{parts.hostname}:{port or 6379}/{db}"


def require_secrets(config: Config) -> None:
    """Refuse to serve without the secrets production needs (dev mode generates them)."""
    auth = config.auth
    if auth.algorithm.startswith("HS") and not auth.hmac_secret:
        raise ConfigError(
            "auth.hmac_secret is empty: set it in the config file or REALTIME_AUTH__HMAC_SECRET "
            "(at least 32 random characters), or run `realtime serve --dev` for local "
            "development secrets"
        )
    if not auth.algorithm.startswith("HS") and not (auth.public_key or auth.public_key_file):
        raise ConfigError(
            f"auth.public_key: {auth.algorithm} needs the PEM public key that verifies "
            "tokens (auth.public_key or auth.public_key_file)"
        )
    if not config.api.key:
        raise ConfigError(
            "api.key is empty: set it in the config file or REALTIME_API__KEY, or run "
            "`realtime serve --dev` for local development secrets"
        )
    if len(config.api.key) < 16:
        raise ConfigError("api.key: must be at least 16 characters")


DEV_SECRETS_FILE = Path(".realtime") / "dev-secrets.toml"


def apply_dev_secrets(config: Config, path: Path = DEV_SECRETS_FILE) -> bool:
    """Fill missing secrets from (or into) a local dev file; True when it was created."""
    import secrets

    created = False
    stored: dict[str, Any] = {}
    if path.exists():
        stored = tomllib.loads(path.read_text())
    else:
        stored = {
            "hmac_secret": secrets.token_urlsafe(32),
            "api_key": secrets.token_urlsafe(24),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(
                "# Generated by `realtime serve --dev`: development only, never production.\n"
                f'hmac_secret = "{stored["hmac_secret"]}"\n'
                f'api_key = "{stored["api_key"]}"\n'
            )
        created = True
    if config.auth.algorithm.startswith("HS") and not config.auth.hmac_secret:
        config.auth.hmac_secret = str(stored["hmac_secret"])
    if not config.api.key:
        config.api.key = str(stored["api_key"])
    config.dev = True
    return created
