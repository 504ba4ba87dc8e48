"""The attacks of a hostile member, reproduced small, each with its bound.

- a flood is slowed (not read past its budget), never dropped or reordered;
  a member who reads keeps every line and a bystander's line still arrives
  within a second; the flooder's :Exit still works in its turn;
- replies (`:Users` asked thousands of times) cost at most about one SendQ;
- bare connections to a TLS port are counted as they are accepted, and the
  handshake is inside the login deadline;
- a stdout nobody reads does not stop the room, and the lost lines are told;
- a storm of logins from one address does not hold up the room.

Each waits for lines with a deadline; loops are bounded in count and time;
traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time

import pytest
from harness import START_RE, child_env
from secwire import NO_BUDGET, PASSCODE, ROOT, Lab

pytestmark = pytest.mark.timeout(90)


def test_a_flood_is_slowed_and_a_reader_keeps_every_line_in_order(lab: Lab) -> None:
    srv = lab.server()  # the default budget: 50 lines at once, then 10 a second
    reader = lab.member(srv, "reader")
    carol = lab.member(srv, "carol", reader)
    flooder = lab.member(srv, "flooder", reader, carol)
    total = 5000
    payload = b"".join(b"m%05d\n" % k for k in range(total))
    stop = threading.Event()

    def flood() -> None:  # as fast as the socket allows, until TCP pushes back
        flooder.sock.settimeout(0.2)
        view = memoryview(payload)
        while view and not stop.is_set():
            try:
                view = view[flooder.sock.send(view):]
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    start = time.monotonic()
    seen: list[str] = []
    delays: list[float] = []
    for k in range(3):
        time.sleep(0.5)  # let the flood run a while between bystander lines
        carol.say(f"ping {k}")
        sent = time.monotonic()
        while True:
            line = reader.line(timeout=5)
            assert line is not None, "the reader was dropped"
            if line == f"carol: ping {k}":
                delays.append(time.monotonic() - sent)
                break
            seen.append(line)
    elapsed = time.monotonic() - start
    stop.set()
    assert max(delays) < 1.0, delays  # a bystander's line still gets through at once
    flooded = [line for line in seen if line.startswith("flooder: ")]
    assert flooded == [f"flooder: m{k:05d}" for k in range(len(flooded))]  # in order, none lost
    assert 50 <= len(flooded) <= 50 + 10 * elapsed + 5, (len(flooded), elapsed)
    thread.join(5)


def test_the_flooders_exit_is_served_in_its_turn(lab: Lab) -> None:
    srv = lab.server("-line-burst", "5", "-line-rate", "20")
    reader = lab.member(srv, "reader")
    flooder = lab.member(srv, "flooder", reader)
    flooder.send(b"".join(b"line %d\n" % k for k in range(30)) + b":Exit\n")
    for k in range(30):
        reader.expect(f"flooder: line {k}", timeout=5)
    reader.expect("flooder left the chatroom", timeout=5)
    flooder.expect(":bye")
    flooder.expect_closed()


def test_users_asked_thousands_of_times_costs_about_one_sendq(lab: Lab) -> None:
    """:Users in a room of 150, asked 5,000 times in one go by a member that
    never reads (the flood limit off, so that only the SendQ stands in the
    way): the server holds about one SendQ for it, then drops it."""
    srv = lab.server("-max-sendq", "131072", *NO_BUDGET)
    others = [lab.member(srv, f"m{k:03d}") for k in range(150)]
    asker = lab.member(srv, "asker", rcvbuf=4096)
    time.sleep(0.2)
    base = srv.rss()
    asker.send(b":Users\n" * 5000)  # about 6 MB of answers if nothing stopped them
    srv.wait_for("asker left the chatroom", timeout=20)
    grown = srv.rss() - base
    print(f"\n:Users x 5000 in a room of 151: server RSS +{grown} KiB")
    assert grown < 8 * 1024, f"the server grew by {grown} KiB"
    others[0].say("still here")
    srv.wait_for("m000: still here", timeout=5)
    lab.assert_serving(srv)


def tls_flags(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("abuse-tls")
    issued = trustme.CA().issue_cert("localhost", "127.0.0.1")
    issued.private_key_pem.write_to_path(str(folder / "key.pem"))
    (folder / "cert.pem").write_bytes(b"".join(b.bytes() for b in issued.cert_chain_pems))
    return ["-tls-cert", str(folder / "cert.pem"), "-tls-key", str(folder / "key.pem")]


def test_bare_connections_to_a_tls_port_are_counted_as_they_are_accepted(
        lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = lab.server(*tls_flags(tmp_path_factory), "-max-clients", "100", "-max-per-ip", "20",
                     "-exempt", "", "-connect-rate", "0")
    base = srv.rss()
    socks = []
    try:
        for _ in range(300):
            socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=5))
        deadline = time.monotonic() + 10
        closed: set[int] = set()
        while time.monotonic() < deadline and len(closed) < 296:
            ready, _, _ = select.select([s for k, s in enumerate(socks) if k not in closed],
                                        [], [], 0.5)
            for s in ready:
                if s.recv(1) == b"":  # closed without a word: no TLS yet to say it on
                    closed.add(socks.index(s))
        grown = srv.rss() - base
        print(f"\n300 bare connections to a TLS port (20 allowed from one address, 4 of them "
              f"in a handshake): {len(closed)} closed at once, server RSS +{grown} KiB")
        assert len(closed) == 296
        assert grown < 16 * 1024
    finally:
        for s in socks:
            s.close()


def test_a_tls_handshake_never_begun_is_closed_at_the_login_deadline(
        lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = lab.server(*tls_flags(tmp_path_factory), "-login-timeout", "1")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        start = time.monotonic()
        s.settimeout(5)
        assert s.recv(1) == b""
        took = time.monotonic() - start
    assert 0.8 < took < 2.5, took


def test_a_stdout_nobody_reads_does_not_stop_the_room(lab: Lab) -> None:
    """stdout into a pipe nobody reads: 12 MB of chat later, members still
    talk and log in; when the pipe is read again, the lost lines are told."""
    proc = subprocess.Popen([sys.executable, "server.py", "-start", "-port", "0",
                             "-passcode", PASSCODE, *NO_BUDGET], cwd=ROOT, env=child_env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        start = proc.stdout.readline().decode()
        m = START_RE.fullmatch(start.rstrip("\n"))
        assert m is not None, start
        port = int(m.group(1))
        alice = lab.wire(port, label="alice").login("alice")
        bob = lab.wire(port, label="bob").login("bob")
        alice.expect("bob joined the chatroom")
        line = "x" * 1000
        for _ in range(12):  # 12 MB, paced by bob's reading
            alice.send((line + "\n").encode() * 1000)
            for _ in range(1000):
                assert bob.line(10) == "alice: " + line
        carol = lab.wire(port, label="carol").login("carol")  # logins go on too
        carol.say("hi")
        alice.expect("carol joined the chatroom", timeout=5)
        alice.expect("carol: hi", timeout=5)
        drained = threading.Thread(target=proc.stdout.read, daemon=True)
        drained.start()  # the reader is back
        alice.say("after")
        deadline = time.monotonic() + 10
        err = b""
        while b"could not be printed" not in err and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 0.5)[0]:
                err += proc.stderr.read1(4096)  # type: ignore[attr-defined]
        assert b"lines could not be printed (stdout was not being read)" in err, err
    finally:
        proc.kill()
        proc.wait(5)


def test_a_storm_of_logins_from_one_address_does_not_hold_up_the_room(lab: Lab) -> None:
    srv = lab.server("-exempt", "")
    bob = lab.member(srv, "bob")
    carol = lab.member(srv, "carol", bob)
    stop = threading.Event()
    storms = [0, 0]  # attempts, refused at once

    def storm() -> None:
        deadline = time.monotonic() + 4
        k = 0
        while not stop.is_set() and time.monotonic() < deadline and k < 4000:
            k += 1
            try:
                with socket.create_connection(("127.0.0.1", srv.port), timeout=2) as s:
                    s.sendall(f"LOGIN {PASSCODE} s{k % 1000}\n".encode())
                    s.settimeout(2)
                    reply = s.recv(4096)
                    storms[0] += 1
                    if b":error throttled" in reply or b":error full" in reply:
                        storms[1] += 1
            except OSError:
                pass

    thread = threading.Thread(target=storm, daemon=True)
    thread.start()
    delays = []
    for k in range(5):
        time.sleep(0.4)
        bob.say(f"tick {k}")
        sent = time.monotonic()
        while True:
            got = carol.line(timeout=3)
            assert got is not None
            if got == f"bob: tick {k}":
                delays.append(time.monotonic() - sent)
                break
    stop.set()
    thread.join(5)
    print(f"\nlogin storm: {storms[0]} attempts, {storms[1]} refused at once; "
          f"bystander delays {[round(d, 3) for d in delays]}")
    assert max(delays) < 1.0, delays
    assert storms[1] > storms[0] / 2
