"""Reference HTTP server for the poll benchmark: the floor of one request per connection.

A raw uvloop `asyncio.Protocol`: it reads a request up to its blank line, answers with a
fixed response (head and body read from --response-file: a real `GET /v1/poll` answer of
the gateway, captured by bench/poll/driver.py, so the bytes on the wire are the same),
and closes the connection, as the gateway does after a poll. No parsing, no auth, no
broker, no JSON: what any Python server must do for a poll is accept, read, write, close.

Run: python bench/poll/reference_http.py --port 9000 --response-file answer.bin (prints
"listening ..." when ready; SIGTERM/SIGINT stop it).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal
from pathlib import Path

import uvloop

MAX_HEAD = 16384


class Connection(asyncio.Protocol):
    __slots__ = ("buffer", "response", "transport")

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        transport = self.transport
        assert transport is not None
        if buffer.find(b"\r\n\r\n") < 0:
            if len(buffer) > MAX_HEAD:
                transport.abort()
            self.buffer = buffer
            return
        self.buffer = b""
        transport.write(self.response)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def main(host: str, port: int, response: bytes) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Connection(response), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"reference HTTP server listening on http://{host}:{bound}/v1/poll", flush=True)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--response-file", type=Path, required=True)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port, args.response_file.read_bytes()))
