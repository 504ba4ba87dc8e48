"""The chat page's pure logic, run alone in a blank page of a real browser:
the catch-up after a lost connection (which replayed lines to show) and the
time stamps of replayed lines.

The block is cut from chatroom_ext/page.html between its two markers, so what
runs here is the page's own code, byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from webwire import repo_file

BEGIN = "  // -- pure: "
END = "  // -- end of the pure block"


def pure_block() -> str:
    html = repo_file("chatroom_ext", "page.html").read_text("utf-8")
    start = html.index(BEGIN)
    return html[start:html.index(END, start)]


@pytest.fixture(scope="module")
def blank(chromium: Any) -> Iterator[Any]:
    """A blank page in a browser on Kolkata's time (UTC+05:30, so that local
    time is not UTC with the date cut off)."""
    context = chromium.new_context(timezone_id="Asia/Kolkata")
    page = context.new_page()
    yield page
    context.close()


def catch_up(page: Any, past: list[tuple[str, str]], last_id: str | None, live: list[str],
             mine: str | None, cut: bool = False) -> list[str]:
    """The lines catchUp shows of `past` ((id, line) pairs, oldest first)."""
    code = ("([past, lastId, live, mine, cut]) => {\n" + pure_block() +
            "\n  return catchUp(past.map(([id, line]) => ({id, time: '', line})),"
            " lastId, live, mine, cut).map(p => p.line);\n}")
    return list(page.evaluate(code, [past, last_id, live, mine, cut]))


def stamp(page: Any, iso: str, now: str) -> str:
    code = "([iso, now]) => {\n" + pure_block() + "\n  return stamp(iso, new Date(now));\n}"
    return str(page.evaluate(code, [iso, now]))


def replay(*lines: str, first: int = 1) -> list[tuple[str, str]]:
    return [(str(first + i), line) for i, line in enumerate(lines)]


def test_the_first_login_shows_everything(blank: Any) -> None:
    past = replay("alice: hi", "erin: my own line, from before", "bob joined the chatroom")
    assert catch_up(blank, past, None, [], None) == [line for _, line in past]


def test_after_the_last_id_only_what_was_not_seen_live(blank: Any) -> None:
    past = replay("alice: old", "bob: old", "alice: seen live", "erin: typed", "bob: seen live",
                  "carol joined the chatroom", "carol: said while away")
    # lastId 2: the previous replay ended at "bob: old"; erin typed her own line.
    shown = catch_up(blank, past, "2", ["alice: seen live", "bob: seen live"], "erin")
    assert shown == ["carol joined the chatroom", "carol: said while away"]


def test_repeated_text_is_matched_in_order(blank: Any) -> None:
    past = replay("bob: ok", "bob: ok", "bob: ok")
    assert catch_up(blank, past, "1", ["bob: ok"], "erin") == ["bob: ok"]
    assert catch_up(blank, past, None, [], "erin") == ["bob: ok"] * 3


def test_a_lost_last_id_keeps_the_longest_matching_suffix_of_live(blank: Any) -> None:
    # The replay no longer holds lastId ("1" was dropped): live's first line is
    # not in it either, its last two are, in order.
    past = replay("x: a", "y: b", "x: c", "y: d", first=5)
    shown = catch_up(blank, past, "1", ["z: gone", "y: b", "x: c"], "erin")
    assert shown == ["x: a", "y: d"]
    # A live line that is not in the replay cuts live after it.
    shown = catch_up(blank, past, "1", ["y: b", "q: never kept", "y: d"], "erin")
    assert shown == ["x: a", "y: b", "x: c"]


def test_own_lines_are_skipped_only_after_a_first_login(blank: Any) -> None:
    past = replay("erin: mine", "erin joined the chatroom", "erin: [feeling happy]")
    assert catch_up(blank, past, None, [], "erin") == ["erin joined the chatroom"]
    assert catch_up(blank, past, None, [], None) == [line for _, line in past]


def test_a_cut_live_matches_as_a_suffix(blank: Any) -> None:
    past = replay("a: 1", "a: 2", "a: 3", "a: 4")
    # lastId found, but live lost its oldest lines: "a: 2" was shown then cut.
    assert catch_up(blank, past, "1", ["a: 3"], None, cut=True) == ["a: 2", "a: 4"]


def test_the_time_of_a_replayed_line_is_local(blank: Any) -> None:
    # 16:05 UTC is 21:35 in Kolkata; 20:00 UTC is already the next day there.
    assert stamp(blank, "2026-12-02T16:05:03Z", "2026-12-02T17:00:00Z") == "21:35"
    assert stamp(blank, "2026-12-01T16:05:03Z", "2026-12-02T17:00:00Z") == "2026-12-01 21:35"
    assert stamp(blank, "2026-12-02T20:00:00Z", "2026-12-02T17:00:00Z") == "2026-12-03 01:30"
    assert stamp(blank, "not a time", "2026-12-02T17:00:00Z") == "not a time"
