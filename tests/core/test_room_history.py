"""The room's history in the core: what is kept, what a new member is sent.

No event loop and no clock: the core is driven call by call (the Wire of
test_server_core), with the time passed in.
"""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st
from test_server_core import NOW, Wire

from server import History, Limits, Past, utc_stamp

STAMP = utc_stamp(NOW)  # 2025-09-24T12:31:44Z


def wire(keep: int = 10, max_age: float = 7 * 86400, **limits: int) -> Wire:
    return Wire(Limits(**limits), history=History(keep, max_age, "r."))  # type: ignore[arg-type]


def test_utc_stamp() -> None:
    assert STAMP == "2025-09-24T12:31:44Z"


def test_a_late_joiner_gets_the_public_lines_in_order_with_times_then_who_is_here() -> None:
    w = wire()
    w.login(1, "alice")
    w.login(2, "bob")
    w.send(1, b"Hello Room\n:)\n:mytime\n:Users\n:Msg bob psst\n:Msg zed hi\n\\:)\n")
    w.send(2, b"hi alice\n")
    w.login(3, "carol")
    assert w.got[3] == (
        b":hello chatroom 1\n:ok carol\n"
        + b"".join(f":past r.{i} {STAMP} {line}\n".encode() for i, line in enumerate([
            "alice joined the chatroom", "bob joined the chatroom", "alice: Hello Room",
            "alice: [feeling happy]", "alice: Wed Sep 24 12:31:44 2025", "alice: :)",
            "bob: hi alice"], 1))
        + b":here alice bob carol\n")
    # carol's own join is live for the others, and next in the history
    assert w.got[1].endswith(b"carol joined the chatroom\n")
    w.login(4, "dave")
    assert f":past r.8 {STAMP} carol joined the chatroom\n:here alice bob carol dave\n".encode() \
        in w.got[4]


def test_private_lines_and_answers_are_never_kept() -> None:
    w = wire()
    w.login(1, "alice")
    w.login(2, "bob")
    w.send(1, b":Msg bob the secret\n:Users\n:Msg nobody x\n:Msg bob\n" + b"x" * 3000 + b"\n")
    history = w.core.history
    assert history is not None
    kept = [p.line for p in history.lines(NOW)]
    assert kept == ["alice joined the chatroom", "bob joined the chatroom"]


def test_leaving_is_kept_both_ways() -> None:
    w = wire()
    w.login(1, "alice")
    w.login(2, "bob")
    w.send(2, b":Exit\n")
    w.core.lost(1, NOW + 3600)  # an hour later, when nothing else happened
    w.login(3, "carol")
    assert re.findall(rb":past \S+ (\S+) (.*)\n", w.got[3]) == [
        (STAMP.encode(), b"alice joined the chatroom"),
        (STAMP.encode(), b"bob joined the chatroom"),
        (STAMP.encode(), b"bob left the chatroom"),
        (utc_stamp(NOW + 3600).encode(), b"alice left the chatroom")]
    assert w.got[3].endswith(b":here carol\n")


def test_only_the_last_lines_and_none_too_old() -> None:
    w = wire(keep=3, max_age=60)
    w.login(1, "alice")
    w.send(1, b"one\ntwo\nthree\nfour\n")
    w.login(2, "bob")
    assert re.findall(rb":past (\S+) \S+ (.*)\n", w.got[2]) == [
        (b"r.3", b"alice: two"), (b"r.4", b"alice: three"), (b"r.5", b"alice: four")]
    w.send(1, b"later\n", now=NOW + 61)
    w.connect(3)
    w.send(3, b"LOGIN pw carol\n", now=NOW + 61)
    assert re.findall(rb":past (\S+) \S+ (.*)\n", w.got[3]) == [(b"r.7", b"alice: later")]
    # (bob joined at NOW: 61 seconds before, too old)


def test_without_history_nothing_changes() -> None:
    w = Wire()
    w.login(1, "alice")
    w.send(1, b"hi\n")
    w.login(2, "bob")
    assert w.got[2] == b":hello chatroom 1\n:ok bob\n"


def test_a_replay_never_owes_more_than_its_bytes() -> None:
    history = History(100, 3600, "r.", max_bytes=200)
    for i in range(50):
        history.record(f"alice: line {i}", NOW)
    replay = history.replay(NOW)
    assert len(replay) <= 200
    n = len(replay.decode().splitlines())
    assert replay == "".join(f":past r.{i + 1} {STAMP} alice: line {i}\n"
                             for i in range(50 - n, 50)).encode()
    assert len(replay) + len(f":past r.{50 - n} {STAMP} alice: line {49 - n}\n") > 200


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=20), st.floats(0, 100)), max_size=40),
       st.integers(1, 10), st.floats(1, 50))
def test_ids_never_repeat_and_the_newest_are_kept(said: list[tuple[str, float]], keep: int,
                                                  max_age: float) -> None:
    history = History(keep, max_age, "p.")
    clock = NOW
    for text, step in said:
        clock += step
        history.record(text, clock)
    lines = history.lines(clock)
    ids = [p.id for p in lines]
    assert len(set(ids)) == len(ids)
    assert ids == [f"p.{n}" for n in range(len(said) - len(lines) + 1, len(said) + 1)]
    assert all(p.when >= clock - max_age for p in lines)
    assert len(lines) <= keep


def test_a_history_goes_on_from_where_a_file_left_it() -> None:
    old = [Past("f.7", NOW, "alice: before the restart")]
    w = Wire(history=History(10, 3600, "f.", first=8, lines=old))
    w.login(1, "bob")
    assert (f":past f.7 {STAMP} alice: before the restart\n"
            f":past f.8 {STAMP} bob joined the chatroom\n").encode() not in w.got[1]
    w.login(2, "carol")
    assert (f":past f.7 {STAMP} alice: before the restart\n"
            f":past f.8 {STAMP} bob joined the chatroom\n:here bob carol\n").encode() in w.got[2]
