"""What a cluster's log needs of the core to keep the room's history itself:
public_lines (an input's public lines from the input alone), History.record
with the log's ids, History.clear, and a core with a log that records nothing
itself."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_server_core import NOW, LaterLog, Wire

from server import Deliver, Gone, History, Input, Joining, Past, Room, Typed, public_lines

TEXTS = st.sampled_from([
    "hello", ":)", ":(", ":mytime", ":+1hr", ":Users", ":Exit", ":Msg bob hi", ":Msg zed hi",
    ":Msg", "\\:)", "", "  ", ":Users x", "héllo ✓"])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["J", "T", "G"]),
                          st.sampled_from(["alice", "bob", "carol"]), TEXTS), max_size=30))
def test_public_lines_are_what_the_room_broadcasts_for_an_input_that_counts(
        steps: list[tuple[str, str, str]]) -> None:
    room = Room("pw")
    for kind, name, text in steps:
        inp: Input = (Joining(name, "t") if kind == "J" else Typed(name, text, NOW)
                      if kind == "T" else Gone(name))
        counts = (name in room) != (kind == "J")  # a member's act, or a free name's join
        said = [o.line for o in room.step(inp) if type(o) is Deliver and o.to is None]
        if counts:
            assert public_lines(inp) == said
        else:
            assert said == []


def test_record_with_ids_from_elsewhere_and_clear() -> None:
    h = History(3, 3600, "x.")
    h.record("a", NOW - 2, "1700-0")
    h.record("b", NOW - 1, "1700-1")
    h.record("c", NOW)
    assert h.lines(NOW) == [Past("1700-0", NOW - 2, "a"), Past("1700-1", NOW - 1, "b"),
                            Past("x.3", NOW, "c")]
    first = h.replay(NOW)
    h.clear()
    assert h.lines(NOW) == [] and h.replay(NOW) == b""
    h.record("a", NOW - 2, "1700-0")
    assert h.replay(NOW) != first and h.replay(NOW).startswith(b":past 1700-0 ")


def test_with_a_log_the_core_records_nothing_itself() -> None:
    log = LaterLog()
    w = Wire(log=log, history=History(10, 3600, "r."))
    w.login(1, "alice")
    for inp in log.held:
        w.core.apply(inp)
    log.held.clear()
    w.take()
    w.send(1, b"hello\n")
    for inp in log.held:
        w.core.apply(inp)
    w.take()
    assert w.core.history is not None and len(w.core.history) == 0  # the log records
    assert b":here alice\n" in w.got[1]
