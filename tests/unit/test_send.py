"""server.Connection.send: straight to the socket while the transport holds nothing.

A member's bytes skip asyncio's transport.write when nothing of theirs is
queued in it. These pin down what must not change because of that: the order
of the bytes when the socket takes only part of a write, the SendQ limit, a
broken peer, and that TLS connections and other loops never take the shortcut
(tests/security/test_tls.py would also see the plain bytes of a TLS member).
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest

import server

pytestmark = pytest.mark.timeout(30)

CHUNK = b"0123456789abcdef" * 4096  # 64 KiB: more than a small socket buffer takes


def on_pass_loop(main: Callable[[], Coroutine[Any, Any, object]]) -> object:
    async def wrapper() -> object:
        return await main()
    return server.run_on_pass_loop(wrapper())


async def member(hub: server.Hub, sndbuf: int | None = None,
                 ) -> tuple[server.Connection, socket.socket]:
    """A Connection on one end of a socket pair; the other end is returned."""
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    _, conn = await loop.connect_accepted_socket(lambda: server.Connection(hub), ours)
    return conn, theirs


async def read_all(sock: socket.socket, size: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < size:
        got += await loop.sock_recv(sock, 1 << 20)
    return bytes(got)


def is_clear(conn: server.Connection) -> bool:
    return conn.clear


def test_a_partial_write_leaves_the_rest_to_the_transport_in_order() -> None:
    async def main() -> None:
        limits = server.Limits(max_sendq=1 << 20)  # room for all four parts
        hub = server.Hub(server.Room("pw"), limits, io.BytesIO())
        conn, peer = await member(hub, sndbuf=4096)
        assert conn.fd >= 0  # a plain socket on the PassLoop: the shortcut is on
        hello = await read_all(peer, 1)
        assert hello.startswith(b":hello ")
        assert is_clear(conn)  # written straight to the socket

        parts = [bytes([65 + k]) * 7 + CHUNK for k in range(4)]
        conn.send(parts[0])
        # The socket took only part of it: the rest waits in the transport.
        assert not is_clear(conn)
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() > 0
        # The peer makes room in the socket before the transport writes again:
        # what comes next must still queue behind the rest of the first part.
        got = bytearray()
        try:
            while True:
                got += peer.recv(1 << 20)
        except BlockingIOError:
            pass
        assert 0 < len(got) < len(parts[0])
        for part in parts[1:]:
            conn.send(part)
        assert not conn.clear
        got += await read_all(peer, sum(map(len, parts)) - len(got))
        assert got == b"".join(parts)

        # Once the transport has written it all, the shortcut comes back.
        assert conn.transport.get_write_buffer_size() == 0
        conn.send(b"after\n")
        assert is_clear(conn)
        assert await read_all(peer, 6) == b"after\n"
        conn.transport.close()
        peer.close()

    on_pass_loop(main)


def test_a_member_that_stops_reading_is_still_dropped_at_the_sendq_limit() -> None:
    async def main() -> None:
        limits = server.Limits(max_sendq=64 * 1024)
        hub = server.Hub(server.Room("pw"), limits, io.BytesIO())
        conn, peer = await member(hub, sndbuf=4096)
        await read_all(peer, 1)
        lost = asyncio.get_running_loop().create_future()
        hub.lost = lambda conn: None if lost.done() else lost.set_result(conn)  # type: ignore[method-assign]
        for _ in range(8):  # 8 x 64 KiB, never read
            if conn.dead:
                break
            conn.send(CHUNK)
        assert conn.dead  # pause_writing: past the SendQ, the transport gave up on it
        assert not conn.clear
        assert await asyncio.wait_for(lost, 5) is conn
        peer.close()

    on_pass_loop(main)


def test_a_reset_peer_is_closed_by_the_transport_without_an_error_escaping() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO())
        lost = loop.create_future()
        hub.lost = lambda conn: None if lost.done() else lost.set_result(conn)  # type: ignore[method-assign]
        ours, theirs = tcp_pair()
        _, conn = await loop.connect_accepted_socket(lambda: server.Connection(hub), ours)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()  # a reset: the next write fails
        sent = 0
        while not lost.done() and sent < 100:
            conn.send(b"x" * 1000 + b"\n")  # must never raise
            sent += 1
            await asyncio.sleep(0)
        assert await asyncio.wait_for(lost, 5) is conn
        assert not [e for e in errors if "exception" in e and
                    not isinstance(e["exception"], (ConnectionError, OSError))]

    on_pass_loop(main)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on 127.0.0.1 (a reset needs TCP)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    return ours, theirs


def test_another_loop_keeps_to_the_transport() -> None:
    async def main() -> tuple[int, bool]:
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO())
        conn, peer = await member(hub)
        await read_all(peer, 1)
        conn.send(b"hi\n")
        assert await read_all(peer, 3) == b"hi\n"
        assert conn.transport is not None
        conn.transport.close()
        peer.close()
        return conn.fd, conn.clear

    # asyncio's own loop (uvloop takes the same path): no PassLoop, no shortcut
    assert asyncio.run(main()) == (-1, False)


class TlsTransport:
    """What connection_made sees of a TLS transport: a socket, and a context."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.written = bytearray()

    def get_extra_info(self, key: str, default: object = None) -> object:
        return {"socket": self.sock, "sslcontext": object(),
                "peername": ("127.0.0.1", 40000)}.get(key, default)

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.written += data


def test_a_tls_member_is_written_through_its_transport() -> None:
    async def main() -> tuple[int, bool, bytes]:
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO())
        ours, theirs = socket.socketpair()
        with ours, theirs:
            conn, transport = server.Connection(hub), TlsTransport(ours)
            conn.connection_made(transport)  # type: ignore[arg-type]
            conn.send(b"secret\n")
            if conn.timer is not None:
                conn.timer.cancel()
            return conn.fd, conn.clear, bytes(transport.written)

    fd, clear, written = cast(tuple[int, bool, bytes], on_pass_loop(main))
    assert (fd, clear) == (-1, False)
    assert written.endswith(b"secret\n")
