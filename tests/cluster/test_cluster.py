"""One room across several server.py processes through a real Redis (issue 5,
docs/CLUSTER.md): every SPEC.md row across servers, order, name races, a
killed server, a clean shutdown, a Redis restart, a server that was declared
dead and comes back, and the command line around -redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cluster_harness import Cluster, RedisServer
from harness import (
    PASSCODE,
    ROOT,
    Peer,
    Proc,
    assert_close_to,
    child_env,
    expect_one_error_line,
    free_port,
    lines_without_double_spaces,
    parse_time,
    time_line_re,
)

pytestmark = pytest.mark.e2e

KILL_DETECTION_LIMIT = 15.0  # issue 5: a killed server's users are gone within this


def next_line_of(who: Proc | Peer) -> str:
    """The next line a server, client.py or raw connection printed; fails if its
    output ended instead."""
    line = who.next_line()
    if line is None:
        who.fail(f"{who.label}: expected one more line, got the end of its output")
    return line


# ---------------------------------------------------------------------------
# SPEC.md rows across servers
# ---------------------------------------------------------------------------


def test_join_notices_reach_every_server_and_member(trio: Cluster) -> None:
    # trio checked: each join printed by all three servers and every member
    # already in; nobody saw their own.
    for who in trio.members:
        trio.assert_quiet(who)


BROADCASTS = [
    ("Hello Room", "Hello Room"),
    (":)", "[feeling happy]"),
    (":(", "[feeling sad]"),
    ("\\:mytime", ":mytime"),
    ("\\:Exit", ":Exit"),
    ("\\:)", ":)"),
    (":Users x", ":Users x"),
    ("héllo wörld ✓ 你好", "héllo wörld ✓ 你好"),
    ("x" * 100, "x" * 100),
]


def test_broadcast_rows_across_servers(trio: Cluster) -> None:
    for i, (typed, shown) in enumerate(BROADCASTS):
        sender = trio.members[i % 3]
        trio.say(sender, typed, shown)
        trio.assert_quiet(sender)  # the sender saw nothing of its own


def test_mytime_and_plus_one_hour_across_servers(trio: Cluster) -> None:
    alice, bob, carol = trio.members
    pattern = time_line_re("bob")
    everyone = (*trio.live(), alice, bob, carol)
    for typed, shift in ((":mytime", 0), (":+1hr", 1)):
        before = datetime.now()
        bob.send(typed)  # bob is on server 1; alice and carol elsewhere
        lines = [who.expect_match(pattern).group(0) for who in everyone]
        after = datetime.now()
        assert len(set(lines)) == 1, f"not the same line everywhere: {lines}"
        lines_without_double_spaces(lines)
        when = parse_time(lines[0].split(": ", 1)[1])
        assert_close_to(when, before + timedelta(hours=shift), after + timedelta(hours=shift))
    trio.assert_quiet(bob)


def test_users_lists_everyone_in_join_order_from_every_server(trio: Cluster) -> None:
    dave = trio.nc_join("dave", 1)  # joins last, on the server in the middle
    assert trio.users_line() == "Active Users: alice, bob, carol, dave"
    for who in (dave, *trio.members):  # assert_quiet asks :Users and checks it
        trio.assert_quiet(who)


def test_msg_reaches_a_user_on_another_server(trio: Cluster) -> None:
    alice, bob, carol = trio.members
    alice.send(":Msg carol CS3251 is awesome")  # server 0 -> server 2
    for server in trio.live():
        server.expect("alice: send message to carol")
    carol.expect("[Message from alice]: CS3251 is awesome")
    trio.assert_quiet(alice)  # bob saw nothing, alice saw nothing
    carol.send(":Msg ALICE hi back")  # names match ignoring case, across servers too
    for server in trio.live():
        server.expect("carol: send message to alice")
    alice.expect("[Message from carol]: hi back")
    carol.send(":Msg zed hello?")  # only carol hears about it
    carol.expect(":error no-such-user No user named zed is in the chatroom")
    trio.assert_quiet(carol)


def test_exit_and_lost_connections_across_servers(trio: Cluster) -> None:
    alice, bob, carol = trio.members
    trio.leave(bob)  # client.py on server 1: status 0, everyone told
    trio.assert_quiet(alice)
    assert isinstance(carol, Peer)
    carol.close()  # gone without :Exit counts as :Exit
    trio.announced_leave(carol)
    trio.assert_quiet(alice)
    bob2 = trio.nc_join("bob", 2)  # the name is free again, on any server
    trio.assert_quiet(bob2)


def test_name_taken_across_servers(trio: Cluster) -> None:
    intruder = trio.nc(2, label="intruder")
    intruder.expect(":hello chatroom 1")
    intruder.send(f"LOGIN {PASSCODE} Alice")  # alice is on server 0
    intruder.expect(":error name-taken The username Alice is already in the chatroom")
    intruder.expect_closed()
    trio.assert_quiet()  # the room saw nothing


# ---------------------------------------------------------------------------
# Order
# ---------------------------------------------------------------------------


def test_every_server_sees_the_same_order(cluster: Cluster) -> None:
    """Lines from one sender keep their order on every server; two senders on
    two servers interleave the same way everywhere (one shared log)."""
    cluster.start(3)
    alice = cluster.nc_join("alice", 0)
    bob = cluster.nc_join("bob", 1)
    carol = cluster.nc_join("carol", 2)
    n = 150
    alice.send_raw("".join(f"a{i}\n" for i in range(n)).encode())
    bob.send_raw("".join(f"b{i}\n" for i in range(n)).encode())
    seen: dict[str, list[str]] = {}
    watchers: list[Proc | Peer] = [*cluster.live(), carol]
    for who in watchers:
        seen[who.label] = [next_line_of(who) for _ in range(2 * n)]
    orders = list(seen.values())
    for label, got in seen.items():
        for name, tag in (("alice", "a"), ("bob", "b")):
            mine = [line for line in got if line.startswith(f"{name}: ")]
            assert mine == [f"{name}: {tag}{i}" for i in range(n)], f"{label}: {name} out of order"
        assert got == orders[0], f"{label} interleaved differently from the others"
    alice_saw = [alice.next_line() for _ in range(n)]
    assert alice_saw == [f"bob: b{i}" for i in range(n)]
    bob_saw = [bob.next_line() for _ in range(n)]
    assert bob_saw == [f"alice: a{i}" for i in range(n)]
    cluster.assert_quiet(carol)


def test_name_race_exactly_one_wins(cluster: Cluster) -> None:
    """Two servers, the same name at the same moment: exactly one gets in."""
    cluster.start(2)
    watcher = cluster.nc_join("watcher", 0)
    for round_ in range(6):
        name = f"racer{round_}"
        # The second spelling differs in case: names are unique ignoring case.
        spellings = (name, name.upper()) if round_ % 2 else (name, name)
        a, b = cluster.nc(0, label=f"{name}@0"), cluster.nc(1, label=f"{name}@1")
        for peer in (a, b):
            peer.expect(":hello chatroom 1")
        a.send_raw(f"LOGIN {PASSCODE} {spellings[0]}\n".encode())
        b.send_raw(f"LOGIN {PASSCODE} {spellings[1]}\n".encode())
        answers = {a.label: next_line_of(a), b.label: next_line_of(b)}
        winners = [p for p in (a, b) if answers[p.label].startswith(":ok ")]
        losers = [p for p in (a, b) if p not in winners]
        assert len(winners) == 1, f"round {round_}: expected exactly one winner: {answers}"
        loser = losers[0]
        assert answers[loser.label].startswith(":error name-taken "), answers
        loser.expect_closed()
        winner = winners[0]
        winner.name = answers[winner.label].split(" ", 1)[1]
        cluster.announced_join(winner)  # exactly one join line everywhere
        cluster.leave(winner)
    cluster.assert_quiet(watcher)


# ---------------------------------------------------------------------------
# New servers, failures
# ---------------------------------------------------------------------------


def test_a_server_started_later_knows_who_is_in(cluster: Cluster) -> None:
    cluster.start(1)
    alice = cluster.nc_join("alice", 0)
    bob = cluster.nc_join("bob", 0)
    cluster.leave(alice)  # the order is join order, after a leave too
    alice = cluster.nc_join("alice", 0)
    cluster.start_server()
    carol = cluster.join("carol", 1)
    assert cluster.users_line() == "Active Users: bob, alice, carol"
    cluster.assert_quiet(carol)
    cluster.say(bob, "hello from the first server")
    cluster.assert_quiet(bob)


def test_killed_server_users_leave_within_15_seconds(trio: Cluster) -> None:
    alice, bob, carol = trio.members
    start = time.monotonic()
    trio.kill(1)  # bob's server, SIGKILL: no goodbye of any kind
    trio.announced_leave(bob, timeout=KILL_DETECTION_LIMIT)
    took = time.monotonic() - start
    sys.stderr.write(f"\n[cluster] SIGKILLed server: its user left after {took:.1f} s\n")
    assert took < KILL_DETECTION_LIMIT
    trio.assert_quiet(alice)  # :Users: alice, carol
    trio.assert_quiet(carol)
    bob2 = trio.nc_join("bob", 2)  # and the name is free again
    trio.assert_quiet(bob2)


def test_clean_shutdown_announces_at_once(trio: Cluster) -> None:
    alice, bob, carol = trio.members
    dave = trio.nc_join("dave", 1)  # a second user on server 1
    server1 = trio.servers[1]
    start = time.monotonic()
    trio.kill(1, signal.SIGTERM)
    trio.members.remove(bob)
    trio.members.remove(dave)
    for who in (*trio.live(), alice, carol):  # both, in server 1's join order
        who.expect("bob left the chatroom", timeout=3)
        who.expect("dave left the chatroom", timeout=3)
    took = time.monotonic() - start
    assert took < 3, f"took {took:.1f} s: that is the heartbeat, not the shutdown"
    dave.expect(":error shutdown The server is shutting down")
    assert server1.wait() == 0
    server1.assert_no_traceback()
    trio.assert_quiet(alice)


def test_declared_dead_then_back(cluster: Cluster) -> None:
    """A server frozen past its heartbeat (as in a partition) is declared dead;
    when it comes back its users are announced again, keep their connections
    and nothing they typed meanwhile is lost."""
    cluster.start(2)
    alice = cluster.nc_join("alice", 0)
    bob = cluster.nc_join("bob", 1)
    frozen = cluster.servers[1]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        cluster.down.add(1)
        cluster.announced_leave(bob, timeout=KILL_DETECTION_LIMIT)  # alice and server 0
        bob.send("typed while frozen")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    # Server 1 learns what the rest of the room saw (bob left), then bob is
    # back everywhere, and his line reaches everyone once. (Server 1 may show
    # the line before the rest: if its Redis calls timed out while it was
    # frozen, it counts as cut off and shows its own members' lines at once.)
    got = [next_line_of(frozen) for _ in range(3)]
    assert sorted(got) == ["bob joined the chatroom", "bob left the chatroom",
                           "bob: typed while frozen"], got
    assert got.index("bob left the chatroom") < got.index("bob joined the chatroom"), got
    for who in (cluster.servers[0], alice):
        who.expect("bob joined the chatroom")
        who.expect("bob: typed while frozen")
    cluster.down.discard(1)
    cluster.members.append(bob)
    cluster.assert_quiet(bob)  # bob's :Users: alice, bob
    cluster.assert_quiet(alice)


# ---------------------------------------------------------------------------
# Redis going away
# ---------------------------------------------------------------------------


def expect_interleaved(who: Proc | Peer, *groups: list[str]) -> None:
    """The next lines of `who` are exactly the lines of `groups`, each group
    in its own order, interleaved in any way (two servers' backlogs)."""
    want = sorted(line for g in groups for line in g)
    got = [next_line_of(who) for _ in want]
    assert sorted(got) == want, f"{who.label}: got {got}, expected {groups}"
    for g in groups:
        assert [line for line in got if line in g] == g, f"{who.label}: {g} out of order: {got}"


def restart_redis_test(redis: RedisServer, hold: float) -> None:
    cluster = Cluster(redis.url)
    try:
        cluster.start(2)
        s0, s1 = cluster.servers
        alice = cluster.nc_join("alice", 0)
        carol = cluster.nc_join("carol", 0)  # on alice's server
        bob = cluster.nc_join("bob", 1)
        cluster.say(alice, "before")
        redis.stop()
        for server in cluster.live():
            server.expect_err_line()  # "lost Redis ...": one line each
        # Each server's room keeps working on its own: carol sees alice at once.
        during = [f"alice: during {i}" for i in range(3)]
        for i in range(3):
            alice.send(f"during {i}")
        bob.send("bob during")
        for line in during:
            s0.expect(line)
            carol.expect(line)
        s1.expect("bob: bob during")
        # A login now waits for Redis: its name cannot be checked before.
        dave = cluster.nc(1, label="dave@1")
        dave.expect(":hello chatroom 1")
        dave.send(f"LOGIN {PASSCODE} dave")
        if hold:
            # Keep Redis down past every heartbeat's expiry: nobody may be
            # declared dead for that once it is back.
            time.sleep(hold)
        redis.start()
        for server in cluster.live():
            server.expect_err_line(timeout=15)  # "Redis is back ..."
        dave.expect(":ok dave", timeout=15)
        dave.name = "dave"
        # Each side now gets the other's lines, once, each sender's in order.
        from_s1 = ["bob: bob during", "dave joined the chatroom"]
        for who in (s0, alice, carol):
            expect_interleaved(who, from_s1)
        expect_interleaved(s1, during, ["dave joined the chatroom"])
        expect_interleaved(bob, during, ["dave joined the chatroom"])
        if hold:
            time.sleep(11)  # past REAP_GRACE: a wrong "left" would come now
        # Barrier: nothing twice, nobody left. Dave first gets whatever of
        # alice's lines came after his login in the log.
        alice.send(":Users")
        alice.expect("Active Users: alice, carol, bob, dave")
        alice.send("barrier")
        for who in (s0, s1):
            who.expect("alice: searched up active users")
            who.expect("alice: barrier")
        for who in (carol, bob):
            who.expect("alice: barrier")
        seen: list[str | None] = []
        for _ in range(len(during) + 1):
            said = dave.next_line()
            if said == "alice: barrier":
                break
            seen.append(said)
        else:
            dave.fail("dave: no barrier line after alice's lines")
        assert seen == during[len(during) - len(seen):], seen
        cluster.members = [alice, carol, bob, dave]
        cluster.say(bob, "after")
        cluster.assert_quiet(dave)
    finally:
        bad = cluster.close()
    assert not bad, "a process printed a traceback:\n" + "\n".join(bad)


def test_redis_restart_mid_conversation(persistent_redis: RedisServer) -> None:
    restart_redis_test(persistent_redis, hold=0)


@pytest.mark.slow
def test_redis_down_longer_than_the_heartbeat(persistent_redis: RedisServer) -> None:
    restart_redis_test(persistent_redis, hold=7)


def test_a_full_backlog_refuses_lines_but_not_exit(persistent_redis: RedisServer) -> None:
    """-redis-backlog bounds what waits for Redis: past it a line is refused
    (and never reaches anyone, then or later); :Exit still goes through."""
    redis = persistent_redis
    cluster = Cluster(redis.url)
    try:
        cluster.start_server("-redis-backlog", "3")
        cluster.start_server()
        s0, s1 = cluster.servers
        alice = cluster.nc_join("alice", 0)
        carol = cluster.nc_join("carol", 0)  # on alice's server
        bob = cluster.nc_join("bob", 1)
        redis.stop()
        for server in cluster.live():
            server.expect_err_line()  # "lost Redis ..."
        kept = [f"alice: kept {i}" for i in range(3)]
        for i in range(3):
            alice.send(f"kept {i}")
        for line in kept:
            s0.expect(line)
            carol.expect(line)
        alice.send("refused")
        alice.expect(":error backlog Too many lines wait for the room's log; "
                     "this one was not sent")
        alice.send(":Exit")
        alice.expect(":bye")
        s0.expect("alice left the chatroom")
        carol.expect("alice left the chatroom")
        redis.start()
        for server in cluster.live():
            server.expect_err_line(timeout=15)  # "Redis is back ..."
        for who in (s1, bob):
            for line in kept:
                who.expect(line, timeout=15)
            who.expect("alice left the chatroom")
        # Nothing of "refused" came before a barrier. It is sent from bob's
        # server: alice's may still be writing its backlog out for a moment,
        # and refuses lines (rightly) until it has.
        bob.send("barrier")
        for who in (s0, s1, carol):
            who.expect("bob: barrier")
        cluster.members = [carol, bob]  # in join order
        cluster.assert_quiet(via=bob)
    finally:
        bad = cluster.close()
    assert not bad, "a process printed a traceback:\n" + "\n".join(bad)


# ---------------------------------------------------------------------------
# The command line around -redis
# ---------------------------------------------------------------------------


def test_missing_redis_package_is_one_line(cluster: Cluster, tmp_path: Path) -> None:
    """-redis without redis-py: one line naming what to install, status 2."""
    shadow = tmp_path / "no-redis"
    (shadow / "redis").mkdir(parents=True)
    (shadow / "redis" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'redis'\", name='redis')\n")
    env = child_env()
    env["PYTHONPATH"] = str(shadow)
    proc = cluster.spawn_server("-start", "-port", "0", "-passcode", PASSCODE,
                                "-redis", cluster.url, env=env)
    line = expect_one_error_line(proc, status=2)
    assert "redis" in line and "pip install" in line, line


def test_unreachable_redis_is_one_line(cluster: Cluster) -> None:
    proc = cluster.spawn_server("-start", "-port", "0", "-passcode", PASSCODE,
                                "-redis", f"redis://127.0.0.1:{free_port()}/0")
    line = expect_one_error_line(proc, status=1)
    assert "Redis" in line, line


def test_bad_redis_url_is_one_line(cluster: Cluster) -> None:
    proc = cluster.spawn_server("-start", "-port", "0", "-passcode", PASSCODE,
                                "-redis", "http://127.0.0.1/0")
    expect_one_error_line(proc, status=2)


NO_REDIS_CHECK = """
import sys
import server
args = server.build_parser().parse_args(["-start", "-port", "0", "-passcode", "abc12"])
server.limits_from(args)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("redis", "chatroom_ext"))
assert not loaded, loaded
print("clean")
"""


def test_no_redis_import_without_the_flag(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", NO_REDIS_CHECK], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=30)
    assert (out.returncode, out.stdout, out.stderr) == (0, "clean\n", "")


def test_a_running_server_without_the_flag_imports_no_redis(cluster: Cluster) -> None:
    """The real thing: a server started without -redis, with `-X importtime`
    listing every module it imports on stderr."""
    proc = cluster.spawn_server("-start", "-port", "0", "-passcode", PASSCODE,
                                python_args=["-X", "importtime"])
    proc.expect_match(r"Server started on port \d+\. Accepting connections")
    proc.signal(signal.SIGINT)
    proc.wait()
    names = [line.rsplit("|", 1)[-1].strip() for line in proc.err.seen if "|" in line]
    assert "asyncio" in names  # the listing is there
    assert not [n for n in names if n.split(".")[0] in ("redis", "chatroom_ext")]


def test_a_flood_is_slowed_where_the_flooder_is_connected(trio: Cluster) -> None:
    """The member budget is kept by the flooder's own server, before its lines
    reach the shared log: with the defaults (50 lines at once, then 10 a
    second), 80 lines sent at once reach every server and member in order,
    the last of them about three seconds after the first."""
    alice, bob, carol = trio.members
    start = time.monotonic()
    carol.send_raw(b"".join(b"flood %d\n" % k for k in range(80)))
    for k in range(80):
        for who in (*trio.live(), alice, bob):
            who.expect(f"carol: flood {k}", timeout=10)
    took = time.monotonic() - start
    assert 2.0 < took < 8.0, took  # 30 lines past the burst at 10 a second
