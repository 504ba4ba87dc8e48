"""Fault tests on real processes: clients that die or freeze.

- A client.py killed with SIGKILL (no :Exit, no goodbye): the room is told.
- A process killed in the middle of a line: the half line is never delivered.
- A client.py frozen with SIGSTOP while another member floods the room: every
  other receiver (a raw socket and another client.py) gets every line in order,
  the frozen one is dropped once its queue passes -max-sendq, the room is told,
  and the server's RSS (VmRSS in /proc/<pid>/status) stays bounded. The numbers
  are printed (run with -s to see them) and recorded in docs/SECURITY.md.

Teardown always sends SIGCONT before killing a client (Lab.client).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from harness import Proc, child_env
from secwire import (
    NO_BUDGET,
    ROOT,
    Lab,
    LineCollector,
    Server,
    Wire,
    check_flow,
    flood_line,
    flood_until_dropped,
)

pytestmark = pytest.mark.e2e

MiB = 1 << 20


def joined(srv: Server, client: Proc, name: str, *others: Wire | Proc) -> Proc:
    """client.py printed its Connected line; the server and `others` saw it join."""
    client.expect(f"Connected to 127.0.0.1 on port {srv.port}")
    srv.expect(f"{name} joined the chatroom")
    for other in others:
        other.expect(f"{name} joined the chatroom")
    return client


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(10_000):
        if process_state(pid) == "T":
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop"
        time.sleep(0.005)


def test_a_client_killed_with_sigkill_is_announced_as_gone(lab: Lab) -> None:
    srv = lab.server()
    bob = lab.member(srv, "bob")
    alice = joined(srv, lab.client(srv, "alice"), "alice", bob)
    carol = joined(srv, lab.client(srv, "carol"), "carol", bob, alice)
    alice.popen.kill()
    assert alice.popen.wait(5) == -signal.SIGKILL
    bob.expect("alice left the chatroom")
    carol.expect("alice left the chatroom")
    srv.expect("alice left the chatroom")
    bob.say(":Users")
    bob.expect("Active Users: bob, carol")
    srv.expect("bob: searched up active users")
    lab.assert_serving(srv, bob, carol)


HALF_A_LINE = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"LOGIN abc12 zed\\n")
f = s.makefile("rb")
f.readline(); f.readline()
s.sendall(b"half a li")
print("ready", flush=True)
time.sleep(60)
"""


def test_a_process_killed_mid_line_never_delivers_the_half_line(lab: Lab) -> None:
    srv = lab.server()
    bob = lab.member(srv, "bob")
    zed = Proc([sys.executable, "-c", HALF_A_LINE, str(srv.port)], cwd=ROOT, label="zed",
               env=child_env())
    lab.cleanups.append(zed.cleanup)
    zed.expect("ready")
    srv.expect("zed joined the chatroom")
    bob.expect("zed joined the chatroom")
    zed.popen.kill()
    zed.popen.wait(5)
    bob.expect("zed left the chatroom")  # and not "zed: half a li" before it
    srv.expect("zed left the chatroom")
    lab.assert_serving(srv, bob)


@pytest.mark.parametrize("sendq", [65536, None], ids=["sendq-64KiB", "sendq-default"])
def test_a_frozen_client_is_dropped_while_the_room_keeps_flowing(lab: Lab, sendq: int | None,
                                                                 ) -> None:
    srv = lab.server(*(["-max-sendq", str(sendq)] if sendq else []), *NO_BUDGET)
    frozen = joined(srv, lab.client(srv, "frozen"), "frozen")
    watcher = joined(srv, lab.client(srv, "watcher"), "watcher", frozen)
    reader = lab.member(srv, "reader", frozen, watcher)
    flooder = lab.member(srv, "flooder", frozen, watcher, reader)
    frozen.popen.send_signal(signal.SIGSTOP)
    wait_stopped(frozen.pid)

    base = srv.rss()
    size = 1000
    collector = LineCollector(reader, "flooder: done", timeout=40, limit=100_000)
    result = flood_until_dropped(srv, flooder, [collector], "frozen", size=size,
                                 followers=[lambda: len(watcher.out.seen)])
    growth = result.rss_peak - base
    print(f"\nfrozen client.py, -max-sendq {sendq or 'default (1 MiB)'}: dropped after "
          f"{result.dropped_after} messages of {size + 17} bytes "
          f"(~{result.dropped_after * (size + 17) / MiB:.1f} MiB); {result.sent} sent in "
          f"{result.seconds:.1f} s; server RSS {base} KiB -> peak {result.rss_peak} KiB "
          f"(+{growth} KiB), after {result.rss_samples[-1]} KiB")
    assert result.dropped_after > 0, f"the frozen client was never dropped ({result.sent} sent)"

    # Everybody else got every line, in order, and was told once that frozen left.
    check_flow(collector.lines, "flooder", result.sent, size, also=["frozen left the chatroom"])
    seen = []
    for _ in range(result.sent + 10):
        line = watcher.next_line(10)
        if line is None:
            watcher.fail("watcher: stdout ended during the flood")
        seen.append(line)
        if line == "flooder: done":
            break
    check_flow(seen, "flooder", result.sent, size, also=["frozen left the chatroom"])
    flooder.expect("frozen left the chatroom")
    srv.wait_for("frozen left the chatroom", limit=result.sent + 10)
    srv.wait_for("flooder: done", limit=result.sent + 10)
    assert growth < 16 * 1024, f"server RSS grew by {growth} KiB while a client was frozen"

    # Thawed, the client prints what the kernel still held for it, in order, then
    # says in one line that the server closed the connection, and ends.
    frozen.popen.send_signal(signal.SIGCONT)
    status, rest, err = frozen.finish(timeout=20)
    expected = [f"flooder: {flood_line(i, size)}" for i in range(len(rest))]
    complete = rest[:-1] if rest and rest[-1] != expected[-1] else rest
    assert complete == expected[:len(complete)], "the frozen client's lines are out of order"
    assert len(complete) < result.sent, "the frozen client got every line: it was never cut off"
    assert status == 1 and len(err) == 1 and "Traceback" not in err[0], frozen.describe()
    print(f"thawed client printed {len(rest)} lines, then {err[0]!r}")
    lab.assert_serving(srv, reader, flooder, watcher)


def test_many_frozen_members_cost_at_most_their_sendq_each(lab: Lab) -> None:
    """20 members that never read, one flood: each is dropped at -max-sendq, so the
    server's peak RSS grows by about 20 x 256 KiB at most, never by the flood."""
    n, sendq = 20, 256 * 1024
    srv = lab.server("-max-sendq", str(sendq), *NO_BUDGET)
    frozen = [lab.member(srv, f"f{i}", rcvbuf=4096) for i in range(n)]
    reader = lab.member(srv, "reader")
    flooder = lab.member(srv, "flooder", reader)
    base = srv.rss()
    collector = LineCollector(reader, "flooder: done", timeout=40, limit=100_000)
    size = 1000
    result = flood_until_dropped(srv, flooder, [collector], [f"f{i}" for i in range(n)],
                                 size=size)
    growth = result.rss_peak - base
    print(f"\n{n} frozen members, -max-sendq {sendq}: all dropped after {result.dropped_after}"
          f" messages (~{result.dropped_after * (size + 17) / MiB:.1f} MiB broadcast to each);"
          f" server RSS {base} KiB -> peak {result.rss_peak} KiB (+{growth} KiB; "
          f"{n} x sendq = {n * sendq // 1024} KiB)")
    assert result.dropped_after > 0
    check_flow(collector.lines, "flooder", result.sent, size,
               also=[f"f{i} left the chatroom" for i in range(n)])
    assert growth < n * sendq // 1024 + 8 * 1024, f"server RSS grew by {growth} KiB"
    told = sorted(flooder.line() or "" for _ in range(n))  # in whatever order they went
    assert told == sorted(f"f{i} left the chatroom" for i in range(n))
    srv.wait_for("flooder: done", limit=result.sent + n + 10)
    assert len(frozen) == n
    lab.assert_serving(srv, reader, flooder)


def test_rss_is_read_from_proc(lab: Lab) -> None:
    """The RSS probe itself: a live number in a sane range for a Python server."""
    srv = lab.server()
    kib = srv.rss()
    assert 4 * 1024 < kib < 200 * 1024, kib
    assert os.path.exists(f"/proc/{srv.pid}/status")
