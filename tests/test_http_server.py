"""Tests for realtime.transports.http: real sockets on 127.0.0.1, raw bytes and urllib."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime.transports.http import Handler, HttpError, HttpRequest, HttpResponse, HttpServer

HOST = "127.0.0.1"
STEP = 3.0  # upper bound for any single network wait in these tests


async def echo(request: HttpRequest) -> HttpResponse:
    """Echo the request back as JSON; a few paths misbehave on purpose."""
    if request.path == "/boom":
        raise RuntimeError("boom")
    if request.path == "/teapot":
        raise HttpError(418, "teapot", "short and stout", {"Retry-After": "7"})
    if request.path == "/json":
        return HttpResponse.json({"got": request.json()}, status=201)
    if request.path == "/bad-header":
        return HttpResponse(200, b"{}", headers={"X-Evil": "a\r\nInjected: yes"})
    if request.path == "/empty":
        return HttpResponse(204, b"dropped")
    if request.path == "/text":
        return HttpResponse.text("héllo")
    return HttpResponse.json(
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "headers": request.headers,
            "body": request.body.decode("latin-1"),
            "client": request.client,
        }
    )


ServerFactory = Callable[..., Awaitable[HttpServer]]


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_asyncio_errors() -> Iterator[None]:
    """Fail if the event loop reports anything (e.g. a connection task ending in error)."""
    collect = _Collect()
    logger = logging.getLogger("asyncio")
    logger.addHandler(collect)
    try:
        yield
    finally:
        logger.removeHandler(collect)
    assert not collect.records, [r.getMessage() for r in collect.records]


@pytest.fixture
async def make_server() -> AsyncIterator[ServerFactory]:
    servers: list[HttpServer] = []

    async def factory(handler: Handler = echo, **kwargs: Any) -> HttpServer:
        server = HttpServer(handler, **kwargs)
        await server.start(HOST, 0)
        servers.append(server)
        return server

    yield factory
    for server in servers:
        await server.stop(timeout=1.0)


@dataclass
class Resp:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error_code(self) -> str:
        code = self.json()["error"]["code"]
        assert isinstance(code, str)
        return code


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> Resp:
    async with asyncio.timeout(STEP):
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        body = b"" if head else await reader.readexactly(length)
    return Resp(int(status), headers, body)


async def read_eof(reader: asyncio.StreamReader) -> bytes:
    """Read until the server closes; a reset counts as closed."""
    try:
        async with asyncio.timeout(STEP):
            return await reader.read()
    except ConnectionResetError:
        return b""


async def connect(server: HttpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, server.port)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def exchange(server: HttpServer, data: bytes) -> tuple[Resp, bytes]:
    """Send raw bytes, read one response, then everything up to EOF."""
    reader, writer = await connect(server)
    try:
        writer.write(data)
        await writer.drain()
        resp = await read_response(reader)
        rest = await read_eof(reader)
    finally:
        await close(writer)
    return resp, rest


def get(path: str = "/", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: test\r\n{extra}\r\n".encode()


def fetch(
    url: str, data: bytes | None = None, method: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=STEP) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


# -- happy paths ---------------------------------------------------------------------------------


async def test_get_json_via_urllib(make_server: ServerFactory) -> None:
    server = await make_server()
    url = f"http://{HOST}:{server.port}/hello%20w%C3%B6rld?a=1&a=2&b=&c=x%2By+z"
    status, headers, body = await asyncio.to_thread(fetch, url)
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-store"
    assert int(headers["content-length"]) == len(body)
    assert "date" in headers
    data = json.loads(body)
    assert data["method"] == "GET"
    assert data["path"] == "/hello wörld"
    assert data["query"] == {"a": "2", "b": "", "c": "x+y z"}
    assert data["headers"]["host"] == f"{HOST}:{server.port}"
    assert data["client"].startswith(f"{HOST}:")
    assert body == json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


async def test_post_json_via_urllib(make_server: ServerFactory) -> None:
    server = await make_server()
    url = f"http://{HOST}:{server.port}/json"
    payload = json.dumps({"x": [1, 2, {"y": "é"}]}).encode()
    status, _, body = await asyncio.to_thread(fetch, url, payload)
    assert status == 201
    assert json.loads(body) == {"got": {"x": [1, 2, {"y": "é"}]}}


@pytest.mark.parametrize("payload", [b"{nope", b"\xff\xfe{}", b"", b"[NaN]", b"[" * 5000])
async def test_post_bad_json(make_server: ServerFactory, payload: bytes) -> None:
    server = await make_server()
    url = f"http://{HOST}:{server.port}/json"
    status, headers, body = await asyncio.to_thread(fetch, url, payload, "POST")
    assert status == 400
    assert headers["cache-control"] == "no-store"
    assert json.loads(body)["error"]["code"] == "bad_json"


async def test_text_response(make_server: ServerFactory) -> None:
    server = await make_server()
    resp, _ = await exchange(server, get("/text", "Connection: close\r\n"))
    assert resp.status == 200
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    assert "cache-control" not in resp.headers
    assert resp.body == "héllo".encode()


async def test_204_has_no_body_nor_length(make_server: ServerFactory) -> None:
    server = await make_server()
    reader, writer = await connect(server)
    try:
        writer.write(get("/empty") + get("/next"))
        resp = await read_response(reader)
        assert resp.status == 204 and resp.body == b""
        assert "content-length" not in resp.headers
        assert (await read_response(reader)).json()["path"] == "/next"
    finally:
        await close(writer)


async def test_keep_alive_two_requests_one_connection(make_server: ServerFactory) -> None:
    server = await make_server()
    reader, writer = await connect(server)
    try:
        writer.write(get("/one"))
        first = await read_response(reader)
        assert first.status == 200 and first.json()["path"] == "/one"
        assert "connection" not in first.headers
        body = b'{"k":1}'
        writer.write(
            b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        second = await read_response(reader)
        assert second.status == 201 and second.json() == {"got": {"k": 1}}
        # Pipelined requests in one segment are answered in order.
        writer.write(get("/a") + get("/b", "Connection: close\r\n"))
        a, b = await read_response(reader), await read_response(reader)
        assert (a.json()["path"], b.json()["path"]) == ("/a", "/b")
        assert b.headers["connection"] == "close"
        assert await read_eof(reader) == b""
    finally:
        await close(writer)


async def test_connection_close_honoured(make_server: ServerFactory) -> None:
    server = await make_server()
    resp, rest = await exchange(server, get("/", "Connection: close\r\n"))
    assert resp.status == 200 and resp.headers["connection"] == "close"
    assert rest == b""


async def test_http10_closes_unless_keep_alive(make_server: ServerFactory) -> None:
    server = await make_server()
    resp, rest = await exchange(server, get("/", version="1.0"))
    assert resp.status == 200 and resp.headers["connection"] == "close" and rest == b""

    reader, writer = await connect(server)
    try:
        for path in ("/x", "/y"):
            writer.write(get(path, "Connection: keep-alive\r\n", version="1.0"))
            resp = await read_response(reader)
            assert resp.json()["path"] == path
            assert resp.headers["connection"] == "keep-alive"
    finally:
        await close(writer)


async def test_head_has_headers_but_no_body(make_server: ServerFactory) -> None:
    server = await make_server()
    reader, writer = await connect(server)
    try:
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: test\r\n\r\n")
        head = await read_response(reader, head=True)
        writer.write(get("/h"))  # the echoed method makes the GET body one byte shorter
        full = await read_response(reader)
        assert head.status == 200 and head.body == b""
        assert int(head.headers["content-length"]) == len(full.body) + 1
        assert head.headers["content-type"] == "application/json"
    finally:
        await close(writer)


async def test_expect_100_continue(make_server: ServerFactory) -> None:
    server = await make_server(max_body=100)
    reader, writer = await connect(server)
    try:
        writer.write(
            b"POST /json HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 7\r\n\r\n"
        )
        async with asyncio.timeout(STEP):
            interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b'{"a":1}')
        resp = await read_response(reader)
        assert resp.status == 201 and resp.json() == {"got": {"a": 1}}
        # Too large: refused straight away, without 100 Continue and without the body.
        writer.write(
            b"POST /json HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 101\r\n\r\n"
        )
        resp = await read_response(reader)
        assert resp.status == 413 and resp.error_code == "body_too_large"
        assert await read_eof(reader) == b""
    finally:
        await close(writer)


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET  / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1 extra\r\n\r\n",
        b"GET / HTTPS/1.1\r\n\r\n",
        b"G(T / HTTP/1.1\r\n\r\n",
        b"GET nopath HTTP/1.1\r\n\r\n",
        b"GET /\xff HTTP/1.1\r\n\r\n",
        b"GET /%ff%fe HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nName : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\x00\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"\r\n" * 10 + b"GET / HTTP/1.1\r\n\r\n",
    ],
)
async def test_malformed_request_is_400_then_close(make_server: ServerFactory, data: bytes) -> None:
    server = await make_server()
    resp, rest = await exchange(server, data)
    assert resp.status == 400 and resp.error_code == "bad_request"
    assert resp.headers["connection"] == "close"
    assert resp.headers["cache-control"] == "no-store"
    assert rest == b""


async def test_unsupported_http_version(make_server: ServerFactory) -> None:
    server = await make_server()
    resp, rest = await exchange(server, b"GET / HTTP/2.0\r\n\r\n")
    assert resp.status == 505 and resp.error_code == "http_version_not_supported"
    assert rest == b""


async def test_leading_empty_line_tolerated(make_server: ServerFactory) -> None:
    server = await make_server()
    resp, _ = await exchange(server, b"\r\n" + get("/ok", "Connection: close\r\n"))
    assert resp.status == 200 and resp.json()["path"] == "/ok"


async def test_incomplete_request_then_eof_is_400(make_server: ServerFactory) -> None:
    server = await make_server()
    for data in (
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab",
    ):
        reader, writer = await connect(server)
        try:
            writer.write(data)
            writer.write_eof()
            resp = await read_response(reader)
            assert resp.status == 400 and resp.error_code == "bad_request"
        finally:
            await close(writer)


@pytest.mark.parametrize("terminated", [True, False])
async def test_headers_too_large_is_431(make_server: ServerFactory, terminated: bool) -> None:
    server = await make_server(max_header_bytes=1024)
    data = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 4000 + (b"\r\n\r\n" if terminated else b"")
    resp, rest = await exchange(server, data)
    assert resp.status == 431 and resp.error_code == "headers_too_large"
    assert rest == b""


async def test_header_limit_is_exact(make_server: ServerFactory) -> None:
    server = await make_server(max_header_bytes=1024)
    head = b"GET / HTTP/1.1\r\nConnection: close\r\nX-Pad: "
    data = head + b"a" * (1024 - len(head) - 4) + b"\r\n\r\n"
    assert len(data) == 1024
    resp, _ = await exchange(server, data)
    assert resp.status == 200
    resp, _ = await exchange(server, data[:-4] + b"a\r\n\r\n")
    assert resp.status == 431


async def test_body_too_large_is_413_without_reading_it(make_server: ServerFactory) -> None:
    server = await make_server(max_body=1000)
    # Only the head is sent: the answer must not wait for the announced body.
    started = time.monotonic()
    resp, rest = await exchange(
        server, b"POST /json HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n"
    )
    assert resp.status == 413 and resp.error_code == "body_too_large"
    assert resp.headers["connection"] == "close" and rest == b""
    assert time.monotonic() - started < 1.0


async def test_body_too_large_via_urllib_sending_body(make_server: ServerFactory) -> None:
    server = await make_server(max_body=1000)
    url = f"http://{HOST}:{server.port}/json"
    status, _, body = await asyncio.to_thread(fetch, url, b"x" * 200_000)
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"


@pytest.mark.parametrize(
    "value",
    [b"abc", b"-1", b"+5", b"1, 2", b"1 2", b"0x10", b"\xb2", b"", b"1" * 30],
)
async def test_bad_content_length_is_400(make_server: ServerFactory, value: bytes) -> None:
    server = await make_server()
    resp, rest = await exchange(
        server, b"POST / HTTP/1.1\r\nContent-Length: " + value + b"\r\n\r\n"
    )
    assert resp.status == 400 and resp.error_code == "bad_request"
    assert rest == b""


async def test_conflicting_content_lengths_are_400(make_server: ServerFactory) -> None:
    server = await make_server()
    data = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    resp, _ = await exchange(server, data)
    assert resp.status == 400 and resp.error_code == "bad_request"


@pytest.mark.parametrize("te", [b"chunked", b"gzip, chunked", b"identity"])
async def test_transfer_encoding_is_501(make_server: ServerFactory, te: bytes) -> None:
    server = await make_server()
    data = b"POST / HTTP/1.1\r\nTransfer-Encoding: " + te + b"\r\nContent-Length: 3\r\n\r\n"
    resp, rest = await exchange(server, data + b"3\r\nabc\r\n0\r\n\r\n")
    assert resp.status == 501 and resp.error_code == "not_implemented"
    assert resp.headers["connection"] == "close" and rest == b""


async def test_unknown_expectation_is_417(make_server: ServerFactory) -> None:
    server = await make_server()
    resp, _ = await exchange(
        server, b"POST / HTTP/1.1\r\nExpect: magic\r\nContent-Length: 0\r\n\r\n"
    )
    assert resp.status == 417 and resp.error_code == "expectation_failed"


# -- timeouts ------------------------------------------------------------------------------------


async def test_slowloris_head_gets_408(make_server: ServerFactory) -> None:
    server = await make_server(read_timeout=0.3)
    reader, writer = await connect(server)

    async def dribble() -> None:
        try:
            writer.write(b"GET / HTTP/1.1\r\n")
            for i in range(100):
                await asyncio.sleep(0.05)
                writer.write(b"X-%d: y\r\n" % i)
                await writer.drain()
        except OSError:
            pass

    task = asyncio.create_task(dribble())
    started = time.monotonic()
    try:
        resp = await read_response(reader)
        elapsed = time.monotonic() - started
        assert resp.status == 408 and resp.error_code == "request_timeout"
        assert 0.25 < elapsed < 1.5
        assert await read_eof(reader) == b""
    finally:
        task.cancel()
        await close(writer)


async def test_slow_body_gets_408(make_server: ServerFactory) -> None:
    server = await make_server(read_timeout=0.3)
    reader, writer = await connect(server)
    try:
        writer.write(b"POST /json HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        resp = await read_response(reader)
        assert resp.status == 408 and resp.error_code == "request_timeout"
        assert await read_eof(reader) == b""
    finally:
        await close(writer)


async def test_idle_keep_alive_connection_is_closed(make_server: ServerFactory) -> None:
    server = await make_server(idle_timeout=0.3, read_timeout=5.0)
    reader, writer = await connect(server)
    try:
        writer.write(get())
        assert (await read_response(reader)).status == 200
        started = time.monotonic()
        assert await read_eof(reader) == b""  # closed silently, no 408
        assert 0.25 < time.monotonic() - started < 1.5
    finally:
        await close(writer)


async def test_silent_new_connection_is_closed(make_server: ServerFactory) -> None:
    server = await make_server(read_timeout=0.2, idle_timeout=5.0)
    reader, writer = await connect(server)
    try:
        assert await read_eof(reader) == b""
    finally:
        await close(writer)


# -- handler errors --------------------------------------------------------------------------------


async def test_http_error_from_handler_keeps_connection(make_server: ServerFactory) -> None:
    server = await make_server()
    reader, writer = await connect(server)
    try:
        writer.write(get("/teapot"))
        resp = await read_response(reader)
        assert resp.status == 418
        assert resp.json() == {"error": {"code": "teapot", "message": "short and stout"}}
        assert resp.headers["retry-after"] == "7"
        assert resp.headers["cache-control"] == "no-store"
        writer.write(get("/after"))
        assert (await read_response(reader)).json()["path"] == "/after"
    finally:
        await close(writer)


async def test_handler_exception_is_500_and_logged_once(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    logger = logging.getLogger("test.http_server")
    caplog.set_level(logging.DEBUG, logger=logger.name)
    server = await make_server(logger=logger)

    resp, _ = await exchange(server, get("/boom", "Connection: close\r\n"))
    assert resp.status == 500
    assert resp.json() == {"error": {"code": "internal", "message": "internal error"}}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None
    assert "boom" in caplog.text

    # A new connection works, and so does the same connection after a 500.
    url = f"http://{HOST}:{server.port}/fine"
    status, _, body = await asyncio.to_thread(fetch, url)
    assert status == 200 and json.loads(body)["path"] == "/fine"
    reader, writer = await connect(server)
    try:
        writer.write(get("/boom") + get("/again"))
        assert (await read_response(reader)).status == 500
        assert (await read_response(reader)).json()["path"] == "/again"
    finally:
        await close(writer)


async def test_invalid_response_from_handler_is_500(
    make_server: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    async def bad(request: HttpRequest) -> HttpResponse:
        if request.path == "/status":
            return HttpResponse(status=99)
        if request.path == "/type":
            return "not a response"  # type: ignore[return-value]
        return await echo(request)

    logger = logging.getLogger("test.http_server.bad")
    caplog.set_level(logging.ERROR, logger=logger.name)
    server = await make_server(bad, logger=logger)
    reader, writer = await connect(server)
    try:
        for path in ("/bad-header", "/status", "/type"):
            writer.write(get(path))
            resp = await read_response(reader)
            assert resp.status == 500 and resp.error_code == "internal"
            assert b"Injected" not in resp.body
    finally:
        await close(writer)
    assert len(caplog.records) == 3


# -- stop() --------------------------------------------------------------------------------------


async def test_stop_lets_in_flight_request_finish(make_server: ServerFactory) -> None:
    started = asyncio.Event()

    async def slow(request: HttpRequest) -> HttpResponse:
        started.set()
        await asyncio.sleep(0.3)
        return HttpResponse.json({"done": True})

    server = await make_server(slow)
    port = server.port
    reader, writer = await connect(server)
    idle_reader, idle_writer = await connect(server)
    try:
        writer.write(get())
        await started.wait()
        stop = asyncio.create_task(server.stop(timeout=5.0))
        # The idle connection is closed at once.
        assert await read_eof(idle_reader) == b""
        resp = await read_response(reader)
        assert resp.status == 200 and resp.json() == {"done": True}
        assert resp.headers["connection"] == "close"
        async with asyncio.timeout(STEP):
            await stop
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
    finally:
        await close(writer)
        await close(idle_writer)


async def test_stop_cancels_handler_after_timeout(make_server: ServerFactory) -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(request: HttpRequest) -> HttpResponse:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return HttpResponse.json({})

    server = await make_server(stuck)
    reader, writer = await connect(server)
    try:
        writer.write(get())
        await started.wait()
        t0 = time.monotonic()
        await server.stop(timeout=0.2)
        assert time.monotonic() - t0 < 1.5
        assert cancelled.is_set()
        assert await read_eof(reader) == b""
    finally:
        await close(writer)


# -- uvloop and fuzzing (server on a uvloop loop in a thread, blocking clients) --------------------


@dataclass
class ThreadedServer:
    server: HttpServer
    loop: asyncio.AbstractEventLoop

    @property
    def port(self) -> int:
        return self.server.port


@pytest.fixture(scope="module")
def uv_server() -> Iterator[ThreadedServer]:
    loop = uvloop.new_event_loop()
    server = HttpServer(echo, max_header_bytes=1024, max_body=4096, read_timeout=0.5)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start(HOST, 0))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="uvloop-http", daemon=True)
    thread.start()
    assert ready.wait(STEP)
    try:
        yield ThreadedServer(server, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(timeout=1.0), loop).result(STEP)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(STEP)
        loop.close()


def healthy(port: int) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=STEP)
    try:
        for i in range(2):  # two requests: keep-alive works too
            conn.request("GET", f"/health?i={i}")
            resp = conn.getresponse()
            assert resp.status == 200
            assert json.loads(resp.read())["query"] == {"i": str(i)}
    finally:
        conn.close()


def send_raw(port: int, data: bytes) -> bytes:
    """Send data, half-close, and return everything the server answers before closing."""
    chunks: list[bytes] = []
    with socket.create_connection((HOST, port), timeout=STEP) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


def test_uvloop_keep_alive_and_post(uv_server: ThreadedServer) -> None:
    healthy(uv_server.port)
    conn = http.client.HTTPConnection(HOST, uv_server.port, timeout=STEP)
    try:
        conn.request("POST", "/json", body=b'{"a":[1]}', headers={"Content-Type": "x"})
        resp = conn.getresponse()
        assert resp.status == 201 and json.loads(resp.read()) == {"got": {"a": [1]}}
        conn.request("POST", "/json", body=b"x" * 5000)
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    finally:
        conn.close()


def test_uvloop_slowloris(uv_server: ThreadedServer) -> None:
    raw = b""
    with socket.create_connection((HOST, uv_server.port), timeout=STEP) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        while chunk := sock.recv(65536):
            raw += chunk
    match = _STATUS_LINE.match(raw)
    assert match is not None and match.group(1) == b"408"
    healthy(uv_server.port)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=3000))
def test_fuzz_random_head_bytes(uv_server: ThreadedServer, data: bytes) -> None:
    raw = send_raw(uv_server.port, data)
    if raw:  # otherwise the server just closed
        match = _STATUS_LINE.match(raw)
        assert match is not None, raw[:200]
        status = int(match.group(1))
        assert 400 <= status < 500 or status == 505, raw[:200]
        body = raw.partition(b"\r\n\r\n")[2]
        assert isinstance(json.loads(body)["error"]["code"], str)
    healthy(uv_server.port)


_FRAGMENTS = [
    b"GET",
    b"POST",
    b"HEAD",
    b"get",
    b" ",
    b"/",
    b"/a?b=c&b=d",
    b"%ff",
    b"%41",
    b"*",
    b"http://h/x",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b":",
    b"Host: x",
    b"Content-Length: 3",
    b"Content-Length: 99999",
    b"Content-Length: x",
    b"Transfer-Encoding: chunked",
    b"Expect: 100-continue",
    b"Connection: close",
    b"Connection: keep-alive",
    b"\x00",
    b"\xff",
    b"\t",
    b"abc",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(_FRAGMENTS), max_size=40))
def test_fuzz_structured_requests(uv_server: ThreadedServer, parts: list[bytes]) -> None:
    raw = send_raw(uv_server.port, b"".join(parts))
    assert raw == b"" or raw.startswith(b"HTTP/1.1 "), raw[:200]
    statuses = [int(m.group(1)) for m in _STATUS_LINE.finditer(raw)]
    assert 500 not in statuses, raw[:500]
    assert b'"internal"' not in raw
    healthy(uv_server.port)


# -- value types -----------------------------------------------------------------------------------


def test_response_helpers_and_error() -> None:
    resp = HttpResponse.json({"a": [1, "é"]}, status=202)
    assert resp.status == 202 and resp.body == '{"a":[1,"é"]}'.encode()
    assert resp.content_type == "application/json" and resp.headers == {}
    text = HttpResponse.text("hi", content_type="text/csv")
    assert (text.status, text.body, text.content_type) == (200, b"hi", "text/csv")
    err = HttpError(404, "not_found", "nope", {"X": "1"})
    assert (err.status, err.code, err.message, err.headers) == (
        404,
        "not_found",
        "nope",
        {"X": "1"},
    )
    with pytest.raises(ValueError):
        HttpResponse.json(float("nan"))


def test_request_json() -> None:
    req = HttpRequest("POST", "/", {}, {}, b'{"a":1}', "1.2.3.4:5")
    assert req.json() == {"a": 1}
    for body in (b"", b"{", b"\xc3", b"\xef\xbb\xbf{}", b"Infinity", b"1" * 5000):
        with pytest.raises(HttpError) as info:
            HttpRequest("POST", "/", {}, {}, body, "x").json()
        assert (info.value.status, info.value.code) == (400, "bad_json")
