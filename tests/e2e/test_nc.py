"""The wire protocol (docs/PROTOCOL.md), spoken over a plain socket the way a
person with `nc` (or `nc -C`, with \\r\\n line ends) would, against a real
server.py. Only the documented session mixes in real client.py processes; the
rest checks the server alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import PASSCODE, PROGRAM_DIR, Room, time_line_re
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.e2e, pytest.mark.nc]

EOLS = [pytest.param("\n", id="lf"), pytest.param("\r\n", id="crlf")]


@pytest.mark.parametrize("eol", EOLS)
def test_the_documented_nc_session(room: Room, eol: str) -> None:
    server = room.start_server()
    alice = room.join("alice")
    bob = room.join("bob")
    dave = room.nc_join("dave", eol=eol)  # :hello, LOGIN, :ok, joined everywhere

    room.say(alice, "Hello Room")  # dave sees "alice: Hello Room"
    room.say(dave, "hi all, I am on nc")
    dave.send(":Users")
    server.expect("dave: searched up active users")
    dave.expect("Active Users: alice, bob, dave")
    dave.send(":Msg alice psst")
    server.expect("dave: send message to alice")
    alice.expect("[Message from dave]: psst")
    dave.send(":mytime")
    time_line = dave.expect_match(time_line_re("dave")).group(0)
    for who in (server, alice, bob):
        who.expect(time_line)
    room.say(bob, ":)", "[feeling happy]")
    room.assert_quiet(dave)
    room.leave(dave)  # :Exit -> :bye, closed; the room is told
    room.assert_quiet(alice)


def test_hello_comes_at_once_before_any_login(room: Room) -> None:
    room.start_server()
    peer = room.nc()
    peer.expect(":hello chatroom 1")


@pytest.mark.parametrize("word", ["LOGIN", "login", "Login"])
def test_login_word_in_any_case_sent_without_waiting_for_hello(room: Room, word: str) -> None:
    room.start_server()
    alice = room.nc_join("alice")
    peer = room.nc(label="dave")
    peer.send(f"{word} {PASSCODE} dave")  # at once, before reading :hello
    peer.expect(":hello chatroom 1")
    peer.expect(":ok dave")
    peer.name = "dave"
    room.announced_join(peer)
    room.say(peer, "hello")
    room.assert_quiet(alice)


def test_wrong_passcode_closes_and_nobody_hears_of_it(room: Room) -> None:
    room.start_server()
    alice = room.nc_join("alice")
    peer = room.nc()
    peer.expect(":hello chatroom 1")
    peer.send("LOGIN nope dave")
    peer.expect(":error passcode Incorrect passcode")
    peer.expect_closed()
    room.nc_join("bob")  # barrier: the server's and alice's next line is bob's join
    room.assert_quiet(alice)


@pytest.mark.parametrize(
    ("login", "code"),
    [
        pytest.param(f"LOGIN {PASSCODE} a:b", "bad-username", id="colon-in-name"),
        pytest.param(f"LOGIN {PASSCODE} toolongname", "bad-username", id="name-too-long"),
        pytest.param(f"LOGIN {PASSCODE} a\x1bb", "bad-username", id="control-char-in-name"),
        pytest.param(f"LOGIN {PASSCODE} alice", "name-taken", id="name-taken"),
        pytest.param("HELLO there", "bad-login", id="not-a-login"),
        pytest.param(f"LOGIN {PASSCODE}", "bad-login", id="no-username"),
        pytest.param("", "bad-login", id="empty-line"),
    ],
)
def test_refused_logins_close_the_connection(room: Room, login: str, code: str) -> None:
    room.start_server()
    alice = room.nc_join("alice")
    peer = room.nc()
    peer.expect(":hello chatroom 1")
    peer.send(login)
    peer.expect_match(rf":error {code}( .+)?")
    peer.expect_closed()
    room.nc_join("bob")  # barrier: nothing was printed for the refused login
    room.assert_quiet(alice)


def test_errors_that_keep_the_connection(room: Room) -> None:
    server = room.start_server()
    alice = room.nc_join("alice")
    dave = room.nc_join("dave")
    dave.send(":Msg zed hi")
    dave.expect_match(r":error no-such-user .+")
    dave.send(":Msg alice")
    dave.expect_match(r":error usage .+")
    dave.send(":Msg alice hi")  # still connected and working
    server.expect("dave: send message to alice")
    alice.expect("[Message from dave]: hi")
    room.assert_quiet(dave)


def test_line_length_limit(room: Room) -> None:
    """-max-line (default 2048 bytes, line end not counted): the longest line goes
    through; one byte more is answered with :error line-too-long and dropped."""
    room.start_server()
    dave = room.nc_join("dave")
    erin = room.nc_join("erin")
    longest = "é" * 1023 + "x" * 2  # 2048 bytes of UTF-8
    assert len(longest.encode()) == 2048
    room.say(dave, longest)
    dave.send(longest + "x")
    dave.expect_match(r":error line-too-long .+")
    room.assert_quiet(dave)  # nobody saw the long line; dave is still in the room
    assert erin.name == "erin"


def test_empty_and_blank_lines_are_ignored(room: Room) -> None:
    room.start_server()
    dave = room.nc_join("dave")
    room.nc_join("erin")
    dave.send("")
    dave.send("   ")
    room.assert_quiet(dave)


@pytest.mark.parametrize(
    ("typed", "shown"),
    [
        pytest.param("\\\\:)", "\\:)", id="escaped-backslash"),
        pytest.param("\\:Msg bob hi", ":Msg bob hi", id="escaped-msg"),
        pytest.param("\\hello", "\\hello", id="backslash-before-other-text"),
        pytest.param("a\x1b[31mred", "a\ufffd[31mred", id="escape-sequence"),
        pytest.param("tab\there", "tab\ufffdhere", id="tab"),
        pytest.param("del\x7f", "del\ufffd", id="del"),
        pytest.param("c1\x85\x9b", "c1\ufffd\ufffd", id="c1-controls"),
        pytest.param("  padded  ", "  padded  ", id="spaces-kept"),
    ],
)
def test_text_lines(room: Room, typed: str, shown: str) -> None:
    room.start_server()
    dave = room.nc_join("dave")
    alice = room.nc_join("alice")
    room.nc_join("erin")
    room.say(dave, typed, shown)
    room.assert_quiet(dave)
    room.assert_quiet(alice)


def test_invalid_utf8_is_replaced_not_dropped(room: Room) -> None:
    server = room.start_server()
    dave = room.nc_join("dave")
    erin = room.nc_join("erin")
    dave.send_raw(b"caf\xff\xfe!\n")
    for who in (server, erin):
        who.expect("dave: caf\ufffd\ufffd!")
    room.assert_quiet(dave)


def test_bye_comes_after_every_reply(room: Room) -> None:
    """Several lines in one packet, ending with :Exit: every reply, then :bye."""
    server = room.start_server()
    alice = room.nc_join("alice")
    dave = room.nc_join("dave")
    dave.send_raw(b"one\n:Users\n:mytime\n:Exit\n")
    dave.expect("Active Users: alice, dave")
    time_line = dave.expect_match(time_line_re("dave")).group(0)
    dave.expect(":bye")
    dave.expect_closed()
    server.expect("dave: one")
    server.expect("dave: searched up active users")
    server.expect(time_line)
    alice.expect("dave: one")
    alice.expect(time_line)
    room.members.remove(dave)
    server.expect("dave left the chatroom")
    alice.expect("dave left the chatroom")
    room.assert_quiet(alice)


def test_closing_without_exit_counts_as_exit(room: Room) -> None:
    room.start_server()
    alice = room.nc_join("alice")
    dave = room.nc_join("dave")
    dave.close()
    room.announced_leave(dave)
    room.assert_quiet(alice)


def test_half_a_line_then_the_rest(room: Room) -> None:
    """A line split across packets is one line."""
    room.start_server()
    dave = room.nc_join("dave")
    erin = room.nc_join("erin")
    dave.send_raw(b"hel")
    dave.send_raw("lo wörld\n".encode())
    assert room.server is not None
    for who in (room.server, erin):
        who.expect("dave: hello wörld")
    room.assert_quiet(dave)


# -- property: any text line reaches the others unchanged but for controls -------

COMMANDS = {":)", ":(", ":mytime", ":+1hr", ":Users", ":Exit"}


def shown_for(text: str) -> str:
    """What PROTOCOL.md says the others see for a plain-text line."""
    if text[:2] in ("\\:", "\\\\"):
        text = text[1:]
    return "".join("\ufffd" if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c for c in text)


text_lines = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\r"),
    min_size=1,
    max_size=60,
)


# One room per interpreter serves every example (a server start per example
# would be slow); a failing example throws its room away so that shrinking
# starts from a clean one.
_shared_rooms: dict[str, Room] = {}


@pytest.fixture(autouse=True, scope="module")
def _close_shared_rooms() -> Iterator[None]:
    yield
    for the_room in _shared_rooms.values():
        the_room.close()
    _shared_rooms.clear()


def _shared_room(python: str) -> Room:
    if python not in _shared_rooms:
        the_room = Room(python, PROGRAM_DIR, PROGRAM_DIR)
        try:
            the_room.start_server()
            the_room.nc_join("dave")
            the_room.nc_join("erin")
        except BaseException:
            the_room.close()
            raise
        _shared_rooms[python] = the_room
    return _shared_rooms[python]


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=text_lines)
def test_any_text_line_is_relayed_exactly(python: str, text: str) -> None:
    assume(text.strip() and text.strip(" "))  # blank lines are ignored
    # `:Msg` alone is a malformed command (PROTOCOL.md: a usage error), not text
    assume(text not in COMMANDS and text != ":Msg" and not text.startswith(":Msg "))
    the_room = _shared_room(python)
    dave, erin = the_room.members
    assert the_room.server is not None
    line = f"dave: {shown_for(text)}"
    try:
        dave.send(text)
        the_room.server.expect(line)
        erin.expect(line)
    except BaseException:
        _shared_rooms.pop(python).close()
        raise
