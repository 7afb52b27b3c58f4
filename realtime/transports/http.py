"""A small, defensive HTTP/1.1 server for the backend-facing JSON API.

Stdlib only, built on ``asyncio.start_server`` (so it runs on uvloop as well). It is meant for
low request volume, and its main promise is that no input can crash it or make it hang:

* Requests are read head first (``readuntil`` bounded by ``max_header_bytes``), then the body,
  which may only be framed by ``Content-Length`` (at most ``max_body`` bytes). A request using
  ``Transfer-Encoding`` is refused with 501. ``Expect: 100-continue`` is honoured.
* Once the first byte of a request has arrived, the whole request (head and body) must arrive
  within ``read_timeout`` seconds, or the server answers 408 and closes (slowloris). A fresh
  connection must start its first request within ``min(read_timeout, idle_timeout)``; a
  keep-alive connection is closed silently after ``idle_timeout`` seconds without a new request.
  Writes that make no progress for ``read_timeout`` seconds abort the connection.
* Malformed input gets a JSON error (``{"error": {"code": ..., "message": ...}}``) and the
  connection is closed. Handler errors do not close the connection: an :class:`HttpError` is
  rendered with its status, anything else is logged once and answered with 500.
* Every response carries ``Content-Length`` and ``Content-Type`` (except 204 and 304, which
  have no body and so neither header), JSON responses ``Cache-Control: no-store`` unless the
  handler set its own. HEAD responses carry the headers of the full response and no body.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json as _json
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["Handler", "HttpError", "HttpRequest", "HttpResponse", "HttpServer"]

_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION_RE = re.compile(r"HTTP/([0-9])\.([0-9])")
_DIGITS_RE = re.compile(r"[0-9]{1,18}")
# Field values: visible ASCII, space, tab and obs-text (0x80-0xFF); no other control chars.
_BAD_VALUE_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Request targets: visible ASCII only.
_BAD_TARGET_RE = re.compile(r"[^\x21-\x7e]")

_MAX_LEADING_EMPTY = 8  # stray CR/LF bytes tolerated before a request line (RFC 9112 2.2)
_MAX_QUERY_FIELDS = 1000
_LINGER_SECONDS = 2.0  # how long to drain unread input after an error before closing
_LINGER_BYTES = 4 << 20
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY_STATUSES = frozenset({204, 304})
# Headers the server computes itself; handler-supplied values for these are ignored.
_MANAGED_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


def _compact_json(obj: Any) -> bytes:
    return _json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


@dataclass(slots=True)
class HttpRequest:
    """One parsed request; the body has been read in full."""

    method: str
    """Upper-case method, e.g. ``"GET"``."""
    path: str
    """Percent-decoded path without the query string (``"*"`` for ``OPTIONS *``)."""
    query: dict[str, str]
    """Decoded query parameters; the last value wins for repeated names."""
    headers: dict[str, str]
    """Header fields keyed by lower-cased name; repeated fields are joined with ``", "``."""
    body: bytes
    client: str
    """The peer as ``"ip:port"`` (``"[ip]:port"`` for IPv6)."""

    def json(self) -> Any:
        """Parse the body as UTF-8 JSON, raising ``HttpError(400, "bad_json", ...)`` if invalid."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError:
            raise HttpError(400, "bad_json", "request body is not valid UTF-8") from None
        try:
            return _json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError):
            raise HttpError(400, "bad_json", "request body is not valid JSON") from None


@dataclass(slots=True)
class HttpResponse:
    """A complete response. ``Content-Length`` is always computed by the server."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, obj: Any, status: int = 200) -> HttpResponse:
        """Compact UTF-8 JSON. NaN and infinities are refused (``ValueError``)."""
        return cls(status=status, body=_compact_json(obj))

    @classmethod
    def text(
        cls, text: str, status: int = 200, content_type: str = "text/plain; charset=utf-8"
    ) -> HttpResponse:
        return cls(status=status, body=text.encode("utf-8"), content_type=content_type)


class HttpError(Exception):
    """Raise from a handler to answer ``status`` with a JSON error body.

    The body is ``{"error": {"code": code, "message": message}}``; ``headers`` are added to the
    response (e.g. ``Allow`` or ``Retry-After``).
    """

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, code, message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers) if headers else {}

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def to_response(self) -> HttpResponse:
        body = _compact_json({"error": {"code": self.code, "message": self.message}})
        return HttpResponse(status=self.status, body=body, headers=dict(self.headers))


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class _ProtocolError(HttpError):
    """A request the server refuses to process; answered, then the connection is closed."""


class _IncompleteRequest(Exception):
    """The peer closed its side before a complete request arrived."""


_INTERNAL_ERROR = HttpError(500, "internal", "internal error")


@dataclass(slots=True)
class _Head:
    method: str
    target: str
    minor: int
    headers: dict[str, str]


@dataclass(slots=True, eq=False)
class _Connection:
    idle: bool = True
    """True while no request is in progress (waiting for one, or draining after an error)."""


def _format_peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        if isinstance(host, str) and ":" in host:
            return f"[{host}]:{port}"
        return f"{host}:{port}"
    return str(peer) if peer else "unknown"


def _bad_request(message: str) -> _ProtocolError:
    return _ProtocolError(400, "bad_request", message)


def _parse_head(head: bytes) -> _Head:
    """Parse a request head (request line and header fields, ending in CRLF CRLF)."""
    if b"\x00" in head:
        raise _bad_request("NUL byte in request head")
    lines = head[:-4].split(b"\r\n") if head.endswith(b"\r\n\r\n") else head.split(b"\r\n")
    for raw in lines:
        if b"\r" in raw or b"\n" in raw:
            raise _bad_request("bare CR or LF in request head")
    try:
        request_line = lines[0].decode("ascii")
    except UnicodeDecodeError:
        raise _bad_request("malformed request line") from None
    parts = request_line.split(" ")
    if len(parts) != 3 or not all(parts):
        raise _bad_request("malformed request line")
    method, target, version = parts
    if not _TOKEN_RE.fullmatch(method) or _BAD_TARGET_RE.search(target):
        raise _bad_request("malformed request line")
    match = _VERSION_RE.fullmatch(version)
    if match is None:
        raise _bad_request("malformed request line")
    if match.group(1) != "1":
        raise _ProtocolError(
            505, "http_version_not_supported", f"{version} is not supported; use HTTP/1.1"
        )
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        text = raw.decode("latin-1")
        name, sep, value = text.partition(":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise _bad_request("malformed header field")
        value = value.strip(" \t")
        if _BAD_VALUE_RE.search(value):
            raise _bad_request("invalid character in header field value")
        key = name.lower()
        previous = headers.get(key)
        if previous is None:
            headers[key] = value
        elif key == "host":
            raise _bad_request("duplicate Host header")
        elif key == "content-length":
            if previous != value:
                raise _bad_request("conflicting Content-Length headers")
        else:
            headers[key] = f"{previous}{'; ' if key == 'cookie' else ', '}{value}"
    return _Head(method=method.upper(), target=target, minor=int(match.group(2)), headers=headers)


def _split_target(method: str, target: str) -> tuple[str, dict[str, str]]:
    """Return the decoded path and query of a request target."""
    if target.startswith("/"):
        raw_path, _, raw_query = target.partition("#")[0].partition("?")
    elif target == "*" and method == "OPTIONS":
        raw_path, raw_query = "*", ""
    elif target.lower().startswith(("http://", "https://")):
        try:
            parts = urlsplit(target)
        except ValueError:
            raise _bad_request("malformed request target") from None
        if not parts.netloc:
            raise _bad_request("malformed request target")
        raw_path, raw_query = parts.path or "/", parts.query
    else:
        raise _bad_request("malformed request target")
    try:
        path = unquote(raw_path, errors="strict")
        pairs = parse_qsl(
            raw_query, keep_blank_values=True, errors="strict", max_num_fields=_MAX_QUERY_FIELDS
        )
    except ValueError:  # includes UnicodeDecodeError and too many fields
        raise _bad_request("malformed request target") from None
    return path, dict(pairs)


def _connection_tokens(headers: dict[str, str]) -> set[str]:
    return {t.strip().lower() for t in headers.get("connection", "").split(",")}


def _is_json(content_type: str) -> bool:
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _render(resp: HttpResponse, *, head_only: bool, close: bool, keep_alive_10: bool) -> bytes:
    """Serialize a response; raises ``ValueError``/``TypeError`` if it cannot be sent as is."""
    status = resp.status
    if type(status) is not int or not 200 <= status <= 599:
        raise ValueError(f"invalid response status {status!r}")
    if not isinstance(resp.body, bytes | bytearray | memoryview):
        raise TypeError(f"response body must be bytes, not {type(resp.body).__name__}")
    try:
        reason = http.HTTPStatus(status).phrase
    except ValueError:
        reason = "Unknown"
    extra: list[tuple[str, str]] = []
    seen: set[str] = set()
    content_type = resp.content_type
    for name, value in resp.headers.items():
        if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
            raise ValueError(f"invalid response header name {name!r}")
        if not isinstance(value, str) or _BAD_VALUE_RE.search(value):
            raise ValueError(f"invalid value for response header {name!r}")
        key = name.lower()
        if key in _MANAGED_HEADERS:
            continue
        if key == "content-type":
            content_type = value
            continue
        seen.add(key)
        extra.append((name, value))
    if not isinstance(content_type, str) or _BAD_VALUE_RE.search(content_type):
        raise ValueError("invalid response content type")
    has_body = status not in _NO_BODY_STATUSES
    body = bytes(resp.body) if has_body else b""
    lines = [f"HTTP/1.1 {status} {reason}"]
    if "date" not in seen:
        lines.append(f"Date: {email.utils.formatdate(usegmt=True)}")
    if has_body:
        lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    if _is_json(content_type) and "cache-control" not in seen:
        lines.append("Cache-Control: no-store")
    lines.extend(f"{name}: {value}" for name, value in extra)
    if close:
        lines.append("Connection: close")
    elif keep_alive_10:
        lines.append("Connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def _render_error(err: HttpError, *, head_only: bool = False, close: bool = True) -> bytes:
    try:
        response = err.to_response()
        return _render(response, head_only=head_only, close=close, keep_alive_10=False)
    except (ValueError, TypeError):
        response = _INTERNAL_ERROR.to_response()
        return _render(response, head_only=head_only, close=close, keep_alive_10=False)


class HttpServer:
    """HTTP/1.1 server calling ``handler`` once per request; see the module docstring."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body: int = 1 << 20,
        max_header_bytes: int = 16384,
        read_timeout: float = 30.0,
        idle_timeout: float = 60.0,
        logger: logging.Logger | None = None,
    ) -> None:
        if max_body < 0:
            raise ValueError("max_body must be >= 0")
        if max_header_bytes < 64:
            raise ValueError("max_header_bytes must be >= 64")
        if read_timeout <= 0 or idle_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        self._handler = handler
        self._max_body = max_body
        self._max_header_bytes = max_header_bytes
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout
        self._logger = logger if logger is not None else logging.getLogger(__name__)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._closing = False
        self._connections: dict[asyncio.Task[Any], _Connection] = {}

    @property
    def port(self) -> int:
        """The bound port (the first listening socket's), or 0 before :meth:`start`."""
        return self._port

    async def start(self, host: str, port: int) -> None:
        """Start listening; ``port`` 0 picks a free port (see :attr:`port`)."""
        if self._server is not None:
            raise RuntimeError("HttpServer already started")
        self._closing = False
        self._server = await asyncio.start_server(
            self._on_connection, host, port, limit=self._max_header_bytes
        )
        sockets = self._server.sockets
        self._port = int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``timeout``; close the rest.

        Idle keep-alive connections are closed at once. A request that completes while
        stopping is answered with ``Connection: close``.
        """
        server = self._server
        if server is None:
            return
        self._closing = True
        server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        while self._connections:
            for task, conn in list(self._connections.items()):
                if conn.idle:
                    task.cancel()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # Wake up regularly to close connections that have turned idle in the meantime.
            await asyncio.wait(list(self._connections), timeout=min(remaining, 0.05))
        leftover = list(self._connections)
        for task in leftover:
            task.cancel()
        if leftover:
            await asyncio.wait(leftover, timeout=1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()
        self._server = None

    # -- connection handling -------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is None or self._closing:
            writer.transport.abort()
            return
        conn = _Connection()
        self._connections[task] = conn
        peer = _format_peer(writer.get_extra_info("peername"))
        try:
            await self._serve(conn, reader, writer, peer)
            conn.idle = True
            writer.close()
            try:
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except Exception:  # includes TimeoutError: the peer does not read what is left
                writer.transport.abort()
        except asyncio.CancelledError:
            # Only stop() cancels these tasks: idle connections are closed politely, busy ones
            # past the deadline are reset. The cancellation is not re-raised on purpose: the
            # done-callback asyncio (3.11.7+) puts on client_connected_cb tasks calls
            # task.exception(), which would log an error for a cancelled task.
            if conn.idle:
                writer.close()
            else:
                writer.transport.abort()
        except Exception:  # a bug in this module; never let it escape into the event loop
            self._logger.exception("unexpected error on HTTP connection from %s", peer)
            writer.transport.abort()
        finally:
            del self._connections[task]

    async def _serve(
        self,
        conn: _Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        wait = min(self._read_timeout, self._idle_timeout)  # for a fresh connection
        while not self._closing:
            conn.idle = True
            try:
                async with asyncio.timeout(wait):
                    first = await reader.read(1)
            except (TimeoutError, OSError):
                return
            if not first:
                return
            conn.idle = False
            wait = self._idle_timeout
            error: HttpError | None = None
            incoming: _Incoming | None = None
            try:
                async with asyncio.timeout_at(loop.time() + self._read_timeout):
                    incoming = await self._read_request(first, reader, writer, peer)
            except _ProtocolError as exc:
                error = exc
            except TimeoutError:
                error = HttpError(408, "request_timeout", "request not received in time")
            except _IncompleteRequest:
                error = _bad_request("incomplete request")
            except asyncio.LimitOverrunError:
                error = _ProtocolError(431, "headers_too_large", "request header block too large")
            except OSError:
                return
            if incoming is None:
                assert error is not None
                self._logger.debug("rejecting request from %s: %s", peer, error)
                if await self._write(writer, _render_error(error)):
                    conn.idle = True
                    await self._linger(reader, writer)
                return

            request = incoming.request
            response = await self._call_handler(request)
            close = not incoming.keep_alive or self._closing or _wants_close(response)
            data = self._render_response(
                response, request, close=close, keep_alive_10=incoming.http10 and not close
            )
            if not await self._write(writer, data) or close:
                return

    async def _read_request(
        self,
        first: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
    ) -> _Incoming:
        skipped = 0
        while first in (b"\r", b"\n"):
            skipped += 1
            if skipped > _MAX_LEADING_EMPTY:
                raise _bad_request("malformed request line")
            first = await _read_exactly(reader, 1)
        try:
            rest = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            raise _IncompleteRequest from None
        head = first + rest
        if len(head) > self._max_header_bytes:
            raise _ProtocolError(431, "headers_too_large", "request header block too large")
        parsed = _parse_head(head)
        path, query = _split_target(parsed.method, parsed.target)
        headers = parsed.headers
        http10 = parsed.minor == 0
        tokens = _connection_tokens(headers)
        keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens
        if "transfer-encoding" in headers:
            raise _ProtocolError(
                501,
                "not_implemented",
                "Transfer-Encoding is not supported in requests; send Content-Length",
            )
        length = 0
        raw_length = headers.get("content-length")
        if raw_length is not None:
            if not _DIGITS_RE.fullmatch(raw_length):
                raise _bad_request("invalid Content-Length")
            length = int(raw_length)
        if length > self._max_body:
            raise _ProtocolError(
                413, "body_too_large", f"request body larger than {self._max_body} bytes"
            )
        expect = headers.get("expect")
        if expect is not None and not http10:
            if expect.lower() != "100-continue":
                raise _ProtocolError(417, "expectation_failed", "unsupported Expect value")
            if length:
                writer.write(_CONTINUE)
                await writer.drain()
        body = await _read_exactly(reader, length) if length else b""
        request = HttpRequest(
            method=parsed.method, path=path, query=query, headers=headers, body=body, client=peer
        )
        return _Incoming(request=request, keep_alive=keep_alive, http10=http10)

    async def _call_handler(self, request: HttpRequest) -> HttpResponse:
        try:
            response = await self._handler(request)
        except HttpError as exc:
            try:
                return exc.to_response()
            except Exception:
                self._logger.exception(
                    "unrenderable HttpError from HTTP handler for %s %s",
                    request.method,
                    request.path,
                )
                return _INTERNAL_ERROR.to_response()
        except Exception:
            self._logger.exception(
                "HTTP handler failed for %s %s from %s",
                request.method,
                request.path,
                request.client,
            )
            return _INTERNAL_ERROR.to_response()
        if not isinstance(response, HttpResponse):
            self._logger.error(
                "HTTP handler returned %s instead of HttpResponse for %s %s",
                type(response).__name__,
                request.method,
                request.path,
            )
            return _INTERNAL_ERROR.to_response()
        return response

    def _render_response(
        self, response: HttpResponse, request: HttpRequest, *, close: bool, keep_alive_10: bool
    ) -> bytes:
        head_only = request.method == "HEAD"
        try:
            return _render(response, head_only=head_only, close=close, keep_alive_10=keep_alive_10)
        except (ValueError, TypeError):
            self._logger.exception(
                "invalid response from HTTP handler for %s %s", request.method, request.path
            )
            return _render_error(_INTERNAL_ERROR, head_only=head_only, close=close)

    async def _write(self, writer: asyncio.StreamWriter, data: bytes) -> bool:
        """Write and drain; on failure or no progress within read_timeout, abort."""
        try:
            writer.write(data)
            async with asyncio.timeout(self._read_timeout):
                await writer.drain()
        except (OSError, RuntimeError):  # includes TimeoutError
            writer.transport.abort()
            return False
        return True

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close, then discard input for a while so the peer can read our error response.

        Closing a socket with unread input makes the kernel send RST, which can destroy the
        response before the client reads it (e.g. after a 413 while the body is still coming).
        """
        try:
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(min(_LINGER_SECONDS, self._read_timeout)):
                received = 0
                while received < _LINGER_BYTES:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    received += len(chunk)
        except (OSError, RuntimeError):
            pass


@dataclass(slots=True)
class _Incoming:
    request: HttpRequest
    keep_alive: bool
    """Whether the client allows the connection to be reused."""
    http10: bool


async def _read_exactly(reader: asyncio.StreamReader, n: int) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        raise _IncompleteRequest from None


def _wants_close(response: HttpResponse) -> bool:
    return any(
        isinstance(name, str)
        and name.lower() == "connection"
        and isinstance(value, str)
        and "close" in {t.strip().lower() for t in value.split(",")}
        for name, value in response.headers.items()
    )
