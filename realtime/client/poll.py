"""``GET /v1/poll`` for backgrounded apps: one HTTP/1.1 request on asyncio streams.

The poll endpoint is served on the gateway's public port, next to the WebSocket: the
request goes to the host and port of the client's WebSocket URL (TLS for ``wss://``),
with the token as ``Authorization: Bearer``. No HTTP library: one request per
connection (``Connection: close``), the answer read by ``Content-Length`` (chunked or
until the end when a proxy sends it so). The answer is JSON (docs in the README,
"Mobile apps in the background"); publications carry their ``data`` as a JSON value,
or base64 in ``b64data`` when it is not JSON, as on the JSON subprotocol.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

from realtime.client.errors import PollError
from realtime.client.models import ChannelPoll, PollResult, Publication, StreamPosition

__all__ = [
    "POLL_PATH",
    "MalformedAnswer",
    "PollTarget",
    "http_get",
    "parse_poll_answer",
    "poll_error",
    "poll_query",
]

POLL_PATH = "/v1/poll"

# Bounds on what the answer may be: status line and headers, body.
_MAX_HEADERS = 100
_MAX_LINE = 16 * 1024


class MalformedAnswer(Exception):
    """The answer is not HTTP, or not the JSON of a poll."""


@dataclass(frozen=True, slots=True)
class PollTarget:
    """Where polls go: the WebSocket URL's host and port."""

    host: str
    port: int
    tls: bool
    host_header: str

    @classmethod
    def from_ws_url(cls, url: str) -> PollTarget:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("ws", "wss", "http", "https"):
            raise ValueError(f"not a WebSocket URL: {url!r}")
        tls = scheme in ("wss", "https")
        host = parts.hostname
        if not host:
            raise ValueError(f"no host in {url!r}")
        default_port = 443 if tls else 80
        port = parts.port or default_port
        shown = f"[{host}]" if ":" in host else host
        host_header = shown if port == default_port else f"{shown}:{port}"
        return cls(host=host, port=port, tls=tls, host_header=host_header)


def poll_query(since: Mapping[str, StreamPosition] | None, wait: float, limit: int) -> str:
    """The query string: ``wait``, ``limit`` (when set) and one ``since`` per channel.

    Values are not checked here: the gateway answers ``bad_request`` with the reason.
    """
    pairs: list[tuple[str, str]] = []
    if wait:
        pairs.append(("wait", repr(float(wait))))
    if limit:
        pairs.append(("limit", str(int(limit))))
    for channel, position in (since or {}).items():
        pairs.append(("since", f"{channel}:{position.offset}:{position.epoch}"))
    return urlencode(pairs)


async def http_get(
    target: PollTarget,
    path: str,
    headers: Mapping[str, str],
    *,
    max_body: int,
) -> tuple[int, bytes]:
    """One GET on a new connection: the status and the body. Raises OSError when the
    connection fails, MalformedAnswer when the answer is not HTTP/1.x."""
    for name, value in headers.items():
        if any(c in value for c in "\r\n\0") or any(c in name for c in "\r\n\0:"):
            raise ValueError(f"header {name!r} has a control character")
    context = ssl.create_default_context() if target.tls else None
    reader, writer = await asyncio.open_connection(
        target.host,
        target.port,
        ssl=context,
        server_hostname=target.host if context is not None else None,
        limit=_MAX_LINE,
    )
    try:
        lines = [f"GET {path} HTTP/1.1", f"Host: {target.host_header}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines += ["Connection: close", "", ""]
        writer.write("\r\n".join(lines).encode("latin-1"))
        await writer.drain()
        while True:
            status, fields = await _read_head(reader)
            if not 100 <= status < 200:
                break  # interim answers (100 Continue) are skipped
        body = await _read_body(reader, fields, max_body)
        return status, body
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await writer.wait_closed()


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise MalformedAnswer("the connection closed before the end of the answer") from exc
    except asyncio.LimitOverrunError as exc:
        raise MalformedAnswer("a header line is too long") from exc
    return line.rstrip(b"\r\n")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await _read_line(reader)
    parts = status_line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise MalformedAnswer(f"not an HTTP/1.x answer: {status_line[:80]!r}")
    fields: dict[str, str] = {}
    for _ in range(_MAX_HEADERS):
        line = await _read_line(reader)
        if not line:
            return int(parts[1]), fields
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise MalformedAnswer(f"malformed header line: {line[:80]!r}")
        fields[name.strip().lower()] = value.strip()
    raise MalformedAnswer("too many header lines")


async def _read_body(reader: asyncio.StreamReader, fields: dict[str, str], max_body: int) -> bytes:
    try:
        if "chunked" in fields.get("transfer-encoding", "").lower():
            return await _read_chunked(reader, max_body)
        length = fields.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise MalformedAnswer(f"bad Content-Length {length[:40]!r}")
            if int(length) > max_body:
                raise MalformedAnswer(f"the answer is larger than {max_body} bytes")
            return await reader.readexactly(int(length))
        body = await reader.read(max_body + 1)  # Connection: close ends it
        while len(body) <= max_body:
            more = await reader.read(max_body + 1 - len(body))
            if not more:
                return body
            body += more
        raise MalformedAnswer(f"the answer is larger than {max_body} bytes")
    except asyncio.IncompleteReadError as exc:
        raise MalformedAnswer("the connection closed before the end of the answer") from exc


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while True:
        size_text = (await _read_line(reader)).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise MalformedAnswer(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            while await _read_line(reader):  # trailers
                pass
            return bytes(body)
        if len(body) + size > max_body:
            raise MalformedAnswer(f"the answer is larger than {max_body} bytes")
        body += await reader.readexactly(size)
        await _read_line(reader)


def parse_poll_answer(body: bytes) -> PollResult:
    """The JSON of a 200 answer as a :class:`PollResult` (MalformedAnswer if it is not)."""
    try:
        obj = json.loads(body)
        channels: dict[str, ChannelPoll] = {}
        for channel, entry in _object(obj.get("channels", {})).items():
            entry = _object(entry)
            position = _object(entry.get("position", {}))
            publications = [_publication(channel, p) for p in entry.get("publications", [])]
            channels[channel] = ChannelPoll(
                channel=channel,
                publications=publications,
                position=StreamPosition(
                    offset=_int(position.get("offset", 0)), epoch=str(position.get("epoch", ""))
                ),
                recovered=entry.get("recovered") is not False,
            )
        return PollResult(channels=channels, more=obj.get("more") is True)
    except (ValueError, TypeError, AttributeError, binascii.Error) as exc:
        raise MalformedAnswer(f"not a poll answer: {exc}") from None


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"expected an offset, got {value!r}")
    return value


def _publication(channel: str, obj: Any) -> Publication:
    """A publication as the JSON codec writes it (fields at their default are left out)."""
    obj = _object(obj)
    if "data" in obj:
        # The gateway parsed the bytes as JSON; this is their compact UTF-8 text again.
        data = json.dumps(obj["data"], separators=(",", ":"), ensure_ascii=False).encode()
    elif "b64data" in obj:
        data = base64.b64decode(obj["b64data"], validate=True)
    else:
        data = b""
    info = _object(obj.get("info", {}))
    tags = _object(obj.get("tags", {}))
    return Publication(
        channel=channel,
        offset=_int(obj.get("offset", 0)),
        data=data,
        user=str(info.get("user", "")),
        client=str(info.get("client", "")),
        tags={str(k): str(v) for k, v in tags.items()},
    )


def poll_error(status: int, body: bytes) -> PollError:
    """The :class:`PollError` of a non-200 answer (the gateway's JSON error, or not)."""
    try:
        error = _object(_object(json.loads(body))["error"])
        code = str(error.get("code", ""))
        message = str(error.get("message", ""))
        retry = error.get("retry_after_ms", 0)
        valid = isinstance(retry, int) and not isinstance(retry, bool) and retry > 0
        retry_after_ms = retry if valid else 0
    except (ValueError, TypeError, KeyError):
        text = body[:200].decode("utf-8", "replace").strip()
        return PollError(status, "", text or f"HTTP {status}")
    return PollError(status, code, message, retry_after_ms=retry_after_ms)
