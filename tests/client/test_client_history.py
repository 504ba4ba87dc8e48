"""Unit tests of client.py's history, colour and -reconnect rules: :past and
:here, the time of a replayed line, catching up after a lost connection, the
retry delays, when to paint and what. No sockets, no processes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

import client
from client import Event, History, Kind, Past

UTC = timezone.utc
NOW = datetime(2026, 12, 2, 16, 30, tzinfo=UTC)


# --- :past and :here -------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (
            ":past 17 2026-12-02T16:05:03Z alice: Hello Room",
            Event(Kind.PAST, "alice: Hello Room",
                  past=Past("17", "2026-12-02T16:05:03Z", "alice: Hello Room")),
        ),
        (
            ":past a-1 2026-12-02T16:05:03Z bob:  two  spaces ",
            Event(Kind.PAST, "bob:  two  spaces ",
                  past=Past("a-1", "2026-12-02T16:05:03Z", "bob:  two  spaces ")),
        ),
        (":past 17 2026-12-02T16:05:03Z", Event(Kind.UNKNOWN, "17 2026-12-02T16:05:03Z")),
        (":past 17", Event(Kind.UNKNOWN, "17")),
        (":past", Event(Kind.UNKNOWN)),
        (":here alice bob erin", Event(Kind.HERE, "alice bob erin")),
        (":here", Event(Kind.HERE)),
        (":Past 1 2 x", Event(Kind.UNKNOWN, "1 2 x")),
        ("past 1 2 x", Event(Kind.DISPLAY, "past 1 2 x")),
    ],
)
def test_classify_past_and_here(line: str, event: Event) -> None:
    assert client.classify(line) == event


@pytest.mark.parametrize(
    ("names", "line"),
    [("alice bob erin", "Active Users: alice, bob, erin"), ("erin", "Active Users: erin"),
     ("", "Active Users: ")],
)
def test_here_is_shown_as_the_users_answer(names: str, line: str) -> None:
    assert client.users_line(names) == line


# --- the time of a replayed line ------------------------------------------------------


@pytest.mark.parametrize(
    ("stamp", "offset", "shown"),
    [
        ("2026-12-02T16:05:03Z", 0, "16:05"),
        ("2026-12-02T16:05:59Z", 1, "17:05"),
        ("2026-12-02T23:30:00Z", -5, "18:30"),  # 16:30 UTC is 11:30 there: the same day
        ("2026-12-01T16:05:00Z", 0, "Dec 01 16:05"),
        ("2026-12-02T01:00:00Z", -5, "Dec 01 20:00"),  # yesterday there, today in UTC
        ("2026-01-09T08:00:00Z", 0, "Jan 09 08:00"),
        ("2025-12-31T23:59:00Z", 0, "2025-12-31 23:59"),
        ("2025-12-31T23:59:00Z", 1, "Jan 01 00:59"),
        ("yesterday", 0, "yesterday"),
        ("2026-12-02 16:05:03", 0, "2026-12-02 16:05:03"),
    ],
)
def test_past_time_is_local(stamp: str, offset: int, shown: str) -> None:
    zone = timezone(timedelta(hours=offset))
    assert client.past_time(stamp, NOW, zone) == shown


def test_past_display() -> None:
    past = Past("17", "2026-12-02T16:05:03Z", "alice: Hello Room")
    assert client.past_display(past, NOW, UTC) == "[16:05] alice: Hello Room"


# --- catch_up ------------------------------------------------------------------------


def pasts(*lines: str, first: int = 1) -> list[Past]:
    return [Past(str(n), "2026-12-02T16:05:03Z", line) for n, line in enumerate(lines, first)]


def lines_of(shown: list[Past]) -> list[str]:
    return [past.line for past in shown]


def test_first_login_shows_everything() -> None:
    replay = pasts("alice: hi", "bob: yo", "alice joined the chatroom")
    assert client.catch_up(replay, None, [], None) == replay


def test_after_last_id_skips_live_and_own_lines() -> None:
    replay = pasts("carol: old", "bob: seen live", "alice: typed", "bob: missed", "bob: seen live")
    shown = client.catch_up(replay, "1", ["bob: seen live"], "alice")
    assert lines_of(shown) == ["bob: missed", "bob: seen live"]  # the same text, said again


def test_last_id_out_of_the_window_keeps_only_the_end_of_live_in_it() -> None:
    # live: x, y, z; the window starts at y; then w was lost in flight.
    replay = pasts("bob: y", "bob: z", "bob: w", first=50)
    shown = client.catch_up(replay, "3", ["bob: x", "bob: y", "bob: z"], "alice")
    assert lines_of(shown) == ["bob: w"]


def test_own_lines_are_never_shown_again_but_others_naming_me_are() -> None:
    replay = pasts("alice: mine", "alicex: not mine", "bob: alice: quoted")
    assert lines_of(client.catch_up(replay, "0", [], "alice")) == [
        "alicex: not mine", "bob: alice: quoted"]


def test_history_remembers_across_logins() -> None:
    history = History("alice", remember=True)
    for past in pasts("bob: one", "alice: from yesterday", "bob: two"):
        history.add(past)
    assert lines_of(history.end()) == ["bob: one", "alice: from yesterday", "bob: two"]
    assert history.last_id == "3"
    history.heard("bob: three")
    history.heard("[Message from bob]: psst")  # private: never kept by a server
    history.heard("Active Users: alice, bob")
    assert history.live == ["bob: three"]
    history.begin()
    history.add(pasts("bob: one")[0])  # a replay cut by a lost connection
    history.begin()
    for past in pasts("bob: one", "alice: from yesterday", "bob: two", "bob: three",
                      "alice: me", "bob: four"):
        history.add(past)
    assert lines_of(history.end()) == ["bob: four"]
    assert (history.last_id, history.live) == ("6", [])


def test_history_without_remember_keeps_no_live_lines() -> None:
    history = History("alice")
    history.heard("bob: hi")
    assert history.live == []


def test_history_forgets_the_last_id_past_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "LIVE_LIMIT", 3)
    history = History("alice", remember=True)
    history.add(pasts("bob: zero")[0])
    history.end()
    for n in range(5):
        history.heard(f"bob: {n}")
    assert history.live == ["bob: 2", "bob: 3", "bob: 4"]
    assert history.last_id is None


@st.composite
def sessions(draw: st.DrawFn) -> tuple[list[Past], str | None, list[str], list[int]]:
    """A room's history as one client lived it: the window of the server's
    history (`keep` lines); a first login at `a` (replay of the lines before
    it), lines a..b received live (not its own: a server does not echo
    them), then the lines from b on not received (lost in flight, or said
    while it was away), and a new login at d. Texts are unique, as the ids
    make them. Returns the new replay, the last id and the live lines
    remembered, and the indexes of the lines the client must show."""
    size = draw(st.integers(0, 40))
    own = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    history = [
        Past(f"id{n}", "2026-12-02T16:05:03Z", f"{'alice' if own[n] else 'bob'}: line {n}")
        for n in range(size)
    ]
    keep = draw(st.integers(1, 50))
    a, b, d = sorted(draw(st.lists(st.integers(0, size), min_size=3, max_size=3)))
    first_replay = history[max(0, a - keep) : a]
    last_id = first_replay[-1].ident if first_replay else None
    live = [history[n].line for n in range(a, b) if not own[n]]
    replay = history[max(0, d - keep) : d]
    expected = [n for n in range(max(0, d - keep), d) if n >= b and not own[n]]
    return replay, last_id, live, expected


@given(sessions())
def test_catch_up_shows_exactly_the_lines_not_shown_yet(
    session: tuple[list[Past], str | None, list[str], list[int]],
) -> None:
    replay, last_id, live, expected = session
    shown = client.catch_up(replay, last_id, live, "alice")
    assert [past.ident for past in shown] == [f"id{n}" for n in expected]


@given(
    st.lists(st.sampled_from(["alice: a", "bob: a", "bob: b", "carol: a"]), max_size=20),
    st.lists(st.sampled_from(["bob: a", "bob: b", "carol: a"]), max_size=10),
    st.integers(0, 25),
)
def test_catch_up_with_repeated_texts_shows_each_line_once_in_order(
    lines: list[str], live: list[str], last: int
) -> None:
    replay = pasts(*lines)
    shown = client.catch_up(replay, str(last), live, "alice")
    ids = [int(past.ident) for past in shown]
    assert ids == sorted(set(ids))
    assert all(not past.line.startswith("alice: ") for past in shown)
    if last >= 1 and last <= len(lines):
        assert all(n > last for n in ids)


# --- -reconnect's delays -----------------------------------------------------------


def test_retry_delays_grow_to_30_seconds() -> None:
    assert [client.retry_delay(n, 0.5) for n in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert client.retry_delay(0, 0.0) == 0.8  # 0.75 rounded to tenths
    assert client.retry_delay(5, 1.0) == 37.5


# --- colours -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("terminal", "environ", "wanted"),
    [
        (True, {}, True),
        (False, {}, False),
        (True, {"NO_COLOR": "1"}, False),
        (True, {"NO_COLOR": "0"}, False),  # any value but "" (no-color.org)
        (True, {"NO_COLOR": ""}, True),
        (False, {"NO_COLOR": ""}, False),
        (True, {"TERM": "dumb"}, False),
        (True, {"TERM": "xterm-256color"}, True),
    ],
)
def test_colour_wanted(terminal: bool, environ: dict[str, str], wanted: bool) -> None:
    assert client.colour_wanted(terminal, environ) is wanted


@pytest.mark.parametrize(
    ("line", "span"),
    [
        ("alice: Hello Room", (0, 5)),
        ("bob: [feeling happy]", (0, 3)),
        ("bob joined the chatroom", (0, 3)),
        ("日本 left the chatroom", (0, 2)),
        ("[Message from bob]: psst", (14, 17)),
        ("[Message from a]]: psst", (14, 16)),
        ("Active Users: alice, bob", None),
        ("Connected to ::1 on port 5000", None),
        ("Incorrect passcode", None),
        ("alice:no space", None),
        ("two words joined the chatroom", None),
        (" joined the chatroom", None),
    ],
)
def test_name_span(line: str, span: tuple[int, int] | None) -> None:
    assert client.name_span(line) == span


def test_name_colour_is_stable() -> None:
    assert client.name_colour("alice") == client.name_colour("alice")
    assert len({client.name_colour(name) for name in ("alice", "bob", "carol", "dave")}) > 1


def colour(name: str) -> str:
    return f"\x1b[{client.name_colour(name)}m"


def test_paint() -> None:
    assert client.paint("bob: hi", "bob: hi") == f"{colour('bob')}bob\x1b[39m: hi"
    assert client.paint("[Message from bob]: psst", "[Message from bob]: psst") == (
        f"\x1b[1m[Message from {colour('bob')}bob\x1b[39m]: psst\x1b[0m"
    )
    replayed = "[16:05] bob: hi"
    assert client.paint(replayed, replayed, 8) == (
        f"\x1b[2m[16:05] {colour('bob')}bob\x1b[39m: hi\x1b[0m"
    )
    assert client.paint("Active Users: bob", "Active Users: bob") == "Active Users: bob"
    # A name cut by fold() is left plain: only whole names are painted.
    assert client.paint("abcdefgh: x", "abcd\n  efgh: x") == "abcd\n  efgh: x"
