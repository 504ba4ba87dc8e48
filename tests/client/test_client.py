"""Unit tests of client.py's pure part: sanitize, the server-line parser, the
line splitter, the command-line rules, the -reconnect retry rule. No sockets,
no processes."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import client
from client import Event, Kind, LineSplitter, Settings

REPLACEMENT = "\ufffd"


# --- sanitize ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alice: Hello Room", "alice: Hello Room"),
        ("", ""),
        ("\x1b[31mred\x1b[0m", f"{REPLACEMENT}[31mred{REPLACEMENT}[0m"),
        ("a\x00b", f"a{REPLACEMENT}b"),
        ("tab\there", f"tab{REPLACEMENT}here"),
        ("cr\rlf\n", f"cr{REPLACEMENT}lf{REPLACEMENT}"),
        ("\x1f\x7f", REPLACEMENT * 2),
        ("\x80\x9b\x9f", REPLACEMENT * 3),  # C1, including the one-byte CSI
        ("\xa0nbsp", "\xa0nbsp"),  # U+00A0 is not a control character
        ("héllo 日本 🙂", "héllo 日本 🙂"),
        (REPLACEMENT, REPLACEMENT),
    ],
)
def test_sanitize(text: str, expected: str) -> None:
    assert client.sanitize(text) == expected


def test_sanitize_leaves_no_control_character_at_all() -> None:
    every = "".join(map(chr, range(0x200)))
    cleaned = client.sanitize(every)
    assert len(cleaned) == len(every)
    assert not [c for c in cleaned if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0]


# --- classify ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "event"),
    [
        (":hello chatroom 1", Event(Kind.HELLO, "chatroom 1")),
        (":ok alice", Event(Kind.OK, "alice")),
        (":bye", Event(Kind.BYE)),
        (
            ":error passcode Incorrect passcode",
            Event(Kind.ERROR, "Incorrect passcode", "passcode"),
        ),
        (
            ":error name-taken The username alice is taken",
            Event(Kind.ERROR, "The username alice is taken", "name-taken"),
        ),
        (":error flood", Event(Kind.ERROR, "the server reported an error: flood", "flood")),
        (":future words here", Event(Kind.UNKNOWN, "words here")),
        (":", Event(Kind.UNKNOWN)),
        (":Bye", Event(Kind.UNKNOWN)),  # protocol words are case-sensitive
        ("alice: Hello Room", Event(Kind.DISPLAY, "alice: Hello Room")),
        ("alice: :bye", Event(Kind.DISPLAY, "alice: :bye")),
        ("Active Users: alice, bob", Event(Kind.DISPLAY, "Active Users: alice, bob")),
        ("", Event(Kind.DISPLAY, "")),
        (" :ok x", Event(Kind.DISPLAY, " :ok x")),
    ],
)
def test_classify(line: str, event: Event) -> None:
    assert client.classify(line) == event


# --- LineSplitter --------------------------------------------------------------


def drain(splitter: LineSplitter) -> list[Event]:
    events = []
    while (event := splitter.pop()) is not None:
        events.append(event)
    return events


def display(text: str) -> Event:
    return Event(Kind.DISPLAY, text)


TOO_LONG = Event(Kind.TOO_LONG)


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"a: 1\nb: 2\n"], [display("a: 1"), display("b: 2")]),
        ([b"a: ", b"1", b"\n"], [display("a: 1")]),
        ([b"a: 1\r\n"], [display("a: 1")]),  # a \r before the \n is dropped
        ([b"a: 1\r\rx\n"], [display("a: 1\r\rx")]),  # only the one before \n
        ([b"a: 1"], []),  # no line end yet
        ([b"\n"], [display("")]),
        ([b"caf\xc3", b"\xa9\n"], [display("café")]),  # UTF-8 cut between chunks
        ([b"bad \xff\xfe\n"], [display("bad \ufffd\ufffd")]),
        ([b":ok al", b"ice\nbob: hi\n"], [Event(Kind.OK, "alice"), display("bob: hi")]),
    ],
)
def test_splitter(chunks: list[bytes], expected: list[Event]) -> None:
    splitter = LineSplitter()
    events = []
    for chunk in chunks:
        splitter.feed(chunk)
        events += drain(splitter)
    assert events == expected


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"x" * 8 + b"\n"], [display("x" * 8)]),  # exactly the limit
        ([b"x" * 8 + b"\r\n"], [display("x" * 8)]),  # the line end does not count
        ([b"x" * 9 + b"\nok\n"], [TOO_LONG, display("ok")]),
        # one report for a long line however it arrives, and nothing of its tail
        ([b"x" * 6, b"x" * 6, b"x" * 20, b"x\nok\n"], [TOO_LONG, display("ok")]),
        ([b"x" * 30 + b"\n" + b"y" * 30 + b"\nok\n"], [TOO_LONG, TOO_LONG, display("ok")]),
        ([b"x" * 9, b"\n"], [TOO_LONG]),
    ],
)
def test_splitter_drops_over_long_lines(chunks: list[bytes], expected: list[Event]) -> None:
    splitter = LineSplitter(limit=8)
    events = []
    for chunk in chunks:
        splitter.feed(chunk)
        events += drain(splitter)
    assert events == expected


def test_splitter_memory_stays_bounded_for_an_endless_line() -> None:
    splitter = LineSplitter(limit=1000)
    events = []
    for _ in range(1000):
        splitter.feed(b"z" * 999)
        events += drain(splitter)
        assert len(splitter._buffer) <= 2000
    assert events == [TOO_LONG]


# --- username, passcode, line ends ------------------------------------------------


@pytest.mark.parametrize("name", ["a", "alice", "12345678", "Zoë", "日本語", "a-b_c.d"])
def test_valid_usernames(name: str) -> None:
    assert client.username_problem(name) is None


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "1 to 8 characters"),
        ("123456789", "1 to 8 characters"),
        ("a b", "no whitespace"),
        ("a\u3000b", "no whitespace"),  # ideographic space
        ("a\tb", "no control characters"),
        ("a\x1bb", "no control characters"),
        ("a\x85", "no control characters"),
        ("a:b", "no ':'"),
        (":)", "no ':'"),
        ("a\udcffb", "valid UTF-8"),  # how Python shows argv bytes that are not UTF-8
    ],
)
def test_invalid_usernames(name: str, problem: str) -> None:
    assert problem in (client.username_problem(name) or "")


@pytest.mark.parametrize(
    ("passcode", "valid"),
    [
        ("abc12", True),
        ("a", True),
        ("ABCDE", True),
        ("", False),
        ("abc123", False),
        ("ab c", False),
        ("ab!", False),
        ("äbc", False),  # a letter, but not ASCII
        ("١٢٣", False),  # digits, but not ASCII
    ],
)
def test_passcode_rules(passcode: str, valid: bool) -> None:
    assert client.is_valid_passcode(passcode) is valid


@pytest.mark.parametrize(
    ("raw", "line"),
    [
        (b"hello\n", b"hello"),
        (b"hello\r\n", b"hello"),
        (b"hello", b"hello"),  # the last line of a file without a line end
        (b"\n", b""),
        (b"a\rb\n", b"a\rb"),
        (b"  spaces  \n", b"  spaces  "),
    ],
)
def test_strip_line_end(raw: bytes, line: bytes) -> None:
    assert client.strip_line_end(raw) == line


# --- the command line --------------------------------------------------------------

BASE = ["-join", "-host", "example.org", "-port", "5000", "-username", "alice"]


@pytest.mark.parametrize(
    ("extra", "settings"),
    [
        (
            ["-passcode", "abc12"],
            Settings("example.org", 5000, "alice", "abc12", tls=False, tls_ca=None),
        ),
        (
            ["-passcode", "not valid!", "-tls"],
            Settings("example.org", 5000, "alice", "not valid!", tls=True, tls_ca=None),
        ),
        (
            ["-passcode", "x", "-tls-ca", "ca.pem"],
            Settings("example.org", 5000, "alice", "x", tls=True, tls_ca="ca.pem"),
        ),
    ],
)
def test_parse_arguments(extra: list[str], settings: Settings) -> None:
    assert client.parse_arguments(client.make_parser(), BASE + extra) == settings


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*BASE[1:], "-passcode", "abc12"], "the following arguments are required: -join"),
        (["-join", "-host", "h", "-port", "5000", "-passcode", "p"], "required: -username"),
        ([*BASE[:4], "0", "-username", "al", "-passcode", "p"], "argument -port: a port"),
        ([*BASE[:4], "65536", "-username", "al", "-passcode", "p"], "argument -port: a port"),
        ([*BASE[:4], "http", "-username", "al", "-passcode", "p"], "argument -port: a port"),
        ([*BASE[:6], "toolongname", "-passcode", "p"], "argument -username: a username has 1"),
        ([*BASE[:6], "a:b", "-passcode", "p"], "argument -username: a username has no ':'"),
        ([*BASE, "-passcode", "p", "-bogus", "1"], "unrecognized arguments: -bogus 1"),
        ([*BASE, "-passcode", "p", "\x1b[2J"], "unrecognized arguments: \ufffd[2J"),
        ([*BASE, "-passcode"], "argument -passcode: expected one argument"),
    ],
)
def test_bad_arguments_give_one_line_and_status_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        client.parse_arguments(client.make_parser(), argv)
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("client.py: error: ")
    assert message in err
    assert err.count("\n") == 1 and err.endswith("\n")


def test_help_is_allowed_to_be_long(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        client.parse_arguments(client.make_parser(), ["-h"])
    assert exited.value.code == 0
    assert "-tls-ca FILE" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
        (TimeoutError("timed out"), "timed out"),
        (OSError(), "OSError"),
    ],
)
def test_describe(exc: BaseException, reason: str) -> None:
    assert client.describe(exc) == reason


# --- fold: a wrapped line's continuation, on a terminal --------------------------------

FAKE_LINE = "bob: ok" + " " * 73 + "carol: passcode changed to zz9"  # the padding attack


def rows_of(folded: str) -> list[str]:
    return folded.split("\n")


def columns_of(row: str) -> int:
    return sum(client.cell_width(ch) for ch in row)


def test_fold_indents_the_tail_of_a_padded_line() -> None:
    rows = rows_of(client.fold(FAKE_LINE, 80))
    assert rows == ["bob: ok" + " " * 73, "  carol: passcode changed to zz9"]


@pytest.mark.parametrize(
    ("line", "columns", "expected"),
    [
        ("short", 80, ["short"]),
        ("x" * 80, 80, ["x" * 80]),  # exactly the width: one row
        ("x" * 81, 80, ["x" * 80, "  x"]),
        ("x" * 20, 8, ["x" * 8, "  xxxxxx", "  xxxxxx"]),
        ("日本語日本語", 7, ["日本語", "  日本", "  語"]),  # a wide character never splits
        ("e\u0301" * 6, 5, ["e\u0301" * 5, "  e\u0301"]),  # marks take no column
        ("\u263a\ufe0f" * 3, 5, ["\u263a\ufe0f" * 2, "  \u263a\ufe0f"]),  # emoji presentation
        ("x" * 20, 4, ["x" * 20]),  # too narrow to indent: left to the terminal
        ("x" * 20, 0, ["x" * 20]),  # no width known
    ],
    ids=ascii,
)
def test_fold(line: str, columns: int, expected: list[str]) -> None:
    assert rows_of(client.fold(line, columns)) == expected


@given(st.text(), st.integers(min_value=5, max_value=200))
def test_fold_rows_fit_and_every_continuation_is_indented(text: str, columns: int) -> None:
    line = client.sanitize(text)
    rows = rows_of(client.fold(line, columns))
    assert "".join([rows[0], *(row[2:] for row in rows[1:])]) == line  # nothing lost or added
    for row in rows:
        assert columns_of(row) <= columns
    for row in rows[1:]:
        assert row.startswith(client.CONTINUATION) and columns_of(row) > 2


# --- -reconnect's refusals and the keepalive ------------------------------------


@pytest.mark.parametrize(
    ("code", "since_loss", "again"),
    [
        ("full", 1000.0, True),
        ("throttled", 0.0, True),
        ("name-taken", 0.0, True),  # most likely this client's own vanished connection
        ("name-taken", client.GHOST_WAIT - 1, True),
        ("name-taken", client.GHOST_WAIT, False),  # someone else has the name
        ("passcode", 0.0, False),
        ("bad-username", 0.0, False),
        ("something-new", 0.0, False),
    ],
)
def test_which_refusals_are_tried_again(code: str, since_loss: float, again: bool) -> None:
    assert client.retried(code, since_loss) is again


def test_client_and_server_watch_for_silence_alike() -> None:
    import server

    for name in ("KEEPALIVE_IDLE", "KEEPALIVE_INTERVAL", "KEEPALIVE_COUNT", "UNACKED_TIMEOUT_MS"):
        assert getattr(client, name) == getattr(server, name), name

    def code(function: Callable[..., object]) -> str:  # its statements, not its docstring
        tree = ast.parse(textwrap.dedent(inspect.getsource(function))).body[0]
        assert isinstance(tree, ast.FunctionDef)
        return ast.dump(ast.Module(body=tree.body[1:], type_ignores=[]))

    assert code(client.watch_for_silence) == code(server.watch_for_silence)
    assert client.SILENCE_OPTIONS == server.SILENCE_OPTIONS
    # The server drops a vanished connection well before the client stops
    # taking name-taken for its own ghost.
    assert server.UNACKED_TIMEOUT_MS / 1000 + server.KEEPALIVE_IDLE < client.GHOST_WAIT
