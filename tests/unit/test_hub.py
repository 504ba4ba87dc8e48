"""server.Hub with fake transports: what a read becomes on every connection.

The Hub hands a run of plain chat from one read to the room's shortcut and
queues it as one broadcast. These check that this changes nothing anyone
sees: a read of many lines gives every connection, and the server's stdout,
exactly the bytes the same lines give when each comes in its own pass.
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server

NOW = 1_764_460_800.0  # :mytime and the room's clock read this, not the real time


class FakeTransport:
    """Collects what the Hub writes; closing it is remembered, not done."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.data += data

    def get_extra_info(self, key: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def cancel_login_timers(conns: Iterable[server.Connection]) -> None:
    """The login timers of connections a test leaves open, so the loop can close."""
    for conn in list(conns):
        if conn.timer is not None:
            conn.timer.cancel()


class RawClients:
    """Plain non-blocking sockets that log in to a Hub on the running loop,
    and what each has read so far."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.got: list[bytes] = []

    async def login(self, port: int, name: str) -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no line held back
        sock.setblocking(False)
        self.socks.append(sock)
        self.got.append(b"")
        sock.send(f"LOGIN pw {name}\n".encode())
        await self.until(len(self.socks) - 1, f":ok {name}\n".encode())

    async def until(self, k: int, want: bytes) -> None:
        """Read client k's socket until `want` is among what it has read."""
        for _ in range(2000):
            try:
                self.got[k] += self.socks[k].recv(65536)
            except BlockingIOError:
                pass
            if want in self.got[k]:
                return
            await asyncio.sleep(0.001)
        raise AssertionError(f"client {k} never got {want!r}: {self.got[k]!r}")


def logged_in(hub: server.Hub, *names: str,
              ) -> tuple[list[server.Connection], list[FakeTransport]]:
    """Connections over fake transports, logged in to `hub` one by one (each
    login written out before the next), and their transports."""
    conns, transports = [], []
    for name in names:
        conn, tr = server.Connection(hub), FakeTransport()
        conn.connection_made(tr)  # type: ignore[arg-type]
        conn.data_received(f"LOGIN pw {name}\n".encode())
        hub.flush()
        conns.append(conn)
        transports.append(tr)
    return conns, transports


def run_room(reads: list[tuple[int, bytes]], flush_each: bool,
             lone: bool = False) -> tuple[list[bytes], bytes]:
    """alice, bob and carol log in; then each (who, data) is one read.
    Returns each one's bytes after the logins, and the server's stdout.
    With `lone`, on a PassLoop, each read is heard as its pass's only one
    (PassLoop.lone), so that plain chat may skip the queue (Hub.said)."""

    async def main() -> tuple[list[bytes], bytes]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop) == lone
        out = io.BytesIO()
        hub = server.Hub(server.Room("pw"), server.Limits(), out, now=lambda: NOW)
        conns, transports = logged_in(hub, "alice", "bob", "carol")
        start = [len(tr.data) for tr in transports]
        printed = len(out.getvalue())
        for who, data in reads:
            if isinstance(loop, server.PassLoop):
                loop.lone = True
            conns[who].data_received(data)
            if flush_each:
                hub.flush()
        hub.flush()
        return ([bytes(tr.data[k:]) for tr, k in zip(transports, start, strict=True)],
                out.getvalue()[printed:])

    return server.run_on_pass_loop(main()) if lone else asyncio.run(main())


def one_read_against_line_by_line(who: int, lines: list[str]) -> None:
    """The same lines in one read or one read each, queued or (when lone)
    written at once: every connection and stdout see the same bytes."""
    data = "".join(line + "\n" for line in lines).encode()
    apart = [(who, line.encode() + b"\n") for line in lines]
    together = run_room([(who, data)], flush_each=False)
    assert run_room(apart, flush_each=True) == together
    assert run_room([(who, data)], flush_each=False, lone=True) == together
    assert run_room(apart, flush_each=True, lone=True) == together


@pytest.mark.parametrize("lines", [
    ["hi", "there"],
    ["a", ":Users", "b"],
    ["a", ":)", "b", ":Msg bob psst", "c"],
    ["a", "\\:Users", "b"],  # an escaped command is plain text, but not the shortcut's
    ["a", "b", ":Exit", "never sent"],
    ["a", "", "   ", "b"],
    ["ascii", "caf\u00e9", "ascii again"],
    ["x" * 3000, "after a line too long"],
    [":mytime", "a"],
])
def test_a_read_of_many_lines_is_seen_as_those_lines_one_by_one(lines: list[str]) -> None:
    one_read_against_line_by_line(0, lines)


def test_a_run_of_plain_chat_reaches_the_others_in_one_write_and_skips_its_sender() -> None:
    (alice, bob, carol), printed = run_room([(0, b"one\ntwo\n:Users\nthree\n")], flush_each=False)
    assert bob == carol == b"alice: one\nalice: two\nalice: three\n"
    assert alice == b"Active Users: alice, bob, carol\n"
    assert printed == (b"alice: one\nalice: two\nalice: searched up active users\n"
                       b"alice: three\n")


LINE = st.sampled_from(["hi", "a b", ":)", ":(", ":Users", ":Msg bob hey", ":Msg nobody x",
                        ":mytime", "\\:)", "", " ", "\u00e9t\u00e9", "tab\there", ":Exit",
                        ":bogus"])


@settings(max_examples=150, deadline=None)
@given(who=st.integers(0, 2), lines=st.lists(LINE, max_size=8))
def test_any_read_is_seen_as_its_lines_one_by_one(who: int, lines: list[str]) -> None:
    one_read_against_line_by_line(who, lines)


def test_the_hub_looks_for_more_input_only_after_a_write_that_carried_several_reads() -> None:
    """PassLoop.look_first costs a lone sender more than it saves, so the Hub
    asks for it only when its last flush carried more than one read."""

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO(), now=lambda: NOW)
        conns = []
        for name in ("alice", "bob"):
            conn = server.Connection(hub)
            conn.connection_made(FakeTransport())  # type: ignore[arg-type]
            conn.data_received(f"LOGIN pw {name}\n".encode())
            await asyncio.sleep(0)  # one pass: the hook flushes
            conns.append(conn)
        asked = []
        for reads in ([b"one\n"], [b"two\n", b"three\n"], [b"four\n"], [b"five\n"]):
            for k, data in enumerate(reads):  # all in one pass
                conns[k].data_received(data)
            asked.append(loop.look_first)
            await asyncio.sleep(0)
        cancel_login_timers(conns)
        return asked

    asked = server.run_on_pass_loop(main())
    assert asked == [False, False, True, False]


def test_a_pass_with_one_read_writes_it_at_once_and_two_reads_share_the_pass_end() -> None:
    """When a pass's poll returns one member's read and nothing else, the Hub
    writes what it queued as soon as it is heard (PassLoop.lone), not at the
    end of the pass. Two reads in one pass still share one write at its end.
    Real sockets, so that the poll really returns one event or two."""

    async def main() -> tuple[list[bool], list[int], list[bytes]]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO(), now=lambda: NOW)
        listener = await loop.create_server(lambda: server.Connection(hub), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        flushes = [0]
        real_flush = hub.flush

        def counting_flush() -> None:
            flushes[0] += 1
            real_flush()

        hub.flush = counting_flush  # type: ignore[method-assign]
        pending = []  # at each pass end, before the Hub's hook: was anything left to write?
        loop.before_poll.insert(0, lambda: pending.append(hub._scheduled))
        raw = RawClients()
        clients, got, until = raw.socks, raw.got, raw.until
        for name in ("alice", "bob"):
            await raw.login(port, name)
        await until(0, b"bob joined the chatroom\n")
        await asyncio.sleep(server.NOTICE_WAIT * 2)  # nothing left waiting
        results = []
        for sends in ([(0, b"one\n")], [(0, b"two\n"), (1, b"three\n")], [(0, b"four\n")]):
            del pending[:]
            flushes[0] = 0
            got[0] = got[1] = b""
            for k, data in sends:  # all sent before the loop polls again
                clients[k].send(data)
            await until(1, b"alice: " + sends[0][1])
            if len(sends) > 1:
                await until(0, b"bob: three\n")
            results.append((True in pending, flushes[0]))
        for sock in clients:
            sock.close()
        listener.close()
        cancel_login_timers(hub.connections)
        return [r[0] for r in results], [r[1] for r in results], [got[0], got[1]]

    left, flushes, last = server.run_on_pass_loop(main())
    # One read: written while it was heard, so no pass ended with it pending;
    # plain chat with nothing else queued is not even queued (no flush).
    # Two reads: the pass ended with them pending, and one flush wrote both.
    # One read right after that: the Hub gathers several senders now
    # (look_first), so it waits for the end of the pass too.
    assert left == [False, True, True]
    assert flushes == [0, 1, 1]
    assert last == [b"", b"alice: four\n"]


def test_only_the_first_read_of_a_lone_pass_is_written_early() -> None:
    """A TLS connection can hand over several reads in one pass; the early
    write is for the first, the rest wait for the end of the pass."""

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO(), now=lambda: NOW)
        conns, transports = [], []
        for name in ("alice", "bob"):
            conn, tr = server.Connection(hub), FakeTransport()
            conn.connection_made(tr)  # type: ignore[arg-type]
            conn.data_received(f"LOGIN pw {name}\n".encode())
            await asyncio.sleep(server.NOTICE_WAIT * 2)
            conns.append(conn)
            transports.append(tr)
        start = len(transports[1].data)
        seen = []
        loop.lone = True  # as if this pass's poll had returned one event
        conns[0].data_received(b"a\n")
        seen.append(bytes(transports[1].data[start:]))
        conns[0].data_received(b"b\n")
        seen.append(bytes(transports[1].data[start:]))
        await asyncio.sleep(0)  # the end of the pass
        seen.append(bytes(transports[1].data[start:]))
        cancel_login_timers(conns)
        return seen

    seen = server.run_on_pass_loop(main())
    assert seen == [b"alice: a\n", b"alice: a\n", b"alice: a\nalice: b\n"]


def test_room_notices_alone_wait_a_moment_and_chat_takes_them_along() -> None:
    """A pass that queued only join or leave notices writes them up to
    NOTICE_WAIT later, so that a storm of logins shares writes; anything
    else queued meanwhile takes them along at once, in order."""

    async def main() -> list[bytes]:
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO(), now=lambda: NOW)
        seen = []
        conns, transports = [], []

        async def login(name: str) -> None:
            conn, tr = server.Connection(hub), FakeTransport()
            conn.connection_made(tr)  # type: ignore[arg-type]
            conn.data_received(f"LOGIN pw {name}\n".encode())
            conns.append(conn)
            transports.append(tr)
            await asyncio.sleep(0)  # one pass

        await login("alice")
        await asyncio.sleep(server.NOTICE_WAIT * 2)
        start = len(transports[0].data)
        await login("bob")
        seen.append(bytes(transports[0].data[start:]))  # after a pass: not yet
        await asyncio.sleep(server.NOTICE_WAIT * 2)
        seen.append(bytes(transports[0].data[start:]))  # after the wait: there
        start = len(transports[0].data)
        await login("carol")
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        loop.lone = True  # the next pass's only read: written at once, but not before the notice
        conns[1].data_received(b"hi\n")  # chat in the next pass takes it along
        seen.append(bytes(transports[0].data[start:]))
        await asyncio.sleep(0)
        seen.append(bytes(transports[0].data[start:]))
        cancel_login_timers(conns)
        return seen

    seen = server.run_on_pass_loop(main())
    assert seen == [b"", b"bob joined the chatroom\n",
                    b"carol joined the chatroom\nbob: hi\n",
                    b"carol joined the chatroom\nbob: hi\n"]


@pytest.mark.parametrize("queued, bob_sees, printed", [
    (server.Deliver("carol left the chatroom"), b"carol left the chatroom\n", b""),
    (server.Deliver("for bob only", to="bob"), b"for bob only\n", b""),
    (server.Log("a line of the server's"), b"", b"a line of the server's\n"),
])
def test_a_lone_read_of_plain_chat_goes_behind_whatever_is_queued(
        queued: server.Output, bob_sees: bytes, printed: bytes) -> None:
    """Plain chat heard as its pass's only read skips the queue only when
    the queue is empty; otherwise it is written after what is queued, to
    every connection and to stdout."""

    async def main() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        out = io.BytesIO()
        hub = server.Hub(server.Room("pw"), server.Limits(), out, now=lambda: NOW)
        conns, transports = logged_in(hub, "alice", "bob")
        start, printed_before = len(transports[1].data), len(out.getvalue())
        hub.route([queued])
        loop.lone = True  # alice's read is the pass's only one
        conns[0].data_received(b"hi\n")
        cancel_login_timers(conns)
        return bytes(transports[1].data[start:]), out.getvalue()[printed_before:]

    assert server.run_on_pass_loop(main()) == (bob_sees + b"alice: hi\n",
                                               printed + b"alice: hi\n")


@pytest.mark.parametrize("ending", ["close", "reset"])
def test_member_reads_are_served_from_the_poll_and_anything_else_is_left_to_asyncio(
        ending: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """PassLoop.serve_read: the Hub reads and hears a member's read right
    where the poll reports it, one read or several, and asyncio dispatches
    nothing for it. A login's read and the end of a stream go to the
    transport as before; a reset, which the read itself meets, drops the
    member. Real sockets and a real poll."""

    transport_reads: list[str] = []  # members' reads that went through asyncio's transport
    get_buffer = server.Connection.get_buffer

    def counting_get_buffer(self: server.Connection, sizehint: int) -> memoryview:
        if self.name is not None:
            transport_reads.append(self.name)
        return get_buffer(self, sizehint)

    monkeypatch.setattr(server.Connection, "get_buffer", counting_get_buffer)

    async def main() -> tuple[list[tuple[str, bool]], bytes, list[str], list[str]]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, server.PassLoop)
        hub = server.Hub(server.Room("pw"), server.Limits(), io.BytesIO(), now=lambda: NOW)
        listener = await loop.create_server(lambda: server.Connection(hub), "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        served: list[tuple[str, bool]] = []  # (whose descriptor, served?) per offer
        offer = hub.serve_read

        def recording(fd: int) -> bool:
            conn = hub.by_fd.get(fd)
            answer = offer(fd)
            served.append((conn.name or "?" if conn is not None else "-", answer))
            return answer

        loop.serve_read = recording
        raw = RawClients()
        clients, got, until = raw.socks, raw.got, raw.until
        for name in ("alice", "bob"):
            await raw.login(port, name)
        logins = list(served)
        del served[:]
        clients[0].send(b"hi there\n")
        await until(1, b"alice: hi there\n")
        clients[0].send(b":Users\n")  # not plain chat: served all the same
        await until(0, b"Active Users: alice, bob\n")
        clients[0].send(b"from alice\n")
        clients[1].send(b"from bob\n")  # both before the loop polls again: two reads in one poll
        await until(1, b"alice: from alice\n")
        await until(0, b"bob: from bob\n")
        if ending == "reset":
            clients[0].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        clients[0].close()
        await until(1, b"alice left the chatroom\n")
        left = sorted(conn.name or "?" for conn in hub.by_fd.values())  # her number may come back
        through = list(transport_reads)
        for sock in clients[1:]:
            sock.close()
        listener.close()
        cancel_login_timers(hub.connections)
        return logins + served, got[1], left, through

    served, bob, left, through = server.run_on_pass_loop(main())
    assert left == ["bob"]
    # Only the end of alice's stream went the transport's way, never her lines.
    assert through == (["alice"] if ending == "close" else [])
    assert ("?", True) not in served  # a login is never read from the poll
    logins = served.index(("alice", True))
    assert served[logins:logins + 2] == [("alice", True), ("alice", True)]
    assert sorted(served[logins + 2:logins + 4]) == [("alice", True), ("bob", True)]
    assert len(served) == logins + 5
    # The end of alice's stream is left to her transport; a reset is met,
    # and dealt with, by the read.
    assert served[-1] == ("alice", ending == "reset")
    assert bob.endswith(b"alice: hi there\nalice: from alice\nalice left the chatroom\n")
