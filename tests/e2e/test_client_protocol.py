"""client.py against a fake server that the test scripts line by line: what the
client sends, and what it prints for each protocol line (docs/PROTOCOL.md),
including lines a real server would never send (a hostile server's)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from harness import PASSCODE, Client, FakeServer, Peer, Room, expect_one_error_line

pytestmark = pytest.mark.e2e


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    server = FakeServer()
    yield server
    server.close()


def connect(room: Room, fake: FakeServer, name: str = "alice") -> tuple[Client, Peer]:
    """A client that logged in to the fake server and printed its Connected line."""
    client = room.spawn_client(*room.client_args(name, port=fake.port), name=name)
    srv = fake.accept()
    srv.send(":hello chatroom 1")
    login = srv.next_line()
    if login is None or not re.fullmatch(rf"(?i:login) {PASSCODE} {re.escape(name)}", login):
        srv.fail(f"expected the login line 'LOGIN {PASSCODE} {name}', got {login!r}")
    srv.send(f":ok {name}")
    client.expect(f"Connected to 127.0.0.1 on port {fake.port}")
    return client, srv


@pytest.mark.parametrize(
    "typed",
    ["Hello Room", ":)", ":mytime", ":Users", ":Msg bob hi there", "\\:mytime", "  spaced  "],
)
def test_typed_lines_are_sent_unchanged(room: Room, fake: FakeServer, typed: str) -> None:
    client, srv = connect(room, fake)
    client.send(typed)
    srv.expect(typed)


@pytest.mark.parametrize(
    ("sent", "shown"),
    [
        pytest.param("bob: hi", "bob: hi", id="plain"),
        pytest.param("bob: hi\x1b[2Jthere\x07", "bob: hi\ufffd[2Jthere\ufffd", id="escape-seq"),
        pytest.param("bob: a\x9bb\x7fc", "bob: a\ufffdb\ufffdc", id="c1-and-del"),
        pytest.param("bob: tab\there", "bob: tab\ufffdhere", id="tab"),
        pytest.param("[Message from bob]: psst", "[Message from bob]: psst", id="private"),
    ],
)
def test_display_lines_are_printed_sanitised(
    room: Room, fake: FakeServer, sent: str, shown: str
) -> None:
    client, srv = connect(room, fake)
    srv.send(sent)
    client.expect(shown)


def test_unknown_protocol_lines_are_ignored(room: Room, fake: FakeServer) -> None:
    client, srv = connect(room, fake)
    srv.send(":future-word with some text")
    srv.send(":another")
    srv.send("bob: after")
    client.expect("bob: after")  # nothing was printed for the two protocol lines


def test_exit_prints_what_came_before_bye_then_ends_0(room: Room, fake: FakeServer) -> None:
    client, srv = connect(room, fake)
    client.send(":Exit")
    srv.expect(":Exit")
    srv.send("bob: last words")
    srv.send(":bye")
    srv.close()
    client.expect("bob: last words")
    assert client.finish() == (0, [], []), client.describe()


def test_end_of_input_waits_for_every_reply(room: Room, fake: FakeServer) -> None:
    """End of stdin is :Exit, but the replies the server sends before :bye
    are all printed (the fake server answers only after it saw the :Exit)."""
    client, srv = connect(room, fake)
    client.send(":Users")
    client.close_stdin()
    srv.expect(":Users")
    srv.expect(":Exit")
    srv.send("Active Users: alice, bob")
    srv.send("bob: one more")
    srv.send(":bye")
    srv.close()
    client.expect("Active Users: alice, bob")
    client.expect("bob: one more")
    assert client.finish() == (0, [], []), client.describe()


def test_incorrect_passcode_line(room: Room, fake: FakeServer) -> None:
    client = room.spawn_client(*room.client_args("alice", port=fake.port), name="alice")
    srv = fake.accept()
    srv.send(":hello chatroom 1")
    srv.next_line()  # the login
    srv.send(":error passcode Incorrect passcode")
    srv.close()
    status, rest, _err = client.finish()
    assert (status, rest) == (1, ["Incorrect passcode"]), client.describe()
    client.assert_no_traceback()


@pytest.mark.parametrize(
    "error",
    [
        ":error name-taken The username alice is already in the chatroom",
        ":error full The chatroom is full",
        ":error throttled Too many wrong passcodes; try again later",
    ],
)
def test_refused_login_is_one_stderr_line_status_1(
    room: Room, fake: FakeServer, error: str
) -> None:
    client = room.spawn_client(*room.client_args("alice", port=fake.port), name="alice")
    srv = fake.accept()
    srv.send(":hello chatroom 1")
    srv.next_line()
    srv.send(error)
    srv.close()
    expect_one_error_line(client, status=1)


def test_server_shutdown_is_one_stderr_line_status_1(room: Room, fake: FakeServer) -> None:
    client, srv = connect(room, fake)
    srv.send(":error shutdown The server is shutting down")
    srv.close()
    expect_one_error_line(client, status=1)


def test_connection_lost_is_one_stderr_line_status_1(room: Room, fake: FakeServer) -> None:
    client, srv = connect(room, fake)
    srv.close()
    expect_one_error_line(client, status=1)


def test_error_that_keeps_the_connection(room: Room, fake: FakeServer) -> None:
    client, srv = connect(room, fake)
    client.send(":Msg zed hi")
    srv.expect(":Msg zed hi")
    srv.send(":error no-such-user No user named zed is in the chatroom")
    assert client.expect_err_line().strip()
    srv.send("bob: still here")
    client.expect("bob: still here")
    client.send(":Exit")
    srv.expect(":Exit")
    srv.send(":bye")
    srv.close()
    status, rest, err = client.finish()
    assert (status, rest, len(err)) == (0, [], 1), client.describe()
