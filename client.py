#!/usr/bin/env python3
"""client.py: the chat room's client. Standard library only, Python 3.10+, POSIX.

    python3 client.py -join -host <host> -port <port> -username <username>
                      -passcode <passcode> [-tls] [-tls-ca FILE]

It speaks the wire protocol of docs/PROTOCOL.md and prints exactly the lines
of docs/SPEC.md: the room's lines on stdout, anything else as one line on
stderr. Exit status: 0 after :Exit, end of input or Ctrl-C (SIGINT, SIGTERM,
SIGHUP); 1 when the login is refused or the connection fails or is lost;
2 for bad arguments.

How the file is organised, top to bottom:

1. The pure part, no I/O: the argument rules, sanitize(), classify() that
   turns one server line into an Event, and LineSplitter that cuts the byte
   stream from the server into Events, dropping over-long lines.
2. Output: whole lines to stdout and stderr, one at a time, never raising.
   When stdin and stdout are both terminals, a line is printed above the line
   being typed, which readline then shows again.
3. Stopper: turns the signals into one Stop exception in the main thread.
4. Connecting (TLS optional) and logging in: the main thread, blocking.
5. Link: after the login, one thread owns the socket and does all of its
   reading and writing in a selector loop (an SSL socket must never be read
   and written by two threads at once). It hands every line that arrives to
   the Chat and sends what the Chat queues. When the connection ends it wakes
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
import selectors
import signal
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import NoReturn, TextIO

PROG = "client.py"
MAX_USERNAME = 8
MAX_PASSCODE = 5
MAX_LINE = 64 * 1024  # longest line accepted from the server, in bytes
RECV_SIZE = 64 * 1024
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
_NEUTRALISED = dict.fromkeys(CONTROL_CHARACTERS, "\ufffd")


def sanitize(text: str) -> str:
    """`text` with every control character (C0, DEL, C1) replaced by U+FFFD.

    This removes ESC, so no escape sequence can reach a terminal.
    """
    return text.translate(_NEUTRALISED)


def username_problem(name: str) -> str | None:
    """What is wrong with `name` as a username (SPEC.md), or None if nothing."""
    if not 1 <= len(name) <= MAX_USERNAME:
        return f"a username has 1 to {MAX_USERNAME} characters"
    for char in name:
        if ord(char) in CONTROL_CHARACTERS:
            return "a username has no control characters"
        if char.isspace():
            return "a username has no whitespace"
        if char == ":":
            return "a username has no ':'"
        if "\ud800" <= char <= "\udfff":  # bytes of argv that were not UTF-8
            return "a username is valid UTF-8"
    return None


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
    UNKNOWN = "unknown"  # a protocol line with a word this client does not know
    DISPLAY = "display"  # a line to print
    TOO_LONG = "too-long"  # a line longer than MAX_LINE, dropped


@dataclass(frozen=True)
class Event:
    """One line from the server, parsed.

    `text` is the line for DISPLAY, the human-readable text for ERROR and the
    rest of the line for the other protocol lines; `code` is ERROR's code.
    """

    kind: Kind
    text: str = ""
    code: str = ""


_PROTOCOL_WORDS = {"hello": Kind.HELLO, "ok": Kind.OK, "bye": Kind.BYE}


def classify(line: str) -> Event:
    """Parse one line from the server (without its line end)."""
    if not line.startswith(":"):
        return Event(Kind.DISPLAY, line)
    word, _, rest = line[1:].partition(" ")
    if word == "error":
        code, _, text = rest.partition(" ")
        return Event(Kind.ERROR, text or f"the server reported an error: {code}", code)
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


@dataclass(frozen=True)
class Settings:
    """The command line, checked."""

    host: str
    port: int
    username: str
    passcode: str
    tls: bool
    tls_ca: str | None


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
        help="1 to 8 characters; no whitespace, no ':', no control characters",
    )
    parser.add_argument("-passcode", required=True, help="the room's passcode")
    parser.add_argument("-tls", action="store_true", help="connect with TLS")
    parser.add_argument(
        "-tls-ca", metavar="FILE", help="also trust this CA certificate file (implies -tls)"
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
    )


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
    """

    def __init__(self, current_input: Callable[[], str] | None = None) -> None:
        self._lock = threading.Lock()
        self._current_input = current_input

    def say(self, text: str) -> None:
        """Print a line of the room on stdout."""
        self._write_line(sys.stdout, text)

    def warn(self, text: str) -> None:
        """Print a line on stderr."""
        self._write_line(sys.stderr, text)

    def erase_input(self) -> None:
        """On a terminal, erase what is left of the typed line, before exiting."""
        if self._current_input is not None:
            self._write(sys.stdout, "\r\x1b[K")

    def _write_line(self, stream: TextIO, text: str) -> None:
        data = sanitize(text) + "\n"
        if self._current_input is not None and stream.isatty():
            data = f"\r\x1b[K{data}{self._current_input()}"
        self._write(stream, data)

    def _write(self, stream: TextIO, data: str) -> None:
        with self._lock:
            try:
                stream.buffer.write(data.encode("utf-8", "surrogateescape"))
                stream.buffer.flush()
            except (OSError, ValueError):
                _send_to_devnull(stream)


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
    """The client must end with this one line on stderr and status 1."""


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


def open_connection(settings: Settings, context: ssl.SSLContext | None) -> socket.socket:
    """Connect, and with a `context`, do the TLS handshake. Raises Failure."""
    where = f"{settings.host} port {settings.port}"
    try:
        sock = socket.create_connection((settings.host, settings.port), timeout=CONNECT_TIMEOUT)
    except OSError as exc:
        raise Failure(f"cannot connect to {where}: {describe(exc)}") from None
    if context is None:
        return sock
    try:  # the handshake has CONNECT_TIMEOUT too; on failure the socket is closed
        return context.wrap_socket(sock, server_hostname=settings.host)
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or describe(exc)
        raise Failure(f"TLS certificate of {settings.host} did not verify: {reason}") from None
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
                              f"this client speaks '{PROTOCOL}'")
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


# ---------------------------------------------------------------------------
# 5. Link
# ---------------------------------------------------------------------------


class End(enum.Enum):
    """How the Link's thread ended."""

    BYE = "bye"  # the server said :bye
    CLOSED = "closed"  # the server closed the connection without :bye
    LOST = "lost"  # the connection failed (reason in Link.reason)
    STOPPED = "stopped"  # Link.stop() was called


class Link:
    """Owns the logged-in socket: one thread does all of its reads and writes.

    The socket is non-blocking and the thread waits in a selector for it and
    for a wake-up socket pair, which send() and stop() poke from the main
    thread. Each event that arrives (all but :bye) goes to `on_event`, in the
    Link's thread. When the thread ends it sets `finished` and sends
    WAKE_SIGNAL to the main thread. The stop signals are blocked in the
    thread, so the kernel delivers them to the main thread.
    """

    def __init__(
        self, sock: socket.socket, splitter: LineSplitter, on_event: Callable[[Event], None]
    ) -> None:
        self._sock = sock
        self._splitter = splitter
        self._on_event = on_event
        self._outbox = bytearray()
        self._lock = threading.Lock()  # guards _outbox
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._stopping = False
        self._blocked_on_write = False
        self._main_thread = threading.main_thread().ident or 0
        self._thread = threading.Thread(target=self._run, name="link", daemon=True)
        self.finished = threading.Event()
        self.end = End.STOPPED
        self.reason = ""

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

    def stop(self) -> None:
        """End the thread if it still runs, and wait for it."""
        self._stopping = True
        self._poke()
        self._thread.join()
        self._wake_reader.close()
        self._wake_writer.close()

    def _poke(self) -> None:
        try:
            self._wake_writer.send(b"!")
        except OSError:  # the pair is full (a wake-up is pending) or closed
            pass

    def _run(self) -> None:
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
        finally:
            self.finished.set()
            signal.pthread_kill(self._main_thread, WAKE_SIGNAL)

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

    def _drain_pokes(self) -> None:
        try:
            self._wake_reader.recv(4096)
        except BlockingIOError:
            pass


# ---------------------------------------------------------------------------
# 6. Chat
# ---------------------------------------------------------------------------


class Chat:
    """The logged-in session, seen from the main thread."""

    def __init__(
        self, sock: socket.socket, splitter: LineSplitter, output: Output, stopper: Stopper
    ) -> None:
        self._output = output
        self._stopper = stopper
        self._link = Link(sock, splitter, self._handle)
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
        """Send each line; stop after a typed :Exit or send :Exit at the end."""
        for line in lines:
            self._link.send(line + b"\n")
            if line == EXIT:
                self._exit_sent = True
                return
        self._link.send(EXIT + b"\n")
        self._exit_sent = True

    def _leave(self) -> None:
        """Leave after a signal: :Exit, then a short wait for :bye."""
        if not self._exit_sent:
            self._link.send(EXIT + b"\n")
        self._link.finished.wait(LEAVE_TIMEOUT)

    def _verdict(self) -> int:
        """The exit status once the Link has ended by itself."""
        if self._link.end is End.BYE:
            return 0
        if not self._error_shown:  # an :error line already said why
            if self._link.end is End.LOST:
                self._output.warn(f"{PROG}: lost the connection to the server: {self._link.reason}")
            else:
                self._output.warn(f"{PROG}: the server closed the connection")
        return 1

    def _handle(self, event: Event) -> None:
        """Act on one line from the server (in the Link's thread)."""
        if event.kind is Kind.DISPLAY:
            self._output.say(event.text)
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
            if refused.event.code == "passcode":
                output.say("Incorrect passcode")
            else:
                output.warn(refused.event.text)
            return 1
        stopper.hold()  # from here on a signal waits for the Chat, which can leave properly
        output.say(f"Connected to {settings.host} on port {settings.port}")
        return Chat(sock, splitter, output, stopper).run(typed_lines(interactive))


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
    output = Output(current_input)
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
