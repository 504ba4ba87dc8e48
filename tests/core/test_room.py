"""The room and its parsers (server.py's pure core), driven by tables: no event loop, no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
    Refused,
    Room,
    Say,
    Tell,
    TurnAway,
    Typed,
    Users,
    Welcome,
    Whisper,
    is_valid_passcode,
    parse_command,
    parse_login,
    username_problem,
)

# A fixed instant: Wed Sep 24 12:31:44 2025 in UTC.
NOW = 1758717104.0


# --- parse_command -----------------------------------------------------------

PARSE = [
    ("Hello Room", Say("Hello Room")),
    (":)", Say("[feeling happy]")),
    (":(", Say("[feeling sad]")),
    (":mytime", Tell(0)),
    (":+1hr", Tell(1)),
    (":Users", Users()),
    (":Exit", Exit()),
    (":Msg bob CS3251 is awesome", Whisper("bob", "CS3251 is awesome")),
    (":Msg bob  two spaces", Whisper("bob", " two spaces")),
    (":Msg", Malformed(server.MSG_USAGE)),
    (":Msg bob", Malformed(server.MSG_USAGE)),
    (":Msg bob ", Malformed(server.MSG_USAGE)),
    (":Msg  bob hi", Malformed(server.MSG_USAGE)),
    (":Msgbob hi", Say(":Msgbob hi")),
    ("\\:mytime", Say(":mytime")),
    ("\\:)", Say(":)")),
    ("\\:Exit", Say(":Exit")),
    ("\\\\:)", Say("\\:)")),
    ("\\o/", Say("\\o/")),
    (":mytime now", Say(":mytime now")),
    (":users", Say(":users")),
    (":Exit ", Say(":Exit ")),
    (":foo", Say(":foo")),
    ("", Blank()),
    ("   ", Blank()),
    ("a\x1b[2Jb", Say("a\ufffd[2Jb")),
    ("bell\x07 del\x7f c1\x9b", Say("bell\ufffd del\ufffd c1\ufffd")),
    (":Msg bob \x1b]0;pwned\x07", Whisper("bob", "\ufffd]0;pwned\ufffd")),
    (":Msg \x1b]0;x\x07 hi", Whisper("\ufffd]0;x\ufffd", "hi")),
    ("héllo wörld ☃", Say("héllo wörld ☃")),
]


@pytest.mark.parametrize(("line", "command"), PARSE, ids=[repr(p[0]) for p in PARSE])
def test_parse_command(line: str, command: server.Command) -> None:
    assert parse_command(line) == command


LOGINS = [
    ("LOGIN abc12 alice", ("abc12", "alice")),
    ("login abc12 alice", ("abc12", "alice")),
    ("LOGIN abc12", None),
    ("LOGIN  abc12 alice", None),
    ("LOGIN abc12 alice extra", None),
    ("HELLO abc12 alice", None),
    ("", None),
]


@pytest.mark.parametrize(("line", "parsed"), LOGINS)
def test_parse_login(line: str, parsed: tuple[str, str] | None) -> None:
    assert parse_login(line) == parsed


@pytest.mark.parametrize(
    ("passcode", "ok"),
    [("a", True), ("abc12", True), ("ABCDE", True), ("", False), ("abcdef", False),
     ("ab-c", False), ("ab c", False), ("١٢٣", False), ("é", False)],
)
def test_passcode_rule(passcode: str, ok: bool) -> None:
    assert is_valid_passcode(passcode) is ok


@pytest.mark.parametrize(
    ("name", "ok"),
    [("a", True), ("alice", True), ("12345678", True), ("josé", True), ("", False),
     ("123456789", False), ("a b", False), ("a\tb", False), ("a:b", False),
     ("a\x1bb", False), ("a\u200bb", False), ("a\u202eb", False), ("a\x85b", False),
     ("a\ufffdb", False)],
)
def test_username_rule(name: str, ok: bool) -> None:
    assert (username_problem(name) is None) is ok


# --- Room transitions ----------------------------------------------------------


def room_with(*names: str) -> Room:
    room = Room("abc12")
    for name in names:
        room.join(name)
    return room


HANDLE = [
    # (typed by alice, what the room outputs)
    ("Hello Room", [Log("alice: Hello Room"), Deliver("alice: Hello Room", skip="alice")]),
    (":)", [Log("alice: [feeling happy]"), Deliver("alice: [feeling happy]", skip="alice")]),
    (":(", [Log("alice: [feeling sad]"), Deliver("alice: [feeling sad]", skip="alice")]),
    (":mytime", [Log("alice: Wed Sep 24 12:31:44 2025"),
                 Deliver("alice: Wed Sep 24 12:31:44 2025")]),
    (":+1hr", [Log("alice: Wed Sep 24 13:31:44 2025"),
               Deliver("alice: Wed Sep 24 13:31:44 2025")]),
    (":Users", [Log("alice: searched up active users"),
                Deliver("Active Users: alice, bob, carol", to="alice")]),
    (":Msg bob CS3251 is awesome", [Log("alice: send message to bob"),
                                    Deliver("[Message from alice]: CS3251 is awesome", to="bob")]),
    (":Msg BOB hi", [Log("alice: send message to bob"),
                     Deliver("[Message from alice]: hi", to="bob")]),
    (":Msg zed hi", [Fail("alice", "no-such-user", "No user named zed is in the chatroom")]),
    (":Msg bob", [Fail("alice", "usage", server.MSG_USAGE)]),
    (":Exit", [Log("alice left the chatroom"), Deliver("alice left the chatroom", skip="alice"),
               Bye("alice")]),
    ("\\:mytime", [Log("alice: :mytime"), Deliver("alice: :mytime", skip="alice")]),
    ("", []),
]


@pytest.mark.parametrize(("typed", "outputs"), HANDLE, ids=[repr(h[0]) for h in HANDLE])
def test_room_handle(typed: str, outputs: list[server.Output]) -> None:
    room = room_with("alice", "bob", "carol")
    assert room.handle("alice", parse_command(typed), NOW) == outputs


def test_time_is_zero_padded_and_has_no_double_spaces() -> None:
    oct_7 = 1759795200.0  # Tue Oct 07 00:00:00 2025 UTC
    [log, _] = room_with("alice").handle("alice", Tell(0), oct_7)
    assert log == Log("alice: Tue Oct 07 00:00:00 2025")
    assert "  " not in log.line


def test_join_and_leave_are_announced_to_the_others_and_kept_in_order() -> None:
    room = Room("abc12")
    assert room.join("alice") == [Log("alice joined the chatroom"),
                                  Deliver("alice joined the chatroom", skip="alice")]
    room.join("bob")
    room.join("carol")
    assert room.names == ["alice", "bob", "carol"]
    assert room.leave("bob") == [Log("bob left the chatroom"),
                                 Deliver("bob left the chatroom", skip="bob")]
    assert room.leave("bob") == []  # already gone: nothing twice
    room.join("bob")
    assert room.names == ["alice", "carol", "bob"]


def test_exit_removes_the_member() -> None:
    room = room_with("alice", "bob")
    room.handle("alice", Exit(), NOW)
    assert room.names == ["bob"]
    assert "alice" not in room


LOGIN_CHECKS = [
    ("abc12", "dave", None),
    ("wrong", "dave", Refused("passcode", "Incorrect passcode")),
    ("", "dave", Refused("passcode", "Incorrect passcode")),
    ("wrong", "bad name", Refused("passcode", "Incorrect passcode")),  # passcode first
    ("abc12", "alice", Refused("name-taken", "The username alice is already in the chatroom")),
    ("abc12", "ALICE", Refused("name-taken", "The username ALICE is already in the chatroom")),
    ("abc12", "bad:name", Refused("bad-username", "Invalid username: a username has no ':'")),
    ("abc12", "toolongname", Refused("bad-username",
                                     "Invalid username: a username has 1 to 8 characters")),
]


@pytest.mark.parametrize(("passcode", "name", "refused"), LOGIN_CHECKS)
def test_check_login(passcode: str, name: str, refused: Refused | None) -> None:
    assert room_with("alice").check_login(passcode, name) == refused


# --- Room.step: inputs in the order a server (or a cluster's log) applies them ---

STEPS = [
    # (inputs, outputs of the last input, members after)
    ([Joining("alice", "n1/1")],
     [Welcome("n1/1", "alice"), Log("alice joined the chatroom"),
      Deliver("alice joined the chatroom", skip="alice")], ["alice"]),
    # two servers race for one name: the first in the log wins, the other is turned away
    ([Joining("alice", "n1/1"), Joining("Alice", "n2/7")],
     [TurnAway("n2/7", "name-taken", "The username Alice is already in the chatroom")],
     ["alice"]),
    ([Joining("alice", "n1/1"), Typed("alice", ":)", NOW)],
     [Log("alice: [feeling happy]"), Deliver("alice: [feeling happy]", skip="alice")],
     ["alice"]),
    # a line that arrives after its sender left is dropped
    ([Joining("alice", "n1/1"), Gone("alice"), Typed("alice", "late", NOW)], [], []),
    ([Joining("alice", "n1/1"), Joining("bob", "n2/1"), Gone("alice")],
     [Log("alice left the chatroom"), Deliver("alice left the chatroom", skip="alice")],
     ["bob"]),
    ([Joining("alice", "n1/1"), Gone("alice"), Gone("alice")], [], []),
    ([Joining("alice", "n1/1"), Typed("alice", ":Exit", NOW), Joining("alice", "n2/1")],
     [Welcome("n2/1", "alice"), Log("alice joined the chatroom"),
      Deliver("alice joined the chatroom", skip="alice")], ["alice"]),
]


@pytest.mark.parametrize(("inputs", "last", "members"), STEPS)
def test_room_step(inputs: list[server.Input], last: list[server.Output],
                   members: list[str]) -> None:
    room = Room("abc12")
    for inp in inputs[:-1]:
        room.step(inp)
    assert room.step(inputs[-1]) == last
    assert room.names == members


@pytest.mark.parametrize(
    ("addr", "key"),
    [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("::ffff:10.1.2.3", "10.1.2.3"),
     ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"), ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
     ("not an address", "not an address")],
)
def test_address_key_groups_ipv6_by_64(addr: str, key: str) -> None:
    assert server.address_key(addr) == key


# --- Login throttle -------------------------------------------------------------


def test_throttle_blocks_after_failures_and_forgets_after_the_window() -> None:
    t = LoginThrottle(max_failures=3, window=60)
    for i in range(3):
        assert not t.blocked("10.0.0.1", 100 + i)
        t.failed("10.0.0.1", 100 + i)
    assert t.blocked("10.0.0.1", 110)
    assert not t.blocked("10.0.0.2", 110)  # another address is not affected
    assert t.blocked("10.0.0.1", 159.9)
    assert not t.blocked("10.0.0.1", 161)  # the oldest failure has aged out


def test_throttle_success_clears_and_memory_is_bounded() -> None:
    t = LoginThrottle(max_failures=1, window=60, max_tracked=2)
    t.failed("a", 0)
    t.succeeded("a")
    assert not t.blocked("a", 1)
    for addr in ("a", "b", "c"):
        t.failed(addr, 0)
    assert not t.blocked("a", 1)  # the oldest address was forgotten
    assert t.blocked("c", 1)
    t.forget_older_than(1000)
    assert not t.blocked("c", 1)


# --- LineReader -------------------------------------------------------------------

READS = [
    # (chunks fed, items out)
    ([b"hello\n"], ["hello"]),
    ([b"hel", b"lo\nwor", b"ld\n"], ["hello", "world"]),
    ([b"a\r\nb\n"], ["a", "b"]),
    ([b"a\r\r\n"], ["a\r"]),
    ([b"\n\n"], ["", ""]),
    ([b"no end yet"], []),
    ([b"\xff\xfeok\n"], ["\ufffd\ufffdok"]),
    ([b"\xe2\x98", b"\x83\n"], ["☃"]),
    ([b"x" * 10 + b"\n"], ["x" * 10]),
    ([b"x" * 10 + b"\r\n"], ["x" * 10]),
    ([b"x" * 11 + b"\nok\n"], [TOO_LONG, "ok"]),
    ([b"x" * 11, b"x" * 5, b"\nok\n"], [TOO_LONG, "ok"]),
    ([b"x" * 50], []),
    ([b"x" * 81], [FLOOD]),
    ([b"x" * 40, b"x" * 41, b"\nlate\n"], [FLOOD]),
    ([b"ok\n" + b"x" * 81 + b"\nlate\n"], ["ok", FLOOD]),
    ([b"x" * 10 + b"\r", b"\n"], ["x" * 10]),
    ([b"x" * 11 + b"\r\n"], [TOO_LONG]),
]


@pytest.mark.parametrize(("chunks", "items"), READS)
def test_line_reader(chunks: list[bytes], items: list[server.Received]) -> None:
    reader = LineReader(max_line=10, max_unterminated=80)
    got: list[server.Received] = []
    for chunk in chunks:
        got += reader.feed(chunk)
    assert got == items


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_line_reader_never_raises_and_is_chunking_independent(chunks: list[bytes]) -> None:
    whole = LineReader(max_line=16, max_unterminated=64).feed(b"".join(chunks))
    pieces = LineReader(max_line=16, max_unterminated=64)
    bytewise = LineReader(max_line=16, max_unterminated=64)
    by_chunk: list[server.Received] = []
    by_byte: list[server.Received] = []
    for chunk in chunks:
        by_chunk += pieces.feed(chunk)
        for i in range(len(chunk)):
            by_byte += bytewise.feed(chunk[i:i + 1])
    assert by_chunk == whole
    assert by_byte == whole
    for item in whole:
        assert item in (TOO_LONG, FLOOD) or (isinstance(item, str) and "\n" not in item
                                             and len(item.encode("utf-8", "surrogatepass")) <= 48)


WHOLE = [
    # (chunks fed first, the chunk asked about, whole?)
    ([], b"hello\n", True),
    ([], b"a\nb\n", True),
    ([], b"\n", True),
    ([], b"x" * 10 + b"\n", True),  # as long as a line may be
    ([], b"x" * 11 + b"\n", False),  # longer: the reader says TOO_LONG
    ([], b"no end", False),
    ([], b"a\nno end", False),
    ([], b"", False),
    ([b"held"], b"more\n", False),  # a line's start is held
    ([b"x" * 12], b"\n", False),  # an over-long line's end is awaited
    ([b"x" * 81], b"ok\n", False),  # flooded: nothing more is taken
    ([b"done\n"], b"next\n", True),
    ([b"x" * 11 + b"\n"], b"next\n", True),  # the over-long line has ended
]


@pytest.mark.parametrize(("before", "chunk", "whole"), WHOLE)
def test_line_reader_knows_a_chunk_of_whole_lines(before: list[bytes], chunk: bytes,
                                                  whole: bool) -> None:
    reader = LineReader(max_line=10, max_unterminated=80)
    for piece in before:
        reader.feed(piece)
    assert reader.whole(chunk) is whole
    assert reader.whole(memoryview(chunk)) is whole


@given(st.lists(st.binary(max_size=24), max_size=4), st.binary(max_size=24))
def test_a_whole_chunk_is_its_lines_and_leaves_the_reader_as_it_was(
        before: list[bytes], chunk: bytes) -> None:
    reader = LineReader(max_line=16, max_unterminated=64)
    for piece in before:
        reader.feed(piece)
    if reader.whole(chunk):
        assert reader.feed(chunk) == [
            line.decode("utf-8", "replace").removesuffix("\r") for line in chunk.split(b"\n")[:-1]]
        assert reader.whole(b"next\n")  # nothing is held after it


@given(st.text())
def test_any_line_parses_to_a_command_without_control_characters(line: str) -> None:
    command = parse_command(line)
    for text in (getattr(command, "text", ""), getattr(command, "to", "")):
        assert not any(ch in server._CONTROL_CHARS for ch in text)


@given(st.text(), st.text(), st.text())
def test_any_login_line_is_checked_without_raising(passcode: str, name: str, junk: str) -> None:
    room = room_with("alice")
    parsed = parse_login(f"LOGIN {passcode} {name}{junk}")
    if parsed is not None:
        refused = room.check_login(*parsed)
        assert refused is None or refused.code in {"passcode", "bad-username", "name-taken"}
