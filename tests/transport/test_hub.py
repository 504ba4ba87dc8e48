"""server.Hub and server.Connection: the core on a stock event loop.

The Hub hands each connection event to the core with the time and writes
what the core queued once per pass (call_soon), through each connection's
small interface (server.Peer). Checked on asyncio's loop and on uvloop:
every read of one pass shares one write per connection; room notices alone
wait a moment; one timer keeps the login deadlines; a member that stops
reading is dropped at its SendQ and the room is told; a broken peer raises
nothing.
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import server

pytestmark = pytest.mark.timeout(30)

NOW = 1_764_460_800.0


def loops() -> list[Any]:
    found: list[Any] = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        found.append(pytest.param(None, id="uvloop", marks=pytest.mark.skip("no uvloop")))
    else:
        found.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    return found


def run(factory: Callable[[], asyncio.AbstractEventLoop],
        main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    loop = factory()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


class FakePeer:
    """A server.Peer that keeps each write apart."""

    def __init__(self, addr: str = "127.0.0.1") -> None:
        self.addr = addr
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def hub_with(limits: server.Limits | None = None) -> server.Hub:
    core = server.Core(server.Room("pw"), limits or server.Limits())
    return server.Hub(core, io.BytesIO(), clock=lambda: NOW)


async def a_pass() -> None:
    """Let the loop finish this pass and run what it scheduled."""
    for _ in range(3):
        await asyncio.sleep(0)


async def members(hub: server.Hub, *names: str) -> list[tuple[int, FakePeer]]:
    got = []
    for name in names:
        peer = FakePeer()
        cid = hub.connected(peer)
        hub.received(cid, f"LOGIN pw {name}\n".encode())
        hub.flush()
        got.append((cid, peer))
    await a_pass()
    for _, peer in got:
        peer.writes.clear()
    return got


@pytest.mark.parametrize("factory", loops())
def test_every_read_of_one_pass_shares_one_write_per_connection(factory: Any) -> None:
    async def main() -> None:
        hub = hub_with()
        (a, alice), (b, bob), (_, carol) = await members(hub, "alice", "bob", "carol")
        hub.received(a, b"one\ntwo\n")
        hub.received(b, b"three\n")
        hub.received(a, b"four\n")
        assert carol.writes == []  # nothing is written while the pass goes on
        await a_pass()
        assert carol.writes == [b"alice: one\nalice: two\nbob: three\nalice: four\n"]
        assert alice.writes == [b"bob: three\n"]
        assert bob.writes == [b"alice: one\nalice: two\nalice: four\n"]
        assert hub.out.getvalue().endswith(  # type: ignore[attr-defined]
            b"alice: one\nalice: two\nbob: three\nalice: four\n")

    run(factory, main)


@pytest.mark.parametrize("factory", loops())
def test_room_notices_alone_wait_a_moment_and_chat_takes_them_along(factory: Any) -> None:
    async def main() -> None:
        hub = hub_with()
        [(a, alice)] = await members(hub, "alice")
        bob = FakePeer()
        cid = hub.connected(bob)
        hub.received(cid, b"LOGIN pw bob\n")
        await a_pass()
        assert alice.writes == bob.writes == []  # a login and its notice wait for company ...
        await asyncio.sleep(server.NOTICE_WAIT * 4)
        assert alice.writes == [b"bob joined the chatroom\n"]  # ... a moment at most
        assert bob.writes == [b":hello chatroom 1\n:ok bob\n"]
        carol = FakePeer()
        hub.received(hub.connected(carol), b"LOGIN pw carol\n")
        hub.received(a, b"hi\n")  # chat takes the waiting notice along, at once
        await a_pass()
        assert alice.writes[1:] == [b"carol joined the chatroom\n"]
        assert bob.writes[1:] == [b"carol joined the chatroom\nalice: hi\n"]

    run(factory, main)


@pytest.mark.parametrize("factory", loops())
def test_one_timer_refuses_a_login_not_finished_in_time(factory: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = server.Core(server.Room("pw"), server.Limits(login_timeout=0.05))
        hub = server.Hub(core, io.BytesIO(), clock=loop.time)
        slow, member = FakePeer(), FakePeer()
        hub.connected(slow)
        hub.received(hub.connected(member), b"LOGIN pw alice\n")
        for _ in range(100):
            if slow.closed:
                break
            await asyncio.sleep(0.01)
        assert slow.closed
        assert slow.writes[-1] == b":error login-timeout The login was not finished in time\n"
        assert not member.closed

    run(factory, main)


async def socket_member(hub: server.Hub, sndbuf: int | None = None,
                        ) -> tuple[server.Connection, socket.socket]:
    """A Connection on one end of a socket pair, logged in; the other end is returned."""
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    theirs.setblocking(False)
    loop = asyncio.get_running_loop()
    _, conn = await loop.connect_accepted_socket(lambda: server.Connection(hub), ours)
    await loop.sock_sendall(theirs, b"LOGIN pw zed\n")
    got = b""
    while b":ok zed\n" not in got:
        got += await loop.sock_recv(theirs, 4096)
    return conn, theirs


@pytest.mark.parametrize("factory", loops())
def test_a_member_that_stops_reading_is_dropped_at_the_sendq_and_the_room_is_told(
        factory: Any) -> None:
    async def main() -> None:
        hub = hub_with(server.Limits(max_sendq=64 * 1024, rate_lines=0, rate_bytes=0))
        [(a, alice)] = await members(hub, "alice")
        conn, peer = await socket_member(hub, sndbuf=4096)
        await a_pass()
        line = b"x" * 1000 + b"\n"
        for _ in range(400):  # 400 KB for zed, who never reads
            if conn.cid not in hub.peers:
                break
            hub.received(a, line)
            await a_pass()
        assert conn.cid not in hub.peers
        await asyncio.sleep(server.NOTICE_WAIT * 4)
        assert b"zed left the chatroom\n" in b"".join(alice.writes)
        peer.close()

    run(factory, main)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of TCP sockets on 127.0.0.1 (a reset needs TCP)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
    ours.setblocking(False)
    return ours, theirs


@pytest.mark.parametrize("factory", loops())
def test_a_reset_peer_is_closed_without_an_error_escaping(factory: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: errors.append(context))
        hub = hub_with(server.Limits(rate_lines=0, rate_bytes=0))
        [(a, _)] = await members(hub, "alice")
        ours, theirs = tcp_pair()
        _, conn = await loop.connect_accepted_socket(lambda: server.Connection(hub), ours)
        theirs.sendall(b"LOGIN pw zed\n")
        for _ in range(100):
            if "zed" in hub.core.members:
                break
            await asyncio.sleep(0.01)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()  # a reset: the next write fails
        for _ in range(200):
            if conn.cid not in hub.peers:
                break
            hub.received(a, b"x" * 1000 + b"\n")  # must never raise
            await asyncio.sleep(0.005)
        assert conn.cid not in hub.peers
        assert "zed" not in hub.core.members
        assert not [e for e in errors if "exception" in e and
                    not isinstance(e["exception"], (ConnectionError, OSError))]

    run(factory, main)


@pytest.mark.parametrize("factory", loops())
def test_what_a_half_closed_client_is_owed_goes_out_before_the_close(factory: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hub = hub_with()
        await members(hub, "alice", "bob")
        conn, peer = await socket_member(hub)
        peer.sendall(b":Users\n")
        peer.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            chunk = await loop.sock_recv(peer, 4096)
            if not chunk:
                break
            got += chunk
        assert got.endswith(b"Active Users: alice, bob, zed\n")
        peer.close()
        for _ in range(100):
            if conn.cid not in hub.peers:
                break
            await asyncio.sleep(0.01)
        assert conn.cid not in hub.peers

    run(factory, main)


@pytest.mark.parametrize("factory", loops())
def test_a_member_socket_is_dropped_by_the_kernel_once_its_peer_goes_silent(
        factory: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        hub = hub_with()
        ours, theirs = tcp_pair()
        await loop.connect_accepted_socket(lambda: server.Connection(hub), ours)
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        if hasattr(socket, "TCP_KEEPIDLE"):  # Linux
            tcp = socket.IPPROTO_TCP
            assert ours.getsockopt(tcp, socket.TCP_KEEPIDLE) == server.KEEPALIVE_IDLE
            assert ours.getsockopt(tcp, socket.TCP_KEEPINTVL) == server.KEEPALIVE_INTERVAL
            assert ours.getsockopt(tcp, socket.TCP_KEEPCNT) == server.KEEPALIVE_COUNT
            assert ours.getsockopt(tcp, socket.TCP_USER_TIMEOUT) == server.UNACKED_TIMEOUT_MS
        theirs.close()

    run(factory, main)
