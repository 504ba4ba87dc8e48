"""The room in a browser (`server.py ... -web PORT`): a page and a WebSocket door.

One asyncio protocol, WebConnection, per connection to the web port. The
`websockets` library's sans-I/O layer (`websockets.server.ServerProtocol`)
parses its HTTP request and, once upgraded, its WebSocket frames; this module
does the I/O and the routing:

    GET /          the chat page (chatroom_ext/page.html), under a strict
                   Content-Security-Policy
    GET /healthz   `ok`
    GET /ws        the WebSocket door, subprotocol `chatroom.v1`

Every other request gets a short plain-text error; each HTTP response closes
its connection (no keep-alive: a page load is two requests).

A WebSocket member is one more adapter behind the server's member interface
(`server.Peer`): the Hub cannot tell it from a TCP member. Each text message
it receives goes to the Hub as that text and a line end, so the core's one
read path (LineReader, login, limits, deadline, throttle) sees exactly what
a TCP member would send; each line the Hub writes goes out as one text
message. Its SendQ is the transport's write buffer, capped at `-max-sendq`
exactly like a TCP member's: a browser that stops reading is dropped.

Refused, each with a close code and a reason a person can read:
a binary frame (1003), a message longer than `-max-line` bytes (1009), a
message that is not one line or not UTF-8 (1007), and a handshake whose
Origin is missing or not allowed (1008; no byte of the room is sent).

docs/PROTOCOL.md ("WebSocket") is the reference; docs/SECURITY.md says why the
Origin check and the Content-Security-Policy are what they are.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import re
import socket
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Final, Protocol, cast

from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import SEND_EOF, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

SUBPROTOCOL: Final = Subprotocol("chatroom.v1")
PAGE_RESOURCE: Final = "page.html"
CLOSE_WAIT: Final = 3.0  # seconds a closing connection waits for the other end's answer
MAX_REQUEST: Final = 32 << 10  # bytes of an HTTP request (a browser's are a few KiB)

# Close codes (RFC 6455, section 7.4.1) and the reasons the browser is given.
NORMAL: Final = 1000
UNSUPPORTED: Final = 1003
INVALID_DATA: Final = 1007
POLICY: Final = 1008
TOO_BIG: Final = 1009


class Hub(Protocol):
    """What this module asks of server.Hub: the calls a TCP connection makes.
    A WebConnection is handed over as a server.Peer (checked where server.py
    passes its Hub in: server.py runs as __main__, so it is not imported here)."""

    def connected(self, peer: WebConnection) -> int: ...
    def received(self, cid: int, data: bytes | memoryview) -> None: ...
    def lost(self, cid: int) -> None: ...


class Limits(Protocol):
    """The server's limits this door applies (server.Limits)."""

    @property
    def max_line(self) -> int: ...
    @property
    def max_sendq(self) -> int: ...
    @property
    def login_timeout(self) -> float: ...
    @property
    def max_clients(self) -> int: ...
    @property
    def max_per_ip(self) -> int: ...


@dataclass(frozen=True)
class WebConfig:
    """The web door's settings, from server.py's flags and limits."""

    host: str
    port: int
    origins: tuple[str, ...]  # allowed besides the page's own (-web-origin), normalised
    tls: ssl.SSLContext | None
    max_line: int  # bytes in one message (a line without its end)
    max_sendq: int  # bytes queued for one member before it is dropped
    handshake_timeout: float  # seconds from connect to the end of the HTTP phase
    max_pending: int  # connections still in the HTTP phase, in total ...
    max_pending_per_ip: int  # ... and from one address (unless exempt)
    address_key: Callable[[str], str]  # server.address_key
    exempt: Callable[[str], bool]  # is this address_key exempt from per-address limits?
    watch_for_silence: Callable[[socket.socket], None]  # server.watch_for_silence
    reset_on_close: Callable[[socket.socket], None]  # server.reset_on_close


_ORIGIN = re.compile(r"(https?)://([^/?#@\s]+)")


def literal_host(host: str) -> bool:
    """Is this Host header an IP address or `localhost` (with or without a port)?"""
    name = host.strip().lower()
    if name.startswith("["):  # [v6] or [v6]:port
        name, bracket, port = name[1:].partition("]")
        if not bracket or port[:1] not in ("", ":"):
            return False
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def normalise_origin(text: str) -> str | None:
    """`scheme://host[:port]` as a browser sends it in Origin, lower-cased,
    or None when `text` is not one."""
    text = text.strip().rstrip("/").lower()
    return text if _ORIGIN.fullmatch(text) else None


def parse_origins(values: list[str]) -> tuple[str, ...]:
    """-web-origin's values (each may be a comma-separated list), normalised;
    ValueError names the first that is not `scheme://host[:port]`."""
    out = []
    for value in values:
        for item in value.split(","):
            if not item.strip():
                continue
            origin = normalise_origin(item)
            if origin is None:
                raise ValueError(f"{item.strip()!r} is not an origin like https://chat.example.org")
            out.append(origin)
    return tuple(dict.fromkeys(out))


# --- The page ------------------------------------------------------------------


def _csp_hash(html: str, tag: str) -> str:
    """The CSP source expression that allows exactly the one inline `tag`
    element of the page (script or style, its tags each at the start of a
    line), by the sha256 of its text."""
    found = re.findall(rf"^<{tag}>(.*?)^</{tag}>", html, re.DOTALL | re.MULTILINE)
    if len(found) != 1:
        raise ValueError(f"{PAGE_RESOURCE} must hold exactly one <{tag}> element")
    digest = hashlib.sha256(found[0].encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


@dataclass(frozen=True)
class Page:
    body: bytes
    csp: str

    @classmethod
    def load(cls, max_line: int) -> Page:
        """The page, with the server's line limit filled in, and its policy:
        nothing may load or run but its own script and style (pinned by
        hash), and it may connect only back to this server."""
        html = resources.files(__package__ or "chatroom_ext").joinpath(PAGE_RESOURCE)
        text = html.read_text("utf-8").replace("__MAX_LINE__", str(max_line))
        csp = ("default-src 'none'; "
               f"script-src {_csp_hash(text, 'script')}; "
               f"style-src {_csp_hash(text, 'style')}; "
               "connect-src 'self'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        return cls(text.encode(), csp)


def _response(status: int, reason: str, body: bytes, content_type: str,
              extra: tuple[tuple[str, str], ...] = ()) -> Response:
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Connection", "close"),
        *extra,
    ])
    return Response(status, reason, headers, body)


def _text(status: int, reason: str, text: str) -> Response:
    return _response(status, reason, text.encode() + b"\n", "text/plain; charset=utf-8")


# --- Outgoing lines as text frames -------------------------------------------


def text_frames(data: bytes) -> bytes:
    """Whole lines (each ending with a line end) as one text frame per line,
    without the line end: what a server sends (unmasked, no extension)."""
    out = []
    for line in data.split(b"\n")[:-1]:
        n = len(line)
        if n < 126:
            out.append(struct.pack("!BB", 0x81, n))
        elif n < 65536:
            out.append(struct.pack("!BBH", 0x81, 126, n))
        else:
            out.append(struct.pack("!BBQ", 0x81, 127, n))
        out.append(line)
    return b"".join(out)


class _ServerProtocol(ServerProtocol):
    """websockets' sans-I/O server, saying in our words why a message was too big."""

    def __init__(self, max_line: int) -> None:
        super().__init__(subprotocols=[SUBPROTOCOL], max_size=max_line)
        self.too_big = f"line too long: at most {max_line} bytes in one message"

    def fail(self, code: int, reason: str = "") -> None:
        super().fail(code, self.too_big if code == TOO_BIG else reason)


# --- The door ------------------------------------------------------------------


class WebDoor:
    """The web listener: its settings, the page, and what all its connections
    share (the count of connections still in the HTTP phase, the last batch
    framed)."""

    def __init__(self, hub: Hub, config: WebConfig) -> None:
        self.hub = hub
        self.config = config
        self.page = Page.load(config.max_line)
        self.scheme = "https" if config.tls is not None else "http"
        self.pending: dict[str, int] = {}  # address_key -> connections in the HTTP phase
        self.pending_total = 0
        self.server: asyncio.Server | None = None
        # The Hub writes the same bytes object to every member in one pass:
        # frame it once for all of them.
        self._framed_in = b""
        self._framed_out = b""

    @classmethod
    def create(cls, hub: Hub, *, host: str, port: int, origins: list[str],
               tls: ssl.SSLContext | None, limits: Limits, address_key: Callable[[str], str],
               exempt: Callable[[str], bool], watch_for_silence: Callable[[socket.socket], None],
               reset_on_close: Callable[[socket.socket], None]) -> WebDoor:
        """The door for server.py's flags: the HTTP phase (before a WebSocket
        joins the core's count) is capped and timed like a login."""
        return cls(hub, WebConfig(
            host=host, port=port, origins=parse_origins(origins), tls=tls,
            max_line=limits.max_line, max_sendq=limits.max_sendq,
            handshake_timeout=limits.login_timeout, max_pending=limits.max_clients,
            max_pending_per_ip=limits.max_per_ip, address_key=address_key, exempt=exempt,
            watch_for_silence=watch_for_silence, reset_on_close=reset_on_close))

    async def start(self) -> int:
        """Listen; return the port (the first socket's). Raises OSError."""
        loop = asyncio.get_running_loop()
        config = self.config
        # Plain TCP even for HTTPS: each connection is counted as it is
        # accepted, and only then starts its TLS handshake (WebConnection).
        self.server = await loop.create_server(
            lambda: WebConnection(self), config.host, config.port, family=socket.AF_UNSPEC,
            backlog=1024)
        return int(self.server.sockets[0].getsockname()[1])

    def url(self, port: int) -> str:
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"{self.scheme}://{host}:{port}/"

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    def frames(self, data: bytes) -> bytes:
        if data is not self._framed_in:
            self._framed_in, self._framed_out = data, text_frames(data)
        return self._framed_out

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """The ones given with -web-origin, and the page's own origin (this
        scheme and the Host the browser asked for) when that Host is an IP
        address or `localhost`; never a missing Origin.

        A name in Host is trusted only through -web-origin: else a hostile
        name that resolves to this server (DNS rebinding) would make a page
        of the attacker's "the page's own", in a visitor's browser, from the
        visitor's address (possibly loopback, exempt from the throttle)."""
        if origin is None:
            return False
        origin = origin.lower()
        if origin in self.config.origins:
            return True
        return (host is not None and literal_host(host)
                and origin == f"{self.scheme}://{host.lower()}")

    def admit(self, addr: str) -> bool:
        """May one more connection from `addr` enter the HTTP phase?"""
        config = self.config
        if self.pending_total >= config.max_pending:
            return False
        if not config.exempt(addr) and self.pending.get(addr, 0) >= config.max_pending_per_ip:
            return False
        self.pending[addr] = self.pending.get(addr, 0) + 1
        self.pending_total += 1
        return True

    def release(self, addr: str) -> None:
        left = self.pending[addr] - 1
        if left:
            self.pending[addr] = left
        else:
            del self.pending[addr]
        self.pending_total -= 1


class WebConnection(asyncio.Protocol):
    """One connection to the web port: an HTTP request, and after an upgrade
    at /ws a member of the room (the server.Peer interface below)."""

    __slots__ = ("addr", "cid", "door", "ending", "handshake", "held", "message", "pending",
                 "request_bytes", "timer", "transport", "ws")

    def __init__(self, door: WebDoor) -> None:
        self.door = door
        self.ws = _ServerProtocol(door.config.max_line)
        self.transport: asyncio.Transport | None = None
        self.addr = ""
        self.cid = 0  # set once it is a member
        self.pending = False  # counted in door.pending
        self.request_bytes = 0  # received before the request was answered
        self.timer: asyncio.TimerHandle | None = None  # the deadline of the current phase
        self.ending = False  # the timer is the last wait, for the other end's close
        self.message: list[bytes] = []  # the fragments of a message being received
        self.handshake: asyncio.Task[None] | None = None  # TLS, on an HTTPS port
        # Set during the TLS handshake: what is written waits for its end (a
        # request can arrive, decrypted, before the handshake's task resumes).
        self.held: list[bytes] | None = None

    # -- asyncio -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.addr = self.door.config.address_key(str(peer[0])) if peer else ""
        if not self.door.admit(self.addr):
            transport.abort()
            return
        self.pending = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.door.config.watch_for_silence(sock)
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.door.config.handshake_timeout, self.abort)
        tls = self.door.config.tls
        if tls is not None:  # counted above; the handshake is inside the same deadline
            self.held = []
            self.handshake = loop.create_task(self._secure(transport, tls))

    async def _secure(self, raw: asyncio.Transport, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            secured = await loop.start_tls(
                raw, self, tls, server_side=True,
                ssl_handshake_timeout=self.door.config.handshake_timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):
            secured = None
        if secured is None or self.transport is None:  # failed, or gone meanwhile
            raw.abort()
            self.connection_lost(None)  # the raw transport's end does not reach us
            return
        self.transport = secured
        held, self.held = self.held or [], None
        self._send()  # the upgrade's answer first, then what the room wrote meanwhile
        for data in held:
            if not secured.is_closing():
                secured.write(data)

    def data_received(self, data: bytes) -> None:
        if self.pending and self.ws.state is State.CONNECTING:
            self.request_bytes += len(data)
            if self.request_bytes > MAX_REQUEST:
                self.abort()
                return
        self.ws.receive_data(data)
        lines: list[bytes] = []
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self._request(event)
            elif isinstance(event, Frame) and not self._frame(event, lines):
                break
        self._send()
        if lines and self.cid:
            self.door.hub.received(self.cid, b"".join(lines))

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        self._send()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._release()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.cid:
            self.door.hub.lost(self.cid)

    def pause_writing(self) -> None:
        if not self.cid:
            return  # a page on its way out: the transport sends it as it can
        # More than -max-sendq waits for this member: it stopped reading. As
        # for a TCP member: reset, and the room is told it left.
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            self.door.config.reset_on_close(sock)
        self.transport.abort()

    # -- HTTP --------------------------------------------------------------------

    def _request(self, request: Request) -> None:
        path = request.path.partition("?")[0]
        if path == "/ws":
            self._upgrade(request)
            # The protocol's parser keeps the request for the connection's
            # life: let its headers go (a few KiB per member).
            request.headers = Headers()
            return
        if request.method != "GET":
            response = _text(405, "Method Not Allowed", "Only GET is served here")
            response.headers["Allow"] = "GET"
        elif path == "/":
            page = self.door.page
            response = _response(200, "OK", page.body, "text/html; charset=utf-8",
                                 (("Content-Security-Policy", page.csp),))
        elif path == "/healthz":
            response = _text(200, "OK", "ok")
        else:
            response = _text(404, "Not Found", "Not found: the chat page is at /")
        self.ws.send_response(response)

    def _upgrade(self, request: Request) -> None:
        response = self.ws.accept(request)
        if response.status_code != 101:
            self.ws.send_response(response)  # a plain HTTP error, the reason as its body
            return
        origin = request.headers.get("Origin")  # one at most: accept() checked
        hosts = request.headers.get_all("Host")
        host = hosts[0] if len(hosts) == 1 else None
        allowed = self.door.origin_allowed(origin, host)
        self.ws.send_response(response)
        if not allowed:
            # Refused in the open WebSocket, so that a browser can show why;
            # the room never sees this connection.
            reason = ("no Origin header" if origin is None
                      else f"origin {origin} is not allowed here")
            # A close reason has at most 123 bytes.
            self.ws.send_close(POLICY, reason.encode()[:120].decode("utf-8", "ignore"))
            self._closing()  # still counted as pending until it is gone
            return
        self._release()
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=self.door.config.max_sendq)
        self._send()  # the 101 goes out before anything the hub writes
        self.cid = self.door.hub.connected(self)

    def _release(self) -> None:
        if self.pending:
            self.pending = False
            self.door.release(self.addr)
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    # -- WebSocket ---------------------------------------------------------------

    def _frame(self, frame: Frame, lines: list[bytes]) -> bool:
        """Take one frame; False when it ended the connection."""
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.CONT:
            if opcode is Opcode.TEXT and frame.fin:
                data = bytes(frame.data)
            else:
                self.message.append(bytes(frame.data))
                if not frame.fin:
                    return True
                data, self.message = b"".join(self.message), []
            if b"\n" in data:
                return self._refuse(INVALID_DATA, "one line per message: no line end inside")
            try:
                data.decode()
            except UnicodeDecodeError:
                return self._refuse(INVALID_DATA, "a text message must be UTF-8")
            lines.append(data + b"\n")
        elif opcode is Opcode.BINARY:
            return self._refuse(UNSUPPORTED, "binary frames are not accepted: "
                                "send each protocol line as one text message")
        elif opcode is Opcode.CLOSE:
            self._closing()
        return True

    def _refuse(self, code: int, reason: str) -> bool:
        if self.ws.state is State.OPEN:
            self.ws.fail(code, reason)
        self._closing()
        return False

    def _send(self) -> None:
        """Write what the WebSocket layer has for the network."""
        transport = self.transport
        if transport is None or self.held is not None:
            return  # nothing yet, or after the TLS handshake
        for chunk in self.ws.data_to_send():
            if chunk == SEND_EOF:
                if transport.can_write_eof():
                    transport.write_eof()
                else:
                    transport.close()
                self._closing()
            elif not transport.is_closing():
                transport.write(chunk)

    def _closing(self) -> None:
        """The connection is closing: give the other end a moment to answer,
        then cut it off."""
        if self.ending or self.transport is None:
            return
        self.ending = True
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(CLOSE_WAIT, self.abort)

    # -- the member interface (server.Peer) --------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.held is not None:
            if self.ws.state is State.OPEN:
                self.held.append(self.door.frames(data))
        elif transport is not None and self.ws.state is State.OPEN and not transport.is_closing():
            transport.write(self.door.frames(data))

    def close(self) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_close(NORMAL, "")
        self._closing()
        self._send()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()
