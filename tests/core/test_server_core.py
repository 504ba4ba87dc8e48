"""server.Core: the whole server with no I/O, driven call by call.

Connections are numbers; time is a number; what comes out is the outbox's
Batch: bytes per connection, connections to close, the server's stdout.
No event loop, no socket, no clock.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import server
from server import Core, Input, Limits, Room

NOW = 1_758_717_104.0  # Wed Sep 24 12:31:44 2025 in UTC
LOCAL = "127.0.0.1"


class Wire:
    """A Core and what each connection has been sent, pass by pass."""

    def __init__(self, limits: Limits | None = None, log: server.RoomLog | None = None,
                 history: server.History | None = None) -> None:
        self.core = Core(Room("pw"), limits or Limits(), log, history)
        self.got: dict[int, bytes] = {}
        self.closed: list[int] = []
        self.printed = b""

    def take(self) -> None:
        batch = self.core.outbox.take()
        cids = [cid for cid, _ in batch.writes]
        assert len(cids) == len(set(cids)), "one write per connection per pass"
        for cid, data in batch.writes:
            assert cid not in self.closed, f"{cid} written after it was closed"
            self.got[cid] = self.got.get(cid, b"") + data
        self.closed += batch.close
        self.printed += batch.printed

    def connect(self, cid: int, addr: str = LOCAL, now: float = NOW) -> None:
        self.core.connect(cid, addr, now)
        self.take()

    def send(self, cid: int, data: bytes, now: float = NOW) -> None:
        self.core.receive(cid, data, now)
        self.take()

    def login(self, cid: int, name: str) -> None:
        self.connect(cid)
        self.send(cid, f"LOGIN pw {name}\n".encode())

    def since(self, cid: int, mark: int) -> bytes:
        return self.got.get(cid, b"")[mark:]


HELLO = b":hello chatroom 1\n"


def test_a_connection_is_greeted_and_a_login_answered_before_the_room_hears() -> None:
    w = Wire()
    w.login(1, "alice")
    assert w.got[1] == HELLO + b":ok alice\n"
    w.login(2, "bob")
    assert w.got[1] == HELLO + b":ok alice\nbob joined the chatroom\n"
    assert w.got[2] == HELLO + b":ok bob\n"
    assert w.printed == b"alice joined the chatroom\nbob joined the chatroom\n"


def test_every_row_of_the_room() -> None:
    w = Wire()
    for cid, name in enumerate(["alice", "bob", "carol"], 1):
        w.login(cid, name)
    marks = {cid: len(w.got[cid]) for cid in (1, 2, 3)}
    w.send(1, b"Hello Room\n:)\n:(\n:mytime\n:+1hr\n:Users\n:Msg bob CS3251 is awesome\n"
              b"\\:mytime\n:Msg zed hi\n:Exit\nnever said\n")
    others = (b"alice: Hello Room\nalice: [feeling happy]\nalice: [feeling sad]\n"
              b"alice: Wed Sep 24 12:31:44 2025\nalice: Wed Sep 24 13:31:44 2025\n")
    assert w.since(1, marks[1]) == (
        b"alice: Wed Sep 24 12:31:44 2025\nalice: Wed Sep 24 13:31:44 2025\n"
        b"Active Users: alice, bob, carol\n"
        b":error no-such-user No user named zed is in the chatroom\n:bye\n")
    assert w.since(2, marks[2]) == (others + b"[Message from alice]: CS3251 is awesome\n"
                                    b"alice: :mytime\nalice left the chatroom\n")
    assert w.since(3, marks[3]) == others + b"alice: :mytime\nalice left the chatroom\n"
    assert w.closed == [1]
    assert w.printed.endswith(
        b"alice: Hello Room\nalice: [feeling happy]\nalice: [feeling sad]\n"
        b"alice: Wed Sep 24 12:31:44 2025\nalice: Wed Sep 24 13:31:44 2025\n"
        b"alice: searched up active users\nalice: send message to bob\nalice: :mytime\n"
        b"alice left the chatroom\n")
    assert w.core.room.names == ["bob", "carol"]


LOGINS = [
    # (first line, the refusal)
    (b"LOGIN nope alice\n", b":error passcode Incorrect passcode\n"),
    (b"HELLO\n", b":error bad-login Expected: LOGIN <passcode> <username>\n"),
    (b"LOGIN pw bad:name\n",
     b":error bad-username Invalid username: a username has no ':'\n"),
    (b"LOGIN pw alice\n", b":error name-taken The username alice is already in the chatroom\n"),
    (b"LOGIN pw ALICE\n", b":error name-taken The username ALICE is already in the chatroom\n"),
    (b"L" * 3000 + b"\n", b":error bad-login Expected: LOGIN <passcode> <username>\n"),
    (b"L" * 20000, b":error flood Too much data without a line end\n"),
]


@pytest.mark.parametrize(("line", "refusal"), LOGINS, ids=[repr(x[:20]) for x, _ in LOGINS])
def test_a_refused_login_is_told_why_in_one_line_and_closed(line: bytes, refusal: bytes) -> None:
    w = Wire()
    w.login(1, "alice")
    printed = w.printed
    w.connect(2)
    w.send(2, line + b"LOGIN pw carol\n")  # nothing after the refusal counts
    assert w.got[2] == HELLO + refusal
    assert w.closed == [2]
    assert w.printed == printed  # a failed login is not room news
    assert w.core.room.names == ["alice"]
    w.core.lost(2)
    assert w.core.connections == 1


def test_limits_count_at_connect() -> None:
    w = Wire(Limits(max_clients=3, max_per_ip=2, exempt=()))
    w.connect(1, "10.0.0.1")
    w.connect(2, "10.0.0.1")
    w.connect(3, "10.0.0.1")
    assert w.got[3] == b":error full Too many connections from your address\n"
    w.connect(4, "10.0.0.2")
    w.connect(5, "10.0.0.3")
    assert w.got[5] == b":error full The server is full; try again later\n"
    assert w.closed == [3, 5]
    w.core.lost(1)
    w.connect(6, "10.0.0.1")
    assert w.got[6] == HELLO


def test_an_exempt_address_has_no_per_address_limit() -> None:
    w = Wire(Limits(max_per_ip=1))
    for cid in range(1, 5):
        w.connect(cid, LOCAL)
    assert all(w.got[cid] == HELLO for cid in range(1, 5))


def test_wrong_passcodes_from_one_address_are_throttled_for_the_window() -> None:
    w = Wire(Limits(login_failures=2, failure_window=60, exempt=()))
    for cid in (1, 2):
        w.connect(cid, "10.0.0.9")
        w.send(cid, b"LOGIN bad alice\n")
    w.connect(3, "10.0.0.9", NOW + 1)
    w.send(3, b"LOGIN pw alice\n", NOW + 1)
    assert w.got[3] == HELLO + b":error throttled Too many wrong passcodes; try again later\n"
    w.connect(4, "10.0.0.9", NOW + 61)
    w.send(4, b"LOGIN pw alice\n", NOW + 61)
    assert w.got[4] == HELLO + b":ok alice\n"


def test_a_login_not_finished_in_time_is_refused_and_a_member_never_is() -> None:
    w = Wire(Limits(login_timeout=5))
    w.login(1, "alice")
    w.connect(2, now=NOW + 1)
    w.send(2, b"LOGI", now=NOW + 2)  # half a login line
    assert w.core.next_tick() == NOW + 5
    w.core.tick(NOW + 4.9)
    w.take()
    assert w.closed == []
    w.core.tick(NOW + 6)
    w.take()
    assert w.got[2] == HELLO + b":error login-timeout The login was not finished in time\n"
    assert w.closed == [2]
    assert w.got[1] == HELLO + b":ok alice\n"
    assert w.core.next_tick() is None


def test_a_line_too_long_is_refused_and_the_member_stays() -> None:
    w = Wire(Limits(max_line=20))
    w.login(1, "alice")
    w.login(2, "bob")
    mark = len(w.got[2])
    w.send(1, b"x" * 21 + b"\nshort\n")
    assert w.got[1].endswith(
        b":error line-too-long Line too long: at most 20 bytes; it was not sent\n")
    assert w.since(2, mark) == b"alice: short\n"


def test_a_flood_without_line_ends_drops_the_member_and_the_room_is_told() -> None:
    w = Wire(Limits(max_line=20))
    w.login(1, "alice")
    w.login(2, "bob")
    w.send(1, b"y" * 200)
    assert w.got[1].endswith(b":error flood Too much data without a line end\n")
    assert w.closed == [1]
    w.core.lost(1)
    w.take()
    assert w.got[2].endswith(b"alice left the chatroom\n")


def test_a_lost_member_leaves_as_with_exit_and_what_it_was_owed_is_forgotten() -> None:
    w = Wire()
    w.login(1, "alice")
    w.login(2, "bob")
    w.core.receive(2, b"for alice\n", NOW)
    w.core.lost(1)  # before the pass ended
    w.take()
    assert b"for alice" not in w.got[1]
    assert w.printed.endswith(b"bob: for alice\nalice left the chatroom\n")
    assert w.core.room.names == ["bob"]


def test_shutdown_tells_every_connection_and_closes_it() -> None:
    w = Wire()
    w.login(1, "alice")
    w.connect(2)
    printed = w.printed
    w.core.shutdown()
    w.take()
    for cid in (1, 2):
        assert w.got[cid].endswith(b":error shutdown The server is shutting down\n")
    assert sorted(w.closed) == [1, 2]
    assert w.printed == printed  # alone, nobody is left to tell


# --- the same path with a log in the middle ------------------------------------------


class LaterLog:
    """A room log that holds inputs until told to hand them back, as a
    cluster's shared log does (server.RoomLog)."""

    node = "n1"

    def __init__(self) -> None:
        self.held: list[Input] = []

    def submit(self, inp: Input) -> None:
        self.held.append(inp)


def test_with_a_log_every_input_takes_the_same_path_and_gives_the_same_bytes() -> None:
    reads = [(1, b"LOGIN pw alice\n"), (2, b"LOGIN pw bob\n"),
             (1, b"hi\n:Users\n:Msg bob x\n"), (2, b":)\n:Exit\n")]
    alone = Wire()
    log = LaterLog()
    logged = Wire(log=log)
    for w in (alone, logged):
        w.connect(1)
        w.connect(2)
    for cid, data in reads:
        alone.send(cid, data)
        logged.send(cid, data)
        for inp in log.held:
            logged.core.apply(inp)
        log.held.clear()
        logged.take()
    assert logged.got == alone.got
    assert logged.printed == alone.printed
    assert logged.closed == alone.closed == [2]


# --- reads: however the bytes are cut, the same lines --------------------------------

LINES = st.lists(st.one_of(
    st.sampled_from(["hi", ":)", ":(", ":mytime", ":Users", ":Msg bob psst", ":Msg zed x",
                     ":Msg", "\\:)", "", "   ", "caf\u00e9", "tab\there", "x" * 40]),
    st.text(max_size=8)), max_size=12)


def room_after(reads: list[bytes]) -> tuple[dict[int, bytes], bytes, list[int]]:
    w = Wire(Limits(max_line=32))
    w.login(1, "alice")
    w.login(2, "bob")
    for data in reads:
        w.send(1, data)
    return w.got, w.printed, w.closed


@settings(max_examples=150, deadline=None)
@given(LINES, st.data())
def test_a_read_is_its_lines_however_the_bytes_are_cut(lines: list[str],
                                                       data: st.DataObject) -> None:
    """One read of many lines, one read per line, or any cuts of the bytes:
    every connection and stdout get the same bytes."""
    whole = "".join(line + "\n" for line in lines).encode("utf-8", "surrogatepass")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=6)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    one_by_one = [line.encode("utf-8", "surrogatepass") + b"\n" for line in lines]
    expected = room_after([whole] if whole else [])
    assert room_after([p for p in pieces if p]) == expected
    assert room_after(one_by_one) == expected


# --- the plain-chat shortcut is the general path, quicker ------------------------------

READS = st.lists(st.one_of(
    st.lists(st.sampled_from(["hi", "Hello Room", " lead", "trail ", ":)", ":Users", "\\:)",
                              "", "  ", "caf\u00e9", "tab\there", "cr\r", "x" * 30, "a:b",
                              "o/ \\o/", "~!@#$%^&*()"]), min_size=1, max_size=5)
    .map(lambda lines: "".join(line + "\n" for line in lines).encode()),
    st.binary(min_size=1, max_size=40),
), min_size=1, max_size=8)


@settings(max_examples=300, deadline=None)
@given(READS)
def test_the_plain_chat_shortcut_gives_what_the_general_path_gives(reads: list[bytes]) -> None:
    """Core.receive may take a shortcut for whole reads of plain chat; with
    it or without it, every connection and stdout get the same bytes after
    every read, the history keeps the same lines, and the room ends the same."""
    quick, general = (Wire(Limits(max_line=32), history=server.History(100, 3600, "h"))
                      for _ in range(2))
    general.core.shortcut = False
    for w in (quick, general):
        w.login(1, "alice")
        w.login(2, "bob")
    for data in reads:
        quick.send(1, data)
        general.send(1, data)
        assert (quick.got, quick.printed, quick.closed) == \
            (general.got, general.printed, general.closed)
    assert quick.core.room.names == general.core.room.names
    assert quick.core.history and general.core.history
    assert quick.core.history.lines(NOW) == general.core.history.lines(NOW)


def test_the_shortcut_is_taken_for_plain_chat() -> None:
    w = Wire()
    w.login(1, "alice")
    w.login(2, "bob")
    w.core.room = None  # type: ignore[assignment]  # the shortcut never asks the room
    w.send(1, b"hi\nthere\n")
    assert w.got[2].endswith(b"alice: hi\nalice: there\n")


# --- each member's budget: slowed, never dropped ---------------------------------------


def budget_wire(**limits: float) -> Wire:
    w = Wire(Limits(**limits))  # type: ignore[arg-type]
    w.login(1, "alice")
    w.login(2, "bob")
    return w


def said_by_alice(w: Wire) -> list[bytes]:
    return [line for line in w.got[2].split(b"\n") if line.startswith(b"alice: ")]


def test_a_burst_goes_at_once_then_one_line_per_period_and_reading_stops_meanwhile() -> None:
    w = budget_wire(burst_lines=3, rate_lines=1.0, rate_bytes=0)
    reading: list[tuple[int, bool]] = []

    def step(data: bytes | None, now: float) -> None:
        if data is None:
            w.core.tick(now)
        else:
            w.core.receive(1, data, now)
        reading.extend(w.core.outbox._reading)
        w.take()

    step(b"".join(b"line %d\n" % k for k in range(6)), NOW)
    assert len(said_by_alice(w)) == 3
    assert reading == [(1, False)]  # not read until the budget refills
    assert w.core.next_tick() == pytest.approx(NOW + 1, abs=0.01)
    step(None, NOW + 0.5)
    assert len(said_by_alice(w)) == 3
    step(None, NOW + 1.01)
    assert len(said_by_alice(w)) == 4
    step(None, NOW + 3.02)
    assert said_by_alice(w) == [b"alice: line %d" % k for k in range(6)]
    assert reading == [(1, False), (1, True)]  # everything served: read again


def test_exit_after_a_flood_still_leaves_in_its_turn() -> None:
    w = budget_wire(burst_lines=2, rate_lines=10.0, rate_bytes=0)
    w.core.receive(1, b"a\nb\nc\nd\n:Exit\n", NOW)
    w.take()
    assert w.closed == []
    for _ in range(10):
        w.core.tick(w.core.next_tick() or NOW)
        w.take()
    assert said_by_alice(w) == [b"alice: a", b"alice: b", b"alice: c", b"alice: d"]
    assert w.got[2].endswith(b"alice left the chatroom\n")
    assert w.closed == [1]


def test_bytes_count_too() -> None:
    w = budget_wire(burst_lines=100, rate_lines=0, burst_bytes=100, rate_bytes=50.0)
    w.core.receive(1, (b"x" * 49 + b"\n") * 6, NOW)  # 50 bytes a line: two go at once
    w.take()
    assert len(said_by_alice(w)) == 2
    w.core.tick(NOW + 1.01)  # 50.5 bytes back: one line, and one more on a debt of 49.5
    w.take()
    assert len(said_by_alice(w)) == 4
    w.core.tick(NOW + 1.5)
    w.take()
    assert len(said_by_alice(w)) == 4
    w.core.tick(NOW + 2.02)
    w.take()
    assert len(said_by_alice(w)) == 5


def test_a_rate_of_zero_turns_the_budget_off() -> None:
    w = budget_wire(burst_lines=1, rate_lines=0, burst_bytes=1, rate_bytes=0)
    w.send(1, b"x\n" * 500)
    assert len(said_by_alice(w)) == 500


def test_replies_a_pass_owes_one_member_stop_at_its_sendq() -> None:
    """However many :Users one read asks for, a pass owes the asker little
    more than its SendQ; the rest waits for the next pass, in order."""
    w = Wire(Limits(max_sendq=1000, rate_lines=0, rate_bytes=0))
    for cid in range(1, 31):
        w.login(cid, f"user{cid}")
    mark = len(w.got[1])
    listing = len(b"Active Users: ") + sum(len(f"user{c}, ") for c in range(1, 31))
    w.core.receive(1, b":Users\n" * 200, NOW)
    batch = w.core.outbox.take()
    owed = dict(batch.writes).get(1, b"")
    assert 1000 < len(owed) <= 1000 + listing
    assert (1, False) in batch.reading
    for k in range(200):
        w.core.tick(NOW + k)
        w.take()
    assert w.since(1, mark).count(b"Active Users: ") == 200 - owed.count(b"Active Users: ")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 40)), min_size=1, max_size=25),
       st.integers(1, 5), st.sampled_from([0.5, 2.0, 10.0]))
def test_a_flood_is_slowed_never_dropped_or_reordered(
        steps: list[tuple[int, int]], burst: int, rate: float) -> None:
    """Whatever a member sends and whenever the clock ticks: every line is
    said once, in order; never more than the burst plus the rate allows."""
    w = budget_wire(burst_lines=burst, rate_lines=rate, rate_bytes=0)
    sent = 0
    now = NOW
    for kind, n in steps:
        now += n / 10
        if kind == 0 and n:
            w.core.receive(1, b"".join(b"m%d\n" % (sent + k) for k in range(n)), now)
            sent += n
        else:
            w.core.tick(now)
        w.take()
        said = said_by_alice(w)
        assert said == [b"alice: m%d" % k for k in range(len(said))]
        assert len(said) <= burst + rate * (now - NOW) + 1e-6
    for _ in range(sent + 1):
        when = w.core.next_tick()
        if when is None:
            break
        now = max(now, when)
        w.core.tick(now)
        w.take()
    assert said_by_alice(w) == [b"alice: m%d" % k for k in range(sent)]
