"""Reference fan-out server: the ceiling a plain Python (uvloop) WebSocket server reaches.

Deliberately minimal, so that it is obviously correct and has no overhead beyond what any
WebSocket fan-out must do:

- HTTP upgrade by hand (Sec-WebSocket-Accept; echoes the `realtime.v1.proto` subprotocol).
- Client frames parsed and unmasked by hand; ping -> pong, close -> close.
- A client's 1st data frame ("connect") and 2nd ("subscribe") are each answered with one
  small pre-built frame (a varint-prefixed `Reply{id: 1}` / `Reply{id: 2}`), so the load
  generator's flow is the same as against the gateway. After that the client is a
  subscriber.
- Every later data frame is fan-out input: its payload is sent, as one server frame built
  once per message, to every other subscriber with one `transport.write` per message per
  connection. No coalescing, no decoding of the payload: that is the reference.

Run: python bench/reference_server.py --port 9000  (prints "listening ..." when ready;
SIGTERM/SIGINT stop it).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import resource
import signal
import struct

import uvloop

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUBPROTOCOL = b"realtime.v1.proto"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_FRAME = 1 << 20

# Reply{id: 1} and Reply{id: 2}, varint-length-prefixed, as binary frames.
CONNECT_REPLY = bytes((0x82, 3, 2, 0x08, 1))
SUBSCRIBE_REPLY = bytes((0x82, 3, 2, 0x08, 2))


def server_frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, n))
    elif n < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return header + payload


def unmask(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if not n:
        return payload
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


class Connection(asyncio.Protocol):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.open = False  # handshake done
        self.data_frames = 0
        self.fragments: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.server.subscribers.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if not self.open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > 16384:
                    self.transport.close()  # type: ignore[union-attr]
                self.buffer = buffer
                return
            if not self.handshake(buffer[:end]):
                return
            buffer = buffer[end + 4 :]
        pos = 0
        size = len(buffer)
        while size - pos >= 2:
            b0 = buffer[pos]
            length = buffer[pos + 1] & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                head = 10
            if length > MAX_FRAME:
                self.transport.abort()  # type: ignore[union-attr]
                return
            start = pos + head + 4  # client frames are always masked
            end = start + length
            if end > size:
                break
            payload = unmask(buffer[start:end], buffer[start - 4 : start])
            pos = end
            self.frame(b0 & 0x80, b0 & 0x0F, payload)
            if self.transport is None:
                return
        self.buffer = buffer[pos:]

    def handshake(self, head: bytes) -> bool:
        transport = self.transport
        assert transport is not None
        key = b""
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-key":
                key = value.strip()
        if not head.startswith(b"GET ") or not key:
            transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            transport.close()
            return False
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n"
            b"Sec-WebSocket-Protocol: " + SUBPROTOCOL + b"\r\n\r\n"
        )
        self.open = True
        return True

    def frame(self, fin: int, opcode: int, payload: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if opcode in (OP_TEXT, OP_BINARY):
            if not fin:
                self.fragments = [payload]
                return
        elif opcode == OP_CONT:
            if self.fragments is None:
                return
            self.fragments.append(payload)
            if not fin:
                return
            payload = b"".join(self.fragments)
            self.fragments = None
        elif opcode == OP_PING:
            transport.write(server_frame(OP_PONG, payload))
            return
        elif opcode == OP_CLOSE:
            transport.write(server_frame(OP_CLOSE, payload[:2]))
            transport.close()
            return
        else:
            return
        # One complete data message.
        self.data_frames += 1
        if self.data_frames == 1:
            transport.write(CONNECT_REPLY)
        elif self.data_frames == 2:
            transport.write(SUBSCRIBE_REPLY)
            self.server.subscribers.add(self)
        else:
            self.server.fanout(self, payload)


class Server:
    def __init__(self) -> None:
        self.connections: set[Connection] = set()
        self.subscribers: set[Connection] = set()

    def fanout(self, sender: Connection, payload: bytes) -> None:
        frame = server_frame(OP_BINARY, payload)  # built once per message
        for conn in self.subscribers:
            if conn is not sender:
                conn.transport.write(frame)  # type: ignore[union-attr]


async def main(host: str, port: int) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = asyncio.get_running_loop()
    state = Server()
    server = await loop.create_server(
        lambda: Connection(state), host, port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = server.sockets[0].getsockname()[1]
    print(f"reference server listening on ws://{host}:{bound}/connection/websocket", flush=True)
    await stop.wait()
    server.close()
    for conn in list(state.connections):
        if conn.transport is not None:
            conn.transport.abort()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    uvloop.run(main(args.host, args.port))
