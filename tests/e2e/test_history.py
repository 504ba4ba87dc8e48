"""History (`-history`, `-history-db`) against the real server: what a late
joiner is sent, what the file keeps, a restart, and a `kill -9` mid-flood.

Every wait is for a line; nothing sleeps and hopes."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pytest
from harness import PROGRAM_DIR, Peer, Proc, Room, expect_one_error_line

pytestmark = [pytest.mark.e2e]

PAST = re.compile(r":past (\S+) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (.*)")


def replay(peer: Peer) -> tuple[list[tuple[str, str]], str]:
    """The (id, line) pairs of a replay and its :here line."""
    got: list[tuple[str, str]] = []
    while True:
        line = peer.next_line()
        assert line is not None, "the replay ended before :here"
        if line.startswith(":here"):
            return got, line
        m = PAST.fullmatch(line)
        assert m, f"not a :past line: {line!r}"
        got.append((m.group(1), m.group(3)))


def stop(server: Proc) -> None:
    server.signal(signal.SIGINT)
    assert server.wait() == 0


def test_a_late_joiner_on_nc_sees_the_room_so_far_then_who_is_here(room: Room) -> None:
    server = room.start_server("-history", "50")
    alice = room.nc_join("alice")
    alice.expect(":here alice")
    bob = room.join("bob")  # alice saw it join
    room.say(bob, "Hello Room")
    bob.send(":Msg alice the secret")
    alice.expect("[Message from bob]: the secret")
    server.expect("bob: send message to alice")
    bob.send(":Users")
    server.expect("bob: searched up active users")
    carol = room.nc("\n", label="carol")
    carol.expect(":hello chatroom 1")
    carol.send(f"LOGIN {room.passcode} carol")
    carol.expect(":ok carol")
    lines, here = replay(carol)
    assert [line for _, line in lines] == [
        "alice joined the chatroom", "bob joined the chatroom", "bob: Hello Room"]
    assert len({i for i, _ in lines}) == 3
    assert here == ":here alice bob carol"
    alice.expect("carol joined the chatroom")


def test_without_history_a_late_joiner_sees_nothing_before(room: Room) -> None:
    room.start_server()
    alice = room.join("alice")
    room.say(alice, "before")
    carol = room.nc_join("carol")
    alice.send("after")
    assert carol.next_line() == "alice: after"  # the first line after :ok is live


OLD_CLIENT = "191d975"  # the last client.py that knew no history words


def test_an_older_client_ignores_the_replay(room: Room, tmp_path: Path) -> None:
    try:
        old = subprocess.run(["git", "show", f"{OLD_CLIENT}:client.py"], cwd=PROGRAM_DIR,
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs the repository's history (git) for the older client.py")
    room.client_dir = tmp_path
    (tmp_path / "client.py").write_bytes(old)
    room.start_server("-history", "10")
    alice = room.join("alice")
    room.say(alice, "said before bob came")
    bob = room.join("bob")
    alice.send("said after")
    assert bob.next_line() == "alice: said after"  # nothing of the replay, no error
    bob.close_stdin()
    code, rest, err = bob.finish()
    assert code == 0 and err == [], bob.describe()


def test_the_file_keeps_public_lines_only_and_outlives_a_restart(room: Room,
                                                                  tmp_path: Path) -> None:
    db = tmp_path / "room.db"
    server = room.start_server("-history", "20", "-history-db", str(db))
    alice = room.join("alice")
    alice.expect("Active Users: alice")  # client.py shows the (empty) replay's :here
    bob = room.join("bob")
    bob.expect_match(r"\[\d\d:\d\d\] alice joined the chatroom")
    bob.expect("Active Users: alice, bob")
    room.say(alice, "kept for later")
    alice.send(":Msg bob not for the file")
    bob.expect("[Message from alice]: not for the file")
    alice.send(":Users")
    alice.expect("Active Users: alice, bob")
    stop(server)
    rows = sqlite3.connect(db).execute("SELECT id, line FROM lines ORDER BY seq").fetchall()
    assert [line for _, line in rows] == [
        "alice joined the chatroom", "bob joined the chatroom", "alice: kept for later"]
    assert all("not for the file" not in line and "Active Users" not in line
               for _, line in rows)
    for proc in list(room.procs):
        proc.cleanup()
    room.members.clear()

    room.start_server("-history", "20", "-history-db", str(db))
    carol = room.nc("\n", label="carol")
    carol.expect(":hello chatroom 1")
    carol.send(f"LOGIN {room.passcode} carol")
    carol.expect(":ok carol")
    lines, here = replay(carol)
    assert lines == rows  # the same ids: a client can tell what it has seen
    assert here == ":here carol"


def test_kill_9_mid_flood_leaves_a_file_that_opens(room: Room, tmp_path: Path) -> None:
    db = tmp_path / "room.db"
    args = ["-history", "1000", "-history-db", str(db), "-line-rate", "0", "-byte-rate", "0"]
    server = room.start_server(*args)
    flooder = room.nc_join("flood")
    flooder.expect(":here flood")
    stop_flood = threading.Event()

    def flood() -> None:  # until the server is gone, or 400,000 lines
        for start in range(0, 400_000, 1000):
            if stop_flood.is_set():
                return
            try:
                flooder.sock.sendall("".join(f"line {i}\n" for i in range(start, start + 1000))
                                 .encode())
            except OSError:
                return

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until a batch of the flood is on disk
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as peek:
                    if peek.execute("SELECT count(*) FROM lines WHERE line LIKE 'flood: %'"
                                    ).fetchone()[0]:
                        break
            except sqlite3.OperationalError:  # busy, or not there yet
                pass
        else:
            pytest.fail("no line of the flood reached the file within 20 s")
        server.kill()  # mid-flood: SIGKILL, nothing flushed
        server.wait()
    finally:
        stop_flood.set()
        sender.join(timeout=30)
    check = sqlite3.connect(db)
    assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    check.close()
    for proc in list(room.procs):
        proc.cleanup()
    room.members.clear()
    room.start_server(*args)
    late = room.nc("\n", label="late")
    late.expect(":hello chatroom 1")
    late.send(f"LOGIN {room.passcode} late")
    late.expect(":ok late")
    lines, _ = replay(late)
    said = [line for _, line in lines if line.startswith("flood: ")]
    assert said, "nothing was kept"
    first = int(said[0].rsplit(" ", 1)[1])
    # what survived is whole and in order: consecutive lines, none missing in between
    assert said == [f"flood: line {first + k}" for k in range(len(said))]


def test_a_bad_history_file_is_one_line_at_start(room: Room, tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, not at all" * 100)
    server = room.spawn_server("-start", "-port", "0", "-passcode", room.passcode,
                               "-history-db", str(junk))
    line = expect_one_error_line(server, 2)
    assert line.startswith(f"server.py: error: -history-db {junk}: "), line
    server = room.spawn_server("-start", "-port", "0", "-passcode", room.passcode,
                               "-history-db", str(tmp_path / "no" / "such" / "dir.db"))
    assert "-history-db" in expect_one_error_line(server, 2)


def test_history_flags_are_checked(room: Room, tmp_path: Path) -> None:
    for args, words in ((["-history", "-3"], "-history"),
                        (["-history", "99999"], "at most"),
                        (["-history", "0", "-history-db", str(tmp_path / "h.db")], "-history")):
        server = room.spawn_server("-start", "-port", "0", "-passcode", room.passcode, *args)
        assert words in expect_one_error_line(server, 2)
