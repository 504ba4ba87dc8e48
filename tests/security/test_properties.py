"""Property tests of the pure core against hostile input (hypothesis).

tests/unit/test_core.py already checks that LineReader does not depend on how
the bytes are chunked and that parse_command/check_login do not raise. Here:

- LineReader equals a ten-line reference model for any bytes and any limits,
  fed whole, in random chunks, or one byte at a time;
- every line that comes out goes through parse_command, parse_login and
  check_login and gives only values or the protocol's own refusals;
- a whole Room driven by random logins, raw bytes typed by members, :Exit and
  lost connections keeps its invariants: no two members equal ignoring case,
  join order kept, no control character in anything delivered or printed;
- stream_view (one connection's bytes in a pass) equals a simple model;
- LoginThrottle equals a sliding-window model and stays bounded in memory.
"""

from __future__ import annotations

import hmac
import unicodedata

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from secwire import CONTROLS, sanitised

import server
from server import (
    FLOOD,
    TOO_LONG,
    Blank,
    Bye,
    Deliver,
    Exit,
    Fail,
    Gone,
    Joining,
    LineReader,
    Log,
    LoginThrottle,
    Malformed,
    Room,
    Say,
    Tell,
    TurnAway,
    Typed,
    Users,
    Welcome,
    Whisper,
    parse_command,
    parse_login,
    stream_view,
)

PASSCODE = "abc12"
COMMAND_TYPES = (Say, Tell, Users, Whisper, Exit, Blank, Malformed)
LOGIN_REFUSALS = {"passcode", "bad-username", "name-taken"}
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def has_control(text: str) -> bool:
    return any(ord(ch) in CONTROLS for ch in text)


# --- strategies -----------------------------------------------------------------------

# Bytes that stress a line reader: line ends, CRs, broken and whole UTF-8, junk.
PIECES = st.one_of(
    st.binary(max_size=70),
    st.sampled_from([b"\n", b"\r\n", b"\r", b"\r\r\n", b"\xff", b"\xe2\x98", b"\x83",
                     b"\xe2\x98\x83", b"\x00", b"\x1b[2J", b"\xc2\x9b", b":", b" ",
                     b"LOGIN abc12 ", b":Msg ", b":Exit", b"\\:"]),
)
STREAMS = st.lists(PIECES, max_size=30)


def reference_lines(data: bytes, max_line: int, max_unterminated: int) -> list[server.Received]:
    """What PROTOCOL.md's framing says `data` is, written the obvious way."""
    out: list[server.Received] = []
    *lines, tail = data.split(b"\n")
    for raw in lines:
        if len(raw) > max_unterminated:
            return [*out, FLOOD]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        out.append(TOO_LONG if len(raw) > max_line else raw.decode("utf-8", "replace"))
    if len(tail) > max_unterminated:
        out.append(FLOOD)
    return out


def feed_all(reader: LineReader, chunks: list[bytes]) -> list[server.Received]:
    got: list[server.Received] = []
    for chunk in chunks:
        got += reader.feed(chunk)
    return got


# --- LineReader against the model -------------------------------------------------------


@FAST
@given(STREAMS, st.integers(1, 40), st.integers(1, 10), st.data())
def test_line_reader_equals_the_reference_model(chunks: list[bytes], max_line: int,
                                                factor: int, data: st.DataObject) -> None:
    flood = max(max_line + 1, factor * max_line)
    whole = b"".join(chunks)
    expected = reference_lines(whole, max_line, flood)
    assert LineReader(max_line, flood).feed(whole) == expected
    assert feed_all(LineReader(max_line, flood), chunks) == expected
    assert feed_all(LineReader(max_line, flood), [whole[i:i + 1] for i in range(len(whole))]) \
        == expected
    # cut at random places
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=8)))
    pieces = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
    assert feed_all(LineReader(max_line, flood), pieces) == expected


SHORT_LINES = st.lists(st.lists(PIECES, max_size=6).map(
    lambda ps: b"".join(ps).replace(b"\n", b"").replace(b"\r", b"")), min_size=1, max_size=8)


@FAST
@given(SHORT_LINES, st.sampled_from([b"\n", b"\r\n"]), st.integers(0, 3))
def test_a_read_of_whole_lines_within_the_limit_is_read_as_the_model_says(
        lines: list[bytes], end: bytes, spare: int) -> None:
    # The reader's shortcut for the commonest read: broken UTF-8 included.
    data = b"".join(line + end for line in lines)
    limit = len(data) + spare
    assert LineReader(limit).feed(data) == reference_lines(data, limit, 8 * limit)


@FAST
@given(STREAMS, st.integers(1, 40))
def test_line_reader_reads_a_memoryview_as_its_bytes(chunks: list[bytes], max_line: int) -> None:
    # The server hands the reader a view of its one read buffer.
    as_bytes, as_views = LineReader(max_line), LineReader(max_line)
    for chunk in chunks:
        buffer = bytearray(chunk) + b"junk after the read"
        assert as_views.feed(memoryview(buffer)[:len(chunk)]) == as_bytes.feed(chunk)
        buffer[:] = b"x" * len(buffer)  # the buffer is reused: nothing may keep a view of it
    assert as_views.feed(b"\n") == as_bytes.feed(b"\n")


@FAST
@given(st.binary(max_size=200), st.binary(max_size=200))
def test_after_a_flood_the_reader_accepts_nothing(before: bytes, after: bytes) -> None:
    reader = LineReader(8, 16)
    got = reader.feed(before.replace(b"\n", b"") + b"x" * 17)
    assert got[-1] is FLOOD and FLOOD not in got[:-1]
    assert reader.feed(after + b"\nline\n") == []


def test_the_default_flood_limit_is_eight_lines() -> None:
    reader = LineReader(64)
    assert reader.feed(b"x" * 512) == []
    assert reader.feed(b"x") == [FLOOD]


# --- every line through the parsers ------------------------------------------------------


@FAST
@given(STREAMS, st.booleans())
def test_any_bytes_give_only_values_or_protocol_markers(chunks: list[bytes],
                                                        bytewise: bool) -> None:
    reader = LineReader(32)
    whole = b"".join(chunks)
    feeds = [whole[i:i + 1] for i in range(len(whole))] if bytewise else chunks
    room = Room(PASSCODE)
    room.join("alice")
    for item in feed_all(reader, feeds):
        if item is TOO_LONG or item is FLOOD:
            continue
        assert isinstance(item, str) and "\n" not in item
        assert len(item) <= 32  # code points never outnumber the bytes they came from
        command = parse_command(item)
        assert isinstance(command, COMMAND_TYPES)
        if isinstance(command, Say | Whisper):
            assert not has_control(command.text)
        login = parse_login(item)
        if login is not None:
            passcode, name = login
            assert " " not in passcode and " " not in name
            assert item.split(" ", 1)[0].upper() == "LOGIN"
            assert item == f"{item[:5]} {passcode} {name}"
            for pc in (passcode, PASSCODE):
                refused = room.check_login(pc, name)
                assert refused is None or refused.code in LOGIN_REFUSALS
                if refused is not None:
                    assert "\n" not in refused.text and not has_control(refused.text)


@FAST
@given(st.text(st.characters(blacklist_characters=" \n"), min_size=1, max_size=9),
       st.text(min_size=1))
def test_a_whisper_carries_no_control_character(to: str, text: str) -> None:
    command = parse_command(f":Msg {to} {text}")
    if text.strip():
        assert isinstance(command, Whisper)
        assert command.to == sanitised(to)  # the target is echoed in no-such-user
        assert not has_control(command.text) and not has_control(command.to)
        assert len(command.text) == len(text)  # replaced one for one, never dropped
    else:
        assert isinstance(command, Malformed)


# --- a whole room, driven at random ------------------------------------------------------

NAME_POOL = ["alice", "Alice", "ALICE", "bob", "BOB", "carol", "josé", "jose\u0301", "straße",
             "STRASSE", "a\u200bb", "a:b", "a b", "a\tb", "", "abcdefghi", "a\x1bb", "dave",
             "\u0392\u039f\u0392", "b\u043eb", "bob\u034f", "\u0441\u043e\u0440", "cop"]
NAMES = st.one_of(st.sampled_from(NAME_POOL), st.text(max_size=9))
TYPED = st.one_of(
    STREAMS.map(b"".join),
    st.sampled_from([b":Users\n", b":)\n", b":(\n", b":mytime\n", b":+1hr\n", b":Msg\n",
                     b":Msg alice hi\n", b":Msg BOB \x1b[31mred\n", b":Msg zed hi\n",
                     b"\\:Exit\n", b"\n", b"   \n", b"hi\r\n"]),
    st.builds(lambda n, t: f":Msg {n} ".encode() + t + b"\n", st.sampled_from(NAME_POOL),
              st.binary(max_size=20)),
)


def key(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def clash(a: str, b: str) -> bool:
    """The same name ignoring case, or look-alikes (their skeletons are tested
    on their own in tests/core/test_names.py)."""
    return key(a) == key(b) or server.name_skeleton(a) == server.name_skeleton(b)


def spec_forbids(name: str) -> bool:
    """SPEC.md: 1 to 8 characters; no whitespace, no ':', no control characters."""
    return (not 1 <= len(name) <= 8 or ":" in name
            or any(ch.isspace() or unicodedata.category(ch) == "Cc" for ch in name))


class RoomMachine(RuleBasedStateMachine):
    """The room against a model: a list of names in join order."""

    @initialize()
    def start(self) -> None:
        self.room = Room(PASSCODE)
        self.order: list[str] = []  # the model
        self.readers: dict[str, LineReader] = {}
        self.tickets = 0
        self.now = 1758717104.0

    # -- helpers ------------------------------------------------------------------

    def check_outputs(self, outputs: list[server.Output], actor: str | None) -> None:
        members = set(self.order)
        for out in outputs:
            if isinstance(out, Deliver):
                assert "\n" not in out.line and not has_control(out.line), out
                assert not out.line.startswith(":"), f"a display line starts with ':': {out}"
                assert out.to is None or out.to in members, out
            elif isinstance(out, Log):
                assert "\n" not in out.line and not has_control(out.line), out
            elif isinstance(out, Fail):
                assert out.to == actor and out.code in {"no-such-user", "usage"}, out
                assert "\n" not in out.text and not has_control(out.text), out
            elif isinstance(out, Bye):
                assert out.to == actor and actor not in members, out
            else:
                assert isinstance(out, Welcome | TurnAway), out

    def member(self, data: st.DataObject) -> str:
        assume(self.order)
        return data.draw(st.sampled_from(self.order))

    # -- rules ---------------------------------------------------------------------

    @rule(name=NAMES, right=st.booleans())
    def login(self, name: str, right: bool) -> None:
        refused = self.room.check_login(PASSCODE if right else "wrong", name)
        if not right:
            assert refused is not None and refused.code == "passcode"
            return
        taken = any(clash(m, name) for m in self.order)
        if spec_forbids(name):
            assert refused is not None and refused.code == "bad-username", (name, refused)
            return
        if refused is not None:
            if refused.code == "bad-username":  # beyond SPEC: invisible characters, U+FFFD,
                assert not name.isascii(), name  # mixed scripts: never in an ASCII name
            else:
                assert refused.code == "name-taken" and taken, (name, refused)
            return
        assert not taken, f"{name!r} got in while {self.order!r} are in the room"
        self.tickets += 1
        ticket = f"t{self.tickets}"
        outputs = self.room.step(Joining(name, ticket))
        self.order.append(name)
        self.readers[name] = LineReader(32)
        assert outputs[0] == Welcome(ticket, name)
        assert outputs[1:] == [Log(f"{name} joined the chatroom"),
                               Deliver(f"{name} joined the chatroom", skip=name)]
        self.check_outputs(outputs, name)

    @rule(data=st.data())
    def a_plain_name_always_gets_in_unless_taken(self, data: st.DataObject) -> None:
        plain = data.draw(st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
                                  min_size=1, max_size=8))
        taken = any(clash(m, plain) for m in self.order)
        refused = self.room.check_login(PASSCODE, plain)
        assert (refused is None) != taken, (plain, refused)

    @rule(data=st.data(), typed=TYPED)
    def member_types(self, data: st.DataObject, typed: bytes) -> None:
        name = self.member(data)
        self.now += 1
        for item in self.readers[name].feed(typed):
            if name not in self.order:
                break  # it typed :Exit earlier in the same bytes
            if item is FLOOD:
                self.gone(name)
                break
            if item is TOO_LONG:
                continue
            assert isinstance(item, str)
            command = parse_command(item)
            before = list(self.order)
            outputs = self.room.step(Typed(name, item, self.now))
            if isinstance(command, Exit):
                self.order.remove(name)
                assert outputs == [Log(f"{name} left the chatroom"),
                                   Deliver(f"{name} left the chatroom", skip=name), Bye(name)]
            elif isinstance(command, Users):
                listing = "Active Users: " + ", ".join(before)
                assert outputs == [Log(f"{name}: searched up active users"),
                                   Deliver(listing, to=name)]
            elif isinstance(command, Whisper):
                to = [m for m in before if key(m) == key(command.to)]
                if to:
                    assert outputs[1] == Deliver(f"[Message from {name}]: {command.text}",
                                                 to=to[0])
                else:
                    assert [type(o) for o in outputs] == [Fail]
            self.check_outputs(outputs, name)

    @rule(data=st.data())
    def connection_lost(self, data: st.DataObject) -> None:
        self.gone(self.member(data))

    @rule(name=NAMES)
    def gone_twice_or_never_there(self, name: str) -> None:
        if not any(key(m) == key(name) for m in self.order):
            assert self.room.step(Typed(name, "hi", self.now)) == []
            assert self.room.step(Gone(name)) == []

    def gone(self, name: str) -> None:
        outputs = self.room.step(Gone(name))
        self.order.remove(name)
        assert outputs == [Log(f"{name} left the chatroom"),
                           Deliver(f"{name} left the chatroom", skip=name)]
        self.check_outputs(outputs, name)
        assert self.room.step(Gone(name)) == []  # told once only

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def members_in_join_order_and_unique_ignoring_case(self) -> None:
        names = self.room.names
        assert names == self.order
        assert len({key(n) for n in names}) == len(names)
        assert len({server.name_skeleton(n) for n in names}) == len(names)  # no look-alikes
        for n in names:
            assert not spec_forbids(n) and not has_control(n)


RoomMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.filter_too_much])
test_room_keeps_its_invariants = RoomMachine.TestCase


# --- stream_view against a model ----------------------------------------------------------


@st.composite
def passes(draw: st.DrawFn) -> tuple[list[bytes], list[tuple[int, bytes | None]], int, int]:
    """One pass of the loop as the Hub builds it for one connection: broadcasts,
    and edits at non-decreasing positions inside the connection's range [lo, hi]."""
    bcast = draw(st.lists(st.binary(min_size=1, max_size=6).map(lambda b: b + b"\n"), max_size=8))
    n = len(bcast)
    lo = draw(st.integers(0, n))
    hi = draw(st.integers(lo, n))
    positions = sorted(draw(st.lists(st.integers(lo, hi), max_size=8)))
    edits: list[tuple[int, bytes | None]] = []
    for pos in positions:
        skip = pos < hi and draw(st.booleans()) and (pos, None) not in edits
        edits.append((pos, None) if skip else (pos, draw(st.binary(min_size=1, max_size=4))))
    return bcast, edits, lo, hi


@FAST
@given(passes())
def test_stream_view_equals_its_model(case: tuple[list[bytes], list[tuple[int, bytes | None]],
                                                  int, int]) -> None:
    bcast, edits, lo, hi = case
    expected = b""
    for i in range(lo, hi + 1):
        expected += b"".join(d for p, d in edits if p == i and d is not None)
        if i < hi and (i, None) not in edits:
            expected += bcast[i]
    offsets = [0]
    for b in bcast:
        offsets.append(offsets[-1] + len(b))
    assert stream_view(b"".join(bcast), offsets, edits, lo, hi) == expected


# --- the login throttle against a sliding window -------------------------------------------

EVENTS = st.lists(st.tuples(st.sampled_from(["fail", "ok", "check", "sweep"]),
                            st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "::1"]),
                            st.floats(0, 30, allow_nan=False)), max_size=60)


@FAST
@given(EVENTS, st.integers(1, 5), st.floats(1, 60, allow_nan=False))
def test_throttle_equals_a_sliding_window(events: list[tuple[str, str, float]], failures: int,
                                          window: float) -> None:
    throttle = LoginThrottle(failures, window)
    model: dict[str, list[float]] = {}
    now = 0.0
    for what, addr, step in events:
        now += step
        if what == "fail":
            model.setdefault(addr, []).append(now)
            throttle.failed(addr, now)
        elif what == "ok":
            model.pop(addr, None)
            throttle.succeeded(addr)
        elif what == "sweep":
            throttle.forget_older_than(now)
        else:
            recent = [t for t in model.get(addr, []) if t > now - window]
            assert throttle.blocked(addr, now) == (len(recent) >= failures)


@FAST
@given(st.lists(st.integers(0, 10_000), max_size=300), st.integers(1, 16))
def test_throttle_memory_is_bounded(addrs: list[int], bound: int) -> None:
    throttle = LoginThrottle(3, 60, max_tracked=bound)
    for i, a in enumerate(addrs):
        throttle.failed(f"10.{a >> 8}.{a & 255}.1", float(i))
        assert len(throttle._failures) <= bound
        for times in throttle._failures.values():
            assert len(times) <= 3


@pytest.mark.parametrize("line", ["LOGIN abc12 alice", "login abc12 alice", "LoGiN x y"])
def test_parse_login_round_trip(line: str) -> None:
    parsed = parse_login(line)
    assert parsed is not None and f"{line[:5]} {parsed[0]} {parsed[1]}" == line


def test_the_passcode_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every passcode check goes through hmac.compare_digest (constant time)."""
    calls: list[tuple[object, object]] = []
    real = hmac.compare_digest  # the module server.py imports: patched here, seen there

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    room = Room(PASSCODE)
    assert room.check_login(PASSCODE, "alice") is None
    refused = room.check_login("abc13", "alice")
    assert refused is not None and refused.code == "passcode"
    assert len(calls) == 2 and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
