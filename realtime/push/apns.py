"""APNs through aioapns: token (.p8) or certificate auth, silent and visible pushes.

One aioapns client per APNs environment (production, sandbox), built on first use inside
the running loop (aioapns binds its pool to the loop it is created in). aioapns has no
request timeout: every send runs under `asyncio.wait_for(deadline)`. Apple's answers map
to a `PushOutcome` (see `outcome_for`).

Tests point the client at a local HTTP/2 server with `host`/`port`/`ssl_context`: aioapns
has no host argument, so the pool's protocol class is subclassed with `APNS_SERVER` and
`APNS_PORT` set (class attributes of aioapns 4.0; pyproject bounds the version and the
tests notice a change).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aioapns import APNs, NotificationRequest, PushType
from aioapns.common import NotificationResult
from aioapns.connection import APNsTLSClientProtocol
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from realtime.push.messages import (
    APNS,
    SANDBOX,
    VISIBLE,
    PushOutcome,
    Wake,
    collapse_id_for,
)

if TYPE_CHECKING:
    from realtime.config import ApnsConfig

MAX_PAYLOAD_BYTES = 4096
PRIORITY_SILENT = 5  # 10 is refused for background pushes
PRIORITY_VISIBLE = 10

# Apple's reasons (https://developer.apple.com, "Handling notification responses").
TOKEN_REASONS = frozenset({"BadDeviceToken", "DeviceTokenNotForTopic"})
CONFIG_REASONS = frozenset(
    {
        # the topic
        "BadTopic",
        "MissingTopic",
        "TopicDisallowed",
        # the provider token or certificate
        "InvalidProviderToken",
        "ExpiredProviderToken",
        "MissingProviderToken",
        "BadCertificate",
        "BadCertificateEnvironment",
        "Forbidden",
    }
)
RETRY_STATUSES = frozenset({429, 500, 503})


def outcome_for(
    status: int, reason: str, timestamp: int | None, registered_at: float
) -> PushOutcome:
    """Map an APNs answer to what to do (shared/notes/push.md, "Provider answers")."""
    if status == 200:
        return PushOutcome.sent()
    if status == 410:
        # Unregistered (or ExpiredToken): the token is gone, unless the app registered it
        # again after APNs noticed (the timestamp is in milliseconds since the epoch).
        if timestamp is not None and registered_at * 1000 > timestamp:
            return PushOutcome.failed(
                reason or "Unregistered",
                f"token registered after APNs invalidated it ({timestamp} ms): kept",
                status,
            )
        since = timestamp / 1000 if timestamp is not None else 0.0
        return PushOutcome.token_invalid(
            reason or "Unregistered", status=status, invalid_since=since
        )
    if status == 400 and reason in TOKEN_REASONS:
        return PushOutcome.token_invalid(reason, status=status)
    if reason in CONFIG_REASONS or status in (403, 413):
        return PushOutcome.config_error(reason or str(status), status=status)
    if status in RETRY_STATUSES:
        return PushOutcome.retry(reason or str(status), status=status)
    return PushOutcome.failed(reason or str(status), status=status)


def build_request(wake: Wake, default_topic: str) -> NotificationRequest:
    """The aioapns request for `wake`: headers and body exactly as APNs wants them."""
    collapse = collapse_id_for(wake.collapse_id) if wake.collapse_id else None
    message: dict[str, Any]
    if wake.kind == VISIBLE:
        alert = {k: v for k, v in (("title", wake.title), ("body", wake.body)) if v}
        aps: dict[str, Any] = {"alert": alert}
        thread = wake.thread_id or wake.collapse_id
        if thread:
            aps["thread-id"] = thread
        message = {"aps": aps, **wake.hint}
        priority, push_type = PRIORITY_VISIBLE, PushType.ALERT
    else:
        # Silent: content-available only, no alert, sound or badge.
        message = {"aps": {"content-available": 1}, **wake.hint}
        priority, push_type = PRIORITY_SILENT, PushType.BACKGROUND
    return NotificationRequest(
        device_token=wake.token,
        message=message,
        time_to_live=wake.ttl,  # aioapns sends apns-expiration = now + ttl
        priority=priority,
        collapse_key=collapse,
        push_type=push_type,
        apns_topic=wake.app_id or default_topic,
    )


def _protocol_class(
    base: type[APNsTLSClientProtocol], host: str | None, port: int | None
) -> type[APNsTLSClientProtocol]:
    """aioapns' protocol with our host/port, and a send that cleans up after a deadline."""

    class Protocol(base):  # type: ignore[valid-type,misc]
        if host is not None:
            APNS_SERVER = host
        if port is not None:
            APNS_PORT = port

        async def send_notification(self, request: NotificationRequest) -> NotificationResult:
            try:
                result: NotificationResult = await super().send_notification(request)
                return result
            except asyncio.CancelledError:
                self._forget(request.notification_id)
                raise

        def _forget(self, notification_id: str) -> None:
            # Our deadline cancelled a request APNs did not answer: drop aioapns' record of
            # it (so a late answer or a lost connection does not touch a cancelled future),
            # reset its stream and give the stream slot back.
            self.requests.pop(notification_id, None)
            self.request_statuses.pop(notification_id, None)
            for stream_id, nid in list(self.request_streams.items()):
                if nid != notification_id:
                    continue
                del self.request_streams[stream_id]
                try:
                    self.conn.reset_stream(stream_id)
                    self.flush()
                except Exception:  # the stream or the connection is already gone
                    pass
                self.free_channels.release()

    return Protocol


class ApnsProvider:
    """Sends `Wake`s to APNs. Token auth: `key_file` (.p8), `key_id`, `team_id`;
    certificate auth: `cert_file` (PEM with the certificate and its key)."""

    name = APNS

    def __init__(
        self,
        *,
        topic: str,
        key_file: str = "",
        key_id: str = "",
        team_id: str = "",
        cert_file: str = "",
        deadline: float = 10.0,
        host: str | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 4,
    ) -> None:
        if bool(key_file) == bool(cert_file):
            raise ValueError("ApnsProvider: give key_file (token auth) or cert_file, not both")
        if key_file and not (key_id and team_id):
            raise ValueError("ApnsProvider: token auth needs key_id and team_id")
        if not topic:
            raise ValueError("ApnsProvider: topic (the app's bundle id) is required")
        self.topic = topic
        self.key_file = key_file
        self.key_id = key_id
        self.team_id = team_id
        self.cert_file = cert_file
        self.deadline = deadline
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.max_connections = max_connections
        self._key: str | None = None
        self._clients: dict[str, APNs] = {}

    @classmethod
    def from_config(cls, config: ApnsConfig, deadline: float) -> ApnsProvider:
        """From `PushConfig.apns`."""
        host: str | None = None
        port: int | None = None
        if config.endpoint:
            host, _, port_text = config.endpoint.rpartition(":")
            port = int(port_text)
        context: ssl.SSLContext | None = None
        if config.ca_file:
            context = ssl.create_default_context(cafile=config.ca_file)
            context.set_alpn_protocols(["h2"])
        return cls(
            topic=config.topic,
            key_file=config.key_file,
            key_id=config.key_id,
            team_id=config.team_id,
            cert_file=config.cert_file,
            deadline=deadline,
            host=host,
            port=port,
            ssl_context=context,
        )

    async def start(self) -> None:
        """Read and check the signing key (a bad key would otherwise surface only as
        connection failures inside aioapns)."""
        if self.key_file:
            self._key = await asyncio.to_thread(Path(self.key_file).read_text)
            try:
                key = load_pem_private_key(self._key.encode(), password=None)
            except ValueError as exc:
                raise ValueError(f"{self.key_file}: not a PEM private key ({exc})") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{self.key_file}: APNs keys (.p8) are EC P-256 keys")

    def _client(self, environment: str) -> APNs:
        client = self._clients.get(environment)
        if client is not None:
            return client
        context = self.ssl_context
        if context is None:
            context = ssl.create_default_context()
            context.set_alpn_protocols(["h2"])

        async def quiet(request: NotificationRequest, result: NotificationResult) -> None:
            pass  # aioapns would log every refusal at error level: send() reports instead

        sandbox = environment == SANDBOX
        if self.cert_file:
            client = APNs(
                client_cert=self.cert_file,
                topic=self.topic,
                use_sandbox=sandbox,
                ssl_context=context,
                max_connections=self.max_connections,
                err_func=quiet,
            )
        else:
            if self._key is None:
                raise RuntimeError("ApnsProvider.start() was not awaited")
            client = APNs(
                key=self._key,
                key_id=self.key_id,
                team_id=self.team_id,
                topic=self.topic,
                use_sandbox=sandbox,
                ssl_context=context,
                max_connections=self.max_connections,
                err_func=quiet,
            )
        pool = client.pool
        pool.protocol_class = _protocol_class(pool.protocol_class, self.host, self.port)
        self._clients[environment] = client
        return client

    async def send(self, wake: Wake) -> PushOutcome:
        request = build_request(wake, self.topic)
        size = len(json.dumps(request.message, ensure_ascii=False).encode())
        if size > MAX_PAYLOAD_BYTES:
            return PushOutcome.failed("PayloadTooLarge", f"{size} bytes (APNs takes 4096)")
        try:
            client = self._client(wake.environment)
            result = await asyncio.wait_for(client.send_notification(request), self.deadline)
        except TimeoutError:
            return PushOutcome.retry("timeout", f"no answer within {self.deadline:g} s")
        except (ssl.SSLError, ValueError) as exc:
            # our certificate or key is unusable (ValueError: aioapns/PyJWT reading the key)
            return PushOutcome.config_error(type(exc).__name__, str(exc))
        except Exception as exc:  # connection refused, closed, MaxAttemptsExceeded, ...
            return PushOutcome.retry("connection", f"{type(exc).__name__}: {exc}")
        try:
            status = int(result.status)
        except ValueError:
            status = 0
        return outcome_for(status, result.description or "", result.timestamp, wake.registered_at)

    async def close(self) -> None:
        for client in self._clients.values():
            client.pool.close()
        self._clients.clear()
        await asyncio.sleep(0)  # let the transports start closing

    def describe(self) -> dict[str, Any]:
        """For the start-up log line."""
        return {
            "auth": "token" if self.key_file else "certificate",
            "topic": self.topic,
            "host": self.host or "apple",
        }
