"""Issue 19, item 6, against a real server.py on -port 0: names that would pass
for a member's are refused on the wire, a look-alike gets in once the member it
imitates has left, and line separators and bidi controls in messages arrive as
U+FFFD. The rule itself is tested in tests/core/test_names.py."""

from __future__ import annotations

import pytest
from harness import PASSCODE, Room

pytestmark = [pytest.mark.e2e, pytest.mark.nc]

GREEK_BOB = "\u0392\u039f\u0392"  # ΒΟΒ: Greek capitals, shown as BOB


def refused(room: Room, name: str) -> str:
    """Log in as `name` on a raw connection; the :error line it gets (then closed)."""
    peer = room.nc(label=ascii(name))
    peer.expect(":hello chatroom 1")
    peer.send(f"LOGIN {PASSCODE} {name}")
    line = peer.expect_match(r":error \S+ .+").group(0)
    peer.expect_closed()
    return line


@pytest.mark.parametrize(
    "name",
    ["bob\u034f", "bob\ufe0f", "bob\u3164", "bob\u2800", "b\u043eb", "a\u200bb", "bob\u202e"],
    ids=ascii,
)
def test_invisible_and_mixed_script_names_are_refused(room: Room, name: str) -> None:
    room.start_server()
    bob = room.nc_join("bob")
    assert refused(room, name).startswith(":error bad-username Invalid username: ")
    room.nc_join("carol")  # barrier: nothing was printed for the refused login
    room.assert_quiet(bob)


def test_a_look_alike_is_refused_while_the_member_is_in_and_gets_in_after(room: Room) -> None:
    room.start_server()
    bob = room.nc_join("bob")
    alice = room.nc_join("alice")
    assert refused(room, GREEK_BOB) == (
        f":error name-taken The username {GREEK_BOB} is already in the chatroom")
    room.leave(bob)
    greek = room.nc_join(GREEK_BOB)  # bob has gone: the name is free
    room.say(greek, "hello")
    assert refused(room, "bob") == ":error name-taken The username bob is already in the chatroom"
    room.assert_quiet(alice)


def test_the_client_refuses_what_the_server_refuses(room: Room) -> None:
    room.start_server()
    for name in ("a\u200bb", "x\ufffd", "bob\u2800"):
        client = room.spawn_client(*room.client_args(name), name=ascii(name))
        status, out, err = client.finish()
        assert status == 2 and out == [], (name, status, out, err)
        assert "argument -username" in err[-1], err


@pytest.mark.parametrize(
    "char", ["\u2028", "\u2029", "\u202e", "\u2066", "\u200f", "\u061c"], ids=ascii)
def test_separators_and_bidi_controls_in_messages_arrive_as_u_fffd(room: Room, char: str) -> None:
    server = room.start_server()
    alice = room.nc_join("alice")
    bob = room.nc_join("bob")
    alice.send(f"line one{char}bob: line two")
    shown = "alice: line one\ufffdbob: line two"
    server.expect(shown)
    bob.expect(shown)
    alice.send(f":Msg bob psst{char}x")
    bob.expect("[Message from alice]: psst\ufffdx")
