"""History in a cluster (`-redis URL -history N`, docs/CLUSTER.md "History"):
the room's last public lines come from the Redis log, so a member joining on
any server, one started later or restarted included, is replayed the same
lines with the same ids and times. Every wait is for a line."""

from __future__ import annotations

import re
import signal
from datetime import datetime, timezone
from typing import TYPE_CHECKING, cast

import pytest
from cluster_harness import Cluster, RedisServer
from harness import PASSCODE, Peer, Proc, expect_one_error_line

if TYPE_CHECKING:  # imported where used: without redis-py the fixtures skip (fail under CI)
    import redis

pytestmark = pytest.mark.e2e

PAST = re.compile(r":past (\S+) (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) (.*)")
KEYS = {"chatroom:epoch", "chatroom:log", "chatroom:members", "chatroom:order",
        "chatroom:seqs", "chatroom:nodes"}  # and per server: node:<id>, owned:<id>

Past = tuple[str, str, str]  # id, time, line


def history_join(cluster: Cluster, name: str, on: int) -> tuple[Peer, list[Past], str]:
    """`name` logs in on server `on` with nc: its replay, its :here line; then
    every server and member already in sees it join."""
    peer = cluster.nc(on, label=f"{name}@{on}")
    peer.expect(":hello chatroom 1")
    peer.send(f"LOGIN {PASSCODE} {name}")
    peer.expect(f":ok {name}")
    pasts: list[Past] = []
    while True:
        line = peer.next_line()
        assert line is not None, f"{name}: the replay ended before :here"
        if line.startswith(":here"):
            break
        m = PAST.fullmatch(line)
        assert m, f"{name}: not a :past line: {line!r}"
        pasts.append((m.group(1), m.group(2), m.group(3)))
    peer.name = name
    cluster.announced_join(peer)
    return peer, pasts, line


def lines_of(pasts: list[Past]) -> list[str]:
    return [line for _, _, line in pasts]


def test_a_member_on_b_is_replayed_what_was_said_on_a_before_b_started(
        cluster: Cluster) -> None:
    cluster.start_server("-history", "50")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    alice, pasts, here = history_join(cluster, "alice", 0)
    assert (pasts, here) == ([], ":here alice")
    bob, _, _ = history_join(cluster, "bob", 0)
    cluster.say(alice, "Hello Room")
    cluster.say(bob, ":)", "[feeling happy]")
    alice.send(":Msg bob the secret")  # private: never replayed
    bob.expect("[Message from alice]: the secret")
    bob.send(":Users")  # an answer to one member: never replayed
    bob.expect(cluster.users_line())
    cluster.servers[0].expect("alice: send message to bob")
    cluster.servers[0].expect("bob: searched up active users")
    cluster.assert_quiet(alice)  # ":Users" and "alice: barrier 1"
    said = ["alice joined the chatroom", "bob joined the chatroom", "alice: Hello Room",
            "bob: [feeling happy]", "alice: barrier 1"]

    cluster.start_server("-history", "50")  # B: all of the above happened before it
    carol, on_b, here = history_join(cluster, "carol", 1)
    assert lines_of(on_b) == said
    assert here == ":here alice bob carol"
    assert len({pid for pid, _, _ in on_b}) == len(on_b), "ids are unique"
    after = datetime.now(timezone.utc)
    for _, stamp, _ in on_b:
        when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
        assert before <= when <= after, stamp

    cluster.say(carol, "said on B")
    dave, on_a, _ = history_join(cluster, "dave", 0)  # and back on A: the same lines
    assert on_a[:len(on_b)] == on_b, "the same ids and times on every server"
    assert lines_of(on_a[len(on_b):]) == ["carol joined the chatroom", "carol: said on B"]
    erin, on_b2, _ = history_join(cluster, "erin", 1)
    assert on_b2 == [*on_a, on_b2[-1]]
    assert on_b2[-1][2] == "dave joined the chatroom"
    cluster.assert_quiet(erin)


def test_a_restarted_server_still_replays(cluster: Cluster) -> None:
    cluster.start_server("-history", "4")
    cluster.start_server("-history", "4")
    alice, _, _ = history_join(cluster, "alice", 0)
    bob, _, _ = history_join(cluster, "bob", 1)
    for i in range(6):
        cluster.say(alice if i % 2 else bob, f"line {i}")
    cluster.kill(1, signal.SIGINT)  # B stops cleanly: bob leaves
    cluster.members.remove(bob)
    watchers: list[Proc | Peer] = [*cluster.live(), alice]
    for who in watchers:
        who.expect("bob left the chatroom")
    assert cluster.servers[1].wait() == 0
    cluster.say(alice, "while B is away")
    cluster.start_server("-history", "4")  # B again (server 2), new process
    carol, on_b, _ = history_join(cluster, "carol", 2)
    assert lines_of(on_b) == ["alice: line 3", "bob: line 4", "alice: line 5",
                              "bob left the chatroom", "alice: while B is away"][-4:]
    dave, on_a, _ = history_join(cluster, "dave", 0)
    assert on_a == [*on_b[1:], on_a[-1]]  # the same ids, the oldest gone (keep 4)
    assert on_a[-1][2] == "carol joined the chatroom"
    cluster.assert_quiet(dave)


def test_a_lost_name_race_is_never_in_the_history(cluster: Cluster) -> None:
    """Two logins race for a name; the loser's Joining is in the log too, but
    no server, running or started later, keeps a line for it."""
    cluster.start_server("-history", "100")
    cluster.start_server("-history", "100")
    watcher, _, _ = history_join(cluster, "watcher", 0)
    for round_ in range(4):
        name = f"racer{round_}"
        a, b = cluster.nc(0, label=f"{name}@0"), cluster.nc(1, label=f"{name}@1")
        for peer in (a, b):
            peer.expect(":hello chatroom 1")
        a.send_raw(f"LOGIN {PASSCODE} {name}\n".encode())
        b.send_raw(f"LOGIN {PASSCODE} {name}\n".encode())
        answers = {p.label: p.next_line() for p in (a, b)}
        winner = next(p for p in (a, b) if answers[p.label] == f":ok {name}")
        loser = b if winner is a else a
        assert answers[loser.label] == f":error name-taken The username {name} is already in " \
                                       "the chatroom", answers
        while (line := winner.next_line()) is not None and not line.startswith(":here"):
            pass
        winner.name = name
        cluster.announced_join(winner)
        cluster.leave(winner)
    cluster.start_server("-history", "100")
    expected = ["watcher joined the chatroom"]
    for round_ in range(4):
        expected += [f"racer{round_} joined the chatroom", f"racer{round_} left the chatroom"]
    replays = [history_join(cluster, f"new{on}", on)[1] for on in (0, 1, 2)]
    assert lines_of(replays[0]) == expected
    assert replays[1][:-1] == replays[0]
    assert replays[2][:-2] == replays[0]
    cluster.assert_quiet(watcher)


def test_lines_typed_while_redis_was_away_are_kept_once(persistent_redis: RedisServer) -> None:
    """Alice's server shows her lines at once while Redis is down; they enter
    the history once Redis has them, once, on every server."""
    cluster = Cluster(persistent_redis.url)
    try:
        cluster.start_server("-history", "20")
        cluster.start_server("-history", "20")
        s0, s1 = cluster.servers
        alice, _, _ = history_join(cluster, "alice", 0)
        bob, _, _ = history_join(cluster, "bob", 1)
        cluster.say(alice, "before")
        persistent_redis.stop()
        for server in cluster.live():
            server.expect_err_line()  # "lost Redis ..."
        during = [f"alice: during {i}" for i in range(3)]
        for line in during:
            alice.send(line.split(": ", 1)[1])
            s0.expect(line)  # shown on alice's server at once
        persistent_redis.start()
        for server in cluster.live():
            server.expect_err_line(timeout=15)  # "Redis is back ..."
        for who in (s1, bob):
            for line in during:
                who.expect(line, timeout=15)
        cluster.say(bob, "after")
        want = ["alice joined the chatroom", "bob joined the chatroom", "alice: before",
                *during, "bob: after"]
        _, on_0, _ = history_join(cluster, "carol", 0)
        assert lines_of(on_0) == want
        _, on_1, _ = history_join(cluster, "dave", 1)
        assert on_1[:-1] == on_0
        cluster.start_server("-history", "20")
        erin, on_2, _ = history_join(cluster, "erin", 2)
        assert on_2[:-1] == on_1
        cluster.assert_quiet(erin)
    finally:
        bad = cluster.close()
    assert not bad, "a process printed a traceback:\n" + "\n".join(bad)


def fill(r: redis.Redis, n: int) -> None:
    """`n` entries no server reads (kind X), trimmed as the servers' own are."""
    with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd("chatroom:log", {"k": "X", "i": str(i)}, maxlen=100_000, approximate=True)
            if i % 5000 == 4999:
                pipe.execute()
        pipe.execute()


def test_the_log_that_holds_the_history_stays_bounded(cluster: Cluster) -> None:
    """The history is the log's tail: no key of its own, and the log stays
    trimmed (STREAM_MAXLEN, about 100,000 entries) however much is said. A
    long run of entries with no public line (here filler; in life :Users and
    :Msg) is read past."""
    import redis

    bound = 100_000 + 1000  # MAXLEN ~ trims whole nodes of entries
    r = redis.Redis.from_url(cluster.url, decode_responses=True)
    try:
        fill(r, 120_000)
        cluster.start_server("-history", "3")
        alice, pasts, _ = history_join(cluster, "alice", 0)
        assert pasts == []
        for i in range(3):
            cluster.say(alice, f"before {i}")
        fill(r, 50_000)
        cluster.say(alice, "after")
        assert int(r.xlen("chatroom:log")) <= bound
        cluster.start_server("-history", "3")  # reads back past 50,000 entries
        bob, on_b, _ = history_join(cluster, "bob", 1)
        assert lines_of(on_b) == ["alice: before 1", "alice: before 2", "alice: after"]
        keys = cast("list[str]", r.keys("chatroom:*"))
        extra = {k for k in keys if k not in KEYS
                 and not k.startswith(("chatroom:node:", "chatroom:owned:"))}
        assert not extra, f"keys beyond the cluster's own: {extra}"
    finally:
        r.close()
    cluster.assert_quiet(bob)


def test_history_db_with_redis_is_one_line(cluster: Cluster) -> None:
    proc = cluster.spawn_server("-start", "-port", "0", "-passcode", PASSCODE,
                                "-redis", cluster.url, "-history-db", "/nonexistent/h.db")
    line = expect_one_error_line(proc, status=2)
    assert "in a cluster the history is kept in Redis" in line, line


def test_without_history_a_cluster_replays_nothing(cluster: Cluster) -> None:
    cluster.start(2)
    alice = cluster.nc_join("alice", 0)
    cluster.say(alice, "before")
    carol = cluster.nc_join("carol", 1)
    alice.send("after")
    assert carol.next_line() == "alice: after"  # the first line after :ok is live
