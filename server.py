#!/usr/bin/env python3
"""chatroom server: one chat room behind a passcode, over TCP (optionally TLS).

    python3 server.py -start -port <port> -passcode <passcode> [options]

The contract is SPEC.md; the wire protocol is docs/PROTOCOL.md. This file runs
alone (standard library only, Python 3.10+) and is laid out in three parts,
top to bottom:

1. THE PURE CORE. Bytes to lines (LineReader), a line to a command value
   (parse_command), the room's state and its transitions (Room), and the
   login throttle. Every transition returns plain values saying what to
   deliver to whom and what the server prints. Nothing in the core touches
   asyncio, sockets, files or clocks: the current time is passed in. It is
   unit-tested from tables with no event loop (tests/unit/test_core.py).
2. THE ASYNCIO TRANSPORT. One event loop (asyncio's, with a hook at the
   end of each pass, and members' reads served straight from the poll:
   PassLoop), one Protocol per connection, the limits
   against hostile or broken clients, and write coalescing: what is due to
   one client in one pass of the loop goes out in one write, at the end of
   the pass (at once when the pass has only one read; room notices alone
   may wait a few milliseconds for more), and a broadcast is encoded and
   joined once for everyone.
3. THE COMMAND LINE.

Rules this file keeps: the server's stdout carries only the contract's lines;
every error a person can cause is one line on stderr, never a traceback; no
byte from one client reaches another's terminal as a control character.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import errno
import hmac
import ipaddress
import itertools
import os
import re
import selectors
import signal
import socket
import ssl
import struct
import sys
import time
import unicodedata
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Final, TypeVar, cast

# ============================================================================
# 1. The pure core
# ============================================================================

PROTOCOL_VERSION: Final = 1
TIME_FORMAT: Final = "%a %b %d %H:%M:%S %Y"
MAX_USERNAME: Final = 8

_PASSCODE = re.compile(r"[A-Za-z0-9]{1,5}", re.ASCII)
_CONTROL_CHARS: Final = "".join(map(chr, [*range(0x20), 0x7F, *range(0x80, 0xA0)]))
_NEUTRALISE: Final = str.maketrans(dict.fromkeys(_CONTROL_CHARS, "\ufffd"))


def is_valid_passcode(text: str) -> bool:
    """SPEC.md: a passcode is 1 to 5 ASCII letters or digits."""
    return _PASSCODE.fullmatch(text) is not None


def username_problem(name: str) -> str | None:
    """Why `name` cannot be a username, or None if it can.

    SPEC.md: 1 to 8 characters; no whitespace, no ':', no control characters.
    Invisible format characters (zero-width spaces, bidi overrides) count as
    control characters here, so that no two names can look the same; so does
    U+FFFD, which is what bytes that were not UTF-8 became.
    """
    if not 1 <= len(name) <= MAX_USERNAME:
        return "a username has 1 to 8 characters"
    for ch in name:
        if ch in ":\ufffd" or ch.isspace() or unicodedata.category(ch)[0] in "CZ":
            return "a username may not contain whitespace, ':' or control characters"
    return None


def name_key(name: str) -> str:
    """Usernames are unique ignoring case: `Bob` cannot join while `bob` is in."""
    return unicodedata.normalize("NFC", name).casefold()


def neutralise(text: str) -> str:
    """Replace every control character with U+FFFD, so no terminal obeys it."""
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


_PLAIN_BYTES: Final = bytes(range(0x20, 0x7F)) + b"\n"  # printable ASCII and the line end
_NOT_FIRST: Final = b" :\\\n"  # a read taken as it is does not start a line with these


class Room:
    """One chat room: who is in it, in join order, and what each act causes."""

    def __init__(self, passcode: str) -> None:
        self._passcode = passcode.encode()
        self._members: dict[str, str] = {}  # name_key -> name, in join order
        self._present: set[str] = set()  # the same names, exactly as they joined

    def __contains__(self, name: str) -> bool:
        return name_key(name) in self._members

    @property
    def names(self) -> list[str]:
        return list(self._members.values())

    def passcode_ok(self, passcode: str) -> bool:
        """Constant-time comparison, so timing tells nothing about the passcode."""
        return hmac.compare_digest(passcode.encode(), self._passcode)

    def check_login(self, passcode: str, name: str) -> Refused | None:
        """Why this login is refused, or None. The passcode is checked first."""
        if not self.passcode_ok(passcode):
            return Refused("passcode", "Incorrect passcode")
        problem = username_problem(name)
        if problem is not None:
            return Refused("bad-username", f"Invalid username: {problem}")
        if name in self:
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

    def said_line(self, name: str, text: str) -> str | None:
        """The room line of member `name`'s plain chat text, or None.

        A shortcut of step() for the commonest input: when it returns a line,
        step(Typed(name, text, now)) gives exactly [Log(line), Deliver(line,
        skip=name)] and changes nothing (a property test holds the two
        together). It answers None whenever the text needs a closer look: a
        command or an escape (a leading `:` or backslash), a blank line, any
        character that is not printable ASCII, or a name that is not in."""
        if (name in self._present and text and text[0] != ":" and text[0] != "\\"
                and text.isascii() and text.isprintable() and not text.isspace()):
            return f"{name}: {text}"
        return None

    def said_lines(self, name: str, texts: list[str]) -> str | None:
        """said_line() for several texts at once: their room lines joined by
        line ends when said_line() gives a line for every one, else None.
        Each check runs once over all the texts, in C, not once per text."""
        if not texts or name not in self._present:
            return None
        block = "\n".join(texts)
        if (block.isascii() and all(map(str.isprintable, texts))
                and not any(map(str.isspace, texts)) and "" not in texts
                and block[0] != ":" and block[0] != "\\"
                and "\n:" not in block and "\n\\" not in block):
            prefix = f"{name}: "
            return prefix + block.replace("\n", "\n" + prefix)
        return None

    def said_bytes(self, name: str, data: bytes) -> bytes | None:
        """said_lines() for a read of whole lines (`data` ends with a line
        end, none of them is too long), from bytes to bytes: the room lines,
        each ending with a line end, or None. Where it gives lines, they are
        said_lines()'s; it declines whatever said_lines() declines, and also
        a line with a CR (which the reader would drop before the line end) or
        starting with a space (which could be blank). Those take the long
        way, where the same rules decide. Printable ASCII is checked in one
        C call, and nothing is decoded."""
        if (name not in self._present or data.translate(None, _PLAIN_BYTES)
                or data[0] in _NOT_FIRST or b"\n\n" in data or b"\n:" in data
                or b"\n\\" in data or b"\n " in data):
            return None
        prefix = name.encode() + b": "
        return prefix + data[:-1].replace(b"\n", b"\n" + prefix) + b"\n"

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
            line = f"{event.name} joined the chatroom"
        else:
            gone = self._members.pop(name_key(event.name), None)
            if gone is not None:
                self._present.discard(gone)
            line = f"{event.name} left the chatroom"
        return [Log(line), Deliver(line, skip=event.name)]


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


# ============================================================================
# 2. The asyncio transport
# ============================================================================

LOOPBACK: Final = ("127.0.0.0/8", "::1/128")
READ_BUFFER: Final = 256 << 10  # bytes read from a socket at once, as asyncio's own
# How long room notices (joins, leaves) may wait to share a write when
# nothing else is queued: in a storm of logins, one write per member per
# wait instead of one per login (uvloop finishes about one login per pass).
NOTICE_WAIT: Final = 0.005


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

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.exempt]


class _PollHookSelector(selectors.DefaultSelector):
    """The platform's selector, running the loop's `before_poll` hooks first."""

    def __init__(self) -> None:
        super().__init__()
        self.loop: PassLoop | None = None
        self.looked = False  # the last poll was a look_first one that found input

    def select(self, timeout: float | None = None) -> Any:
        loop = self.loop
        if loop is not None and loop.before_poll:
            if loop.look_first and not self.looked:  # take in what arrived meanwhile
                ready = super().select(0)
                if ready:
                    self.looked = True  # and then the hooks, whatever arrives next
                    loop.lone = False
                    return self._served(loop, ready)
            self.looked = loop.look_first = False
            loop.scheduled = False
            for hook in loop.before_poll:
                hook()
            if loop.scheduled:
                timeout = 0  # the hooks queued callbacks or timers: look again, don't sleep
        ready = super().select(timeout)
        if loop is not None:
            loop.lone = len(ready) == 1
            return self._served(loop, ready)
        return ready

    @staticmethod
    def _served(loop: PassLoop, ready: list[tuple[selectors.SelectorKey, int]],
                ) -> list[tuple[selectors.SelectorKey, int]]:
        """What is left of `ready` for asyncio once loop.serve_read has
        served the reads it takes."""
        serve = loop.serve_read
        if serve is None or not ready:
            return ready
        if len(ready) == 1:  # the commonest poll: one read
            key, events = ready[0]
            return [] if events == selectors.EVENT_READ and serve(key.fd) else ready
        return [(key, events) for key, events in ready
                if events != selectors.EVENT_READ or not serve(key.fd)]


_T = TypeVar("_T")  # what run_on_pass_loop's coroutine returns


class PassLoop(asyncio.SelectorEventLoop):
    """asyncio's selector loop, able to act at the end of each pass.

    A pass of the loop polls for I/O once and then runs every callback that
    is ready; the functions in `before_poll` run after the last of those
    callbacks, just before the next poll. The Hub writes there: once per pass,
    after every client whose data arrived in it has been heard, and without
    the extra poll that a flush scheduled with call_soon would cost. When a
    hook schedules a callback (closing a transport does) or a timer (the
    Hub's wait for more room notices), that poll does not block: the loop
    has already chosen how long to sleep, without them. The loop calls its
    selector's select() once per pass, after running what was ready, on
    every Python this file supports.

    Setting `look_first` asks for one look before the hooks run: a poll that
    does not wait, and if anything has arrived since the pass began, one
    more pass to handle it first. The Hub sets it when it has lines queued
    and its last write carried more than one read, so that senders whose
    lines arrive a few microseconds apart share one write per client instead
    of each costing a round of writes. A lone sender's lines are not held
    for a look that would find nothing: side by side, that look cost more
    than its system call. The hooks wait at most one extra pass, however
    often it is set; it is cleared when they run.

    `lone` is True while the pass's poll returned a single event: no other
    read in this pass can share a write with the one being handled, so the
    Hub may write a member's lines as soon as it has heard them, without
    waiting for the end of the pass (Hub.read_done). Whoever writes early
    clears it: at most one early write per pass.

    `serve_read(fd)`, when set, is offered every read the poll reports,
    in the poll's order, before asyncio dispatches anything. It returns True
    when it has served the read itself, and the poll then reports the rest:
    the reader handle, the ready queue and the transport's read method are
    skipped. When one member speaks and nobody else does, that is the whole
    of a pass. It returns False to leave the event to asyncio as usual.
    Served reads run before the callbacks already queued for this pass
    (a connection closed at the end of the last pass learns of it after
    them), which is one more order a poll could have given."""

    def __init__(self) -> None:
        selector = _PollHookSelector()
        super().__init__(selector)
        selector.loop = self
        self.before_poll: list[Callable[[], None]] = []
        self.scheduled = False
        self.look_first = False
        self.lone = False
        self.serve_read: Callable[[int], bool] | None = None

    def call_soon(self, callback: Callable[..., Any], *args: Any,  # type: ignore[override]
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        self.scheduled = True
        return super().call_soon(callback, *args, context=context)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any,  # type: ignore[override]
                context: contextvars.Context | None = None) -> asyncio.TimerHandle:
        self.scheduled = True
        return super().call_at(when, callback, *args, context=context)


def run_on_pass_loop(main: Coroutine[Any, Any, _T]) -> _T:
    """asyncio.run(main), on a PassLoop."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=PassLoop) as runner:  # novm
            return runner.run(main)

    class Policy(asyncio.DefaultEventLoopPolicy):
        def new_event_loop(self) -> asyncio.AbstractEventLoop:
            return PassLoop()

    asyncio.set_event_loop_policy(Policy())
    try:
        return asyncio.run(main)
    finally:
        asyncio.set_event_loop_policy(None)


class Connection(asyncio.BufferedProtocol):
    """One client connection. It frames lines and hands them to the Hub.

    It reads into the Hub's one buffer (get_buffer/buffer_updated): a plain
    Protocol would have asyncio allocate, shrink and free a 256 KiB bytes
    object for every read, which malloc turns into three more system calls."""

    __slots__ = ("addr", "backlog", "clear", "close_after_flush", "dead", "fd", "hub", "name",
                 "reader", "ticket", "timer", "transport")

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.addr = ""
        self.name: str | None = None  # set while this connection is a member
        self.ticket: str | None = None  # set while its login waits for the room
        self.backlog: list[Received] | None = None  # lines that came meanwhile
        self.reader = hub.new_reader()
        self.timer: asyncio.TimerHandle | None = None
        self.dead = False
        self.close_after_flush = False
        self.fd = -1  # the socket, when send() may write to it directly
        self.clear = False  # set while the transport holds nothing of ours

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's do not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        if self.hub.direct_writes and transport.get_extra_info("sslcontext") is None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                self.fd = sock.fileno()
                self.hub.by_fd[self.fd] = self
        peer = transport.get_extra_info("peername")
        self.addr = address_key(str(peer[0])) if peer else ""
        self.hub.connected(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.hub.read_buffer  # callbacks never overlap: one buffer serves all

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.hub.read_buffer[:nbytes])  # the reader copies what it keeps

    def data_received(self, data: bytes | memoryview) -> None:
        if self.name is not None:
            hub = self.hub
            if hub.submit is hub._local and self.reader.whole(data):
                block = hub.room.said_bytes(self.name, bytes(data))
                if block is not None:  # plain chat, the commonest read of all
                    hub.said(self, block)
                    hub.read_done()
                    return
            hub.heard(self, self.reader.feed(data))
            hub.read_done()
            return
        items = self.reader.feed(data)
        for item in items:
            if self.dead or self.close_after_flush:
                break
            if self.backlog is not None:
                self.backlog.append(item)
            else:
                self.hub.received(self, item)

    def eof_received(self) -> bool:
        # What it is owed goes out before the close (the Hub may have looked
        # for more input, and found this end, before writing).
        self.hub.flush_pending()
        return False  # close our side too: a half-closed client has left

    def connection_lost(self, exc: Exception | None) -> None:
        self.hub.lost(self)

    def pause_writing(self) -> None:
        # The write buffer passed max_sendq: this client stopped reading.
        # Drop it rather than hold its backlog; the room is told it left
        # when connection_lost follows.
        assert self.transport is not None
        self.dead = True
        self.clear = False
        sock = self.transport.get_extra_info("socket")
        if sock is not None:  # reset, so the kernel frees what it still holds for it
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.transport.abort()

    def send(self, data: bytes) -> None:
        """Write `data` after everything written to this connection before.

        While the transport holds nothing of ours it goes straight to the
        socket: one system call without the transport's checks in front of
        it (about 0.3 microseconds a write, paid for every member of a room
        on every pass). The transport takes what the socket does not, and
        any error, so that order, the SendQ limit (pause_writing) and
        closing a broken connection stay its own. Only for plain sockets on
        the PassLoop (Hub.direct_writes), never TLS."""
        if not self.clear:
            transport = self.transport
            assert transport is not None
            if (self.fd < 0 or self.dead or transport.is_closing()
                    or transport.get_write_buffer_size()):
                transport.write(data)
                return
            self.clear = True
        try:
            sent = os.write(self.fd, data)
        except OSError:  # full or broken: the transport meets it again and acts
            sent = 0
        if sent != len(data):
            self.clear = False
            self.transport.write(data[sent:])  # type: ignore[union-attr]

    def write_now(self, line: str) -> None:
        """Write one protocol line at once (outside the room's coalescing)."""
        if self.transport is not None and not self.dead:
            self.send(line.encode() + b"\n")

    def refuse(self, code: str, text: str) -> None:
        """Say why in one line, then close; nothing more is read or written."""
        self.write_now(f":error {code} {text}")
        if self.transport is not None:
            self.transport.close()
        self.dead = True
        self.clear = False


class Hub:
    """The room on this server: connections, limits, and coalesced delivery.

    Inputs to the room go through `submit`: by default straight to apply();
    a cluster replaces it with a shared log that calls apply() on every
    server in the same order. Outputs only reach this server's connections.

    Deliveries are queued for the current pass of the event loop and written
    by flush() at its end: on a PassLoop just before the loop polls again
    (after one look for lines that arrived meanwhile, when the last flush
    carried more than one read: PassLoop.look_first), or as soon as a
    member's read is heard when it is the pass's only event (read_done),
    elsewhere (uvloop) by a callback scheduled once per pass; such a read of
    plain chat, with nothing queued, skips the queue altogether (said). A
    broadcast goes into `_bcast`; what sets one connection's stream apart
    from everyone's (its own messages skipped, lines only for it, joining or
    leaving mid-pass) is an edit list. Everyone else is sent the same joined
    bytes: one write per client per pass. A pass that queued only room notices
    (joins, leaves) leaves them for up to NOTICE_WAIT, so that a storm of
    logins shares writes; anything else queued meanwhile takes them along.
    """

    def __init__(self, room: Room, limits: Limits, out: BinaryIO, now: Any = time.time,
                 node: str = "local") -> None:
        self.room = room
        self.limits = limits
        self.out = out
        self.now = now
        self.node = node
        self.submit: Callable[[Input], None] = self.apply
        self._local = self.submit  # while submit is this, inputs are applied here and now
        self.throttle = LoginThrottle(limits.login_failures, limits.failure_window)
        self.members: dict[str, Connection] = {}  # this server's members, by name
        self.waiting: dict[str, Connection] = {}  # logins waiting for the room, by ticket
        self.connections: set[Connection] = set()
        self.per_ip: dict[str, int] = {}
        self._tickets = itertools.count(1)
        self._exempt = limits.networks()
        self._exempt_cache: dict[str, bool] = {}
        self._loop = loop = asyncio.get_running_loop()
        self._scheduled = False  # something is queued that flush() has not written
        self._reads = 0  # members' reads heard since the last flush
        self._urgent = False  # queued: more than room notices (flush at the pass end)
        self._notices: asyncio.TimerHandle | None = None  # notices only, due then
        self._look = False  # the last flush carried several: look before the next
        self._pass_loop = loop if isinstance(loop, PassLoop) else None  # flush() runs by itself
        # Connection.send may write to the socket itself (a socket is a file there)
        self.direct_writes = self._pass_loop is not None and os.name == "posix"
        self.by_fd: dict[int, Connection] = {}  # plain sockets (direct_writes), by descriptor
        if self._pass_loop is not None:
            self._pass_loop.before_poll.append(self.pass_end)
            self._pass_loop.serve_read = self.serve_read
        self.read_buffer = memoryview(bytearray(READ_BUFFER))
        self._bcast: list[bytes] = []
        self._edits: dict[Connection, list[tuple[int, bytes | None]]] = {}
        self._ranges: dict[Connection, list[int]] = {}
        self._printed: list[bytes] = []  # the server's lines for stdout, each ending in a line end

    def new_reader(self) -> LineReader:
        return LineReader(self.limits.max_line)

    # -- connection life ----------------------------------------------------

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

    def connected(self, conn: Connection) -> None:
        limits = self.limits
        if len(self.connections) >= limits.max_clients:
            conn.refuse("full", "The server is full; try again later")
            return
        if not self.exempt(conn.addr) and self.per_ip.get(conn.addr, 0) >= limits.max_per_ip:
            conn.refuse("full", "Too many connections from your address")
            return
        self.connections.add(conn)  # counted against the limits until lost
        self.per_ip[conn.addr] = self.per_ip.get(conn.addr, 0) + 1
        assert conn.transport is not None
        conn.transport.set_write_buffer_limits(high=limits.max_sendq)
        conn.timer = self._loop.call_later(limits.login_timeout, self.login_timed_out, conn)
        conn.write_now(f":hello chatroom {PROTOCOL_VERSION}")

    def login_timed_out(self, conn: Connection) -> None:
        conn.timer = None
        if conn.name is None and not conn.dead:  # also when the room never answered
            if conn.ticket is not None:
                self.waiting.pop(conn.ticket, None)
            conn.refuse("login-timeout", "The login was not finished in time")

    def lost(self, conn: Connection) -> None:
        conn.dead = True
        if self.by_fd.get(conn.fd) is conn:
            del self.by_fd[conn.fd]
        conn.clear, conn.fd = False, -1  # its socket is closed: the number may come back
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if conn in self.connections:
            self.connections.remove(conn)
            left = self.per_ip[conn.addr] - 1
            if left:
                self.per_ip[conn.addr] = left
            else:
                del self.per_ip[conn.addr]
        self._edits.pop(conn, None)
        self._ranges.pop(conn, None)
        if conn.ticket is not None:  # its Welcome, if one comes, finds nobody
            self.waiting.pop(conn.ticket, None)
        name = conn.name
        if name is not None:
            conn.name = None
            del self.members[name]
            self.submit(Gone(name))

    # -- lines in -------------------------------------------------------------

    def heard(self, conn: Connection, items: list[Received]) -> None:
        """The lines of one read from member `conn`, in order.

        While inputs are applied here, plain chat takes the room's own
        shortcut (no values are built): a read of nothing else goes out as
        one broadcast, one encode and one skip for its sender."""
        name = conn.name
        if name is None or not items:
            return
        if self.submit is self._local and TOO_LONG not in items and FLOOD not in items:
            block = self.room.said_lines(name, items)  # type: ignore[arg-type]
            if block is not None:
                self.said(conn, block.encode() + b"\n")
                return
        self._reads += 1
        self._urgent = True
        for item in items:
            if conn.dead or conn.close_after_flush:
                break
            self.received(conn, item)

    def serve_read(self, fd: int) -> bool:
        """Read a member's socket that the poll found readable, and hear it,
        as its transport would (PassLoop.serve_read). Anything but a member
        with data to read is left to the transport: a login, TLS (never in
        `by_fd`), the end of the stream, which stays readable until the
        transport meets it. A broken connection is aborted here, since
        reading it took its error."""
        conn = self.by_fd.get(fd)
        if conn is None or conn.name is None or conn.dead:
            return False
        transport = conn.transport
        assert transport is not None
        buffer = self.read_buffer
        try:
            nbytes = os.readv(fd, [buffer])
        except (BlockingIOError, InterruptedError):
            return True  # nothing after all; the poll will say when there is
        except OSError:
            transport.abort()
            return True
        if not nbytes:
            return False
        try:
            conn.data_received(buffer[:nbytes])
        except Exception as exc:  # as the transport does: report it, drop this client
            self._loop.call_exception_handler({
                "message": "Hub.serve_read: handling a read failed",
                "exception": exc, "protocol": conn, "transport": transport})
            transport.abort()
        return True

    def said(self, conn: Connection, block: bytes) -> None:
        """A read from member `conn` that was plain chat and nothing else:
        `block` is its room lines, each ending with a line end.

        When it is the pass's only read (PassLoop.lone), no run of several
        senders is being gathered (`_look`) and nothing is queued (no line,
        edit or server line), as with most reads in a quiet room, it is
        written at once, without being queued: to every member but `conn`,
        then to stdout. That is what flush() would write for it, by a shorter
        way (docs/PERFORMANCE.md, the eighth "Small rooms" round); read_done,
        which follows, ends the pass's early write. Otherwise it is queued
        like any other read, behind what was queued before. (`_ranges` needs
        no look: a join or a leave queues a line or an edit too, and a member
        who joined in this pass may be written to now.)"""
        loop = self._pass_loop
        if (loop is not None and loop.lone and not self._look and not self._bcast
                and not self._edits and not self._printed):
            for other in self.members.values():
                if other is not conn and not other.dead:
                    other.send(block)
            self.write_out(block)
            return
        self._reads += 1
        self._urgent = True
        self._said(conn, block)

    def _said(self, conn: Connection, block: bytes) -> None:
        """Room lines of `conn`'s plain chat: for every member but `conn`,
        and for our stdout."""
        self._printed.append(block)
        self._for_all(block, conn)

    def read_done(self) -> None:
        """A member's read has been heard. When it is the only read of this
        pass (PassLoop.lone) and no run of several senders is being gathered
        (look_first), what it queued is written now instead of at the end of
        the pass: nothing else in the pass could share that write."""
        loop = self._pass_loop
        if loop is not None and loop.lone and not self._look:
            loop.lone = False
            self.pass_end()

    def received(self, conn: Connection, item: Received) -> None:
        name = conn.name
        if name is not None:
            self._urgent = True
            if type(item) is str:
                line = self.room.said_line(name, item) if self.submit is self._local else None
                if line is None:
                    self.submit(Typed(name, item, self.now()))
                else:
                    self._said(conn, line.encode() + b"\n")
            elif item is TOO_LONG:
                limit = self.limits.max_line
                self.route([Fail(name, "line-too-long",
                                 f"Line too long: at most {limit} bytes; it was not sent")])
            else:
                conn.refuse("flood", "Too much data without a line end")
        elif isinstance(item, str):
            self.login(conn, item)
        elif item is TOO_LONG:
            conn.refuse("bad-login", "Expected: LOGIN <passcode> <username>")
        else:
            conn.refuse("flood", "Too much data without a line end")

    def login(self, conn: Connection, line: str) -> None:
        request = parse_login(line)
        if request is None:
            conn.refuse("bad-login", "Expected: LOGIN <passcode> <username>")
            return
        passcode, name = request
        exempt = self.exempt(conn.addr)
        now = self.now()
        if not exempt and self.throttle.blocked(conn.addr, now):
            conn.refuse("throttled", "Too many wrong passcodes; try again later")
            return
        refused = self.room.check_login(passcode, name)
        if refused is not None:
            if refused.code == "passcode" and not exempt:
                self.throttle.failed(conn.addr, now)
            conn.refuse(refused.code, refused.text)
            return
        self.throttle.succeeded(conn.addr)
        ticket = conn.ticket = f"{self.node}/{next(self._tickets)}"
        self.waiting[ticket] = conn
        conn.backlog = []  # until the room answers; at once when it is local
        self.submit(Joining(name, ticket))

    def apply(self, inp: Input) -> None:
        """Apply one input to the room, in the order the room sees them."""
        if type(inp) is Typed:  # (in a cluster, other servers' chat comes here)
            self._urgent = True
        self.route(self.room.step(inp))

    # -- lines out ------------------------------------------------------------

    def route(self, outputs: Iterable[Output]) -> None:
        """Queue `outputs` for this server's connections in this pass."""
        for out in outputs:
            if isinstance(out, Deliver):
                if out.to is None:
                    self._broadcast(out.line, out.skip)
                else:
                    self._to(out.to, out.line.encode() + b"\n")
            elif isinstance(out, Log):
                self._printed.append(out.line.encode("utf-8", "replace") + b"\n")
            elif isinstance(out, Fail):
                self._to(out.to, f":error {out.code} {out.text}\n".encode())
            elif isinstance(out, Bye):
                conn = self.members.pop(out.to, None)
                if conn is not None:
                    conn.name = None
                    self._ranges.setdefault(conn, [0, -1])[1] = len(self._bcast)
                    self._edit(conn, len(self._bcast), b":bye\n")
                    conn.close_after_flush = True
            elif isinstance(out, Welcome):
                self._welcome(out.ticket, out.name)
            else:
                conn = self.waiting.pop(out.ticket, None)
                if conn is not None:
                    conn.refuse(out.code, out.text)
        self._schedule()

    def _welcome(self, ticket: str, name: str) -> None:
        conn = self.waiting.pop(ticket, None)
        if conn is None or conn.dead:
            if ticket.startswith(self.node + "/"):
                self.submit(Gone(name))  # it left while its login waited
            return
        conn.ticket = None
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        conn.write_now(f":ok {name}")
        conn.name = name
        self.members[name] = conn
        self._ranges[conn] = [len(self._bcast), -1]
        backlog, conn.backlog = conn.backlog or [], None
        self.heard(conn, backlog)

    def _broadcast(self, line: str, skip: str | None) -> None:
        """`line` for every member of this server but `skip`."""
        self._for_all(line.encode() + b"\n", None if skip is None else self.members.get(skip))

    def _for_all(self, data: bytes, skip: Connection | None) -> None:
        """`data` (whole lines) for every member of this server but `skip`."""
        if skip is not None:
            self._edit(skip, len(self._bcast), None)
        self._bcast.append(data)
        self._schedule()

    def _to(self, name: str, data: bytes) -> None:
        conn = self.members.get(name)
        if conn is not None:
            self._edit(conn, len(self._bcast), data)

    def _edit(self, conn: Connection, pos: int, data: bytes | None) -> None:
        edits = self._edits.get(conn)
        if edits is None:
            self._edits[conn] = [(pos, data)]
        else:
            edits.append((pos, data))

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            if self._pass_loop is not None:
                if self._look:  # whoever else speaks meanwhile joins this flush
                    self._pass_loop.look_first = True
            else:
                self._loop.call_soon(self.pass_end)

    def pass_end(self) -> None:
        """The end of a pass: write what it queued, unless that is room
        notices alone; they wait up to NOTICE_WAIT for more, and go out at
        once with anything else queued meanwhile."""
        if not self._scheduled:
            return
        if self._urgent:
            self.flush()
            return
        self._scheduled = False  # what is queued next schedules a pass end again
        if self._notices is None:
            self._notices = self._loop.call_later(NOTICE_WAIT, self.flush_pending)

    def flush_pending(self) -> None:
        """Write whatever is queued, now."""
        if self._scheduled or self._notices is not None:
            self.flush()

    def flush(self) -> None:
        """Write everything queued (this pass's lines, and any room notices
        that were waiting): one write per connection."""
        self._scheduled = self._urgent = False
        self._look, self._reads = self._reads > 1, 0
        if self._notices is not None:
            self._notices.cancel()
            self._notices = None
        bcast, edits, ranges = self._bcast, self._edits, self._ranges
        self._bcast, self._edits, self._ranges = [], {}, {}
        common = b"".join(bcast)
        special = edits.keys() | ranges.keys()  # their own view; usually none
        if common:
            members: Iterable[Connection] = self.members.values()
            if special:
                members = [conn for conn in members if conn not in special]
            for conn in members:
                if not conn.dead:
                    conn.send(common)
        if special:
            offsets = list(itertools.accumulate(map(len, bcast), initial=0))
            for conn in special:
                if conn.dead:
                    continue
                lo, hi = ranges.get(conn, (0, -1))
                data = stream_view(common, offsets, edits.get(conn, ()), lo,
                                   len(bcast) if hi < 0 else hi)
                if data:
                    conn.send(data)
                if conn.close_after_flush:
                    conn.transport.close()  # type: ignore[union-attr]
        self._print_pending()

    def _print_pending(self) -> None:
        """The server's own lines for this pass, after the clients' (stdout may be slow)."""
        if self._printed:
            self.write_out(b"".join(self._printed))
            self._printed = []

    def print_lines(self, lines: list[str]) -> None:
        self.write_out(("\n".join(lines) + "\n").encode("utf-8", "replace"))

    def write_out(self, data: bytes) -> None:
        try:
            self.out.write(data)
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass  # nobody reads our stdout any more; the room goes on

    async def shutdown(self, grace: float = 2.0) -> None:
        """Tell everyone the server is going, then close every connection.

        In a cluster its members are reported gone first, so that the other
        servers announce them at once."""
        for name in list(self.members):
            self.members.pop(name).name = None
            if self.submit != self.apply:
                self.submit(Gone(name))
        self.flush()
        for conn in list(self.connections):
            conn.refuse("shutdown", "The server is shutting down")
        deadline = self._loop.time() + grace
        while self.connections and self._loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()


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


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(text)
    return value


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
                  failure_window=args.failure_window, exempt=exempt)


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
                cluster_module: Any = None) -> int:
    loop = asyncio.get_running_loop()
    fd_limit = raise_open_file_limit()
    loop.set_exception_handler(loop_error_handler(fd_limit))
    hub = Hub(Room(args.passcode), limits, sys.stdout.buffer)
    cluster = (await cluster_module.attach(hub, args.redis, args.redis_backlog)
               if cluster_module else None)
    try:
        server = await loop.create_server(
            lambda: Connection(hub), args.host, args.port, family=socket.AF_UNSPEC,
            backlog=4096, ssl=tls, ssl_handshake_timeout=limits.login_timeout if tls else None)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or exc
        sys.stderr.write(f"server.py: cannot listen on {args.host} port {args.port}: {reason}\n")
        return 1
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before the start line: from then on
        loop.add_signal_handler(sig, stop.set)  # a signal means a clean shutdown
    port = server.sockets[0].getsockname()[1]
    hub.print_lines([f"Server started on port {port}. Accepting connections"])
    sweeper = loop.create_task(sweep_throttle(hub))
    await stop.wait()
    sweeper.cancel()
    server.close()
    await hub.shutdown()
    if cluster is not None:
        await cluster.close()
    return 0


async def sweep_throttle(hub: Hub) -> None:
    while True:
        await asyncio.sleep(hub.limits.failure_window)
        hub.throttle.forget_older_than(hub.now())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not is_valid_passcode(args.passcode):
            raise UsageError("the passcode must be 1 to 5 ASCII letters or digits")
        limits = limits_from(args)
        tls = tls_context(args.tls_cert, args.tls_key)
        cluster = None
        if args.redis:
            cluster = optional("chatroom_ext.cluster", "-redis needs the chatroom_ext package "
                               "beside server.py and redis-py: pip install 'redis>=5'")
        run: Any = run_on_pass_loop
        if args.uvloop:
            run = optional("chatroom_ext.fastloop", "-uvloop needs the chatroom_ext package "
                           "beside server.py and uvloop: pip install uvloop").run
    except UsageError as exc:
        sys.stderr.write(f"server.py: error: {exc}\n")
        return 2
    try:
        return int(run(serve(args, limits, tls, cluster)))
    except KeyboardInterrupt:  # Ctrl-C before the loop could catch it
        return 0


if __name__ == "__main__":
    sys.exit(main())
