"""Shared helpers for the end-to-end tests: real processes, read line by line.

Rules the helpers enforce so that tests stay honest:

- Never sleep: every wait is "wait for this line, at most N seconds".
- Every line is compared to the byte: the streams are read as bytes, split on
  b"\\n" only, so a stray "\\r", a trailing space or a missing newline shows.
- To prove something was *not* printed, use an in-order barrier
  (`Room.assert_quiet`): the server answers each client in order, so anything
  that should not have been sent would arrive before the barrier's own lines.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal as signal_module
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository
# Where server.py and client.py are taken from: the repository, unless
# CHATROOM_PROGRAM_DIR points elsewhere (e.g. at a deliberately broken copy,
# to see that the suite notices).
PROGRAM_DIR = Path(os.environ.get("CHATROOM_PROGRAM_DIR") or ROOT).resolve()
DEFAULT_TIMEOUT = 10.0
PASSCODE = "abc12"
START_RE = re.compile(r"Server started on port (\d+)\. Accepting connections")

_EOF = object()
NO_NEWLINE = " <<missing newline at end of stream>>"

# What a child's stdin can be: subprocess.PIPE or DEVNULL, a file descriptor, a file.
Stdin = int | IO[bytes]


def child_env() -> dict[str, str]:
    """The environment for the programs under test.

    PYTHONUNBUFFERED would hide a program that forgets to flush its output, so
    it is removed; a UTF-8 locale is what a person's terminal has.
    """
    env = dict(os.environ)
    for var in ("PYTHONUNBUFFERED", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME"):
        env.pop(var, None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("LANG", "C.UTF-8")
    return env


class _Stream:
    """One pipe of a child process, read by its own thread into a queue."""

    def __init__(self, pipe: IO[bytes], label: str) -> None:
        self.q: queue.Queue[object] = queue.Queue()
        self.seen: list[str] = []  # every line read so far, for error messages
        self.eof = False
        self._thread = threading.Thread(target=self._pump, args=(pipe,), name=label, daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", errors="backslashreplace")
                line = line[:-1] if line.endswith("\n") else line + NO_NEWLINE
                self.seen.append(line)
                self.q.put(line)
        except (OSError, ValueError):
            pass
        finally:
            self.q.put(_EOF)

    def get(self, timeout: float) -> str | None:
        """The next line; None at end of stream; raises queue.Empty on timeout."""
        if self.eof:
            return None
        item = self.q.get(timeout=timeout)
        if item is _EOF:
            self.eof = True
            return None
        assert isinstance(item, str)
        return item

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


class Proc:
    """A child process with piped stdin/stdout/stderr, read line by line."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        cwd: str | os.PathLike[str],
        label: str,
        stdin: Stdin = subprocess.PIPE,
        env: dict[str, str] | None = None,
    ) -> None:
        self.argv = list(argv)
        self.label = label
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env if env is not None else child_env(),
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C on pytest must not reach the programs
        )
        assert self.popen.stdout is not None and self.popen.stderr is not None
        self.out = _Stream(self.popen.stdout, f"{label}-stdout")
        self.err = _Stream(self.popen.stderr, f"{label}-stderr")

    # -- reporting ---------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.popen.pid

    def describe(self) -> str:
        status = self.popen.poll()
        state = "still running" if status is None else f"exited with status {status}"
        return (
            f"[{self.label}] {' '.join(self.argv)}\n"
            f"  {state}\n"
            f"  stdout so far: {self.out.seen!r}\n"
            f"  stderr so far: {self.err.seen!r}"
        )

    def fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\n{self.describe()}", pytrace=False)

    # -- stdout ------------------------------------------------------------

    def next_line(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """The next stdout line (without its newline), or None at end of output."""
        try:
            return self.out.get(timeout)
        except queue.Empty:
            self.fail(f"{self.label}: no stdout line within {timeout} s")

    def expect(self, line: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Assert that the NEXT stdout line is exactly `line`."""
        got = self.next_line(timeout)
        if got != line:
            what = "end of output" if got is None else repr(got)
            self.fail(f"{self.label}: expected the next stdout line {line!r}, got {what}")

    def expect_match(
        self, pattern: str | re.Pattern[str], timeout: float = DEFAULT_TIMEOUT
    ) -> re.Match[str]:
        """Assert that the NEXT stdout line fully matches `pattern`; return the match."""
        got = self.next_line(timeout)
        m = re.fullmatch(pattern, got) if got is not None else None
        if m is None:
            what = "end of output" if got is None else repr(got)
            pat = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
            self.fail(f"{self.label}: expected the next stdout line to match {pat!r}, got {what}")
        return m

    def expect_eof(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Assert that stdout ends with no further line."""
        got = self.next_line(timeout)
        if got is not None:
            self.fail(f"{self.label}: expected no more stdout, got {got!r}")

    def rest_of_stdout(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """Every stdout line still to come, up to end of output."""
        lines = []
        deadline = time.monotonic() + timeout
        while (line := self.next_line(max(0.01, deadline - time.monotonic()))) is not None:
            lines.append(line)
        return lines

    # -- stderr ------------------------------------------------------------

    def expect_err_line(self, timeout: float = DEFAULT_TIMEOUT) -> str:
        """The next stderr line; fails at end of stream or on timeout."""
        try:
            got = self.err.get(timeout)
        except queue.Empty:
            self.fail(f"{self.label}: no stderr line within {timeout} s")
        if got is None:
            self.fail(f"{self.label}: expected a stderr line, got end of stderr")
        return got

    def stderr_lines(self, timeout: float = DEFAULT_TIMEOUT) -> list[str]:
        """All stderr lines ever written; waits for the process to end first."""
        self.wait(timeout)
        self.err.join(timeout)
        return list(self.err.seen)

    def stderr_text(self) -> str:
        return "\n".join(self.err.seen)

    # -- stdin, signals, exit ------------------------------------------------

    def send(self, text: str) -> None:
        """Type one line (a newline is added)."""
        self.send_raw((text + "\n").encode())

    def send_raw(self, data: bytes) -> None:
        assert self.popen.stdin is not None, f"{self.label}: stdin is not a pipe"
        try:
            self.popen.stdin.write(data)
            self.popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            self.fail(f"{self.label}: could not write {data!r} to stdin (process gone?)")

    def close_stdin(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()
            except BrokenPipeError:
                pass

    def signal(self, sig: int = signal_module.SIGINT) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()

    def wait(self, timeout: float = DEFAULT_TIMEOUT) -> int:
        """Wait for the process to end and return its status."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"{self.label}: still running after {timeout} s")
        self.out.join(timeout)
        self.err.join(timeout)
        return status

    def finish(self, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, list[str], list[str]]:
        """Wait for the end; return (status, stdout lines not yet read, all stderr lines)."""
        status = self.wait(timeout)
        rest = self.rest_of_stdout(timeout)
        return status, rest, list(self.err.seen)

    def assert_no_traceback(self) -> None:
        text = self.stderr_text()
        if "Traceback" in text or "Traceback" in "\n".join(self.out.seen):
            self.fail(f"{self.label}: printed a Python traceback")

    def cleanup(self) -> None:
        self.close_stdin()
        self.kill()
        self.out.join(2)
        self.err.join(2)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()


def expect_one_error_line(proc: Proc, status: int | None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The process ends with `status` (any non-zero if None), nothing on stdout, and
    exactly one non-empty line on stderr, with no traceback. Returns that line."""
    code, rest, err = proc.finish(timeout)
    if status is None:
        assert code != 0, f"{proc.label}: expected a non-zero status\n{proc.describe()}"
    else:
        assert code == status, (
            f"{proc.label}: expected status {status}, got {code}\n{proc.describe()}"
        )
    assert rest == [], f"{proc.label}: expected nothing on stdout\n{proc.describe()}"
    proc.assert_no_traceback()
    assert len(err) == 1 and err[0].strip(), (
        f"{proc.label}: expected exactly one non-empty line on stderr\n{proc.describe()}"
    )
    return err[0]


# -- time lines ----------------------------------------------------------------

DAYS = "Mon|Tue|Wed|Thu|Fri|Sat|Sun"
MONTHS = "Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec"
TIME_RE = rf"(?:{DAYS}) (?:{MONTHS}) \d\d \d\d:\d\d:\d\d \d{{4}}"


def time_line_re(name: str) -> str:
    return rf"{re.escape(name)}: ({TIME_RE})"


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%a %b %d %H:%M:%S %Y")


def assert_close_to(when: datetime, low: datetime, high: datetime, slack: float = 2.0) -> None:
    """`when` (whole seconds) lies in [low, high], give or take `slack` seconds."""
    pad = timedelta(seconds=slack)
    assert low - pad <= when <= high + pad, f"time {when} is not between {low} and {high}"


# -- ports -----------------------------------------------------------------------


def free_port() -> int:
    """A port nobody listens on right now (bound then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def watched_sockets(side: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> list[bool]:
    """For each established TCP socket whose `side` port ("sport": this
    end's, "dport": the other end's) is `port`: has it a keepalive timer?
    Read from `ss` (iproute2), once no socket has data in flight (its
    retransmission timer would be shown instead); skips the test where
    there is no `ss`."""
    if shutil.which("ss") is None:
        pytest.skip("no ss (iproute2) to read the sockets' timers with")
    deadline = time.monotonic() + timeout
    while True:
        shown = subprocess.run(
            ["ss", "-tnoH", "state", "established", f"( {side} = :{port} )"],
            capture_output=True, text=True, timeout=10, check=True).stdout
        lines = [line for line in shown.splitlines() if line.strip()]
        if not any("timer:(on," in line for line in lines) or time.monotonic() > deadline:
            return ["timer:(keepalive" in line for line in lines]
        time.sleep(0.05)


# -- a person with nc ---------------------------------------------------------------


class Peer:
    """A raw TCP connection read line by line, like a person with `nc`; also the
    other end of a fake server. Lines must end with b"\\n" alone (never b"\\r\\n")
    and be valid UTF-8."""

    def __init__(self, sock: socket.socket, label: str = "nc", eol: str = "\n") -> None:
        self.sock = sock
        self.label = label
        self.name = label  # a Peer that logged in can be a Room member
        self.eol = eol
        self.buf = b""
        self.seen: list[str] = []

    @classmethod
    def connect(cls, port: int, label: str = "nc", eol: str = "\n") -> Peer:
        return cls(
            socket.create_connection(("127.0.0.1", port), timeout=DEFAULT_TIMEOUT), label, eol
        )

    def describe(self) -> str:
        return f"[{self.label}] lines so far: {self.seen!r}, unread bytes: {self.buf!r}"

    def fail(self, message: str) -> NoReturn:
        pytest.fail(f"{message}\n{self.describe()}", pytrace=False)

    def send(self, text: str) -> None:
        self.send_raw((text + self.eol).encode())

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as e:
            self.fail(f"{self.label}: could not send {data[:80]!r}: {e}")

    def next_line(self, timeout: float = DEFAULT_TIMEOUT) -> str | None:
        """The next line without its b"\\n"; None when the other end closed."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"{self.label}: no line within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if self.buf:
                    self.fail(f"{self.label}: connection closed in the middle of a line")
                return None
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\n", 1)
        if raw.endswith(b"\r"):
            self.fail(f"{self.label}: a line ended with \\r\\n: {raw!r}")
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{self.label}: a line is not UTF-8: {raw!r}")
        self.seen.append(line)
        return line

    def expect(self, line: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        got = self.next_line(timeout)
        if got != line:
            what = "the connection closing" if got is None else repr(got)
            self.fail(f"{self.label}: expected the next line {line!r}, got {what}")

    def expect_match(self, pattern: str, timeout: float = DEFAULT_TIMEOUT) -> re.Match[str]:
        got = self.next_line(timeout)
        m = re.fullmatch(pattern, got) if got is not None else None
        if m is None:
            what = "the connection closing" if got is None else repr(got)
            self.fail(f"{self.label}: expected the next line to match {pattern!r}, got {what}")
        return m

    def expect_closed(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        got = self.next_line(timeout)
        if got is not None:
            self.fail(f"{self.label}: expected the connection to close, got {got!r}")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class FakeServer:
    """A listening socket on loopback that plays the server for one client."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = int(self.sock.getsockname()[1])
        self.peers: list[Peer] = []

    def accept(self, timeout: float = DEFAULT_TIMEOUT) -> Peer:
        self.sock.settimeout(timeout)
        try:
            conn, _ = self.sock.accept()
        except TimeoutError:
            pytest.fail(f"the client did not connect within {timeout} s", pytrace=False)
        peer = Peer(conn, label="fake-server")
        self.peers.append(peer)
        return peer

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.sock.close()


# -- the room --------------------------------------------------------------------


class Client(Proc):
    def __init__(self, name: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name = name


Member = Client | Peer  # anything in the room that can be typed to and read from


class Room:
    """One server and its clients, started with one interpreter from one place.

    `server_dir` and `client_dir` hold server.py and client.py (the repo root,
    or two empty temp folders with a copy each).
    """

    def __init__(
        self,
        python: str,
        server_dir: Path,
        client_dir: Path,
        passcode: str = PASSCODE,
        extra_python_args: Sequence[str] = (),
    ) -> None:
        self.python = python
        self.server_dir = server_dir
        self.client_dir = client_dir
        self.passcode = passcode
        self.extra_python_args = list(extra_python_args)
        self.server: Proc | None = None
        self.port: int | None = None
        self.members: list[Member] = []  # in the room, in join order
        self.procs: list[Proc] = []  # everything started, for cleanup
        self.peers: list[Peer] = []  # raw connections, for cleanup
        self._sync = 0

    # -- starting things ---------------------------------------------------

    def _py(self, script: str, wrapper: Sequence[str] = ()) -> list[str]:
        folder = self.server_dir if script == "server.py" else self.client_dir
        if not (folder / script).is_file():
            pytest.fail(f"{script} is missing (looked in {folder})", pytrace=False)
        return [self.python, *self.extra_python_args, *wrapper, script]

    def spawn_server(self, *args: str, label: str = "server", wrapper: Sequence[str] = ()) -> Proc:
        """Start server.py with exactly these arguments; no checks. `wrapper` goes
        between the interpreter and the script (e.g. ["-c", CODE, ...])."""
        proc = Proc(self._py("server.py", wrapper) + list(args), cwd=self.server_dir, label=label)
        self.procs.append(proc)
        return proc

    def start_server(
        self, *extra: str, passcode: str | None = None, wrapper: Sequence[str] = ()
    ) -> Proc:
        """Start the server on -port 0; check its first line; learn the port."""
        args = ["-start", "-port", "0", "-passcode", passcode or self.passcode, *extra]
        server = self.spawn_server(*args, wrapper=wrapper)
        first = server.next_line()
        m = START_RE.fullmatch(first or "")
        if m is None:
            server.fail(
                "server: first line should be "
                f"'Server started on port <port>. Accepting connections', got {first!r}"
            )
        port = int(m.group(1))
        if port == 0:
            server.fail("server: printed port 0 instead of the port the OS chose")
        self.server, self.port = server, port
        return server

    def client_args(
        self,
        name: str,
        passcode: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> list[str]:
        port = self.port if port is None else port
        assert port is not None, "start the server first"
        pc = self.passcode if passcode is None else passcode
        return ["-join", "-host", host, "-port", str(port), "-username", name, "-passcode", pc]

    def spawn_client(
        self, *args: str, name: str = "client", stdin: Stdin = subprocess.PIPE
    ) -> Client:
        """Start client.py with exactly these arguments; no checks."""
        proc = Client(
            name, self._py("client.py") + list(args), cwd=self.client_dir, label=name, stdin=stdin
        )
        self.procs.append(proc)
        return proc

    def connect(
        self,
        name: str,
        passcode: str | None = None,
        host: str = "127.0.0.1",
        stdin: Stdin = subprocess.PIPE,
    ) -> Client:
        """Start a client for `name` and check its Connected line, nothing more."""
        client = self.spawn_client(*self.client_args(name, passcode, host), name=name, stdin=stdin)
        client.expect(f"Connected to {host} on port {self.port}")
        return client

    def join(self, name: str, passcode: str | None = None, host: str = "127.0.0.1", **kw) -> Client:
        """A client that is in the room: it printed Connected, the server and every
        other member printed '<name> joined the chatroom' (all consumed)."""
        client = self.connect(name, passcode, host, **kw)
        self.announced_join(client)
        return client

    def nc(self, eol: str = "\n", label: str = "nc") -> Peer:
        """A raw connection to the server, nothing read yet."""
        assert self.port is not None, "start the server first"
        peer = Peer.connect(self.port, label, eol)
        self.peers.append(peer)
        return peer

    def nc_join(self, name: str, eol: str = "\n") -> Peer:
        """A raw connection that logged in as `name`, like a person with nc."""
        peer = self.nc(eol, label=name)
        peer.expect(":hello chatroom 1")
        peer.send(f"LOGIN {self.passcode} {name}")
        peer.expect(f":ok {name}")
        peer.name = name
        self.announced_join(peer)
        return peer

    def announced_join(self, client: Member) -> None:
        """The server and the members already there print the join line."""
        assert self.server is not None
        line = f"{client.name} joined the chatroom"
        self.server.expect(line)
        for other in self.members:
            other.expect(line)
        self.members.append(client)

    # -- leaving -------------------------------------------------------------

    def announced_leave(self, client: Member) -> None:
        """The server and everybody else print '<name> left the chatroom'."""
        assert self.server is not None
        self.members.remove(client)
        line = f"{client.name} left the chatroom"
        self.server.expect(line)
        for other in self.members:
            other.expect(line)

    def leave(self, client: Member) -> None:
        """`:Exit`: the room is told, the client ends with status 0 and prints nothing
        more (a raw connection gets `:bye` and is closed)."""
        errors_before = 0 if isinstance(client, Peer) else len(client.err.seen)
        client.send(":Exit")
        self.announced_leave(client)
        if isinstance(client, Peer):
            client.expect(":bye")
            client.expect_closed()
            return
        status, rest, err = client.finish()
        assert (status, rest, err[errors_before:]) == (0, [], []), (
            f"after :Exit expected status 0 and no more output\n{client.describe()}"
        )

    # -- saying things -------------------------------------------------------

    def others(self, client: Member) -> list[Member]:
        return [c for c in self.members if c is not client]

    def say(self, client: Member, text: str, shown: str | None = None) -> None:
        """`client` types plain text: the server and every other member print
        '<name>: <shown>' (shown defaults to text); the sender prints nothing
        (checked later by assert_quiet)."""
        assert self.server is not None
        line = f"{client.name}: {text if shown is None else shown}"
        client.send(text)
        self.server.expect(line)
        for other in self.others(client):
            other.expect(line)

    def users_line(self) -> str:
        return "Active Users: " + ", ".join(c.name for c in self.members)

    def assert_quiet(self, via: Member | None = None) -> None:
        """In-order barrier: nobody has an unread line pending.

        `via` (default: the first member) types :Users and then a plain-text
        marker. Because the server handles one client's lines in order and
        answers in order, anything still due to anyone because of what `via`
        did before would be printed ahead of these lines:
        - `via`'s next line must be its Active Users line;
        - every other member's next line must be the marker;
        - the server's next lines must be the :Users notice and the marker.
        """
        assert self.server is not None
        via = via or self.members[0]
        self._sync += 1
        marker = f"barrier {self._sync}"
        via.send(":Users")
        via.expect(self.users_line())
        self.server.expect(f"{via.name}: searched up active users")
        self.say(via, marker)

    # -- cleanup ---------------------------------------------------------------

    def close(self) -> list[str]:
        """Kill everything (clients first); return the labels of processes that
        printed a traceback."""
        for peer in self.peers:
            peer.close()
        bad = []
        for proc in sorted(self.procs, key=lambda p: p is self.server):
            proc.cleanup()
            if "Traceback" in proc.stderr_text():
                bad.append(proc.describe())
        return bad


def lines_without_double_spaces(lines: Iterable[str]) -> None:
    for line in lines:
        assert "  " not in line, f"two spaces in a row in {line!r}"
