#!/usr/bin/env python3
"""chatroom server: one chat room behind a passcode, over TCP (optionally TLS).

    python3 server.py -start -port <port> -passcode <passcode> [options]

The contract is docs/SPEC.md; the wire protocol is docs/PROTOCOL.md. This file runs
alone (standard library only, Python 3.10+) and is laid out in three parts,
top to bottom:

1. THE PURE CORE, with no asyncio, socket, file or clock (the time is
   passed in), tested with no event loop (tests/core, tests/outbox):
   bytes to lines (LineReader), a line to a command (parse_command), the
   room and its transitions (Room: inputs in, outputs out), the login
   throttle, the Outbox (what each connection is owed in one pass: a
   broadcast joined once, each connection's own view as edits), and the
   Core, which is the whole server without I/O. The transport tells the
   Core four things: connect(cid, addr, now), receive(cid, data, now) -
   the one entry point for every read - lost(cid, now) and tick(now). What
   they cause lands in the Core's outbox. A room log (RoomLog: a cluster)
   may stand between the Core and the Room; alone, inputs apply at once.
   With -history, the History keeps the room's last public lines, and a
   new member is sent them (`:past`) and who is here (`:here`) after `:ok`.
2. THE ASYNCIO TRANSPORT, on the stock loop (asyncio's or uvloop): one
   Connection (a BufferedProtocol) per TCP or TLS client, reached by the
   Hub only through the small Peer interface (write, close, abort, pause
   and resume reading, its address); the Hub passes events to the Core with
   the time and writes what it queued once per pass (call_soon). With
   -history-db, a HistoryFile thread writes the history's new lines to
   SQLite in batches, off the loop.
3. THE COMMAND LINE.

Rules this file keeps: the server's stdout carries only the contract's lines;
every error a person can cause is one line on stderr, never a traceback; no
byte from one client reaches another's terminal as a control character.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import heapq
import hmac
import ipaddress
import itertools
import os
import re
import signal
import socket
import ssl
import stat
import struct
import sys
import threading
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

if TYPE_CHECKING:  # optional capabilities, for their types only (imported when their flag is given)
    from chatroom_ext.cluster import RedisLog
    from chatroom_ext.web import WebDoor

# ============================================================================
# 1. The pure core
# ============================================================================

PROTOCOL_VERSION: Final = 1
TIME_FORMAT: Final = "%a %b %d %H:%M:%S %Y"
MAX_USERNAME: Final = 8

_PASSCODE = re.compile(r"[A-Za-z0-9]{1,5}", re.ASCII)
_CONTROL_CHARS: Final = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))
# Not terminal controls, but they break or reorder what a terminal shows: the
# line and paragraph separators, and the bidi controls (marks, embeddings,
# overrides, isolates), which can make a line display as someone else's.
_LAYOUT_CHARS: Final = "\u2028\u2029\u200e\u200f\u061c" + "".join(
    map(chr, [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]))
_NEUTRALISE: Final = str.maketrans(dict.fromkeys(_CONTROL_CHARS + _LAYOUT_CHARS, "\ufffd"))


def is_valid_passcode(text: str) -> bool:
    """SPEC.md: a passcode is 1 to 5 ASCII letters or digits."""
    return _PASSCODE.fullmatch(text) is not None


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


def name_key(name: str) -> str:
    """Usernames are unique ignoring case: `Bob` cannot join while `bob` is in."""
    return unicodedata.normalize("NFC", name).casefold()


# Letters of other scripts (and a few Latin ones) that look like a Latin
# letter, each mapped to the letter it passes for, in the same case: Cyrillic,
# Greek and Armenian look-alikes, Latin small capitals, dotless i and j,
# script a and g. Written for this project after the idea of the
# confusables data of Unicode's UTS #39, which is much larger; see
# docs/SECURITY.md ("Names") for what is and is not covered.
_LOOK_ALIKE: Final = str.maketrans({
    # Cyrillic capitals, then small letters
    "\u0410": "A", "\u0412": "B", "\u0415": "E", "\u041a": "K", "\u041c": "M", "\u041d": "H",
    "\u041e": "O", "\u0420": "P", "\u0421": "C", "\u0422": "T", "\u0423": "Y", "\u0425": "X",
    "\u0405": "S", "\u0406": "I", "\u0408": "J", "\u04ae": "Y", "\u04ba": "h", "\u04c0": "l",
    "\u0474": "V", "\u051a": "Q", "\u051c": "W",
    "\u0430": "a", "\u0435": "e", "\u043e": "o", "\u0440": "p", "\u0441": "c", "\u0443": "y",
    "\u0445": "x", "\u0455": "s", "\u0456": "i", "\u0458": "j", "\u0501": "d", "\u04bb": "h",
    "\u04cf": "l", "\u04af": "y", "\u0475": "v", "\u051b": "q", "\u051d": "w",
    # Greek capitals, then small letters
    "\u0391": "A", "\u0392": "B", "\u0395": "E", "\u0396": "Z", "\u0397": "H", "\u0399": "I",
    "\u039a": "K", "\u039c": "M", "\u039d": "N", "\u039f": "O", "\u03a1": "P", "\u03a4": "T",
    "\u03a5": "Y", "\u03a7": "X", "\u037f": "J",
    "\u03b1": "a", "\u03bf": "o", "\u03bd": "v", "\u03c1": "p", "\u03b9": "i", "\u03ba": "k",
    "\u03c5": "u", "\u03c7": "x", "\u03b3": "y", "\u03f3": "j",
    # Armenian
    "\u0555": "O", "\u054d": "U", "\u0585": "o", "\u0578": "n", "\u057d": "u", "\u0570": "h",
    "\u0566": "q",
    # Latin: small capitals (they pass for capitals, and names ignore case),
    # dotless i and j, script a and g, the dental click (a bar)
    "\u1d00": "A", "\u0299": "B", "\u1d04": "C", "\u1d05": "D", "\u1d07": "E", "\ua730": "F",
    "\u0262": "G", "\u029c": "H", "\u026a": "I", "\u1d0a": "J", "\u1d0b": "K", "\u029f": "L",
    "\u1d0d": "M", "\u0274": "N", "\u1d0f": "O", "\u1d18": "P", "\ua7af": "Q", "\u0280": "R",
    "\ua731": "S", "\u1d1b": "T", "\u1d1c": "U", "\u1d20": "V", "\u1d21": "W", "\u028f": "Y",
    "\u1d22": "Z", "\u0131": "i", "\u0237": "j", "\u0251": "a", "\u0261": "g", "\u01c0": "l",
})


def name_skeleton(name: str) -> str:
    """What `name` looks like, for telling look-alike names apart, in the
    spirit of the "skeleton" of Unicode's UTS #39: compatibility forms
    unfolded (NFKD: fullwidth, mathematical and ligature letters become plain
    ones, accents become marks), look-alike letters mapped to the Latin
    letter they pass for, case folded. Two names with one skeleton cannot
    both be in the room. ASCII letters and digits are left as they are:
    `b0b` and `bob` are different names (see docs/SECURITY.md, "Names")."""
    if name.isascii():
        return name.lower()  # the usual case: ASCII has no look-alikes here
    text = unicodedata.normalize("NFKD", name).translate(_LOOK_ALIKE).casefold()
    return unicodedata.normalize("NFKD", text).translate(_LOOK_ALIKE)


def neutralise(text: str) -> str:
    """Replace every control character (C0, DEL, C1), and the line and
    paragraph separators and bidi controls, with U+FFFD, so no terminal obeys
    them."""
    if text.isascii() and text.isprintable():
        return text  # the usual case, and nothing to replace
    return text.translate(_NEUTRALISE)


def room_time(now: float) -> str:
    """The room's clock, as SPEC.md spells it: `Wed Sep 24 12:31:44 2025`."""
    return time.strftime(TIME_FORMAT, time.localtime(now))


# --- Bytes to lines ----------------------------------------------------------


class TooLong:
    """A line longer than the limit arrived; it was dropped."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "TOO_LONG"


class Flood:
    """More bytes than allowed arrived without a line end; stop reading."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FLOOD"


TOO_LONG: Final = TooLong()
FLOOD: Final = Flood()
Received = str | TooLong | Flood


class LineReader:
    """Cuts a byte stream into decoded lines, holding at most `max_line` bytes.

    feed() returns, in order, one item per line end seen: the line as text
    (a trailing CR dropped, invalid UTF-8 replaced by U+FFFD) or TOO_LONG for
    a line over the limit. Once more than `max_unterminated` bytes arrive with
    no line end, the last item is FLOOD and the reader accepts nothing more.
    Whatever the bytes, feed() raises nothing.
    """

    __slots__ = ("_buf", "_flooded", "_skipped", "max_line", "max_unterminated")

    def __init__(self, max_line: int, max_unterminated: int | None = None) -> None:
        self.max_line = max_line
        self.max_unterminated = max_unterminated or 8 * max_line
        self._buf = b""
        self._skipped = -1  # bytes of an over-long line dropped so far; -1: none
        self._flooded = False

    def whole(self, chunk: bytes | memoryview) -> bool:
        """Is `chunk` whole lines, none too long, with nothing held before it?
        Then feed(chunk) gives exactly its lines, and changes nothing here: a
        caller may take such a chunk as it is, without feeding it."""
        return (len(chunk) <= self.max_line + 1 and chunk[-1:] == b"\n" and not self._buf
                and self._skipped < 0 and not self._flooded)

    def feed(self, chunk: bytes | memoryview) -> list[Received]:
        if self.whole(chunk):
            # The commonest read: whole lines, none of them too long. One
            # decode gives what decoding each line would: a line end is never
            # part of a UTF-8 sequence, nor of a replaced one.
            text = str(chunk, "utf-8", "replace")
            if "\r" not in text:
                whole: list[Received] = text.split("\n")  # type: ignore[assignment]
                del whole[-1]
                return whole
        data = bytes(chunk)
        if self._flooded:
            return []
        if self._buf:
            data = self._buf + data
            self._buf = b""
        *lines, tail = data.split(b"\n")
        out: list[Received] = []
        limit, flood = self.max_line, self.max_unterminated
        skipped = self._skipped
        for raw in lines:
            if skipped >= 0:  # the end of an over-long line whose start was dropped
                if skipped + len(raw) > flood:
                    return self._flood(out)
                out.append(TOO_LONG)
                skipped = -1
                continue
            if len(raw) > limit:
                if len(raw) > flood:
                    return self._flood(out)
                if len(raw) > limit + 1 or raw[-1:] != b"\r":
                    out.append(TOO_LONG)
                    continue
            if raw[-1:] == b"\r":
                raw = raw[:-1]
            out.append(raw.decode("utf-8", "replace"))
        if skipped >= 0:
            skipped += len(tail)
        elif len(tail) > limit + 1:  # room for a CR before the line end
            skipped = len(tail)
        else:
            self._buf = tail
        if skipped > flood:
            return self._flood(out)
        self._skipped = skipped
        return out

    def _flood(self, out: list[Received]) -> list[Received]:
        self._flooded = True
        self._buf = b""
        out.append(FLOOD)
        return out


# --- Lines to commands -------------------------------------------------------


@dataclass(slots=True)  # not frozen: built per message, and frozen costs
class Say:
    """Text for the others (`alice: <text>`); `echo`: the sender sees it too."""

    text: str
    echo: bool = False


@dataclass(frozen=True, slots=True)
class Tell:
    """The room's time, `hours` ahead, for everyone (`:mytime`, `:+1hr`)."""

    hours: int


@dataclass(frozen=True, slots=True)
class Users:
    """`:Users`: the member list, back to the asker."""


@dataclass(frozen=True, slots=True)
class Whisper:
    """`:Msg <to> <text>`: a private message."""

    to: str
    text: str


@dataclass(frozen=True, slots=True)
class Exit:
    """`:Exit`: leave the room."""


@dataclass(frozen=True, slots=True)
class Blank:
    """An empty line, or only spaces: nothing to do."""


@dataclass(frozen=True, slots=True)
class Malformed:
    """A command with the wrong shape; `usage` is the one-line help."""

    usage: str


Command = Say | Tell | Users | Whisper | Exit | Blank | Malformed

COMMANDS: Final[dict[str, Command]] = {
    ":)": Say("[feeling happy]"),
    ":(": Say("[feeling sad]"),
    ":mytime": Tell(0),
    ":+1hr": Tell(1),
    ":Users": Users(),
    ":Exit": Exit(),
}
MSG_USAGE: Final = "Usage: :Msg <username> <message>"


def parse_command(line: str) -> Command:
    """What a member's line asks for (SPEC.md, 'In the room').

    Commands count only as the whole line. A leading backslash before `:` or
    another backslash is removed and the rest is plain text (`\\:)` -> `:)`).
    """
    command = COMMANDS.get(line)
    if command is not None:
        return command
    if line.startswith(":Msg ") or line == ":Msg":
        to, _, text = line[5:].partition(" ")
        if not to or not text.strip():
            return Malformed(MSG_USAGE)
        return Whisper(neutralise(to), neutralise(text))
    if not line or line.isspace():
        return Blank()
    if line[:2] in ("\\:", "\\\\"):
        line = line[1:]
    return Say(neutralise(line))


# --- The room ----------------------------------------------------------------
# Events are facts about the room; Room.apply turns each into outputs. A
# command first becomes events (decide), then events become outputs (apply):
# on one server both happen at once; a cluster can carry events between them.


@dataclass(frozen=True, slots=True)
class Joined:
    name: str


@dataclass(frozen=True, slots=True)
class Left:
    name: str


@dataclass(slots=True)  # not frozen: built per message, and frozen costs
class Said:
    name: str
    text: str
    echo: bool = False


@dataclass(frozen=True, slots=True)
class Whispered:
    sender: str
    to: str
    text: str


Event = Joined | Left | Said | Whispered


@dataclass(slots=True)  # not frozen: built per message, and frozen costs
class Deliver:
    """Send `line` to member `to`, or (to=None) to every member but `skip`."""

    line: str
    to: str | None = None
    skip: str | None = None


@dataclass(slots=True)  # not frozen: built per message, and frozen costs
class Log:
    """The server prints `line`."""

    line: str


@dataclass(frozen=True, slots=True)
class Fail:
    """Tell member `to` that something it asked for failed; it stays."""

    to: str
    code: str
    text: str


@dataclass(frozen=True, slots=True)
class Bye:
    """Member `to` has left by asking: answer `:bye`, then close."""

    to: str


@dataclass(frozen=True, slots=True)
class Welcome:
    """The login holding `ticket` got in as `name`: answer `:ok`."""

    ticket: str
    name: str


@dataclass(frozen=True, slots=True)
class TurnAway:
    """The login holding `ticket` is refused (it lost a race for its name)."""

    ticket: str
    code: str
    text: str


Output = Deliver | Log | Fail | Bye | Welcome | TurnAway

# --- Inputs: what the room is asked to do, in the order it happens ------------
# Inputs are plain values so that something outside the core can put them in
# one order: on one server they are applied as they come (Hub.apply); in a
# cluster a shared log orders them for every server (chatroom_ext.cluster).


@dataclass(frozen=True, slots=True)
class Joining:
    """`name` asks to join; `ticket` tells its server which connection it is."""

    name: str
    ticket: str


@dataclass(slots=True)  # not frozen: built per message, and frozen costs
class Typed:
    """Member `name` typed `text` at `now` (seconds since the epoch)."""

    name: str
    text: str
    now: float


@dataclass(frozen=True, slots=True)
class Gone:
    """Member `name` is gone without `:Exit` (connection lost, server down)."""

    name: str


Input = Joining | Typed | Gone


@dataclass(frozen=True, slots=True)
class Refused:
    """A login turned down: the protocol's error code and its one line."""

    code: str
    text: str


class Room:
    """One chat room: who is in it, in join order, and what each act causes."""

    def __init__(self, passcode: str) -> None:
        self._passcode = passcode.encode()
        self._members: dict[str, str] = {}  # name_key -> name, in join order
        self._present: set[str] = set()  # the same names, exactly as they joined
        self._looks: dict[str, int] = {}  # name_skeleton -> how many members have it

    def __contains__(self, name: str) -> bool:
        return name_key(name) in self._members

    @property
    def names(self) -> list[str]:
        return list(self._members.values())

    def passcode_ok(self, passcode: str) -> bool:
        """Constant-time comparison, so timing tells nothing about the passcode."""
        return hmac.compare_digest(passcode.encode(), self._passcode)

    def check_login(self, passcode: str, name: str) -> Refused | None:
        """Why this login is refused, or None. The passcode is checked first.
        A name is taken when a member has it (ignoring case) or one that looks
        the same (name_skeleton): `ΒΟΒ` in Greek capitals while `bob` is in."""
        if not self.passcode_ok(passcode):
            return Refused("passcode", "Incorrect passcode")
        problem = username_problem(name)
        if problem is not None:
            return Refused("bad-username", f"Invalid username: {problem}")
        if name in self or name_skeleton(name) in self._looks:  # or one that looks the same
            return Refused("name-taken", f"The username {name} is already in the chatroom")
        return None

    def step(self, inp: Input) -> list[Output]:
        """Apply one input, whatever its origin; the same inputs in the same
        order give the same room and the same outputs on every server."""
        if isinstance(inp, Typed):
            if inp.name not in self._present:
                return []  # typed just before leaving; nobody to speak for
            return self.handle(inp.name, parse_command(inp.text), inp.now)
        if isinstance(inp, Joining):
            if inp.name in self:
                text = f"The username {inp.name} is already in the chatroom"
                return [TurnAway(inp.ticket, "name-taken", text)]
            return [Welcome(inp.ticket, inp.name), *self.join(inp.name)]
        return self.leave(inp.name)

    def join(self, name: str) -> list[Output]:
        """`name` (already checked) enters the room."""
        return self.apply(Joined(name))

    def leave(self, name: str) -> list[Output]:
        """`name` is gone without asking (connection lost): as if it typed :Exit."""
        if name not in self:
            return []
        return self.apply(Left(name))

    def handle(self, name: str, command: Command, now: float) -> list[Output]:
        """Member `name` typed `command` at time `now` (seconds since the epoch)."""
        events, replies = self.decide(name, command, now)
        outputs: list[Output] = []
        for event in events:
            outputs += self.apply(event)
        return outputs + replies

    def decide(self, name: str, command: Command, now: float) -> tuple[list[Event], list[Output]]:
        """The events `command` causes, and the replies that follow them."""
        if isinstance(command, Say):
            return [Said(name, command.text, command.echo)], []
        if isinstance(command, Tell):
            return [Said(name, room_time(now + 3600 * command.hours), echo=True)], []
        if isinstance(command, Users):
            listing = "Active Users: " + ", ".join(self._members.values())
            return [], [Log(f"{name}: searched up active users"), Deliver(listing, to=name)]
        if isinstance(command, Whisper):
            to = self._members.get(name_key(command.to))
            if to is None:
                text = f"No user named {command.to} is in the chatroom"
                return [], [Fail(name, "no-such-user", text)]
            return [Whispered(name, to, command.text)], []
        if isinstance(command, Exit):
            return [Left(name)], [Bye(name)]
        if isinstance(command, Malformed):
            return [], [Fail(name, "usage", command.usage)]
        return [], []  # Blank

    def apply(self, event: Event) -> list[Output]:
        """Change the room by `event`; return what to deliver and print."""
        if isinstance(event, Said):
            line = f"{event.name}: {event.text}"
            return [Log(line), Deliver(line, skip=None if event.echo else event.name)]
        if isinstance(event, Whispered):
            return [
                Log(f"{event.sender}: send message to {event.to}"),
                Deliver(f"[Message from {event.sender}]: {event.text}", to=event.to),
            ]
        if isinstance(event, Joined):
            self._members[name_key(event.name)] = event.name
            self._present.add(event.name)
            looks = name_skeleton(event.name)
            self._looks[looks] = self._looks.get(looks, 0) + 1
            line = f"{event.name} joined the chatroom"
        else:
            gone = self._members.pop(name_key(event.name), None)
            if gone is not None:
                self._present.discard(gone)
                looks = name_skeleton(gone)
                if self._looks[looks] > 1:
                    self._looks[looks] -= 1
                else:
                    del self._looks[looks]
            line = f"{event.name} left the chatroom"
        return [Log(line), Deliver(line, skip=event.name)]


def public_lines(inp: Input) -> list[str]:
    """The public lines (Deliver to everyone) `inp` gives in a room where it
    takes effect: a Typed or a Gone from a member, a Joining of a free name.
    What a history keeps of it, from the input alone, so that servers of a
    cluster agree on it whatever each holds (chatroom_ext.cluster)."""
    room = Room("")
    if not isinstance(inp, Joining):
        room.join(inp.name)
    return [out.line for out in room.step(inp) if type(out) is Deliver and out.to is None]


class LoginThrottle:
    """Wrong-passcode throttling per address, in bounded memory.

    After `max_failures` wrong passcodes from one address within `window`
    seconds, that address is refused until the oldest of them is `window` old.
    At most `max_tracked` addresses are remembered (the oldest are forgotten).
    """

    def __init__(self, max_failures: int, window: float, max_tracked: int = 65536) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_tracked = max_tracked
        self._failures: dict[str, deque[float]] = {}

    def blocked(self, addr: str, now: float) -> bool:
        times = self._failures.get(addr)
        if times is None:
            return False
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[addr]
            return False
        return len(times) >= self.max_failures

    def failed(self, addr: str, now: float) -> None:
        times = self._failures.get(addr)
        if times is None:
            if len(self._failures) >= self.max_tracked:
                del self._failures[next(iter(self._failures))]
            times = self._failures[addr] = deque(maxlen=max(self.max_failures, 1))
        times.append(now)

    def succeeded(self, addr: str) -> None:
        self._failures.pop(addr, None)

    def forget_older_than(self, now: float) -> None:
        for addr in [a for a, t in self._failures.items() if not t or t[-1] <= now - self.window]:
            del self._failures[addr]


class RateLimiter:
    """A token bucket per key (an address), in bounded memory: `burst` at
    once, then `rate` a second; a rate of 0 allows everything. At most
    `max_tracked` keys are remembered (the least recently seen are forgotten)."""

    def __init__(self, burst: int, rate: float, max_tracked: int = 65536) -> None:
        self.burst = burst
        self.rate = rate
        self.max_tracked = max_tracked
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (level, when)

    def allow(self, key: str, now: float) -> bool:
        if not self.rate:
            return True
        level, when = self._buckets.pop(key, (float(self.burst), now))
        level = min(float(self.burst), level + (now - when) * self.rate)
        allowed = level >= 1
        if allowed:
            level -= 1
        if len(self._buckets) >= self.max_tracked:
            del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = (level, now)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


def address_key(addr: str) -> str:
    """What the per-address limits and the throttle count: an IPv4 address, or
    an IPv6 /64 (one site's usual share), so that a host cannot dodge them by
    hopping between the addresses it was given."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if not ip.is_loopback:
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def parse_login(line: str) -> tuple[str, str] | None:
    """`LOGIN <passcode> <username>` -> (passcode, username), or None."""
    parts = line.split(" ")
    if len(parts) != 3 or parts[0].upper() != "LOGIN":
        return None
    return parts[1], parts[2]


LOOPBACK: Final = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True)
class Limits:
    """Every limit against hostile or broken clients (docs/SECURITY.md)."""

    max_line: int = 2048  # bytes in one line, line end not counted
    max_sendq: int = 128 << 10  # bytes queued for one client before it is dropped
    login_timeout: float = 60.0  # seconds from connect to a finished login
    max_clients: int = 20000  # connections in total
    max_per_ip: int = 20  # connections from one address
    login_failures: int = 5  # wrong passcodes from one address ...
    failure_window: float = 60.0  # ... within this many seconds, then refused
    exempt: tuple[str, ...] = LOOPBACK  # networks free of the per-address limits
    # Each member's budget: a burst at once, then a steady rate; a line costs
    # one line and its bytes. Over budget, the member is not read until it
    # refills. 0 turns a rate off.
    burst_lines: int = 50
    rate_lines: float = 10.0  # lines per second
    burst_bytes: int = 16 << 10
    rate_bytes: float = 4 << 10  # bytes per second
    # New connections from one (non-exempt) address: a burst, then a rate.
    connect_burst: int = 20
    connect_rate: float = 2.0  # connections per second
    max_handshakes: int = 256  # TLS handshakes in progress, in total ...
    max_handshakes_per_ip: int = 4  # ... and from one (non-exempt) address

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.exempt]


# --- The outbox: what each connection is owed in one pass ---------------------

ConnId = int  # a connection, numbered by the transport; never reused


@dataclass(slots=True)
class Batch:
    """One pass's output: the bytes for each connection (in the order
    connections were first owed something), the connections to close once
    their bytes are written, and the server's own lines for stdout."""

    writes: list[tuple[ConnId, bytes]]
    close: list[ConnId]
    printed: bytes
    reading: list[tuple[ConnId, bool]]  # connections to stop (False) or go on (True) reading


class Outbox:
    """What each connection is owed in one pass, decided with no I/O.

    A broadcast goes to every recipient (this server's members), encoded and
    joined once for all of them. What sets one connection's stream apart
    from everyone's (its own line skipped, a line for it alone, joining or
    leaving the recipients mid-pass) is kept as edits against the list of
    broadcasts, so order holds for everyone: a member sees exactly the
    broadcasts made while it was a recipient, with its own lines slotted in
    where they were queued. take() empties the outbox into a Batch: one
    write per connection per pass.

    `urgent` is False while everything queued is room notices (joins and
    leaves): the transport may let those wait a moment for company.
    """

    __slots__ = ("_bcast", "_close", "_edits", "_owed", "_printed", "_ranges", "_reading",
                 "recipients", "urgent")

    def __init__(self) -> None:
        self.recipients: dict[ConnId, None] = {}  # members, in join order (a set that keeps it)
        self.urgent = False
        self._bcast: list[bytes] = []
        self._edits: dict[ConnId, list[tuple[int, bytes | None]]] = {}
        self._ranges: dict[ConnId, list[int]] = {}  # [from, until): joined or left mid-pass
        self._close: list[ConnId] = []
        self._printed: list[bytes] = []
        self._owed: dict[ConnId, int] = {}  # bytes sent to one connection alone
        self._reading: list[tuple[ConnId, bool]] = []

    def __bool__(self) -> bool:
        return bool(self._bcast or self._edits or self._ranges or self._close or self._printed
                    or self._reading)

    def add(self, cid: ConnId) -> None:
        """`cid` receives broadcasts from now on (once per connection: a
        member that leaves is not added again)."""
        self.recipients[cid] = None
        self._ranges[cid] = [len(self._bcast), -1]

    def remove(self, cid: ConnId) -> None:
        """`cid` receives no broadcast from now on (what it is owed stays)."""
        if cid in self.recipients:
            del self.recipients[cid]
            self._ranges.setdefault(cid, [0, -1])[1] = len(self._bcast)

    def broadcast(self, data: bytes, skip: ConnId | None = None) -> None:
        """`data` (whole lines) for every recipient but `skip`."""
        if skip is not None:
            self._edit(skip, None)
        self._bcast.append(data)

    def send(self, cid: ConnId, data: bytes) -> None:
        """`data` for `cid` alone, after everything queued for it so far."""
        self._edit(cid, data)
        self._owed[cid] = self._owed.get(cid, 0) + len(data)

    def owed(self, cid: ConnId) -> int:
        """Bytes queued for `cid` alone in this pass (replies, not broadcasts)."""
        return self._owed.get(cid, 0)

    def reading(self, cid: ConnId, on: bool) -> None:
        """Stop reading `cid` (on=False), or go on (on=True)."""
        self._reading.append((cid, on))

    def close(self, cid: ConnId) -> None:
        """Close `cid` once what it is owed is written."""
        self._close.append(cid)

    def print(self, data: bytes) -> None:
        """Lines (each with its line end) for the server's stdout."""
        self._printed.append(data)

    def drop(self, cid: ConnId) -> None:
        """`cid` is gone: forget it and whatever it was owed."""
        self.recipients.pop(cid, None)
        self._edits.pop(cid, None)
        self._ranges.pop(cid, None)
        self._owed.pop(cid, None)
        if cid in self._close:
            self._close.remove(cid)
        self._reading = [r for r in self._reading if r[0] != cid]

    def _edit(self, cid: ConnId, data: bytes | None) -> None:
        edits = self._edits.get(cid)
        if edits is None:
            self._edits[cid] = [(len(self._bcast), data)]
        else:
            edits.append((len(self._bcast), data))

    def take(self) -> Batch:
        """Everything queued, as one write per connection; the outbox is empty after."""
        bcast, edits, ranges = self._bcast, self._edits, self._ranges
        batch = Batch([], self._close, b"".join(self._printed), self._reading)
        self._bcast, self._edits, self._ranges, self._close, self._printed = [], {}, {}, [], []
        self._owed, self._reading = {}, []
        self.urgent = False
        common = b"".join(bcast)
        writes = batch.writes
        special = edits.keys() | ranges.keys()  # their own view; usually none or few
        if common:
            if special:
                writes += [(cid, common) for cid in self.recipients if cid not in special]
            else:
                writes += [(cid, common) for cid in self.recipients]
        if special:
            offsets = list(itertools.accumulate(map(len, bcast), initial=0))
            whole = len(bcast)
            for cid in (*edits, *(c for c in ranges if c not in edits)):
                lo, hi = ranges.get(cid, (0, whole if cid in self.recipients else 0))
                data = stream_view(common, offsets, edits.get(cid, ()), lo,
                                   whole if hi < 0 else hi)
                if data:
                    writes.append((cid, data))
        return batch


def stream_view(common: bytes, offsets: Sequence[int], edits: Iterable[tuple[int, bytes | None]],
                lo: int, hi: int) -> bytes:
    """One connection's bytes for a pass: broadcasts lo..hi of `common`, with
    edits applied in order: (pos, None) skips broadcast pos, (pos, data)
    puts data before broadcast pos."""
    pieces: list[bytes] = []
    cur = lo
    for pos, data in edits:
        stop = min(max(pos, lo), hi)
        if stop > cur:
            pieces.append(common[offsets[cur]:offsets[stop]])
            cur = stop
        if data is None:
            if lo <= pos < hi and pos == cur:
                cur = pos + 1
        else:
            pieces.append(data)
    if hi > cur:
        pieces.append(common[offsets[cur]:offsets[hi]])
    return b"".join(pieces)


# --- History: the room's last public lines -------------------------------------


@dataclass(frozen=True, slots=True)
class Past:
    """One public line of the room: its id (unique in the room, without
    spaces), when it was said (seconds since the epoch), and the display line."""

    id: str
    when: float
    line: str


def utc_stamp(when: float) -> str:
    """`2026-12-02T16:05:03Z`: a line's time in a `:past` line."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class History:
    """The room's last `keep` public lines (what everyone sees: chat, shortcuts,
    time answers, joins and leaves), none older than `max_age` seconds.

    Pure: the time is passed in. Ids are `prefix` and a counter from `first`;
    the prefix tells one history from another (a restart without a file
    starts a new one), so an id never names two lines. A cluster's log
    records its lines under ids of its own (the log entry's), the same on
    every server. Lines recorded and not yet saved wait in `unsaved` for
    whoever keeps them on disk.
    """

    def __init__(self, keep: int, max_age: float, prefix: str, first: int = 1,
                 lines: Iterable[Past] = (), max_bytes: int = 64 << 10,
                 saving: bool = False) -> None:
        self.keep = keep
        self.max_age = max_age
        self.prefix = prefix
        self.max_bytes = max_bytes  # a replay never owes a new member more than this
        self.next = first
        self.saving = saving  # keep what is recorded in `unsaved` (a file takes it)
        self.unsaved: list[Past] = []
        self._lines: deque[Past] = deque(lines, maxlen=keep)
        self._replay: tuple[tuple[int, str], bytes] | None = None  # (next, oldest id), bytes

    def __len__(self) -> int:
        return len(self._lines)

    def record(self, line: str, when: float, id: str | None = None) -> None:
        """Keep `line`, said at `when`, under the next id, or under `id` when
        the line's id comes from elsewhere (a cluster's log names each line)."""
        past = Past(f"{self.prefix}{self.next}" if id is None else id, when, line)
        self.next += 1
        self._lines.append(past)
        if self.saving:
            self.unsaved.append(past)

    def clear(self) -> None:
        """Forget every line (a cluster reloads its history from the log)."""
        self._lines.clear()
        self.unsaved.clear()
        self._replay = None

    def lines(self, now: float) -> list[Past]:
        """The kept lines not older than max_age at `now`, oldest first."""
        lines, oldest = self._lines, now - self.max_age
        while lines and lines[0].when < oldest:
            lines.popleft()
        return list(lines)

    def replay(self, now: float) -> bytes:
        """The `:past` lines a new member is sent: the newest that fit in
        max_bytes, oldest first (the same bytes for every login until a line
        is recorded or expires)."""
        lines = self.lines(now)
        key = (self.next, lines[0].id if lines else "")
        if self._replay is None or self._replay[0] != key:
            out: list[bytes] = []
            size = 0
            for past in reversed(lines):
                data = f":past {past.id} {utc_stamp(past.when)} {past.line}\n".encode()
                size += len(data)
                if size > self.max_bytes:
                    break
                out.append(data)
            self._replay = (key, b"".join(reversed(out)))
        return self._replay[1]

    def take_unsaved(self) -> list[Past]:
        unsaved, self.unsaved = self.unsaved, []
        return unsaved


# --- The server's core: connections in, plain values out -----------------------


class RoomLog(Protocol):
    """Where the room's inputs are put in one order (docs/CLUSTER.md).

    Alone, the core applies each input as it is made. A log (the Redis
    cluster) takes them instead, and hands every input of the room, this
    server's and the others', back to Hub.apply in the one order all
    servers share: the same path, with the log in the middle. With a log,
    the log also keeps the room's history (Hub.history): it knows each
    line's place in that order."""

    node: str  # this server's name among the log's servers; it prefixes login tickets

    def submit(self, inp: Input) -> None: ...


class _Conn:
    """What the core knows of one connection."""

    __slots__ = ("addr", "bytes", "cid", "closing", "held", "lines", "name", "paused", "reader",
                 "securing", "stamp", "ticket")

    def __init__(self, cid: ConnId, addr: str, reader: LineReader, limits: Limits,
                 now: float) -> None:
        self.cid = cid
        self.addr = addr
        self.reader = reader
        self.name: str | None = None  # set while it is a member of the room
        self.ticket: str | None = None  # set while its login waits for the room
        self.held: deque[Received] = deque()  # lines read, not yet served
        self.closing = False  # refused or left: nothing more it sends counts
        self.paused = False  # not read until its held lines are served
        self.securing = False  # its TLS handshake is under way
        self.lines = float(limits.burst_lines)  # the budget left, refilled at `stamp`
        self.bytes = float(limits.burst_bytes)
        self.stamp = now


class Core:
    """The server with no I/O: connections' bytes in, plain values out.

    The transport numbers each connection and tells the core four things,
    always with the time (seconds since the epoch):

        connect(cid, addr, now)   a connection arrived from `addr`
        receive(cid, data, now)   it sent `data` (one read; the one way in)
        lost(cid, now)            it is gone
        tick(now)                 the time next_tick() named has come

    and, in a cluster, apply(inp) for every input the shared log hands
    back. Everything they cause lands in `outbox` (what to write to whom,
    who to close, whom to stop or go on reading, what the server prints);
    the transport takes it once per pass.

    Rules kept here: a connection logs in with its first line, within
    `login_timeout`; limits count at connect, and so does the rate of new
    connections from one address; a refused connection is told why in one
    line and closed; a member's lines reach the room in the order sent, each
    as one input, as its budget allows: past it, or once a pass owes it more
    than its SendQ, the rest of what it sent waits (and it is not read)
    until the budget refills or the pass is written, so a read never causes
    unbounded work and nothing is dropped; nothing a connection sends after
    it was refused or left counts.
    """

    shortcut = True  # take the plain-chat shortcut (tests turn it off to compare)

    def __init__(self, room: Room, limits: Limits, log: RoomLog | None = None,
                 history: History | None = None) -> None:
        self.room = room
        self.limits = limits
        self.history = history
        # Alone, the core records each public line as it routes it. With a log
        # the log records them: it names each line by its place in the room's
        # order and knows when it was said, the same on every server.
        self._recorder = history if log is None else None
        self.outbox = Outbox()
        self.throttle = LoginThrottle(limits.login_failures, limits.failure_window)
        self.node = "local" if log is None else log.node
        self._alone = log is None  # inputs apply here and now, with no log between
        self._submit: Callable[[Input], None] = self.apply if log is None else log.submit
        # Each member's budget is kept only when a rate is set (the bench sets none).
        self._budgeted = bool(limits.rate_lines or limits.rate_bytes)
        self._conns: dict[ConnId, _Conn] = {}
        self.members: dict[str, ConnId] = {}  # this server's members, by name
        self._waiting: dict[str, _Conn] = {}  # logins waiting for the room, by ticket
        self._per_ip: dict[str, int] = {}
        self._handshakes = 0  # TLS handshakes under way ...
        self._shaking: dict[str, int] = {}  # ... by address
        self._deadlines: deque[tuple[float, ConnId]] = deque()  # in connect order
        self._asleep: dict[ConnId, float] = {}  # paused members: when to serve them again
        self._wakes: list[tuple[float, ConnId]] = []  # the same, as a heap (stale entries skipped)
        self._serving: _Conn | None = None
        self._now = 0.0  # the latest time the transport told
        self.arrivals = RateLimiter(limits.connect_burst, limits.connect_rate)
        self._tickets = itertools.count(1)
        self._exempt = limits.networks()
        self._exempt_cache: dict[str, bool] = {}
        self._too_long = (f":error line-too-long Line too long: at most {limits.max_line} "
                          "bytes; it was not sent\n").encode()

    # -- the transport's four calls ---------------------------------------------

    def connect(self, cid: ConnId, addr: str, now: float, securing: bool = False) -> None:
        """Connection `cid` arrived from `addr` (an address_key); `securing`:
        its TLS handshake starts now (secured() says when it is done)."""
        limits = self.limits
        self._now = now
        exempt = self.exempt(addr)
        if len(self._conns) >= limits.max_clients:
            self._turn_away(cid, "full", "The server is full; try again later")
            return
        if not exempt:
            if self._per_ip.get(addr, 0) >= limits.max_per_ip:
                self._turn_away(cid, "full", "Too many connections from your address")
                return
            if not self.arrivals.allow(addr, now):
                self._turn_away(cid, "throttled", "Too many new connections from your "
                                                  "address; try again later")
                return
        if securing and (self._handshakes >= limits.max_handshakes or (
                not exempt and self._shaking.get(addr, 0) >= limits.max_handshakes_per_ip)):
            self._turn_away(cid, "full", "Too many connections are starting; try again later")
            return
        conn = self._conns[cid] = _Conn(cid, addr, LineReader(limits.max_line), limits, now)
        if securing:
            conn.securing = True
            self._handshakes += 1
            self._shaking[addr] = self._shaking.get(addr, 0) + 1
        self._per_ip[addr] = self._per_ip.get(addr, 0) + 1
        self._deadlines.append((now + limits.login_timeout, cid))
        self.outbox.send(cid, HELLO)

    def receive(self, cid: ConnId, data: bytes | memoryview, now: float) -> None:
        """Connection `cid` sent `data`: the one entry point for a read."""
        conn = self._conns.get(cid)
        if conn is None or conn.closing:
            return
        self._now = now
        if conn.name is not None and not conn.held and self.shortcut and self._alone:
            block = self._plain_chat(conn, data)
            if block is not None and self._spend_all(conn, block.count(b"\n"), len(data), now):
                self.outbox.urgent = True
                self.outbox.broadcast(block, skip=cid)
                self.outbox.print(block)
                if self._recorder is not None:
                    for line in block.decode().split("\n")[:-1]:
                        self._recorder.record(line, now)
                return
        conn.held.extend(conn.reader.feed(data))
        if not conn.paused:
            self._serve(conn, now)

    def secured(self, cid: ConnId) -> None:
        """The TLS handshake of connection `cid` is done."""
        conn = self._conns.get(cid)
        if conn is not None and conn.securing:
            conn.securing = False
            self._handshakes -= 1
            left = self._shaking[conn.addr] - 1
            if left:
                self._shaking[conn.addr] = left
            else:
                del self._shaking[conn.addr]

    def lost(self, cid: ConnId, now: float | None = None) -> None:
        """Connection `cid` is gone; a member leaves the room as with :Exit."""
        if now is not None:
            self._now = now
        self.outbox.drop(cid)
        self._asleep.pop(cid, None)
        self.secured(cid)
        conn = self._conns.pop(cid, None)
        if conn is None:
            return
        left = self._per_ip[conn.addr] - 1
        if left:
            self._per_ip[conn.addr] = left
        else:
            del self._per_ip[conn.addr]
        if conn.ticket is not None:  # its Welcome, if one comes, finds nobody
            self._waiting.pop(conn.ticket, None)
        if conn.name is not None:
            name, conn.name = conn.name, None
            del self.members[name]
            self._submit(Gone(name))

    def tick(self, now: float) -> None:
        """Serve the paused members whose time has come, and refuse every
        connection whose login deadline has passed by `now`."""
        self._now = now
        wakes, asleep = self._wakes, self._asleep
        due = []  # taken first: a member served may go back to sleep until `now`
        while wakes and wakes[0][0] <= now:
            when, cid = heapq.heappop(wakes)
            if asleep.get(cid) == when:
                del asleep[cid]
                due.append(cid)
        for cid in due:
            if cid in self._conns:
                self._serve(self._conns[cid], now)
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            cid = deadlines.popleft()[1]
            conn = self._conns.get(cid)
            if conn is not None and conn.name is None and not conn.closing:
                if conn.ticket is not None:  # also when the room never answered
                    self._waiting.pop(conn.ticket, None)
                self._refuse(conn, "login-timeout", "The login was not finished in time")

    def next_tick(self) -> float | None:
        """When tick() next has something to do, if ever."""
        first = self._deadlines[0][0] if self._deadlines else None
        wakes = self._wakes
        while wakes and self._asleep.get(wakes[0][1]) != wakes[0][0]:
            heapq.heappop(wakes)  # served, refused or lost since
        if wakes:
            return wakes[0][0] if first is None else min(first, wakes[0][0])
        return first

    def apply(self, inp: Input) -> None:
        """Apply one input to the room, in the room's order, and queue what it causes."""
        if type(inp) is Typed:
            self.outbox.urgent = True
        self.route(self.room.step(inp))

    # -- housekeeping ---------------------------------------------------------

    @property
    def connections(self) -> int:
        return len(self._conns)

    def admitted(self, cid: ConnId) -> bool:
        """Was connection `cid` let in (and not lost since)?"""
        return cid in self._conns

    def is_waiting(self, ticket: str) -> bool:
        return ticket in self._waiting

    def exempt(self, addr: str) -> bool:
        """Is `addr` (an address_key) inside a network exempt from the limits?"""
        hit = self._exempt_cache.get(addr)
        if hit is None:
            try:
                net = ipaddress.ip_network(addr, strict=False)
                hit = any(net.version == ex.version and net.subnet_of(ex)  # type: ignore[arg-type]
                          for ex in self._exempt)
            except ValueError:
                hit = False
            if len(self._exempt_cache) < 4096:
                self._exempt_cache[addr] = hit
        return hit

    def refuse_member(self, name: str, code: str, text: str) -> None:
        """Tell member `name` why in one line and close it (the log found its
        name taken while this server was cut off)."""
        cid = self.members.get(name)
        if cid is not None:
            self._refuse(self._conns[cid], code, text)

    def shutdown(self) -> None:
        """The server is stopping: every connection is told and closed. In a
        cluster this server's members are reported gone first, so that the
        other servers announce them at once; alone, nobody is left to tell."""
        for name in list(self.members):
            conn = self._conns[self.members.pop(name)]
            conn.name = None
            self.outbox.remove(conn.cid)
            if not self._alone:
                self._submit(Gone(name))
        for conn in list(self._conns.values()):
            if not conn.closing:
                self._refuse(conn, "shutdown", "The server is shutting down")

    # -- inside ---------------------------------------------------------------

    def _serve(self, conn: _Conn, now: float) -> None:
        """Serve what `conn` sent, in order, as far as its budget goes."""
        held, outbox, limits = conn.held, self.outbox, self.limits
        outer, self._serving = self._serving, conn
        try:
            while held:
                if conn.closing:
                    held.clear()
                    break
                if conn.name is None:
                    if conn.ticket is not None:
                        return  # its login waits for the room; the rest waits for it
                    self._login(conn, held.popleft(), now)
                    continue
                if outbox.owed(conn.cid) > limits.max_sendq:
                    self._sleep(conn, now)  # after this pass is written
                    return
                wake = self._spend(conn, held[0], now)
                if wake is not None:
                    self._sleep(conn, wake)
                    return
                self._heard(conn, held.popleft(), now)
            if conn.paused:
                conn.paused = False
                outbox.reading(conn.cid, True)
        finally:
            self._serving = outer

    def _refill(self, conn: _Conn, now: float) -> None:
        limits = self.limits
        elapsed, conn.stamp = now - conn.stamp, now
        conn.lines = min(float(limits.burst_lines), conn.lines + elapsed * limits.rate_lines)
        conn.bytes = min(float(limits.burst_bytes), conn.bytes + elapsed * limits.rate_bytes)

    def _spend(self, conn: _Conn, item: Received, now: float) -> float | None:
        """Take one line's cost from `conn`'s budget: None if it could, else
        when it can. A line needs a whole line's worth left, and bytes above
        zero (a line may take them below zero: a debt the refill pays first)."""
        if not self._budgeted:
            return None
        limits = self.limits
        self._refill(conn, now)
        wait = -1.0
        if limits.rate_lines and conn.lines < 1:  # a whole line's worth
            wait = (1 - conn.lines) / limits.rate_lines
        if limits.rate_bytes and conn.bytes <= 0:
            wait = max(wait, -conn.bytes / limits.rate_bytes)
        if wait >= 0:
            return now + wait + 1e-3  # a little past zero, so that the level is above it
        conn.lines -= 1
        conn.bytes -= len(item) + 1 if isinstance(item, str) else limits.max_line
        return None

    def _spend_all(self, conn: _Conn, lines: int, size: int, now: float) -> bool:
        """_spend for a whole read of `lines` lines and `size` bytes at once,
        when it can take every line's cost (else the lines go one by one)."""
        if not self._budgeted:
            return True
        limits = self.limits
        self._refill(conn, now)
        if ((limits.rate_lines and conn.lines < lines)
                or (limits.rate_bytes and conn.bytes <= size - 1)):
            return False
        conn.lines -= lines
        conn.bytes -= size
        return True

    def _sleep(self, conn: _Conn, until: float) -> None:
        """Stop reading `conn` until `until`; tick() serves it then."""
        self._asleep[conn.cid] = until
        heapq.heappush(self._wakes, (until, conn.cid))
        self.outbox.urgent = True
        if not conn.paused:
            conn.paused = True
            self.outbox.reading(conn.cid, False)

    def _plain_chat(self, conn: _Conn, data: bytes | memoryview) -> bytes | None:
        """The shortcut for the commonest read: whole lines of plain chat
        from a member, with nothing held before them. Their room lines, from
        bytes to bytes, or None to take the general path. What it gives is
        what the general path gives (a property test holds them equal): it
        declines anything that could be a command, an escape, a blank line,
        a line too long, a CR, or anything but printable ASCII."""
        if not conn.reader.whole(data) or conn.closing:
            return None
        chunk = bytes(data)
        if (chunk.translate(None, _PLAIN_BYTES) or chunk[0] in _NOT_FIRST or b"\n\n" in chunk
                or b"\n:" in chunk or b"\n\\" in chunk or b"\n " in chunk):
            return None
        prefix = conn.name.encode() + b": "  # type: ignore[union-attr]
        return prefix + chunk[:-1].replace(b"\n", b"\n" + prefix) + b"\n"

    def _heard(self, conn: _Conn, item: Received, now: float) -> None:
        """One line (or marker) from member `conn`."""
        if type(item) is str:
            self.outbox.urgent = True
            self._submit(Typed(conn.name, item, now))  # type: ignore[arg-type]
        elif item is TOO_LONG:
            self.outbox.urgent = True
            self.outbox.send(conn.cid, self._too_long)
        else:
            self._refuse(conn, "flood", "Too much data without a line end")

    def _login(self, conn: _Conn, item: Received, now: float) -> None:
        """The first line of a connection: `LOGIN <passcode> <username>`."""
        if item is FLOOD:
            self._refuse(conn, "flood", "Too much data without a line end")
            return
        request = parse_login(item) if isinstance(item, str) else None
        if request is None:
            self._refuse(conn, "bad-login", "Expected: LOGIN <passcode> <username>")
            return
        passcode, name = request
        exempt = self.exempt(conn.addr)
        if not exempt and self.throttle.blocked(conn.addr, now):
            self._refuse(conn, "throttled", "Too many wrong passcodes; try again later")
            return
        refused = self.room.check_login(passcode, name)
        if refused is not None:
            if refused.code == "passcode" and not exempt:
                self.throttle.failed(conn.addr, now)
            self._refuse(conn, refused.code, refused.text)
            return
        self.throttle.succeeded(conn.addr)
        ticket = conn.ticket = f"{self.node}/{next(self._tickets)}"
        self._waiting[ticket] = conn
        self._submit(Joining(name, ticket))

    def route(self, outputs: Iterable[Output]) -> None:
        """Queue the room's outputs for this server's connections."""
        outbox, members = self.outbox, self.members
        for out in outputs:
            if type(out) is Deliver:
                data = out.line.encode() + b"\n"
                if out.to is None:
                    outbox.broadcast(data, None if out.skip is None else members.get(out.skip))
                    if self._recorder is not None:
                        self._recorder.record(out.line, self._now)
                elif out.to in members:
                    outbox.send(members[out.to], data)
            elif type(out) is Log:
                outbox.print(out.line.encode("utf-8", "replace") + b"\n")
            elif type(out) is Fail:
                if out.to in members:
                    outbox.send(members[out.to], f":error {out.code} {out.text}\n".encode())
            elif type(out) is Bye:
                cid = members.pop(out.to, None)
                if cid is not None:
                    conn = self._conns[cid]
                    conn.name, conn.closing = None, True
                    outbox.remove(cid)
                    outbox.send(cid, b":bye\n")
                    outbox.close(cid)
            elif type(out) is Welcome:
                self._welcome(out.ticket, out.name)
            elif type(out) is TurnAway:
                waiting = self._waiting.pop(out.ticket, None)
                if waiting is not None:
                    self._refuse(waiting, out.code, out.text)

    def _welcome(self, ticket: str, name: str) -> None:
        conn = self._waiting.pop(ticket, None)
        if conn is None:
            if ticket.startswith(self.node + "/"):
                self._submit(Gone(name))  # it left while its login waited
            return
        conn.ticket = None
        conn.name = name
        self.members[name] = conn.cid
        self.outbox.send(conn.cid, f":ok {name}\n".encode())
        if self.history is not None:  # what was said before, then who is here
            self.outbox.send(conn.cid, self.history.replay(self._now))
            self.outbox.send(conn.cid, f":here {' '.join(self.room.names)}\n".encode())
        self.outbox.add(conn.cid)
        if self._serving is not conn and not conn.paused:
            self._serve(conn, self._now)  # what it sent while its login waited

    def _refuse(self, conn: _Conn, code: str, text: str) -> None:
        """Say why in one line, then close; nothing more it sends counts."""
        conn.closing = True
        conn.held.clear()
        self._asleep.pop(conn.cid, None)
        self.outbox.remove(conn.cid)
        self._turn_away(conn.cid, code, text)

    def _turn_away(self, cid: ConnId, code: str, text: str) -> None:
        self.outbox.urgent = True
        self.outbox.send(cid, f":error {code} {text}\n".encode())
        self.outbox.close(cid)


HELLO: Final = f":hello chatroom {PROTOCOL_VERSION}\n".encode()
_PLAIN_BYTES: Final = bytes(range(0x20, 0x7F)) + b"\n"  # printable ASCII and the line end
_NOT_FIRST: Final = b" :\\\n"  # the shortcut leaves lines starting with these to the general path


# ============================================================================
# 2. The asyncio transport
# ============================================================================

READ_BUFFER: Final = 256 << 10  # bytes read from a socket at once, as asyncio's own
# How long room notices (joins, leaves) may wait to share a write when
# nothing else is queued: in a storm of logins, one write per member per
# wait instead of one per login.
NOTICE_WAIT: Final = 0.005
# A connection whose other end has vanished without a word (a machine gone,
# a network down) is dropped, and the room told, within about a minute:
# after 30 s of quiet the kernel probes it every 10 s (TCP keepalive), and
# it gives up once nothing sent, probe or line, is acknowledged for 60 s.
# Without this, a vanished member would stay in the room, keeping its name.
KEEPALIVE_IDLE: Final = 30
KEEPALIVE_INTERVAL: Final = 10
KEEPALIVE_COUNT: Final = 3
UNACKED_TIMEOUT_MS: Final = 60_000


# The socket options that do it, those this platform has (worked out once).
SILENCE_OPTIONS: Final = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), *(
    (socket.IPPROTO_TCP, getattr(socket, name), value)
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
                        ("TCP_KEEPCNT", KEEPALIVE_COUNT), ("TCP_USER_TIMEOUT", UNACKED_TIMEOUT_MS))
    if hasattr(socket, name)))


def watch_for_silence(sock: socket.socket) -> None:
    """Have the kernel drop `sock` once its peer has gone silent (the
    KEEPALIVE_* settings; where the platform has them)."""
    for level, option, value in SILENCE_OPTIONS:
        try:
            sock.setsockopt(level, option, value)
        except OSError:  # not a TCP socket, or the platform refuses it: no harm
            pass


def reset_on_close(sock: socket.socket) -> None:
    """Make closing `sock` a reset, so that the kernel drops what it still
    holds for the peer at once."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


class Peer(Protocol):
    """What the Hub may do with one connection: the member interface. A TCP
    member, a TLS member (and a WebSocket member) differ only here."""

    addr: str  # the address_key of its peer

    def write(self, data: bytes) -> None: ...  # queue bytes, after all before them
    def close(self) -> None: ...  # close once what was written is sent
    def abort(self) -> None: ...  # close now, dropping what was not sent
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Sink(Protocol):
    """Where the server's own lines go (a Printer; a BytesIO in tests)."""

    def write(self, data: bytes, /) -> object: ...


class Printer:
    """The server's stdout, written by a thread of its own through a bounded
    buffer, so that a stdout nobody reads (a terminal paused with Ctrl-S, a
    pipe into a stalled program) never stops the room. While `limit` bytes
    wait, further lines are counted instead of kept; once stdout takes lines
    again, the count is told on stderr in one line. The thread writes the
    file descriptor itself (os.write), holding no lock the interpreter needs
    at exit, so a stdout that never drains cannot hold up the server's end.
    A regular file never stalls: it is written at once, with no thread."""

    def __init__(self, fd: int, limit: int = 8 << 20) -> None:
        self._fd = fd
        self._limit = limit
        try:  # a regular file takes every write at once: no thread needed
            self._direct = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            self._direct = False
        self._pending: list[bytes] = []
        self._size = 0  # bytes taken and not yet written (pending or being written)
        self._lost = 0  # lines not kept since the last report
        self._closed = False
        self._broken = False  # nobody reads our stdout any more: nothing to wait for
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if not self._direct:
            self._thread = threading.Thread(target=self._run, name="stdout", daemon=True)
            self._thread.start()

    def write(self, data: bytes) -> None:
        if self._direct:
            self._write(data)
            return
        with self._cond:
            if self._broken:
                return
            if self._size + len(data) > self._limit:
                self._lost += data.count(b"\n")
                return
            self._pending.append(data)
            self._size += len(data)
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                data = b"".join(self._pending)
                self._pending = []
                lost, self._lost = self._lost, 0
            if not self._write(data):
                with self._cond:
                    self._pending, self._size = [], 0
                return
            with self._cond:
                self._size -= len(data)
            if lost:
                sys.stderr.write(f"server.py: {lost} lines could not be printed "
                                 "(stdout was not being read)\n")
                sys.stderr.flush()

    def _write(self, data: bytes) -> bool:
        """Write all of `data`; False once stdout is closed (the room goes on)."""
        view = memoryview(data)
        try:
            while view and not self._broken:
                view = view[os.write(self._fd, view):]
        except OSError:
            self._broken = True
        return not self._broken

    def alive(self) -> bool:
        """Is stdout still open (someone may read it)?"""
        return not self._broken

    def close(self, timeout: float = 2.0) -> None:
        """Write what waits (for at most `timeout` seconds), then stop."""
        if self._thread is None:
            return
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)


class Connection(asyncio.BufferedProtocol):
    """A TCP connection, and with `tls` a TLS one: an asyncio protocol that
    adapts its transport to the Hub (bytes in, bytes out, close).

    A TLS connection is counted against the limits as it is accepted, before
    its handshake: the handshake (loop.start_tls) starts only if the core let
    it in, runs inside the login deadline, and what the core sends it
    meanwhile (its greeting) waits until the handshake is done. A TLS
    connection refused before its handshake is closed without a word: there
    is no channel yet to say it on."""

    __slots__ = ("addr", "cid", "handshake", "held", "hub", "tls", "transport")

    def __init__(self, hub: Hub, tls: ssl.SSLContext | None = None) -> None:
        self.hub = hub
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.addr = ""
        self.cid: ConnId = 0
        self.held: list[bytes] | None = None  # written during the TLS handshake
        self.handshake: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=self.hub.core.limits.max_sendq)
        peer = transport.get_extra_info("peername")
        self.addr = address_key(str(peer[0])) if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            watch_for_silence(sock)
        if self.tls is not None:
            # Nothing is read before the handshake: start_tls, which runs before
            # this transport's first read, stops reading it and hands it to TLS.
            # (Pausing here instead breaks Python 3.10's start_tls.)
            self.held = []
        self.cid = self.hub.connected(self, securing=self.tls is not None)
        if self.tls is not None and self.hub.core.admitted(self.cid):
            self.handshake = asyncio.get_running_loop().create_task(
                self._secure(transport, self.tls))

    async def _secure(self, raw: asyncio.Transport, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(
                raw, self, tls, server_side=True,
                ssl_handshake_timeout=self.hub.core.limits.login_timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, RuntimeError):
            transport = None
        if transport is None or self.held is None:  # failed, or closed meanwhile
            raw.abort()
            self.hub.lost(self.cid)
            return
        self.transport = transport
        transport.set_write_buffer_limits(high=self.hub.core.limits.max_sendq)
        held, self.held = self.held, None
        self.hub.secured(self.cid)
        for data in held:
            transport.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.hub.read_buffer  # callbacks never overlap: one buffer serves all

    def buffer_updated(self, nbytes: int) -> None:
        self.hub.received(self.cid, self.hub.read_buffer[:nbytes])  # the core copies what it keeps

    def eof_received(self) -> bool:
        self.hub.flush()  # what it is owed goes out before the close
        return False  # close our side too: a half-closed client has left

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.lost(self.cid)

    def pause_writing(self) -> None:
        # More than max_sendq waits for this client: it stopped reading. Drop
        # it rather than hold its backlog (reset, so the kernel frees what it
        # still holds too); the room is told it left when connection_lost follows.
        assert self.transport is not None
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            reset_on_close(sock)
        self.transport.abort()

    # -- Peer -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.held is not None:  # refused before its handshake: nothing can be said
            self.held = None
            self.abort()
        elif self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and self.held is None:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and self.held is None:
            self.transport.resume_reading()


class HistoryFile:
    """The room's history on disk (`-history-db`): SQLite in WAL mode, written
    by one thread in batches, never on the event loop's path.

    save() only hands lines over; the thread waits up to SAVE_EVERY for more,
    then writes everything waiting in one transaction and trims the file to
    the newest `keep` lines and `max_age`. A commit in WAL mode survives the
    process being killed, so a `kill -9` loses at most the lines not yet
    committed: those of the last SAVE_EVERY (more only if the disk is slower
    than the room). SQLite never leaves the file half-written.
    """

    SAVE_EVERY: Final = 0.25  # seconds a batch waits for company

    def __init__(self, path: str, keep: int, max_age: float) -> None:
        try:
            import sqlite3
        except ImportError:
            raise UsageError("-history-db needs Python's sqlite3 module, which this Python "
                             "was built without") from None
        self.path, self.keep, self.max_age = path, keep, max_age
        self._error = sqlite3.Error
        try:  # a new file is readable by its owner alone: it holds what the room said
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise UsageError(f"-history-db {path}: {exc.strerror or exc}") from None
        try:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("BEGIN IMMEDIATE")  # can we write? (a read-only file fails here)
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            db.execute("CREATE TABLE IF NOT EXISTS lines (seq INTEGER PRIMARY KEY, "
                       "id TEXT NOT NULL, at REAL NOT NULL, line TEXT NOT NULL)")
            db.execute("INSERT OR IGNORE INTO meta VALUES ('prefix', ?)",
                       (os.urandom(3).hex() + ".",))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('next', '1')")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise UsageError(f"-history-db {path}: {exc}") from None
        self._db = db
        self._waiting: list[Past] = []
        self._wake = threading.Condition()
        self._next = 1
        self._closing = False
        self._thread: threading.Thread | None = None

    def load(self, now: float) -> History:
        """The history as the file holds it, to go on from."""
        meta = dict(self._db.execute("SELECT key, value FROM meta"))
        rows = self._db.execute(
            "SELECT id, at, line FROM (SELECT * FROM lines WHERE at >= ? "
            "ORDER BY seq DESC LIMIT ?) ORDER BY seq", (now - self.max_age, self.keep))
        lines = [Past(i, at, line) for i, at, line in rows]
        return History(self.keep, self.max_age, meta["prefix"], int(meta["next"]), lines,
                       saving=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="history", daemon=True)
        self._thread.start()

    def save(self, lines: list[Past], next_id: int) -> None:
        with self._wake:
            if not self._waiting:
                self._wake.notify()  # the writer was idle; from now on the batch fills
            self._waiting += lines
            self._next = next_id

    def close(self) -> None:
        """Write what waits, then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._db.close()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._waiting and not self._closing:
                    self._wake.wait()
                if not self._closing:  # let the batch fill a while
                    self._wake.wait(self.SAVE_EVERY)
                lines, self._waiting = self._waiting[-self.keep:], []
                next_id, closing = self._next, self._closing
            if lines:
                try:
                    self._write(lines, next_id)
                except self._error as exc:
                    sys.stderr.write(f"server.py: -history-db {self.path}: {exc}; "
                                     "history is no longer saved\n")
                    return
            if closing:
                return

    def _write(self, lines: list[Past], next_id: int) -> None:
        db = self._db
        db.execute("BEGIN")
        db.executemany("INSERT INTO lines (id, at, line) VALUES (?, ?, ?)",
                       [(p.id, p.when, p.line) for p in lines])
        db.execute("DELETE FROM lines WHERE seq <= (SELECT MAX(seq) FROM lines) - ? OR at < ?",
                   (self.keep, lines[-1].when - self.max_age))
        db.execute("UPDATE meta SET value = ? WHERE key = 'next'", (str(next_id),))
        db.execute("COMMIT")


class Hub:
    """The core on the event loop: the connections' adapters, the clock, and
    one flush per pass.

    Every connection event goes to the core with the time; what the core
    queues is written by flush(), scheduled once with call_soon, twice over:
    the first callback runs after the reads of this pass, the second after
    those of the poll right after it, so that every read handled in those
    two passes shares one write per connection. (The second hop costs a
    poll that does not wait; in a room of 1,000 it made writes bigger and
    the lines delivered a second 10 to 18 % more, side by side.) A pass
    that queued only room notices lets them wait up to NOTICE_WAIT for more
    (a storm of logins shares writes). One timer follows the core's next
    tick (a login deadline, or a paused member's budget).
    """

    def __init__(self, core: Core, out: Sink, clock: Callable[[], float] = time.time,
                 keeper: HistoryFile | None = None) -> None:
        self.core = core
        self.out = out
        self.keeper = keeper  # saves the history's new lines, if it is kept on disk
        self.clock = clock
        self.peers: dict[ConnId, Peer] = {}
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self._ids = itertools.count(1)
        self._loop = asyncio.get_running_loop()
        self._flush: asyncio.Handle | None = None  # a flush is scheduled
        self._urgent = False  # ... for this pass, not after NOTICE_WAIT
        self._timer: asyncio.TimerHandle | None = None  # for the core's next tick
        self._timer_at: float | None = None

    # -- from the adapters --------------------------------------------------------

    def connected(self, peer: Peer, securing: bool = False) -> ConnId:
        cid = next(self._ids)
        self.peers[cid] = peer
        self.core.connect(cid, peer.addr, self.clock(), securing)
        self._queued()
        return cid

    def secured(self, cid: ConnId) -> None:
        self.core.secured(cid)

    def received(self, cid: ConnId, data: bytes | memoryview) -> None:
        self.core.receive(cid, data, self.clock())
        self._queued()

    def lost(self, cid: ConnId) -> None:
        if self.peers.pop(cid, None) is not None:
            self.core.lost(cid, self.clock())
            self._queued()

    # -- what a room log (chatroom_ext.cluster) may ask: its typed seam -------------

    @property
    def room(self) -> Room:
        return self.core.room

    def apply(self, inp: Input) -> None:
        """Apply an input the log hands back, in the room's order."""
        self.core.apply(inp)
        self._queued()

    def show(self, outputs: Sequence[Output]) -> None:
        """Queue outputs that come from outside the room's order (a cluster's
        own copy of the room while its log is away)."""
        self.core.outbox.urgent = True
        self.core.route(outputs)
        self._queued()

    def here(self, name: str) -> bool:
        """Is `name` a member connected to this server?"""
        return name in self.core.members

    def names_here(self) -> list[str]:
        return list(self.core.members)

    def waiting(self, ticket: str) -> bool:
        """Is the login holding `ticket` still waiting for the room?"""
        return self.core.is_waiting(ticket)

    def fail(self, name: str, code: str, text: str) -> None:
        """Tell member `name` that what it sent failed; it stays."""
        self.show([Fail(name, code, text)])

    def finish_exit(self, name: str) -> None:
        """Member `name` asked to leave and the room has already seen it go."""
        self.show([Bye(name)])

    def refuse_member(self, name: str, code: str, text: str) -> None:
        self.core.refuse_member(name, code, text)
        self._queued()

    @staticmethod
    def encode(inp: Input) -> tuple[str, str, str, str]:
        """An input as four strings: kind (J, T or G), name, extra, time."""
        if isinstance(inp, Typed):
            return "T", inp.name, inp.text, repr(inp.now)
        if isinstance(inp, Joining):
            return "J", inp.name, inp.ticket, ""
        return "G", inp.name, "", ""

    @staticmethod
    def decode(kind: str, name: str, extra: str, when: str) -> Input:
        """encode() backwards."""
        if kind == "T":
            return Typed(name, extra, float(when or 0))
        if kind == "J":
            return Joining(name, extra)
        return Gone(name)

    @staticmethod
    def key(name: str) -> str:
        """The name as the room compares names (case and form folded)."""
        return name_key(name)

    @staticmethod
    def leaves(inp: Input) -> bool:
        """Is `inp` a member's :Exit?"""
        return isinstance(inp, Typed) and isinstance(parse_command(inp.text), Exit)

    @property
    def history(self) -> History | None:
        """The room's last public lines, if kept (-history): the log records them."""
        return self.core.history

    @staticmethod
    def public_lines(inp: Input) -> list[str]:
        """What the history keeps of an input that takes effect."""
        return public_lines(inp)

    # -- writing ---------------------------------------------------------------

    def _queued(self) -> None:
        """Schedule a flush for what the core queued: at the end of this pass,
        or after NOTICE_WAIT when it is room notices alone."""
        core = self.core
        when = core.next_tick()
        if when is not None and (self._timer_at is None or when < self._timer_at):
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self._loop.call_later(max(0.0, when - self.clock()), self._tick)
        outbox = core.outbox
        if not outbox:
            return
        if outbox.urgent:
            if not self._urgent:
                if self._flush is not None:
                    self._flush.cancel()
                self._urgent = True
                self._flush = self._loop.call_soon(self._gather)
        elif self._flush is None:
            self._flush = self._loop.call_later(NOTICE_WAIT, self.flush)

    def _gather(self) -> None:
        """One pass later: what the next poll brings joins this write."""
        self._flush = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write everything queued: one write per connection."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._urgent = False
        batch = self.core.outbox.take()
        peers = self.peers
        for cid, on in batch.reading:
            peer = peers.get(cid)
            if peer is not None:
                if on:
                    peer.resume_reading()
                else:
                    peer.pause_reading()
        for cid, data in batch.writes:
            peer = peers.get(cid)
            if peer is not None:
                peer.write(data)
        for cid in batch.close:
            peer = peers.get(cid)
            if peer is not None:
                peer.close()
        if batch.printed:
            self.write_out(batch.printed)
        if self.keeper is not None:
            history = self.core.history
            if history is not None and history.unsaved:
                self.keeper.save(history.take_unsaved(), history.next)

    def print_lines(self, lines: list[str]) -> None:
        self.write_out(("\n".join(lines) + "\n").encode("utf-8", "replace"))

    def write_out(self, data: bytes) -> None:
        self.out.write(data)

    # -- time ------------------------------------------------------------------

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        self.core.tick(self.clock())
        self._queued()

    async def sweep_throttle(self) -> None:
        """Forget old wrong passcodes now and then (bounded memory)."""
        while True:
            await asyncio.sleep(self.core.limits.failure_window)
            self.core.throttle.forget_older_than(self.clock())

    async def shutdown(self, grace: float = 2.0) -> None:
        """Tell everyone the server is going, then close every connection."""
        self.core.shutdown()
        self.flush()
        if self._timer is not None:
            self._timer.cancel()
        deadline = self._loop.time() + grace
        while self.peers and self._loop.time() < deadline:
            await asyncio.sleep(0.02)
        for peer in list(self.peers.values()):
            peer.abort()


# ============================================================================
# 3. The command line
# ============================================================================


class UsageError(Exception):
    """The person running the server asked for something impossible."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line on stderr and status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive(kind: type[int] | type[float]) -> Any:
    def convert(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise ValueError(text)
        return value
    convert.__name__ = kind.__name__
    return convert


def not_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def not_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


MAX_HISTORY: Final = 10_000  # lines a -history may keep
DEFAULT_HISTORY: Final = 100  # ... with -history-db and no -history


def build_parser() -> OneLineParser:
    d = Limits()
    p = OneLineParser(prog="server.py", description="Run the chat room.")
    p.add_argument("-start", action="store_true", required=True, help="start the server")
    p.add_argument("-port", type=port, required=True, help="TCP port (0: any free port)")
    p.add_argument("-passcode", required=True, help="1 to 5 ASCII letters or digits")
    p.add_argument("-host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("-max-line", type=positive(int), default=d.max_line, metavar="BYTES",
                   help=f"longest line accepted (default {d.max_line})")
    p.add_argument("-max-sendq", type=positive(int), default=d.max_sendq, metavar="BYTES",
                   help=f"bytes queued for one client before it is dropped (default {d.max_sendq})")
    p.add_argument("-login-timeout", type=positive(float), default=d.login_timeout,
                   metavar="SECONDS",
                   help=f"time to finish logging in (default {d.login_timeout:g})")
    p.add_argument("-max-clients", type=positive(int), default=d.max_clients, metavar="N",
                   help=f"connections in total (default {d.max_clients})")
    p.add_argument("-max-per-ip", type=positive(int), default=d.max_per_ip, metavar="N",
                   help=f"connections from one address (default {d.max_per_ip})")
    p.add_argument("-login-failures", type=positive(int), default=d.login_failures, metavar="N",
                   help=f"wrong passcodes from one address before it is refused "
                        f"(default {d.login_failures})")
    p.add_argument("-failure-window", type=positive(float), default=d.failure_window,
                   metavar="SECONDS", help=f"... within this time (default {d.failure_window:g})")
    p.add_argument("-line-burst", type=positive(int), default=d.burst_lines, metavar="LINES",
                   help=f"lines a member may send at once ... (default {d.burst_lines})")
    p.add_argument("-line-rate", type=not_negative, default=d.rate_lines, metavar="PER_SECOND",
                   help=f"... and then each second; 0: no limit (default {d.rate_lines:g})")
    p.add_argument("-byte-burst", type=positive(int), default=d.burst_bytes, metavar="BYTES",
                   help=f"bytes a member may send at once ... (default {d.burst_bytes})")
    p.add_argument("-byte-rate", type=not_negative, default=d.rate_bytes, metavar="PER_SECOND",
                   help=f"... and then each second; 0: no limit (default {d.rate_bytes:g})")
    p.add_argument("-connect-burst", type=positive(int), default=d.connect_burst, metavar="N",
                   help=f"new connections from one address at once ... "
                        f"(default {d.connect_burst})")
    p.add_argument("-connect-rate", type=not_negative, default=d.connect_rate,
                   metavar="PER_SECOND",
                   help=f"... and then each second; 0: no limit (default {d.connect_rate:g})")
    p.add_argument("-exempt", default=",".join(d.exempt), metavar="NETS",
                   help="comma-separated networks exempt from the per-address limits "
                        "(default loopback; '' for none)")
    p.add_argument("-tls-cert", metavar="FILE", help="serve TLS with this certificate chain")
    p.add_argument("-tls-key", metavar="FILE", help="... and this private key")
    p.add_argument("-redis", metavar="URL",
                   help="join the cluster at this Redis URL, e.g. redis://127.0.0.1:6379/0 "
                        "(needs chatroom_ext and the redis package)")
    p.add_argument("-redis-backlog", type=positive(int), default=10_000, metavar="LINES",
                   help="with -redis: at most this many of this server's lines wait to be "
                        "written to Redis (while it is away); more are refused (default 10000)")
    p.add_argument("-web", type=port, metavar="PORT",
                   help="also serve the chat page and a WebSocket door for browsers on this "
                        "port (0: any free port; needs chatroom_ext and websockets)")
    p.add_argument("-web-host", metavar="ADDR",
                   help="address the web port listens on (default: -host's)")
    p.add_argument("-web-origin", action="append", default=[], metavar="ORIGIN",
                   help="with -web: also accept WebSockets from pages of this origin, e.g. "
                        "https://chat.example.org (repeatable, or comma-separated)")
    p.add_argument("-history", type=not_negative_int, metavar="LINES",
                   help=f"replay the room's last LINES public lines to each member as it "
                        f"joins (at most {MAX_HISTORY}; default 0, or {DEFAULT_HISTORY} with "
                        f"-history-db)")
    p.add_argument("-history-days", type=positive(float), default=7.0, metavar="DAYS",
                   help="... none older than this (default 7)")
    p.add_argument("-history-db", metavar="FILE",
                   help="keep the history in this SQLite file, so that it outlives a restart "
                        "(not with -redis: a cluster's history is in Redis)")
    p.add_argument("-uvloop", action="store_true",
                   help="run on uvloop (needs chatroom_ext and the uvloop package)")
    return p


def limits_from(args: argparse.Namespace) -> Limits:
    exempt = tuple(n.strip() for n in args.exempt.split(",") if n.strip())
    for net in exempt:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise UsageError(f"-exempt: {net!r} is not a network") from None
    return Limits(max_line=args.max_line, max_sendq=args.max_sendq,
                  login_timeout=args.login_timeout, max_clients=args.max_clients,
                  max_per_ip=args.max_per_ip, login_failures=args.login_failures,
                  failure_window=args.failure_window, exempt=exempt,
                  burst_lines=args.line_burst, rate_lines=args.line_rate,
                  burst_bytes=args.byte_burst, rate_bytes=args.byte_rate,
                  connect_burst=args.connect_burst, connect_rate=args.connect_rate)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise UsageError("-tls-cert and -tls-key go together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for path, what in ((cert, "-tls-cert"), (key, "-tls-key")):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise UsageError(f"{what} {path}: {exc.strerror or exc}") from None
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise UsageError(f"-tls-cert {cert} / -tls-key {key}: not a PEM certificate chain and "
                         f"its matching private key ({exc.reason or exc})") from None
    return ctx


def optional(module: str, needs: str) -> Any:
    """Import an optional capability from chatroom_ext, or say in one line
    what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{needs} (could not import {exc.name})") from None


def raise_open_file_limit() -> int:
    """Lift the soft limit on open files to the hard limit; return it."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return int(soft)


def loop_error_handler(fd_limit: int) -> Any:
    """Report the loop's errors as one line each, and running out of files once."""
    warned = [0.0]

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            if loop.time() - warned[0] > 10:
                warned[0] = loop.time()
                sys.stderr.write(f"server.py: out of open files (limit {fd_limit}); "
                                 "new connections wait\n")
            return
        sys.stderr.write(f"server.py: {context.get('message', 'error')}: {exc!r}\n")

    return handle


async def serve(args: argparse.Namespace, limits: Limits, tls: ssl.SSLContext | None,
                cluster: type[RedisLog] | None = None, web: type[WebDoor] | None = None,
                keeper: HistoryFile | None = None) -> int:
    loop = asyncio.get_running_loop()
    fd_limit = raise_open_file_limit()
    loop.set_exception_handler(loop_error_handler(fd_limit))
    log = None if cluster is None else cluster(args.redis, args.redis_backlog)
    printer = Printer(sys.stdout.fileno())
    history = None
    if keeper is not None:
        history = keeper.load(time.time())
        keeper.start()
    elif args.history:
        history = History(args.history, args.history_days * 86400, os.urandom(3).hex() + ".")
    if history is not None:
        history.max_bytes = min(history.max_bytes, limits.max_sendq // 2)
    hub = Hub(Core(Room(args.passcode), limits, log, history), printer, keeper=keeper)
    if log is not None:
        await log.start(hub)
    try:
        server = await loop.create_server(
            lambda: Connection(hub, tls), args.host, args.port, family=socket.AF_UNSPEC,
            backlog=4096)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
        sys.stderr.write(f"server.py: cannot listen on {args.host} port {args.port}: {reason}\n")
        return 1
    door = None
    if web is not None:  # the same room for browsers (chatroom_ext/web.py)
        web_host = args.host if args.web_host is None else args.web_host
        door = web.create(hub, host=web_host, port=args.web, origins=args.web_origin, tls=tls,
                          limits=limits, address_key=address_key, exempt=hub.core.exempt,
                          watch_for_silence=watch_for_silence, reset_on_close=reset_on_close)
        try:
            web_port = await door.start()
        except OSError as exc:
            reason = ("address already in use" if exc.errno == errno.EADDRINUSE
                      else exc.strerror or exc)
            sys.stderr.write(f"server.py: cannot listen on {web_host} port {args.web} "
                             f"(-web): {reason}\n")
            server.close()
            return 1
        sys.stderr.write(f"server.py: web page at {door.url(web_port)}\n")  # stdout: the contract
        sys.stderr.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the start line: from then on
        loop.add_signal_handler(sig, stop.set)  # a signal means a clean shutdown
    port = server.sockets[0].getsockname()[1]
    hub.print_lines([f"Server started on port {port}. Accepting connections"])
    sweeper = loop.create_task(hub.sweep_throttle())
    await stop.wait()
    sweeper.cancel()
    server.close()
    if door is not None:
        door.close()
    await hub.shutdown()
    if log is not None:
        await log.close()
    if keeper is not None:
        keeper.close()
    printer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not is_valid_passcode(args.passcode):
            raise UsageError("the passcode must be 1 to 5 ASCII letters or digits")
        limits = limits_from(args)
        if args.history is None:
            args.history = 0 if args.history_db is None else DEFAULT_HISTORY
        if args.history > MAX_HISTORY:
            raise UsageError(f"-history: at most {MAX_HISTORY} lines")
        if args.history_db is not None:
            if not args.history:
                raise UsageError("-history-db keeps the history: it needs -history above 0")
            if args.redis:  # the log is the history: a file would be one server's copy
                raise UsageError("-history-db: in a cluster the history is kept in Redis")
        tls = tls_context(args.tls_cert, args.tls_key)
        cluster: type[RedisLog] | None = None
        if args.redis:
            cluster = optional("chatroom_ext.cluster", "-redis needs the chatroom_ext package "
                               "beside server.py and redis-py: pip install 'redis>=5'").RedisLog
        web: type[WebDoor] | None = None
        if args.web is not None:
            module = optional("chatroom_ext.web", "-web needs the chatroom_ext package beside "
                              "server.py and websockets: pip install '.[web]'")
            try:
                module.parse_origins(args.web_origin)
            except ValueError as exc:
                raise UsageError(f"-web-origin: {exc}") from None
            web = module.WebDoor
        elif args.web_origin or args.web_host is not None:
            raise UsageError("-web-host and -web-origin go with -web PORT")
        run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
        if args.uvloop:
            run = optional("chatroom_ext.fastloop", "-uvloop needs the chatroom_ext package "
                           "beside server.py and uvloop: pip install uvloop").run
        keeper = None  # opened last: every other mistake is told before a file is made
        if args.history_db is not None:
            keeper = HistoryFile(args.history_db, args.history, args.history_days * 86400)
    except UsageError as exc:
        sys.stderr.write(f"server.py: error: {exc}\n")
        return 2
    try:
        return run(serve(args, limits, tls, cluster, web, keeper))
    except KeyboardInterrupt:  # Ctrl-C before the loop could catch it
        return 0


if __name__ == "__main__":
    sys.exit(main())
