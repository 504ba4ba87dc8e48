"""Helpers for the web tests: a server.py with -web, and WebSocket members.

As everywhere in this suite: real processes on -port 0 (and -web 0), every
wait is "this line, within N seconds", never a sleep.

- WebServer: server.py started through harness.Room with -web 0; it learns
  the web port from the one line the server writes to stderr
  (`server.py: web page at http://127.0.0.1:PORT/`).
- Ws: a WebSocket member (the `websockets` library's sync client), read line
  by line like harness.Peer: one text message is one line.
- RawWs: a WebSocket opened by hand on a plain socket, for what a well-behaved
  client library will not do (stop reading, send frames split oddly).
"""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import NoReturn

import pytest
from harness import DEFAULT_TIMEOUT, PASSCODE, PROGRAM_DIR, Client, Peer, Proc, Room

websockets = pytest.importorskip("websockets")

from websockets.exceptions import ConnectionClosed, InvalidStatus  # noqa: E402
from websockets.sync.client import ClientConnection, connect  # noqa: E402
from websockets.typing import Origin, Subprotocol  # noqa: E402

SUBPROTOCOL = Subprotocol("chatroom.v1")
__all__ = ["InvalidStatus", "RawWs", "WebServer", "Ws", "repo_file", "run_server_without"]

WEB_LINE = re.compile(r"server\.py: web page at (https?)://127\.0\.0\.1:(\d+)/")


class WebServer:
    """server.py with -web 0 on loopback, and what joins it."""

    def __init__(self, room: Room, scheme: str, web_port: int, tls: ssl.SSLContext | None) -> None:
        self.room = room
        self.scheme = scheme
        self.web_port = web_port
        self.tls = tls
        self.members: list[Ws] = []

    @classmethod
    def start(cls, room: Room, *extra: str, tls: ssl.SSLContext | None = None,
              web_port: int = 0, passcode: str | None = None) -> WebServer:
        room.start_server("-web", str(web_port), *extra, passcode=passcode)
        server = room.server
        assert server is not None
        line = server.expect_err_line()
        m = WEB_LINE.fullmatch(line)
        if m is None:
            server.fail(f"server: expected the web page's address on stderr, got {line!r}")
        return cls(room, m.group(1), int(m.group(2)), tls)

    @property
    def proc(self) -> Proc:
        assert self.room.server is not None
        return self.room.server

    @property
    def origin(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.web_port}"

    @property
    def page_url(self) -> str:
        return self.origin + "/"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.scheme == 'https' else 'ws'}://127.0.0.1:{self.web_port}/ws"

    def ws(self, label: str = "ws", origin: str | None = "",
           subprotocols: list[Subprotocol] | None = None) -> Ws:
        """A WebSocket opened as the page would (its own Origin), nothing read."""
        return Ws(self, label, self.origin if origin == "" else origin, subprotocols)

    def ws_join(self, name: str, *others: Peer | Client | Ws) -> Ws:
        """A WebSocket member `name` in the room; the server and `others` saw it join."""
        member = self.ws(label=name)
        member.expect(":hello chatroom 1")
        member.send(f"LOGIN {PASSCODE} {name}")
        member.expect(f":ok {name}")
        self.announced(f"{name} joined the chatroom", *others)
        return member

    def announced(self, line: str, *others: Peer | Client | Ws) -> None:
        self.proc.expect(line)
        for other in others:
            other.expect(line)

    def raw(self, label: str = "raw") -> RawWs:
        return RawWs(self, label)

    def close(self) -> None:
        for member in self.members:
            member.close()


class Ws:
    """One WebSocket, read one text message (one line) at a time."""

    def __init__(self, web: WebServer, label: str, origin: str | None,
                 subprotocols: list[Subprotocol] | None = None) -> None:
        self.label = label
        self.name = label
        self.seen: list[str] = []
        self.closed: tuple[int, str] | None = None
        self._stack = ExitStack()
        self.conn: ClientConnection = self._stack.enter_context(connect(
            web.ws_url, origin=None if origin is None else Origin(origin),
            subprotocols=[SUBPROTOCOL] if subprotocols is None else subprotocols,
            ssl=web.tls, open_timeout=DEFAULT_TIMEOUT, close_timeout=2,
            max_size=None, compression=None))
        web.members.append(self)

    def fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\n[{self.label}] lines so far: {self.seen!r}", pytrace=False)

    def send(self, text: str) -> None:
        self.conn.send(text)

    def send_binary(self, data: bytes) -> None:
        self.conn.send(data)

    def next_line(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """The next text message; None once the server closed the WebSocket
        (its code and reason are then in `closed`)."""
        if self.closed is not None:
            return None
        try:
            message = self.conn.recv(timeout)
        except TimeoutError:
            self.fail(f"{self.label}: no message within {timeout} s")
        except ConnectionClosed as exc:
            close = exc.rcvd
            self.closed = (1006, "") if close is None else (close.code, close.reason)
            return None
        if not isinstance(message, str):
            self.fail(f"{self.label}: a binary message: {message!r}")
        self.seen.append(message)
        return message

    def expect(self, line: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        got = self.next_line(timeout)
        if got != line:
            what = f"the close {self.closed}" if got is None else repr(got)
            self.fail(f"{self.label}: expected the next message {line!r}, got {what}")

    def expect_match(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> re.Match[str]:
        got = self.next_line(timeout)
        m = re.fullmatch(pattern, got) if got is not None else None
        if m is None:
            what = f"the close {self.closed}" if got is None else repr(got)
            self.fail(f"{self.label}: expected the next message to match {pattern!r}, got {what}")
        return m

    def expect_closed(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str]:
        """The server closes the WebSocket next; its (code, reason)."""
        got = self.next_line(timeout)
        if got is not None:
            self.fail(f"{self.label}: expected the WebSocket to close, got {got!r}")
        assert self.closed is not None
        return self.closed

    def close(self) -> None:
        self._stack.close()


class RawWs:
    """A WebSocket client on a plain socket: the handshake, then frames built
    here. It reads only when asked, so it can stop reading altogether."""

    def __init__(self, web: WebServer, label: str, origin: str | None = "",
                 recv_buffer: int | None = None, host: str = "") -> None:
        self.label = label
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if recv_buffer is not None:  # before connecting, so the window stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        sock.settimeout(DEFAULT_TIMEOUT)
        sock.connect(("127.0.0.1", web.web_port))
        self.sock = sock
        key = base64.b64encode(os.urandom(16)).decode()
        origin = web.origin if origin == "" else origin
        host = host or f"127.0.0.1:{web.web_port}"
        request = (f"GET /ws HTTP/1.1\r\nHost: {host}\r\n"
                   f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
                   + (f"Origin: {origin}\r\n" if origin is not None else "") + "\r\n")
        sock.sendall(request.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = sock.recv(4096)
            assert chunk, f"{label}: the server closed during the handshake: {self.buf!r}"
            self.buf += chunk
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101 "), head

    def frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        """Send one masked frame, as a client must."""
        mask = os.urandom(4)
        n = len(payload)
        first = (0x80 if fin else 0) | opcode
        if n < 126:
            head = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(head + mask + body)

    def close_frame(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, str] | None:
        """The server's next frame is a close: its (code, reason); None if not."""
        frame = self.next_frame(timeout)
        if frame is None or frame[0] != 0x8:
            return None
        return int.from_bytes(frame[1][:2], "big"), frame[1][2:].decode()

    def text(self, line: str) -> None:
        self.frame(0x1, line.encode())

    def _read(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def next_frame(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next frame from the server; None at EOF."""
        deadline = time.monotonic() + timeout
        try:
            first, second = self._read(2, deadline)
            n = second & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._read(2, deadline))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._read(8, deadline))[0]
            return first & 0x0F, self._read(n, deadline)
        except (EOFError, ConnectionResetError):
            return None

    def next_text(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        frame = self.next_frame(timeout)
        if frame is None or frame[0] != 0x1:
            return None
        return frame[1].decode()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def run_server_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """server.py run with `module` unimportable, as on a machine without it."""
    code = ("import runpy, sys; sys.modules[sys.argv[1]] = None; sys.argv = sys.argv[2:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, module, "server.py", *args],
                          cwd=PROGRAM_DIR, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def repo_file(*parts: str) -> Path:
    return PROGRAM_DIR.joinpath(*parts)
