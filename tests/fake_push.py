"""Local fakes of APNs and FCM that the real aioapns and firebase-admin talk to.

- `FakeApns`: HTTP/2 over TLS (ALPN h2) with a CA and a server certificate made here with
  `cryptography`; it asks for (and records) a client certificate when one is offered.
  Every request is recorded (path, headers, JSON body); the answer is programmed per
  device token (`answer(token, ApnsAnswer(...))`, or `default` for all): 200, any status
  with a reason and timestamp, or no answer at all.
- `FakeFcm`: an HTTP/1.1 server for `POST /v1/projects/{p}/messages:send` and the OAuth
  token endpoint (`POST /token`, which checks the service account's signed assertion).
  Answers are programmed per registration token (`answer(token, FcmAnswer(...))`).
- `service_account_file(...)`: a service-account JSON with a fresh RSA key whose
  `token_uri` is the fake's token endpoint.

Both servers run in their own thread (their own event loop for APNs), so a test's loop
being slow cannot slow them, and they stop cleanly (`stop()`; the fixtures do it).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, RequestReceived, StreamEnded
from h2.exceptions import ProtocolError

# ----------------------------------------------------------------------------- certificates


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class PushPki:
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate (for
    APNs certificate auth: subject UID = the topic), all as PEM files in `directory`."""

    directory: Path
    ca_file: Path
    server_cert_file: Path
    server_key_file: Path
    client_pem_file: Path  # client certificate + its key, as aioapns wants it
    apns_key_file: Path  # an EC P-256 .p8 key for APNs token auth
    apns_public_key: Any

    def client_context(self) -> ssl.SSLContext:
        """What a client trusting only the test CA uses (ALPN h2)."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.set_alpn_protocols(["h2"])
        return context


def make_pki(directory: Path, topic: str = "com.example.app") -> PushPki:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "realtime test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(subject: x509.Name, key: Any, server: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [
                        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
                        if server
                        else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
                    ]
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256())

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = leaf(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), server_key, True
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = leaf(
        x509.Name(
            [
                x509.NameAttribute(NameOID.USER_ID, topic),
                x509.NameAttribute(NameOID.COMMON_NAME, f"Apple Push Services: {topic}"),
            ]
        ),
        client_key,
        False,
    )
    apns_key = ec.generate_private_key(ec.SECP256R1())
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "ca.pem": ca_cert.public_bytes(serialization.Encoding.PEM),
        "server.pem": server_cert.public_bytes(serialization.Encoding.PEM),
        "server.key": _pem_key(server_key),
        "client.pem": client_cert.public_bytes(serialization.Encoding.PEM) + _pem_key(client_key),
        "AuthKey_TEST123456.p8": _pem_key(apns_key),
    }
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return PushPki(
        directory=directory,
        ca_file=directory / "ca.pem",
        server_cert_file=directory / "server.pem",
        server_key_file=directory / "server.key",
        client_pem_file=directory / "client.pem",
        apns_key_file=directory / "AuthKey_TEST123456.p8",
        apns_public_key=apns_key.public_key(),
    )


# ----------------------------------------------------------------------------- fake APNs


def _next_answer(answers: list[Any] | None, default: Any) -> Any:
    if not answers:
        return default
    return answers.pop(0) if len(answers) > 1 else answers[0]


@dataclass(frozen=True)
class ApnsAnswer:
    status: int = 200
    reason: str = ""
    timestamp: int | None = None  # 410: milliseconds since the epoch
    answer: bool = True  # False: never answer this request
    delay: float = 0.0


@dataclass
class ApnsRequest:
    path: str
    token: str
    headers: dict[str, str]
    body: dict[str, Any]
    raw_body: bytes
    client_subject: str  # the client certificate's subject, "" without one
    alpn: str | None
    received_at: float = field(default_factory=time.time)


class _ApnsConnection(asyncio.Protocol):
    def __init__(self, fake: FakeApns) -> None:
        self.fake = fake
        self.conn = H2Connection(H2Configuration(client_side=False, header_encoding="utf-8"))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self.subject = ""
        self.alpn: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.fake._connections.add(self)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.alpn = ssl_object.selected_alpn_protocol()
            peer = ssl_object.getpeercert()
            if peer:
                self.subject = ", ".join(
                    f"{k}={v}" for rdn in peer.get("subject", ()) for k, v in rdn
                )
        self.conn.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)

    def _flush(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.data_to_send())

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            assert self.transport is not None
            self.transport.close()
            return
        for ev in events:
            if isinstance(ev, RequestReceived):
                self.streams[ev.stream_id] = (dict(ev.headers), bytearray())  # type: ignore[arg-type]
            elif isinstance(ev, DataReceived):
                entry = self.streams.get(ev.stream_id)
                if entry is not None:
                    entry[1].extend(ev.data)
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                self._request(ev.stream_id)
            elif isinstance(ev, ConnectionTerminated):
                assert self.transport is not None
                self.transport.close()
        self._flush()

    def _request(self, stream_id: int) -> None:
        entry = self.streams.pop(stream_id, None)
        if entry is None:
            return
        headers, raw = entry
        path = headers.get(":path", "")
        token = path.rsplit("/", 1)[-1]
        try:
            body = json.loads(raw) if raw else {}
        except ValueError:
            body = {}
        self.fake._record(
            ApnsRequest(path, token, headers, body, bytes(raw), self.subject, self.alpn)
        )
        answer = self.fake.answer_for(token)
        if not answer.answer:
            return
        apns_id = headers.get("apns-id", "")
        if answer.delay > 0:
            asyncio.get_running_loop().call_later(
                answer.delay, self._respond, stream_id, apns_id, answer
            )
        else:
            self._respond(stream_id, apns_id, answer)

    def _respond(self, stream_id: int, apns_id: str, answer: ApnsAnswer) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        headers = [(":status", str(answer.status)), ("apns-id", apns_id)]
        try:
            if answer.status == 200:
                self.conn.send_headers(stream_id, headers, end_stream=True)
            else:
                payload: dict[str, Any] = {"reason": answer.reason}
                if answer.timestamp is not None:
                    payload["timestamp"] = answer.timestamp
                data = json.dumps(payload).encode()
                self.conn.send_headers(stream_id, [*headers, ("content-type", "application/json")])
                self.conn.send_data(stream_id, data, end_stream=True)
        except ProtocolError:
            return  # the client reset the stream (its deadline passed)
        self._flush()


class FakeApns:
    """A fake APNs on 127.0.0.1 (HTTP/2, TLS, ALPN h2) in its own thread."""

    def __init__(self, pki: PushPki) -> None:
        self.pki = pki
        self.default = ApnsAnswer()
        self.answers: dict[str, list[ApnsAnswer]] = {}
        self.requests: list[ApnsRequest] = []
        self.port = 0
        self._lock = threading.Lock()
        self._connections: set[_ApnsConnection] = set()
        self.errors: list[str] = []  # unexpected errors inside the fake
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_error)
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._seen = threading.Condition(self._lock)

    # programming and inspection (any thread)

    def answer(self, token: str, *answers: ApnsAnswer) -> None:
        """Answer `token`'s requests with `answers` in turn (the last one repeats)."""
        with self._lock:
            self.answers[token] = list(answers)

    def answer_for(self, token: str) -> ApnsAnswer:
        with self._lock:
            return _next_answer(self.answers.get(token), self.default)

    def set_default(self, answer: ApnsAnswer) -> None:
        with self._lock:
            self.default = answer

    def _record(self, request: ApnsRequest) -> None:
        with self._lock:
            self.requests.append(request)
            self._seen.notify_all()

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if isinstance(context.get("exception"), ConnectionError | ssl.SSLError):
            return  # a client that went away mid-handshake or mid-request
        self.errors.append(str(context.get("message")) + " " + repr(context.get("exception")))

    def requests_for(self, token: str) -> list[ApnsRequest]:
        with self._lock:
            return [r for r in self.requests if r.token == token]

    # lifecycle

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.pki.server_cert_file, self.pki.server_key_file)
        context.set_alpn_protocols(["h2"])
        # Ask for a client certificate (APNs certificate auth) without requiring one.
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(self.pki.ca_file)
        return context

    def start(self) -> FakeApns:
        self._thread.start()

        async def serve() -> asyncio.Server:
            return await self._loop.create_server(
                lambda: _ApnsConnection(self), "127.0.0.1", 0, ssl=self._ssl_context()
            )

        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for connection in list(self._connections):
                if connection.transport is not None:
                    connection.transport.abort()
            if self._server is not None:
                await self._server.wait_closed()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()


# ----------------------------------------------------------------------------- fake FCM


@dataclass(frozen=True)
class FcmAnswer:
    status: int = 200
    body: dict[str, Any] | None = None  # None: a success body, or the error below
    headers: dict[str, str] = field(default_factory=dict)
    answer: bool = True  # False: hold the request until the fake stops


def _fcm_error(status: int, grpc: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "status": grpc, "details": list(details)}}


def _fcm_code(code: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}


# The answers FCM gives (as documented for the v1 API).
FCM_UNREGISTERED = FcmAnswer(
    404,
    _fcm_error(404, "NOT_FOUND", "Requested entity was not found.", _fcm_code("UNREGISTERED")),
)
FCM_SENDER_ID_MISMATCH = FcmAnswer(
    403,
    _fcm_error(403, "PERMISSION_DENIED", "SenderId mismatch", _fcm_code("SENDER_ID_MISMATCH")),
)
FCM_BAD_TOKEN = FcmAnswer(
    400,
    _fcm_error(
        400,
        "INVALID_ARGUMENT",
        "The registration token is not a valid FCM registration token",
        _fcm_code("INVALID_ARGUMENT"),
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [
                {"field": "message.token", "description": "Invalid registration token"}
            ],
        },
    ),
)
FCM_BAD_TTL = FcmAnswer(
    400,
    _fcm_error(
        400,
        "INVALID_ARGUMENT",
        "Invalid value at 'message.android.ttl' (type.googleapis.com/google.protobuf.Duration)",
        _fcm_code("INVALID_ARGUMENT"),
        {
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": [{"field": "message.android.ttl", "description": "Invalid value"}],
        },
    ),
)


def fcm_quota_exceeded(retry_after: int) -> FcmAnswer:
    return FcmAnswer(
        429,
        _fcm_error(
            429,
            "RESOURCE_EXHAUSTED",
            "Quota exceeded for quota metric 'Send requests'",
            _fcm_code("QUOTA_EXCEEDED"),
        ),
        {"Retry-After": str(retry_after)},
    )


FCM_UNAVAILABLE = FcmAnswer(
    503,
    _fcm_error(
        503, "UNAVAILABLE", "The service is currently unavailable.", _fcm_code("UNAVAILABLE")
    ),
)
FCM_INTERNAL = FcmAnswer(
    500, _fcm_error(500, "INTERNAL", "Internal error encountered.", _fcm_code("INTERNAL"))
)


GOOGLE_TOKEN_AUD = "https://oauth2.googleapis.com/token"


@dataclass
class FcmRequest:
    path: str
    project: str
    headers: dict[str, str]
    body: dict[str, Any]
    token: str  # message.token
    received_at: float = field(default_factory=time.time)


class FakeFcm:
    """A fake FCM v1 endpoint and OAuth token endpoint on 127.0.0.1, in its own thread."""

    def __init__(self) -> None:
        self.default = FcmAnswer()
        self.answers: dict[str, list[FcmAnswer]] = {}
        self.requests: list[FcmRequest] = []
        self.token_requests: list[dict[str, Any]] = []  # the verified assertion claims
        self.token_lifetime = 3600  # expires_in of issued access tokens
        self.token_delay = 0.0  # seconds the token endpoint takes to answer
        self.token_refusal: str | None = None  # e.g. "invalid_grant"
        self.public_keys: dict[str, Any] = {}  # client_email -> RSA public key
        self.issued: set[str] = set()
        self.errors: list[str] = []  # unexpected errors inside the fake
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        return f"{self.endpoint}/token"

    def answer(self, token: str, *answers: FcmAnswer) -> None:
        """Answer `token`'s requests with `answers` in turn (the last one repeats)."""
        with self._lock:
            self.answers[token] = list(answers)

    def set_default(self, answer: FcmAnswer) -> None:
        with self._lock:
            self.default = answer

    def answer_for(self, token: str) -> FcmAnswer:
        with self._lock:
            return _next_answer(self.answers.get(token), self.default)

    def requests_for(self, token: str) -> list[FcmRequest]:
        with self._lock:
            return [r for r in self.requests if r.token == token]

    def start(self) -> FakeFcm:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(
                self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
            ) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path == "/token":
                    fake._token(self, raw)
                    return
                parts = self.path.split("/")
                # /v1/projects/{p}/messages:send
                if len(parts) != 5 or parts[1] != "v1" or parts[4] != "messages:send":
                    self._reply(404, {"error": {"code": 404, "status": "NOT_FOUND"}})
                    return
                auth = self.headers.get("Authorization", "")
                with fake._lock:
                    known = auth.removeprefix("Bearer ") in fake.issued
                if not known:
                    self._reply(
                        401,
                        _fcm_error(401, "UNAUTHENTICATED", "Request had invalid credentials."),
                    )
                    return
                body = json.loads(raw or b"{}")
                token = str(body.get("message", {}).get("token", ""))
                request = FcmRequest(
                    self.path,
                    parts[3],
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    token,
                )
                with fake._lock:
                    fake.requests.append(request)
                answer = fake.answer_for(token)
                if not answer.answer:
                    fake._stopping.wait(60)
                    self.close_connection = True
                    return
                if answer.status == 200:
                    name = f"projects/{parts[3]}/messages/{len(fake.requests)}"
                    self._reply(200, {"name": name})
                else:
                    self._reply(answer.status, answer.body or {}, answer.headers)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                error = sys.exc_info()[1]
                if not isinstance(error, ConnectionError):  # else the client gave up on us
                    fake.errors.append(repr(error))

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def _token(self, handler: Any, raw: bytes) -> None:
        form = urllib.parse.parse_qs(raw.decode())
        if self.token_delay:
            time.sleep(self.token_delay)
        if self.token_refusal:
            handler._reply(400, {"error": self.token_refusal, "error_description": "refused"})
            return
        assertion = (form.get("assertion") or [""])[0]
        try:
            unverified = jwt.decode(assertion, options={"verify_signature": False})
            key = self.public_keys[unverified["iss"]]
            # google-auth always addresses the assertion to Google's token endpoint
            claims = jwt.decode(assertion, key, algorithms=["RS256"], audience=GOOGLE_TOKEN_AUD)
        except (KeyError, jwt.PyJWTError) as exc:
            handler._reply(400, {"error": "invalid_grant", "error_description": str(exc)})
            return
        access = f"fake-access-{len(self.token_requests) + 1}-{time.time_ns()}"
        with self._lock:
            self.token_requests.append(claims)
            self.issued.add(access)
        handler._reply(
            200,
            {"access_token": access, "expires_in": self.token_lifetime, "token_type": "Bearer"},
        )

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)


def service_account_file(directory: Path, fake: FakeFcm, project_id: str = "realtime-test") -> Path:
    """A service-account JSON whose token_uri is `fake`'s token endpoint."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    email = f"push@{project_id}.iam.gserviceaccount.com"
    fake.public_keys[email] = key.public_key()
    data = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": "0123456789abcdef",
        "private_key": _pem_key(key).decode(),
        "client_email": email,
        "client_id": "1234567890",
        "token_uri": fake.token_uri,
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "service-account.json"
    path.write_text(json.dumps(data))
    return path


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def push_pki(tmp_path_factory: pytest.TempPathFactory) -> PushPki:
    return make_pki(tmp_path_factory.mktemp("push-pki"))


@pytest.fixture
def fake_apns(push_pki: PushPki) -> Iterator[FakeApns]:
    fake = FakeApns(push_pki).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.errors == []


@pytest.fixture
def fake_fcm() -> Iterator[FakeFcm]:
    fake = FakeFcm().start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.errors == []


@pytest.fixture
def fcm_credentials(tmp_path: Path, fake_fcm: FakeFcm) -> Path:
    return service_account_file(tmp_path / "fcm", fake_fcm)
