"""client.py with a server that keeps history: the replay as a person sees it,
-reconnect across a real restart of the server (the missed lines shown once,
nothing shown twice), and the output of a server without history unchanged.

Every wait is for a line; nothing sleeps and hopes."""

from __future__ import annotations

import re
import signal
import subprocess
from pathlib import Path

import pytest
from harness import PROGRAM_DIR, START_RE, Client, Peer, Proc, Room

pytestmark = [pytest.mark.e2e]

# A replayed line: its local time in brackets (today's: only the clock).
REPLAYED = re.compile(r"\[\d\d:\d\d\] (.*)")
TRYING_AGAIN = re.compile(r"client\.py: (.*); trying again in [0-9.]+ s")


def replayed(client: Client, line: str) -> None:
    got = client.next_line()
    m = REPLAYED.fullmatch(got or "")
    assert m is not None and m.group(1) == line, f"expected [hh:mm] {line!r}, got {got!r}"


def nc_login(room: Room, name: str, history: bool = True) -> Peer:
    """A raw connection logged in as `name`, its replay read up to :here
    (when the server keeps history)."""
    peer = room.nc(label=name)
    peer.expect(":hello chatroom 1")
    peer.send(f"LOGIN {room.passcode} {name}")
    peer.expect(f":ok {name}")
    while history and not (peer.next_line() or ":here").startswith(":here"):
        pass
    return peer


def start_server_on(room: Room, port: int, *extra: str) -> Proc:
    """server.py again on a port it had (a restart); its first line checked."""
    server = room.spawn_server("-start", "-port", str(port), "-passcode", room.passcode, *extra)
    m = START_RE.fullmatch(server.next_line() or "")
    assert m is not None and int(m.group(1)) == port, server.describe()
    room.server = server
    return server


def test_a_client_shows_the_replay_then_who_is_here(room: Room) -> None:
    server = room.start_server("-history", "50")
    bob = nc_login(room, "bob")
    server.expect("bob joined the chatroom")
    bob.send("Hello Room")
    server.expect("bob: Hello Room")
    alice = room.connect("alice")
    replayed(alice, "bob joined the chatroom")
    replayed(alice, "bob: Hello Room")
    alice.expect("Active Users: bob, alice")
    bob.expect("alice joined the chatroom")
    bob.send("live now")
    alice.expect("bob: live now")
    alice.close_stdin()
    assert alice.finish() == (0, [], [])


def test_reconnect_across_a_restart_shows_the_missed_lines_once(
    room: Room, tmp_path: Path
) -> None:
    history = ("-history", "50", "-history-db", str(tmp_path / "room.db"))
    server = room.start_server(*history)
    port = room.port
    assert port is not None
    bob = nc_login(room, "bob")
    server.expect("bob joined the chatroom")
    bob.send("before alice")
    server.expect("bob: before alice")
    alice = room.spawn_client(*room.client_args("alice"), "-reconnect", name="alice")
    alice.expect(f"Connected to 127.0.0.1 on port {port}")
    replayed(alice, "bob joined the chatroom")
    replayed(alice, "bob: before alice")
    alice.expect("Active Users: bob, alice")
    bob.expect("alice joined the chatroom")
    bob.send("seen live")
    alice.expect("bob: seen live")
    alice.send("typed by alice")
    bob.expect("alice: typed by alice")

    server.signal(signal.SIGINT)
    assert server.wait() == 0
    assert alice.expect_err_line() == "The server is shutting down"
    # Each failed attempt says so: after the third note the next attempt is
    # at least 3 s away (4 s, less a quarter at most), time enough to have
    # the server back and a line said that alice cannot have received.
    notes = [TRYING_AGAIN.fullmatch(alice.expect_err_line()) for _ in range(3)]
    why = [note.group(1) if note else None for note in notes]
    refused = f"cannot connect to 127.0.0.1 port {port}: Connection refused"
    assert why == ["the server closed the connection", refused, refused]
    alice.send("typed while away")  # held, and sent after the new login

    # After the third note the next attempt is 3 to 5 s away: time enough, as
    # a rule, to have the server back and a line said that alice cannot have
    # received. On a machine slow enough to let her in first, that line
    # reaches her live instead: either way, each line is shown once.
    server = start_server_on(room, port, *history)
    bob = nc_login(room, "bob")
    server.expect("bob joined the chatroom")
    bob.send("missed by alice")
    server.expect("bob: missed by alice")
    assert alice.expect_err_line() == f"client.py: connected again to 127.0.0.1 port {port}"
    # After "bob: before alice" (the last line of alice's replay): alice's own
    # join, then what she saw live or typed is skipped, the rest shown once.
    shown: list[str] = []
    replays, here = 0, False  # replayed lines; the replay's end (Active Users) seen
    while not shown or shown[-1] != "bob: missed by alice":
        line = alice.next_line()
        assert line is not None, alice.describe()
        m = REPLAYED.fullmatch(line)
        if line.startswith("Active Users: "):
            here = True
            continue
        shown.append(m.group(1) if m else line)
        replays += m is not None
    if not here:
        assert (alice.next_line() or "").startswith("Active Users: "), alice.describe()
    assert shown == [  # the shutdown is not in the history: nobody left the room
        "alice joined the chatroom",
        "bob joined the chatroom",
        "bob: missed by alice",
    ]
    assert replays >= 1  # at least her own earlier join came back as a replayed line
    bob.expect("alice joined the chatroom")
    bob.expect("alice: typed while away")
    bob.send("after")
    alice.expect("bob: after")
    alice.close_stdin()
    status, rest, err = alice.finish()  # err: every line of stderr, all checked above
    assert (status, rest, len(err)) == (0, [], 5), alice.describe()


OLD_CLIENT = "191d975"  # the last client.py before history, colours and -reconnect


@pytest.mark.parametrize("flags", [(), ("-reconnect",)])
def test_without_history_the_output_is_what_it_was(
    room: Room, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    try:
        old = subprocess.run(["git", "show", f"{OLD_CLIENT}:client.py"], cwd=PROGRAM_DIR,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the repository's history (git) for the older client.py")
    (tmp_path / "client.py").write_bytes(old)
    room.start_server()
    bob = nc_login(room, "bob", history=False)
    script = "hello\n:Users\n:Msg bob psst\n:)\n"
    results = []
    for folder, extra in ((tmp_path, ()), (room.client_dir, flags)):
        client = Client(
            "alice", [room.python, str(folder / "client.py"), *room.client_args("alice"), *extra],
            cwd=folder, label="alice",
        )
        room.procs.append(client)
        bob.expect("alice joined the chatroom")
        bob.send("hi \x1b[31malice\x1b[0m")
        client.send_raw(script.encode())
        bob.expect("alice: hello")
        bob.expect("[Message from alice]: psst")
        bob.expect("alice: [feeling happy]")
        bob.send(":Msg alice back")
        shown = []
        for _ in range(4):
            line = client.next_line()
            assert line is not None, client.describe()
            shown.append(line)
        client.close_stdin()
        bob.expect("alice left the chatroom")
        status, rest, err = client.finish()
        results.append((status, shown + rest, err))
    assert results[0] == results[1]
    assert results[1] == (0, [
        f"Connected to 127.0.0.1 on port {room.port}",
        "bob: hi \ufffd[31malice\ufffd[0m",
        "Active Users: bob, alice",
        "[Message from bob]: back",
    ], [])
