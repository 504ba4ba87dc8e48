#!/usr/bin/env python3
"""client.py: the chat room's client. Standard library only, Python 3.10+, POSIX.

    python3 client.py -join -host <host> -port <port> -username <username>
                      -passcode <passcode> [-tls] [-tls-ca FILE] [-reconnect]

It speaks the wire protocol of docs/PROTOCOL.md and prints exactly the lines
of docs/SPEC.md: the room's lines on stdout, anything else as one line on
stderr. Exit status: 0 after :Exit, end of input or Ctrl-C (SIGINT, SIGTERM,
SIGHUP); 1 when the login is refused or the connection fails or is lost;
2 for bad arguments.

From a server with history (-history), the replay after the login is shown
first: each :past line as `[<time>] <line>`, the time local (`16:05` today,
`Dec 01 16:05` another day, `2025-12-01 16:05` another year; a live line
cannot start so, since no name holds a `:`), then :here as the answer to
:Users would be, `Active Users: a, b, c`.

On a terminal, unless NO_COLOR is set and not empty or TERM is dumb, the
lines on stdout are painted after they are sanitised: names in a colour of
their own, private messages in bold, replayed lines dimmed. Anywhere else
not one escape sequence is added, so the bytes are the contract's.

With -reconnect, a connection lost or closed without :bye, unless :Exit had
been sent on it, does not end the client: one line on stderr says so and
when it tries again (after 1, 2, 4, 8, 16, then 30 s, give or take a
quarter); it logs in again with the same name and passcode, says so on
stderr, and shows of the new replay only what it has not shown (catch_up()).
What is typed meanwhile is held and sent after the new login (the line being
edited on a terminal is left alone). A refusal with a code that a retry
cannot mend (passcode, bad-username, bad-login, any code it does not know),
another protocol or a certificate that does not verify ends it as the first
login would; full, throttled, shutdown and login-timeout are tried again, and
so is name-taken for GHOST_WAIT after the loss (the name is most likely held
by this client's own vanished connection, which the server drops within
about a minute). Ctrl-C while it waits ends it at once with status 0.

The socket has TCP keepalive, as the server's do (watch_for_silence()): a
server that has vanished without a word (a network down) counts as lost
after about a minute, instead of never.

How the file is organised, top to bottom:

1. The pure part, no I/O: the argument rules (the username rule is the
   server's, copied), sanitize(), classify() that turns one server line into
   an Event, LineSplitter that cuts the byte stream from the server into
   Events, dropping over-long lines, the history (past_time(), catch_up(),
   History), retry_delay(), the colours (colour_wanted(), paint()), and
   fold() for a terminal's width.
2. Output: whole lines to stdout and stderr, one at a time, never raising.
   When stdin and stdout are both terminals, a line is printed above the line
   being typed, which readline then shows again. On a terminal, a line wider
   than it is folded, its continuation rows indented (fold()), so that no
   padding can make a row look like a line of its own.
3. Stopper: turns the signals into one Stop exception in the main thread.
4. Connecting (TLS optional) and logging in: the main thread, blocking.
5. Link: after the login, one thread owns the socket and does all of its
   reading and writing in a selector loop (an SSL socket must never be read
   and written by two threads at once). It hands every line that arrives to
   the Chat and sends what the Chat queues; the Chat reads no more input
   while over 1 MiB waits to be sent (HOLD_LIMIT). With -reconnect it also
   connects and logs in again (Dialer), in that thread, while the main thread
   goes on taking what is typed. When the connection ends for good it wakes
   the main thread with a signal, since that thread may be blocked on stdin.
6. Chat: the main thread forwards what is typed (terminal, pipe or file)
   line by line; at the end of input, or after a typed :Exit, it has sent
   :Exit and waits for :bye, so every reply to what was sent gets printed.
7. main().
"""

from __future__ import annotations

import argparse
import enum
import io
import os
import random
import select
import selectors
import shutil
import signal
import socket
import ssl
import sys
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone, tzinfo
from types import FrameType
from typing import NoReturn, TextIO

PROG = "client.py"
MAX_USERNAME = 8
MAX_PASSCODE = 5
MAX_LINE = 64 * 1024  # longest line accepted from the server, in bytes
RECV_SIZE = 64 * 1024
# Bytes queued for the server past which the client stops reading its input
# until the queue drains: a fast pipe into a slow (or, with -reconnect,
# absent) server waits in the pipe, not in the client's memory.
HOLD_LIMIT = 1 << 20
CONNECT_TIMEOUT = 10.0  # seconds, for the TCP connect and the TLS handshake
LOGIN_TIMEOUT = 30.0  # seconds to wait for the answer to LOGIN
PROTOCOL = "chatroom 1"  # what :hello must say (docs/PROTOCOL.md, "Stability")
LEAVE_TIMEOUT = 3.0  # seconds to wait for :bye after a signal
EXIT = b":Exit"  # the line that leaves the room
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
WAKE_SIGNAL = signal.SIGUSR1  # sent by the Link thread to the main thread

# ---------------------------------------------------------------------------
# 1. The pure part
# ---------------------------------------------------------------------------

CONTROL_CHARACTERS = frozenset([*range(0x00, 0x20), *range(0x7F, 0xA0)])
# Not terminal controls, but they break or reorder a line on the screen: the
# line and paragraph separators and the bidi controls (the server replaces
# them in messages too; a client trusts nothing from the network).
LAYOUT_CHARACTERS = frozenset(
    [0x2028, 0x2029, 0x200E, 0x200F, 0x061C, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
)
_NEUTRALISED = dict.fromkeys(CONTROL_CHARACTERS | LAYOUT_CHARACTERS, "\ufffd")


def sanitize(text: str) -> str:
    """`text` with every control character (C0, DEL, C1), line or paragraph
    separator and bidi control replaced by U+FFFD.

    This removes ESC, so no escape sequence can reach a terminal.
    """
    return text.translate(_NEUTRALISED)


# --- The username rule: the same lines in server.py and client.py -------------
# Each file runs alone, so the rule is copied; tests/core/test_names.py holds
# the two copies equal, character for character and in behaviour.

# Default_Ignorable_Code_Point, from DerivedCoreProperties.txt of Unicode 15.1
# (the standard library has no such property): code points a renderer draws
# as nothing when it does not support them, so `bob` followed by one of them
# looks like `bob`. Most are also category Cf or Cn, refused anyway; the table
# adds U+034F, U+115F, U+1160, U+17B4, U+17B5, U+180B-U+180D, U+180F, U+3164,
# U+FE00-U+FE0F, U+FFA0 and U+E0100-U+E01EF, which are letters or marks.
_IGNORABLE = (
    (0x00AD, 0x00AD),  # soft hyphen
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x061C, 0x061C),  # Arabic letter mark
    (0x115F, 0x1160),  # Hangul choseong and jungseong fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian free variation selectors, vowel separator
    (0x200B, 0x200F),  # zero width space, (non-)joiner, left-to-right and right-to-left marks
    (0x202A, 0x202E),  # bidi embeddings, pop, overrides
    (0x2060, 0x206F),  # word joiner, invisible operators, bidi isolates, deprecated formats
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFEFF, 0xFEFF),  # zero width no-break space (BOM)
    (0xFFA0, 0xFFA0),  # halfwidth Hangul filler
    (0xFFF0, 0xFFF8),  # reserved specials
    (0x1BCA0, 0x1BCA3),  # shorthand format controls
    (0x1D173, 0x1D17A),  # musical symbol format controls
    (0xE0000, 0xE0FFF),  # tags, variation selectors supplement, reserved
)
# Visible-as-nothing characters that are not default-ignorable: the Braille
# pattern blank (a symbol), and the Hangul fillers once more, to be explicit.
_BLANK = "\u2800\u115f\u1160\u3164\uffa0"
# Scripts that are written together: a name may mix Latin with these (as
# Japanese, Chinese and Korean names do), but no other two scripts.
_SCRIPTS_WRITTEN_TOGETHER = (
    frozenset(("LATIN", "HAN", "HIRAGANA", "KATAKANA")),
    frozenset(("LATIN", "HAN", "BOPOMOFO")),
    frozenset(("LATIN", "HAN", "HANGUL")),
)

# Names whose first word is not the script's own.
_SCRIPT_ALIASES = {"CJK": "HAN", "IDEOGRAPHIC": "HAN", "ARABIC-INDIC": "ARABIC",
                   "EXTENDED": "ARABIC"}  # EXTENDED ARABIC-INDIC DIGIT ...


def _is_ignorable(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _IGNORABLE)


def _character_problem(char: str) -> str | None:
    """What is wrong with `char` in a username, or None."""
    if char == ":":
        return "a username has no ':'"
    category = unicodedata.category(char)
    if category == "Cc":
        return "a username has no control characters"
    if char.isspace() or category[0] == "Z":
        return "a username has no whitespace"
    if category == "Cs" or char == "\ufffd":  # bytes that were not UTF-8
        return "a username is valid UTF-8 (no U+FFFD)"
    if category in ("Co", "Cn"):
        return "a username has no private-use or unassigned characters"
    if category == "Cf" or char in _BLANK or _is_ignorable(char):
        return "a username has no invisible characters (format, filler, variation selector)"
    return None


def _script(char: str) -> str:
    """The script of a letter or digit: the first word of its Unicode name
    (LATIN, CYRILLIC, GREEK, HAN...); "" for anything else (ASCII digits,
    marks, symbols, punctuation, modifier letters), which goes with any."""
    if char.isascii():
        return "LATIN" if char.isalpha() else ""
    category = unicodedata.category(char)
    if category[0] != "L" and category not in ("Nd", "Nl"):
        return ""
    word = unicodedata.name(char, "").split(" ", 1)[0]
    if word in ("MODIFIER", "KATAKANA-HIRAGANA"):
        return ""
    return _SCRIPT_ALIASES.get(word, word)


def username_problem(name: str) -> str | None:
    """What is wrong with `name` as a username, or None if nothing.

    SPEC.md: 1 to 8 characters; no whitespace, no ':', no control characters.
    So that no name can pass for another, also refused: invisible characters
    (format characters such as zero-width spaces and bidi controls, Unicode's
    default-ignorable code points, fillers, variation selectors, the Braille
    blank), U+FFFD (what bytes that were not UTF-8 became), private-use and
    unassigned code points, a combining mark first, and letters of two
    scripts (Latin with Cyrillic or Greek...) after NFKC normalisation.
    """
    if not 1 <= len(name) <= MAX_USERNAME:
        return f"a username has 1 to {MAX_USERNAME} characters"
    for char in name:
        problem = _character_problem(char)
        if problem is not None:
            return problem
    if name.isascii():
        return None
    if unicodedata.category(name[0])[0] == "M":
        return "a username does not start with a combining mark"
    folded = unicodedata.normalize("NFKC", name)
    if ":" in folded:  # a fullwidth or small colon, say
        return "a username has no ':'"
    scripts = {_script(char) for char in folded} - {""}
    if len(scripts) > 1 and not any(scripts <= group for group in _SCRIPTS_WRITTEN_TOGETHER):
        mixed = " and ".join(sorted(script.title() for script in scripts))
        return f"a username does not mix scripts ({mixed})"
    return None


# --- End of the username rule ----------------------------------------------------


def is_valid_passcode(passcode: str) -> bool:
    """True for 1 to 5 ASCII letters or digits."""
    return 1 <= len(passcode) <= MAX_PASSCODE and passcode.isascii() and passcode.isalnum()


def strip_line_end(raw: bytes) -> bytes:
    """`raw` without its line end: a final \\n, and a \\r just before it."""
    if raw.endswith(b"\n"):
        raw = raw[:-1]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
    return raw


class Kind(enum.Enum):
    """What a line from the server is."""

    HELLO = "hello"  # :hello chatroom 1
    OK = "ok"  # :ok <username>
    ERROR = "error"  # :error <code> <text>
    BYE = "bye"  # :bye
    PAST = "past"  # :past <id> <time> <line>, a kept line replayed after the login
    HERE = "here"  # :here <name> <name> ..., the end of the replay
    UNKNOWN = "unknown"  # a protocol line with a word this client does not know
    DISPLAY = "display"  # a line to print
    TOO_LONG = "too-long"  # a line longer than MAX_LINE, dropped


@dataclass(frozen=True)
class Past:
    """One line of the room's history: `ident` names it in the room, `time` is
    when it was said (UTC, as the server wrote it), `line` the display line
    exactly as it was sent live (not sanitised)."""

    ident: str
    time: str
    line: str


@dataclass(frozen=True)
class Event:
    """One line from the server, parsed.

    `text` is the line for DISPLAY and PAST, the human-readable text for
    ERROR and the rest of the line for the other protocol lines; `code` is
    ERROR's code; `past` is PAST's line of history.
    """

    kind: Kind
    text: str = ""
    code: str = ""
    past: Past | None = None


_PROTOCOL_WORDS = {"hello": Kind.HELLO, "ok": Kind.OK, "bye": Kind.BYE, "here": Kind.HERE}


def classify(line: str) -> Event:
    """Parse one line from the server (without its line end)."""
    if not line.startswith(":"):
        return Event(Kind.DISPLAY, line)
    word, _, rest = line[1:].partition(" ")
    if word == "error":
        code, _, text = rest.partition(" ")
        return Event(Kind.ERROR, text or f"the server reported an error: {code}", code)
    if word == "past":  # :past <id> <time> <line>; without all three, a word not known
        ident, _, more = rest.partition(" ")
        stamp, space, text = more.partition(" ")
        if not (ident and stamp and space):
            return Event(Kind.UNKNOWN, rest)
        return Event(Kind.PAST, text, past=Past(ident, stamp, text))
    return Event(_PROTOCOL_WORDS.get(word, Kind.UNKNOWN), rest)


class LineSplitter:
    """Cuts the byte stream from the server into Events, one per line.

    A line ends with \\n (a \\r before it is dropped) and is decoded as UTF-8,
    bad bytes becoming U+FFFD. A line longer than `limit` bytes gives one
    TOO_LONG event and is dropped, so the buffer never holds much more than
    `limit` bytes whatever the server sends. Bytes after the last \\n wait
    for the next feed().
    """

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._limit = limit
        self._buffer = bytearray()
        self._skipping = False  # inside a line already reported as too long

    def feed(self, data: bytes) -> None:
        """Add bytes received from the server."""
        self._buffer += data

    def pop(self) -> Event | None:
        """The next complete line as an Event, or None until more is fed."""
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return self._overflow()
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if self._skipping:  # the tail of a line already reported
                self._skipping = False
                continue
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self._limit:
                return Event(Kind.TOO_LONG)
            return classify(line.decode("utf-8", "replace"))

    def _overflow(self) -> Event | None:
        """Drop an unfinished line that is already too long (reported once)."""
        if len(self._buffer) <= self._limit:
            return None
        self._buffer.clear()
        if self._skipping:
            return None
        self._skipping = True
        return Event(Kind.TOO_LONG)


# --- History: the replay after a login, and catching up after a lost connection ---

USERS_PREFIX = "Active Users: "  # the answer to :Users, and what :here is shown as
PRIVATE_PREFIX = "[Message from "  # a private message
LIVE_LIMIT = 10_000  # public lines remembered since the last replay (see History)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun",
           "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")  # not the locale's: always these


def users_line(names: str) -> str:
    """The line shown for `:here <names>`: the same as the answer to :Users."""
    return USERS_PREFIX + ", ".join(names.split())


def past_time(stamp: str, now: datetime, zone: tzinfo | None = None) -> str:
    """When a replayed line was said, in local time (`zone`, or the system's):
    `16:05` on the day of `now`, `Dec 01 16:05` on another day of its year,
    `2025-12-01 16:05` in another year. A `stamp` that is not the protocol's
    `2026-12-02T16:05:03Z` is given back as it is."""
    try:
        when = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return stamp
    local, today = when.astimezone(zone), now.astimezone(zone)
    clock = f"{local.hour:02}:{local.minute:02}"
    if local.date() == today.date():
        return clock
    if local.year == today.year:
        return f"{_MONTHS[local.month - 1]} {local.day:02} {clock}"
    return f"{local.year}-{local.month:02}-{local.day:02} {clock}"


def past_display(past: Past, now: datetime, zone: tzinfo | None = None) -> str:
    """The line shown for a replayed line: its time in brackets, then the line.

    A live line cannot look like it: it starts with a username, or with
    `[Message from ` or `Active Users:`, and no username holds the `:` that
    every time does."""
    return f"[{past_time(past.time, now, zone)}] {past.line}"


def is_public(line: str) -> bool:
    """True for a display line everyone saw, the kind a server keeps: not a
    private message, not the answer to :Users."""
    return not line.startswith((PRIVATE_PREFIX, USERS_PREFIX))


def catch_up(replay: Sequence[Past], last_id: str | None, live: Sequence[str],
             me: str | None) -> list[Past]:
    """The lines of `replay` (all the :past lines of one login, oldest first)
    to show, given what was shown before: `last_id`, the id of the last line
    of the previous replay (None if there was none), and `live`, the public
    lines received live since then (raw, oldest first). `me` is the username,
    or None on the first login, when all of `replay` is shown.

    The candidates are the lines after `last_id` (all of them if it is not in
    `replay`: the window moved on, and then only the end of `live` that is
    still in the window, in order, counts). Walking them in order, a line
    equal to the next live line was shown live and is skipped; a line of `me`
    (`me: ...`) was typed here and is skipped; any other one is shown.
    """
    ids = [past.ident for past in replay]
    if last_id is not None and last_id in ids:
        candidates = list(replay[ids.index(last_id) + 1 :])
        seen = list(live)
    else:
        candidates = list(replay)
        kept = len(live)  # the longest end of `live` that is in order in `candidates`
        for past in reversed(candidates):
            if kept > 0 and past.line == live[kept - 1]:
                kept -= 1
        seen = list(live[kept:])
    shown = []
    matched = 0
    mine = None if me is None else f"{me}: "
    for past in candidates:
        if matched < len(seen) and past.line == seen[matched]:
            matched += 1
        elif mine is None or not past.line.startswith(mine):
            shown.append(past)
    return shown


class History:
    """The replay of each login, and what -reconnect needs to show after a new
    login only the lines not shown yet (catch_up()): the id of the last
    replayed line and, when `remember` is on, the public lines received live
    since. At most LIVE_LIMIT live lines are kept; past that, the oldest go
    and the last id is forgotten, so catching up stays exact as long as the
    server keeps at most that many lines."""

    def __init__(self, me: str, remember: bool = False) -> None:
        self.me = me
        self.remember = remember
        self.last_id: str | None = None
        self._live: deque[str] = deque(maxlen=LIVE_LIMIT)
        self._replay: list[Past] = []
        self._first = True  # no replay has ended yet

    def begin(self) -> None:
        """A new login: forget an unfinished replay of a lost connection."""
        self._replay = []

    def add(self, past: Past) -> None:
        """One :past line of the replay."""
        self._replay.append(past)

    def end(self) -> list[Past]:
        """The replay is over (:here): the lines to show, in order."""
        shown = catch_up(self._replay, self.last_id, self.live, None if self._first else self.me)
        self._first = False
        if self._replay:
            self.last_id = self._replay[-1].ident
        self._live.clear()
        self._replay = []
        return shown

    def heard(self, line: str) -> None:
        """A display line received live."""
        if self.remember and is_public(line):
            if len(self._live) == self._live.maxlen:  # the oldest goes, and with it the
                self.last_id = None  # certainty of where the last replay ended
            self._live.append(line)

    @property
    def live(self) -> list[str]:
        """The public lines received live since the last replay, oldest first."""
        return list(self._live)


# --- -reconnect ------------------------------------------------------------------

RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)  # then 30 s again and again
STABLE_AFTER = 30.0  # seconds up after which the delays start again from the first
# Refusals of a new login that are worth trying again: the server is busy,
# restarting or slowing this address down. Any other code (passcode,
# bad-username, bad-login, or one this client does not know) ends it, and so
# does name-taken once GHOST_WAIT has passed since the connection was lost.
RETRIED_CODES = frozenset(("full", "throttled", "shutdown", "login-timeout"))
# Seconds after a loss during which name-taken is tried again: the server
# drops a connection that went silent within about a minute (its keepalive).
GHOST_WAIT = 120.0


def retried(code: str, since_loss: float) -> bool:
    """Is a refusal with this code, `since_loss` seconds after the connection
    was lost, worth another try?"""
    return code in RETRIED_CODES or (code == "name-taken" and since_loss < GHOST_WAIT)


def retry_delay(attempt: int, jitter: float) -> float:
    """Seconds to wait before attempt number `attempt` (0, 1, ...) to connect
    again: RETRY_DELAYS, then 30 s, each made 25 % shorter to 25 % longer by
    `jitter` (0 to 1), so that a room of clients does not come back at once."""
    base = RETRY_DELAYS[min(attempt, len(RETRY_DELAYS) - 1)]
    return round(base * (0.75 + 0.5 * jitter), 1)


# --- Colours on a terminal --------------------------------------------------------

NAME_COLOURS = (32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)  # SGR foreground colours
SGR_BOLD, SGR_DIM, SGR_DEFAULT_COLOUR, SGR_RESET = "1", "2", "\x1b[39m", "\x1b[0m"
_JOIN_LEAVE = (" joined the chatroom", " left the chatroom")


def colour_wanted(stdout_is_terminal: bool, environ: Mapping[str, str]) -> bool:
    """Colours only on a terminal, and not when NO_COLOR is set to anything
    but "" (no-color.org) or TERM is `dumb`."""
    return stdout_is_terminal and not environ.get("NO_COLOR") and environ.get("TERM") != "dumb"


def name_colour(name: str) -> int:
    """The SGR colour of a name: the same in every run and on every machine
    (FNV-1a of its UTF-8 bytes; Python's hash() changes from run to run)."""
    value = 0x811C9DC5
    for byte in name.encode("utf-8", "surrogateescape"):
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return NAME_COLOURS[value % len(NAME_COLOURS)]


def name_span(line: str) -> tuple[int, int] | None:
    """Where the name of whoever a display line is from is in it: the sender
    of a private message, the speaker of `name: ...`, who joined or left; or
    None. A name has no whitespace and no `:`, so the first `:` ends it."""
    colon = line.find(":")
    if line.startswith(PRIVATE_PREFIX):
        start = len(PRIVATE_PREFIX)
        if colon > start + 1 and line[colon - 1] == "]":
            return start, colon - 1
        return None
    if colon > 0 and line[colon + 1 : colon + 2] == " " and " " not in line[:colon]:
        return 0, colon
    for tail in _JOIN_LEAVE:
        head = line[: -len(tail)]
        if line.endswith(tail) and head and not any(c.isspace() or c == ":" for c in head):
            return 0, len(head)
    return None


def paint(line: str, folded: str, start: int | None = None) -> str:
    """`folded`, which is fold() of the sanitised `line`, with colours: the
    sender's name in its colour (when it is whole on the first row), a
    private message in bold, a replayed line dimmed. `start` is where the
    room's line begins in a replayed line (after its time); None for a live
    line. Only ever given sanitised text, so the escape sequences in the
    result are all this function's."""
    offset = start or 0
    room_line = line[offset:]
    out = folded
    span = name_span(room_line)
    if span is not None:
        first, last = span[0] + offset, span[1] + offset
        if "\n" not in folded[:last]:  # fold() only adds "\n  ": same text up to there
            colour = f"\x1b[{name_colour(line[first:last])}m"
            out = f"{folded[:first]}{colour}{folded[first:last]}{SGR_DEFAULT_COLOUR}{folded[last:]}"
    attributes = []
    if start is not None:
        attributes.append(SGR_DIM)
    if room_line.startswith(PRIVATE_PREFIX):
        attributes.append(SGR_BOLD)
    if attributes:
        out = f"\x1b[{';'.join(attributes)}m{out}{SGR_RESET}"
    return out


@dataclass(frozen=True)
class Settings:
    """The command line, checked."""

    host: str
    port: int
    username: str
    passcode: str
    tls: bool
    tls_ca: str | None
    reconnect: bool = False


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {sanitize(message)}\n")


def _port_argument(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError("a port is a number from 1 to 65535")
    return int(text)


def _username_argument(text: str) -> str:
    problem = username_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def make_parser() -> argparse.ArgumentParser:
    """The command-line parser (single-dash long options, as SPEC.md has them)."""
    parser = _Parser(
        prog=PROG,
        allow_abbrev=False,
        description="Join the chat room: what you type goes to the room, what the room "
        "says is printed. End of input, :Exit or Ctrl-C leaves.",
    )
    parser.add_argument("-join", action="store_true", required=True, help="join the room")
    parser.add_argument("-host", required=True, help="the server's host name or address")
    parser.add_argument("-port", required=True, type=_port_argument, help="the server's port")
    parser.add_argument(
        "-username",
        required=True,
        type=_username_argument,
        help="1 to 8 characters; no whitespace, no ':', no control characters; "
        "nothing invisible, letters of one script",
    )
    parser.add_argument("-passcode", required=True, help="the room's passcode")
    parser.add_argument("-tls", action="store_true", help="connect with TLS")
    parser.add_argument(
        "-tls-ca", metavar="FILE", help="also trust this CA certificate file (implies -tls)"
    )
    parser.add_argument(
        "-reconnect",
        action="store_true",
        help="when the connection is lost, keep trying to join again, and show "
        "what was missed (from a server with -history)",
    )
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str]) -> Settings:
    """Settings from the command line; exits with status 2 when it is wrong."""
    args = parser.parse_args(argv)
    return Settings(
        host=args.host,
        port=args.port,
        username=args.username,
        passcode=args.passcode,
        tls=args.tls or args.tls_ca is not None,
        tls_ca=args.tls_ca,
        reconnect=args.reconnect,
    )


CONTINUATION = "  "  # starts every row of a wrapped line but its first, on a terminal


def cell_width(char: str) -> int:
    """How many columns a terminal gives `char`: 0 for a combining mark or a
    format character, 2 for a wide or fullwidth one (East Asian Width W or
    F), 1 for the rest."""
    if char.isascii():
        return 1
    if unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def fold(line: str, columns: int) -> str:
    """`line` (sanitised) cut into rows of at most `columns` columns, each row
    after the first starting with CONTINUATION, joined by \\n.

    A terminal wraps a long line by itself, and then its next row starts at
    the left edge like a line of its own: `ok` padded with spaces up to the
    edge, then `bob: ...`, would look like a line from bob. Cut here, every
    row that is not the start of a line is indented, and nothing a member
    sends can start a row at the left edge. A wide character that does not
    fit at the end of a row goes to the next, as a terminal does; a character
    followed by U+FE0F (shown as an emoji) counts as wide. Lines that fit,
    and terminals too narrow to indent, are left as they are.
    """
    if len(line) * 2 <= columns or columns <= 2 * len(CONTINUATION) or (
        line.isascii() and len(line) <= columns
    ):
        return line
    out: list[str] = []
    used = 0
    for index, char in enumerate(line):
        width = cell_width(char)
        if width == 1 and line[index + 1 : index + 2] == "\ufe0f":
            width = 2
        if used + width > columns and used > len(CONTINUATION):
            out.append("\n" + CONTINUATION)
            used = len(CONTINUATION)
        out.append(char)
        used += width
    return "".join(out)


def describe(exc: BaseException) -> str:
    """A short reason for a failed operation, for one line on stderr."""
    if isinstance(exc, ssl.SSLError) and exc.reason:  # "WRONG_VERSION_NUMBER"
        return exc.reason.replace("_", " ").lower()
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------
# 2. Output
# ---------------------------------------------------------------------------


class Output:
    """Prints whole lines, sanitised, to stdout or stderr, one at a time.

    Every line is written as UTF-8 bytes (whatever the locale) and flushed at
    once. Writing never raises: a stream whose reader has gone (broken pipe,
    hung-up terminal) is sent to /dev/null instead.

    `current_input`, given only when stdin and stdout are both terminals,
    returns the line being typed: a line is then printed above it ("\\r",
    erase the line, the text, "\\n"), and the typed line is drawn again.

    On a terminal, a line wider than the terminal is folded (fold()) so
    that its continuation rows are indented, and with `colour`, stdout's
    lines are painted (paint()); anywhere else the bytes are exactly the
    line's.
    """

    def __init__(
        self, current_input: Callable[[], str] | None = None, colour: bool = False
    ) -> None:
        self._lock = threading.Lock()
        self._current_input = current_input
        self._colour = colour

    def say(self, text: str) -> None:
        """Print a line of the room on stdout."""
        self._write_line(sys.stdout, text)

    def say_past(self, past: Past) -> None:
        """Print a replayed line of the room on stdout, its time first."""
        text = past_display(past, datetime.now(timezone.utc))
        self._write_line(sys.stdout, text, len(text) - len(past.line))

    def warn(self, text: str) -> None:
        """Print a line on stderr."""
        self._write_line(sys.stderr, text)

    def erase_input(self) -> None:
        """On a terminal, erase what is left of the typed line, before exiting."""
        if self._current_input is not None:
            self._write(sys.stdout, "\r\x1b[K")

    def _write_line(self, stream: TextIO, text: str, start: int | None = None) -> None:
        line = sanitize(text)  # as long as `text`: `start` holds in it
        if not _is_terminal(stream):
            self._write(stream, line + "\n")
            return
        data = fold(line, shutil.get_terminal_size().columns)
        if self._colour and stream is sys.stdout:
            data = paint(line, data, start)
        data += "\n"
        if self._current_input is not None:
            data = f"\r\x1b[K{data}{self._current_input()}"
        self._write(stream, data)

    def _write(self, stream: TextIO, data: str) -> None:
        with self._lock:
            try:
                stream.buffer.write(data.encode("utf-8", "surrogateescape"))
                stream.buffer.flush()
            except (OSError, ValueError):
                _send_to_devnull(stream)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):  # closed, or detached
        return False


def _send_to_devnull(stream: TextIO) -> None:
    """Point the file descriptor of `stream` at /dev/null: its reader is gone."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def terminal_input() -> Callable[[], str] | None:
    """When stdin and stdout are both terminals: a function giving the line
    being typed (readline's, or always "" without readline). Otherwise None."""
    if not (sys.stdin and sys.stdout and sys.stdin.isatty() and sys.stdout.isatty()):
        return None
    try:
        import readline  # imported only for a terminal: importing it may write to it
    except ImportError:
        return lambda: ""
    return readline.get_line_buffer


def typed_lines(interactive: bool) -> Iterator[bytes]:
    """What is typed, line by line, without the line end, as bytes.

    From a terminal (with readline when there is one) lines come from input(),
    with an empty prompt; otherwise stdin is read as bytes, so a pipe or a file
    is forwarded unchanged whatever its encoding.
    """
    if interactive:
        while True:
            try:
                text = input()
            except EOFError:
                return
            yield text.encode("utf-8", "surrogateescape")
    elif sys.stdin is not None:
        for raw in sys.stdin.buffer:
            yield strip_line_end(raw)


# ---------------------------------------------------------------------------
# 3. Stopper
# ---------------------------------------------------------------------------


class Stop(Exception):
    """Raised in the main thread by a signal: stop what you are doing."""


class Stopper:
    """Turns SIGINT, SIGTERM, SIGHUP and WAKE_SIGNAL into one Stop exception.

    Python runs signal handlers in the main thread, between two bytecodes or
    when a blocking call (reading stdin, waiting on an Event) is interrupted.
    So while the Stopper is armed, Stop comes out of whatever the main thread
    is doing; while it is held, a signal is only remembered, and arm() raises
    Stop for it. Raising Stop holds the Stopper again: a second Ctrl-C cannot
    interrupt the leaving.
    """

    def __init__(self) -> None:
        self._armed = True
        self._signalled = False  # a signal came while held
        for signum in (*STOP_SIGNALS, WAKE_SIGNAL):
            signal.signal(signum, self._on_signal)

    def hold(self) -> None:
        """From now on, only remember signals."""
        self._armed = False

    def arm(self) -> None:
        """Raise Stop for a signal that came while held, or for the next one."""
        self._armed = True
        if self._signalled:
            self._armed = False
            raise Stop

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            self._armed = False
            raise Stop
        self._signalled = True


# ---------------------------------------------------------------------------
# 4. Connecting and logging in
# ---------------------------------------------------------------------------


class Failure(Exception):
    """The client must end with this one line on stderr and status 1.

    `final`: even -reconnect must not try again (another protocol, a
    certificate that does not verify); the rest may pass.
    """

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


class Refused(Exception):
    """The server refused the login with this :error event."""

    def __init__(self, event: Event) -> None:
        super().__init__(event.text)
        self.event = event


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A client context that verifies certificates, TLS 1.2 or newer.

    Raises OSError (ssl.SSLError included) when `ca_file` cannot be used.
    """
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=ca_file)
    return context


# The server's keepalive, on this side too (see watch_for_silence()).
KEEPALIVE_IDLE = 30
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 3
UNACKED_TIMEOUT_MS = 60_000


# The socket options that do it, those this platform has (worked out once).
SILENCE_OPTIONS = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), *(
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", UNACKED_TIMEOUT_MS))
    if hasattr(socket, name)))


def watch_for_silence(sock: socket.socket) -> None:
    """Have the kernel end `sock` once the server has gone silent: probes
    after 30 s of quiet, every 10 s; given up once nothing sent is
    acknowledged for 60 s (where the platform has these options)."""
    for level, option, value in SILENCE_OPTIONS:
        try:
            sock.setsockopt(level, option, value)
        except OSError:
            pass


def open_connection(settings: Settings, context: ssl.SSLContext | None) -> socket.socket:
    """Connect, and with a `context`, do the TLS handshake. Raises Failure."""
    where = f"{settings.host} port {settings.port}"
    try:
        sock = socket.create_connection((settings.host, settings.port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise Failure(f"cannot connect to {where}: {describe(exc)}") from None
    watch_for_silence(sock)
    if context is None:
        return sock
    try:  # the handshake has CONNECT_TIMEOUT too; on failure the socket is closed
        return context.wrap_socket(sock, server_hostname=settings.host)
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or describe(exc)
        raise Failure(
            f"TLS certificate of {settings.host} did not verify: {reason}", final=True
        ) from None
    except OSError as exc:
        raise Failure(
            f"TLS handshake with {where} failed ({describe(exc)}); is the server using TLS?"
        ) from None


def log_in(sock: socket.socket, settings: Settings, splitter: LineSplitter) -> None:
    """Send LOGIN at once (not waiting for :hello) and read up to :ok.

    Raises Refused for an :error line, Failure when the connection fails or
    ends first. Lines after :ok stay in `splitter`.
    """
    where = f"{settings.host} port {settings.port}"
    hint = "" if settings.tls else " (does the server require -tls?)"
    sock.settimeout(LOGIN_TIMEOUT)
    try:
        sock.sendall(f"LOGIN {settings.passcode} {settings.username}\n".encode())
        while True:
            event = splitter.pop()
            if event is None:
                data = sock.recv(RECV_SIZE)
                if not data:
                    break
                splitter.feed(data)
            elif event.kind is Kind.HELLO and event.text != PROTOCOL:
                greeting = " ".join((":hello", sanitize(event.text))).rstrip()
                raise Failure(f"{where} greeted with '{greeting}'; "
                              f"this client speaks '{PROTOCOL}'", final=True)
            elif event.kind is Kind.OK:
                return
            elif event.kind is Kind.ERROR:
                raise Refused(event)
            elif event.kind is Kind.BYE:
                break
    except TimeoutError:
        raise Failure(f"no answer to the login from {where}{hint}") from None
    except OSError as exc:
        reason = describe(exc)
        raise Failure(f"lost the connection to {where} during the login: {reason}{hint}") from None
    raise Failure(f"{where} closed the connection before the login was accepted{hint}")


class Dialer:
    """Connects and logs in again, for -reconnect (in the Link's thread)."""

    def __init__(self, settings: Settings, context: ssl.SSLContext | None) -> None:
        self.settings = settings
        self.context = context
        self.where = f"{settings.host} port {settings.port}"

    def dial(self) -> tuple[socket.socket, LineSplitter]:
        """A logged-in socket and what came after :ok. Raises Failure, Refused."""
        sock = open_connection(self.settings, self.context)
        splitter = LineSplitter()
        try:
            log_in(sock, self.settings, splitter)
        except BaseException:
            sock.close()
            raise
        return sock, splitter


# ---------------------------------------------------------------------------
# 5. Link
# ---------------------------------------------------------------------------


class End(enum.Enum):
    """How the Link's thread ended."""

    BYE = "bye"  # the server said :bye
    CLOSED = "closed"  # the server closed the connection without :bye
    LOST = "lost"  # the connection failed (reason in Link.reason)
    STOPPED = "stopped"  # Link.stop() was called
    REFUSED = "refused"  # -reconnect: a new login was refused for good (Link.refusal)
    FAILED = "failed"  # -reconnect: connecting again cannot work (Link.failure)


class Link:
    """Owns the logged-in socket: one thread does all of its reads and writes.

    The socket is non-blocking and the thread waits in a selector for it and
    for a wake-up socket pair, which send() and stop() poke from the main
    thread. Each event that arrives (all but :bye) goes to `on_event`, in the
    Link's thread. When the thread ends it sets `finished` and sends
    WAKE_SIGNAL to the main thread. The stop signals are blocked in the
    thread, so the kernel delivers them to the main thread.

    With a `dialer` (-reconnect), a connection that is lost or closed
    without :bye, unless :Exit has been sent on it (`leaving` and nothing
    left to send), is not the end: the thread says so on stderr (`note`),
    waits (retry_delay()), connects and logs in again with the dialer, and
    goes on with the new socket, giving `on_event` an OK event for the new
    login. What is queued meanwhile waits, and goes after the login; a line
    that was half sent goes again whole. A refusal whose code is not in
    RETRIED_CODES, or a final Failure, ends the thread (End.REFUSED,
    End.FAILED).

    The queue is bounded by whoever fills it: wait_for_room() holds a sender
    while more than HOLD_LIMIT bytes wait.
    """

    def __init__(
        self,
        sock: socket.socket,
        splitter: LineSplitter,
        on_event: Callable[[Event], None],
        dialer: Dialer | None = None,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self._sock = sock
        self._splitter = splitter
        self._on_event = on_event
        self._dialer = dialer
        self._note = note or (lambda text: None)
        self._outbox = bytearray()
        self._half_sent = bytearray()  # the start of a line sent without its end yet
        self._lock = threading.Lock()  # guards _outbox
        self._room = threading.Condition(self._lock)  # the outbox shrank, or the thread ended
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._stopping = False
        self._blocked_on_write = False
        self._main_thread = threading.main_thread().ident or 0
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)
        self._attempt = 0  # attempts to connect again since the last stable connection
        self._up_since = time.monotonic()
        self.finished = threading.Event()
        self.connected = True  # False while connecting again
        self.leaving = False  # set by the Chat once :Exit is queued
        self.end = End.STOPPED
        self.reason = ""
        self.refusal: Refused | None = None
        self.failure: Failure | None = None

    def start(self) -> None:
        """Start the thread, with the stop signals blocked in it."""
        for end in (self._sock, self._wake_reader, self._wake_writer):
            end.setblocking(False)
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {*STOP_SIGNALS, WAKE_SIGNAL})
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def send(self, data: bytes) -> None:
        """Queue bytes for the server (any thread)."""
        with self._lock:
            self._outbox += data
        self._poke()

    def wait_for_room(self) -> None:
        """Block while more than HOLD_LIMIT bytes wait to be sent, unless the
        thread has ended (any thread but the Link's; a signal interrupts it)."""
        with self._room:
            while len(self._outbox) > HOLD_LIMIT and not self.finished.is_set():
                self._room.wait()

    def stop(self) -> None:
        """End the thread if it still runs, and wait for it (not while it
        connects again: that can take seconds, and the thread is a daemon)."""
        self._stopping = True
        self._poke()
        self._thread.join(None if self.connected else 0.5)
        if not self._thread.is_alive():
            self._wake_reader.close()
            self._wake_writer.close()

    def _poke(self) -> None:
        try:
            self._wake_writer.send(b"!")
        except OSError:  # the pair is full (a wake-up is pending) or closed
            pass

    def _run(self) -> None:
        try:
            while self._serve() and self._dial_again():
                pass
        finally:
            self._sock.close()
            self.finished.set()
            with self._room:
                self._room.notify_all()
            try:
                signal.pthread_kill(self._main_thread, WAKE_SIGNAL)
            except (OSError, ValueError):  # the main thread has already gone
                pass

    def _serve(self) -> bool:
        """Serve the current socket until the connection ends; True if it was
        lost in a way that -reconnect may mend."""
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self._wake_reader, selectors.EVENT_READ)
                selector.register(self._sock, selectors.EVENT_READ)
                while True:
                    self._blocked_on_write = False
                    if self._stopping or not self._receive():
                        break
                    self._transmit()
                    wanted = selectors.EVENT_READ
                    if self._blocked_on_write:
                        wanted |= selectors.EVENT_WRITE
                    selector.modify(self._sock, wanted)
                    selector.select()
                    self._drain_pokes()
        except OSError as exc:
            self.end, self.reason = End.LOST, describe(exc)
        if self._dialer is None or self._stopping or self.end not in (End.CLOSED, End.LOST):
            return False
        with self._lock:
            return not self.leaving or bool(self._outbox or self._half_sent)

    def _dial_again(self) -> bool:
        """Connect and log in again, waiting longer after each failure; True
        once in, False when it must end (stopped, or refused for good)."""
        assert self._dialer is not None
        self.connected = False
        self._sock.close()
        if time.monotonic() - self._up_since >= STABLE_AFTER:
            self._attempt = 0
        lost_at = time.monotonic()
        with self._lock:  # a line cut by the loss goes again whole
            self._outbox[:0] = self._half_sent
            self._half_sent.clear()
        if self.end is End.LOST:
            why = f"lost the connection to the server: {self.reason}"
        else:
            why = "the server closed the connection"
        while True:
            delay = retry_delay(self._attempt, random.random())
            self._attempt += 1
            self._note(f"{PROG}: {why}; trying again in {delay:g} s")
            if not self._pause(delay):
                return False
            try:
                sock, splitter = self._dialer.dial()
            except Refused as refused:
                if not retried(refused.event.code, time.monotonic() - lost_at):
                    self.end, self.refusal = End.REFUSED, refused
                    return False
                why = f"refused: {refused.event.text}"
                continue
            except Failure as failure:
                if failure.final:
                    self.end, self.failure = End.FAILED, failure
                    return False
                why = str(failure)
                continue
            if self._stopping:
                sock.close()
                return False
            sock.setblocking(False)
            self._sock, self._splitter = sock, splitter
            self._up_since = time.monotonic()
            self.end, self.reason = End.STOPPED, ""
            self._note(f"{PROG}: connected again to {self._dialer.where}")
            self._on_event(Event(Kind.OK, self._dialer.settings.username))
            self.connected = True
            return True

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds`; False if stop() came first."""
        deadline = time.monotonic() + seconds
        while not self._stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            select.select([self._wake_reader], [], [], left)
            self._drain_pokes()
        return False

    def _receive(self) -> bool:
        """Handle every line that has arrived; False once the connection ended."""
        while True:
            while (event := self._splitter.pop()) is not None:
                if event.kind is Kind.BYE:
                    self.end = End.BYE
                    return False
                self._on_event(event)
            try:
                data = self._sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                return True
            except ssl.SSLWantWriteError:
                self._blocked_on_write = True
                return True
            if not data:
                self.end = End.CLOSED
                return False
            self._splitter.feed(data)

    def _transmit(self) -> None:
        """Send what is queued, as far as the socket takes it now."""
        while True:
            with self._lock:
                chunk = bytes(self._outbox[:RECV_SIZE])
            if not chunk:
                return
            try:
                sent = self._sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError):
                self._blocked_on_write = True
                return
            except ssl.SSLWantReadError:
                return
            with self._lock:
                del self._outbox[:sent]
                self._room.notify_all()
                if self._dialer is not None:
                    done = chunk[:sent]
                    cut = done.rfind(b"\n")
                    if cut >= 0:
                        self._half_sent[:] = done[cut + 1 :]
                    else:
                        self._half_sent += done

    def _drain_pokes(self) -> None:
        try:
            self._wake_reader.recv(4096)
        except BlockingIOError:
            pass


# ---------------------------------------------------------------------------
# 6. Chat
# ---------------------------------------------------------------------------


class Chat:
    """The logged-in session, seen from the main thread.

    With a `dialer` (-reconnect), the Link connects again by itself when the
    connection is lost; the Chat meanwhile goes on taking what is typed.
    """

    def __init__(
        self,
        sock: socket.socket,
        splitter: LineSplitter,
        output: Output,
        stopper: Stopper,
        history: History,
        dialer: Dialer | None = None,
    ) -> None:
        self._output = output
        self._stopper = stopper
        self._history = history
        self._link = Link(sock, splitter, self._handle, dialer, output.warn)
        self._exit_sent = False
        self._error_shown = False  # the last line handled was an :error

    def run(self, lines: Iterable[bytes]) -> int:
        """Forward `lines` until they end or :Exit; return the exit status.

        Called with the Stopper held: a signal that came since the login is
        raised once the Link runs, so that leaving can send :Exit.
        """
        self._link.start()
        try:
            return self._chat(lines)
        finally:
            self._link.stop()

    def _chat(self, lines: Iterable[bytes]) -> int:
        try:
            self._stopper.arm()
            self._forward(lines)
            self._link.finished.wait()
            self._stopper.hold()  # the last statement: no Stop after it
        except Stop:  # a signal, or the Link's wake-up when the connection ended
            if not self._link.finished.is_set():
                self._leave()
                return 0
        return self._verdict()

    def _forward(self, lines: Iterable[bytes]) -> None:
        """Send each line; stop after a typed :Exit or send :Exit at the end.
        Input is read no faster than the server takes it (Link.wait_for_room)."""
        for line in lines:
            self._link.wait_for_room()
            self._link.send(line + b"\n")
            if line == EXIT:
                self._exit_sent = self._link.leaving = True
                return
        self._link.send(EXIT + b"\n")
        self._exit_sent = self._link.leaving = True

    def _leave(self) -> None:
        """Leave after a signal: :Exit, then a short wait for :bye; at once
        while connecting again (there is no room to leave)."""
        if not self._link.connected:
            return
        if not self._exit_sent:
            self._link.send(EXIT + b"\n")
        self._link.finished.wait(LEAVE_TIMEOUT)

    def _verdict(self) -> int:
        """The exit status once the Link has ended by itself."""
        if self._link.end is End.BYE:
            return 0
        if self._link.refusal is not None:
            report_refusal(self._link.refusal, self._output)
            return 1
        if self._link.failure is not None:
            self._output.warn(f"{PROG}: {self._link.failure}")
            return 1
        if not self._error_shown:  # an :error line already said why
            if self._link.end is End.LOST:
                self._output.warn(f"{PROG}: lost the connection to the server: {self._link.reason}")
            else:
                self._output.warn(f"{PROG}: the server closed the connection")
        return 1

    def _handle(self, event: Event) -> None:
        """Act on one line from the server (in the Link's thread)."""
        if event.kind is Kind.DISPLAY:
            self._history.heard(event.text)
            self._output.say(event.text)
        elif event.kind is Kind.PAST and event.past is not None:
            self._history.add(event.past)
        elif event.kind is Kind.HERE:
            for past in self._history.end():
                self._output.say_past(past)
            self._output.say(users_line(event.text))
        elif event.kind is Kind.OK:  # a new login, after a lost connection
            self._history.begin()
        elif event.kind is Kind.ERROR:
            self._output.warn(event.text)
        elif event.kind is Kind.TOO_LONG:
            self._output.warn(f"{PROG}: dropped a line from the server over {MAX_LINE} bytes")
        self._error_shown = event.kind is Kind.ERROR


# ---------------------------------------------------------------------------
# 7. main
# ---------------------------------------------------------------------------


def run(
    settings: Settings,
    context: ssl.SSLContext | None,
    output: Output,
    stopper: Stopper,
    interactive: bool,
) -> int:
    """Connect, log in and chat; return the exit status. Raises Failure."""
    with open_connection(settings, context) as sock:
        if not is_valid_passcode(settings.passcode):  # the server would refuse it
            output.say("Incorrect passcode")
            return 1
        splitter = LineSplitter()
        try:
            log_in(sock, settings, splitter)
        except Refused as refused:
            report_refusal(refused, output)
            return 1
        stopper.hold()  # from here on a signal waits for the Chat, which can leave properly
        output.say(f"Connected to {settings.host} on port {settings.port}")
        history = History(settings.username, remember=settings.reconnect)
        dialer = Dialer(settings, context) if settings.reconnect else None
        chat = Chat(sock, splitter, output, stopper, history, dialer)
        return chat.run(typed_lines(interactive))


def report_refusal(refused: Refused, output: Output) -> None:
    """Say why the login was refused: the contract's line for a wrong
    passcode, the server's text on stderr for anything else."""
    if refused.event.code == "passcode":
        output.say("Incorrect passcode")
    else:
        output.warn(refused.event.text)


def main(argv: Sequence[str] | None = None) -> int:
    """The program; returns the exit status."""
    parser = make_parser()
    settings = parse_arguments(parser, sys.argv[1:] if argv is None else argv)
    context = None
    if settings.tls:
        try:
            context = tls_context(settings.tls_ca)
        except OSError as exc:
            parser.error(f"argument -tls-ca: {describe(exc)}")
    current_input = terminal_input()
    interactive = current_input is not None
    if interactive and isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")  # keep bytes the locale cannot decode
    colour = colour_wanted(sys.stdout is not None and _is_terminal(sys.stdout), os.environ)
    output = Output(current_input, colour)
    try:  # Stop can come out of any statement here, but only once (see Stopper)
        stopper = Stopper()
        try:
            status = run(settings, context, output, stopper, interactive)
        except Failure as failure:
            output.warn(f"{PROG}: {failure}")
            status = 1
        stopper.hold()  # the last statement: no Stop after it
    except Stop:  # a signal before the chat began (Chat handles its own): no room to leave
        status = 0
    output.erase_input()
    return status


if __name__ == "__main__":
    sys.exit(main())
