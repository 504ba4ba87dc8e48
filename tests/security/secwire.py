"""Helpers for the security suite: real server processes and raw bytes on the wire.

Rules kept here so that every test stays honest:

- Every wait is "this line, at most N seconds"; there are no fixed sleeps.
- Every loop is bounded in count and in time.
- Traffic goes to 127.0.0.0/8 only.
- Every line read from the server is checked against the protocol's safety
  rules (valid UTF-8, ends with a bare "\\n", no control character at all), so a
  control sequence that slips through fails whichever test sees it.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Protocol, TypedDict

import pytest
from harness import START_RE, Proc, child_env

if TYPE_CHECKING:  # for mypy only: typing.Unpack is Python 3.11+
    from typing_extensions import Unpack

ROOT = Path(__file__).resolve().parents[2]
PASSCODE = "abc12"
TIMEOUT = 5.0
# A server's flags that turn off each member's budget (the flood limit), for
# tests of what happens downstream of a flood (SendQ, frozen readers).
NO_BUDGET = ("-line-rate", "0", "-byte-rate", "0")

# Every control character the protocol forbids on a display line.
CONTROLS = frozenset([*range(0x20), 0x7F, *range(0x80, 0xA0)])
ERROR_RE = re.compile(r":error ([a-z-]+) (\S.*)")


def sanitised(text: str) -> str:
    """What the protocol says another client sees for `text`: every control
    character (C0, DEL, C1) replaced by U+FFFD. Written here independently of
    server.neutralise on purpose."""
    return "".join("\ufffd" if ord(ch) in CONTROLS else ch for ch in text)


def check_safe_line(raw: bytes, who: str) -> str:
    """A line from the server (without its "\\n") as text; fails the test if it
    could act on a terminal or is not UTF-8."""
    bad = [b for b in raw if b < 0x20 or b == 0x7F]
    assert not bad, f"{who}: control byte(s) {bytes(bad)!r} in line from the server: {raw!r}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AssertionError(f"{who}: line from the server is not UTF-8: {raw!r}") from exc
    c1 = [ch for ch in text if ord(ch) in CONTROLS]
    assert not c1, f"{who}: C1 control(s) {c1!r} in line from the server: {raw!r}"
    return text


def rss_kib(pid: int) -> int:
    """The resident set size of process `pid`, in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS line for pid {pid}")


# -- the server -------------------------------------------------------------------


class Server:
    """`python3 server.py -start -port 0 -passcode abc12 [flags]`, read line by line."""

    def __init__(self, *flags: str, passcode: str = PASSCODE, python: str = sys.executable) -> None:
        self.argv = [python, "server.py", "-start", "-port", "0", "-passcode", passcode, *flags]
        self.proc = Proc(self.argv, cwd=ROOT, label="server", env=child_env())
        first = self.next_line(10)
        m = START_RE.fullmatch(first or "")
        if m is None:
            self.fail(f"server: expected the 'Server started' line first, got {first!r}")
        self.port = int(m.group(1))
        assert self.port != 0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss(self) -> int:
        return rss_kib(self.pid)

    def fail(self, message: str) -> NoReturn:
        """Fail with the last few lines only (a flood prints megabytes)."""
        status = self.proc.popen.poll()
        tail = [line[:120] for line in self.proc.out.seen[-8:]]
        pytest.fail(f"{message}\n[server] {' '.join(self.argv[1:])}\n"
                    f"  {'still running' if status is None else f'exited with status {status}'}"
                    f"\n  last stdout lines: {tail!r}\n  stderr: {self.proc.err.seen[-5:]!r}",
                    pytrace=False)

    def next_line(self, timeout: float = TIMEOUT) -> str | None:
        try:
            return self.proc.out.get(timeout)
        except queue.Empty:
            self.fail(f"server: no stdout line within {timeout} s")

    def expect(self, line: str, timeout: float = TIMEOUT) -> None:
        """The server's NEXT stdout line is exactly `line`."""
        got = self.next_line(timeout)
        if got != line:
            self.fail(f"server: expected the next stdout line {line[:120]!r}, got "
                      f"{'end of output' if got is None else repr(got[:120])}")

    def wait_for(self, line: str, timeout: float = TIMEOUT, limit: int = 1_000_000) -> int:
        """Skip stdout lines until `line`; return how many were skipped."""
        deadline = time.monotonic() + timeout
        for skipped in range(limit):
            got = self.next_line(max(0.01, deadline - time.monotonic()))
            if got == line:
                return skipped
            if got is None:
                self.fail(f"server: stdout ended before {line!r}")
        self.fail(f"server: {line!r} not among {limit} lines")

    def alive(self) -> bool:
        return self.proc.popen.poll() is None

    def close(self) -> str:
        """Kill it; return its stderr."""
        self.proc.cleanup()
        return self.proc.stderr_text()


# -- a raw client ---------------------------------------------------------------------


class Wire:
    """A raw TCP (or TLS) connection that speaks the protocol by hand, like nc."""

    def __init__(self, port: int, *, host: str = "127.0.0.1", source: str | None = None,
                 rcvbuf: int | None = None, label: str = "wire",
                 tls: ssl.SSLContext | None = None, server_hostname: str | None = None) -> None:
        self.label = label
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:  # before connect, so the window is small from the start
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            if source is not None:
                sock.bind((source, 0))
            sock.settimeout(TIMEOUT)
            sock.connect((host, port))
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=server_hostname or host)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.buf = b""
        self.eof = False
        self.received: list[str] = []  # every line so far, for failure messages

    # -- sending --------------------------------------------------------------

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def say(self, line: str) -> None:
        self.send(line.encode() + b"\n")

    # -- receiving ------------------------------------------------------------

    def _fill(self, deadline: float) -> bool:
        """Read more bytes; False at end of stream (or a reset after a close)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.sock.settimeout(left)
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
            chunk = b""
        except (TimeoutError, ssl.SSLWantReadError):
            raise TimeoutError from None
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def raw_line(self, timeout: float = TIMEOUT) -> bytes | None:
        """The next line's bytes without its "\\n"; None at end of stream."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            if self.eof:
                return None
            try:
                if not self._fill(deadline):
                    if self.buf:
                        pytest.fail(f"{self.label}: stream ended inside a line: {self.buf!r}"
                                    f"\nafter {self.received[-5:]!r}", pytrace=False)
                    return None
            except TimeoutError:
                pytest.fail(f"{self.label}: no line within {timeout} s (buffered "
                            f"{self.buf[:200]!r}); lines so far: {self.received[-5:]!r}",
                            pytrace=False)
        raw, _, self.buf = self.buf.partition(b"\n")
        return raw

    def line(self, timeout: float = TIMEOUT) -> str | None:
        """The next line as text (checked against the safety rules); None at end."""
        raw = self.raw_line(timeout)
        if raw is None:
            return None
        text = check_safe_line(raw, self.label)
        self.received.append(text)
        return text

    def expect(self, line: str, timeout: float = TIMEOUT) -> None:
        got = self.line(timeout)
        assert got == line, (f"{self.label}: expected {line!r}, got "
                             f"{'end of stream' if got is None else repr(got)}")

    def expect_error(self, code: str, timeout: float = TIMEOUT) -> str:
        """The next line is `:error <code> <one line of text>`; returns the text."""
        got = self.line(timeout)
        m = ERROR_RE.fullmatch(got or "")
        assert m is not None and m.group(1) == code, (
            f"{self.label}: expected ':error {code} ...', got "
            f"{'end of stream' if got is None else repr(got)}")
        return m.group(2)

    def expect_closed(self, timeout: float = TIMEOUT) -> None:
        """Nothing more arrives and the server closes the connection."""
        got = self.line(timeout)
        assert got is None, f"{self.label}: expected the connection closed, got {got!r}"

    def expect_refused(self, code: str, timeout: float = TIMEOUT) -> str:
        text = self.expect_error(code, timeout)
        self.expect_closed(timeout)
        return text

    # -- the protocol ------------------------------------------------------------

    def hello(self) -> None:
        self.expect(":hello chatroom 1")

    def login(self, name: str, passcode: str = PASSCODE) -> Wire:
        self.say(f"LOGIN {passcode} {name}")
        self.hello()
        self.expect(f":ok {name}")
        return self

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


# -- fixtures' engine -----------------------------------------------------------------


class ConnectOptions(TypedDict, total=False):
    """Wire's keyword options that Lab.member and Lab.assert_serving pass on."""

    host: str
    source: str | None
    rcvbuf: int | None
    tls: ssl.SSLContext | None
    server_hostname: str | None


class WireOptions(ConnectOptions, total=False):
    """Every keyword option of Wire, which Lab.wire passes on."""

    label: str


class Member(Protocol):
    """Someone in the room who is told of joins and leaves: a Wire, or a Proc that
    runs client.py (both check their next line with `expect`)."""

    def expect(self, line: str, timeout: float = ...) -> None: ...


class Lab:
    """Everything one test started, so that teardown can end all of it."""

    def __init__(self) -> None:
        self.servers: list[Server] = []
        self.wires: list[Wire] = []
        self.cleanups: list[Callable[[], None]] = []
        self.clients: list[Proc] = []
        self._probe = 0

    def server(self, *flags: str, **kw: str) -> Server:
        srv = Server(*flags, **kw)
        self.servers.append(srv)
        return srv

    def wire(self, port: int, **kw: Unpack[WireOptions]) -> Wire:
        w = Wire(port, **kw)
        self.wires.append(w)
        return w

    def client(self, srv: Server, name: str, *args: str, label: str | None = None) -> Proc:
        """The real client.py, logging in as `name` (nothing checked). Teardown sends
        SIGCONT before killing it, in case a test stopped it."""
        argv = [sys.executable, "client.py", "-join", "-host", "127.0.0.1", "-port",
                str(srv.port), "-username", name, "-passcode", PASSCODE, *args]
        proc = Proc(argv, cwd=ROOT, label=label or name, env=child_env())

        def end() -> None:
            if proc.popen.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
            proc.cleanup()
        self.cleanups.append(end)
        self.clients.append(proc)
        return proc

    def member(
        self, srv: Server, name: str, *others: Member, **kw: Unpack[ConnectOptions]
    ) -> Wire:
        """`name` logs in over a raw socket; the server and `others` are told."""
        w = self.wire(srv.port, label=name, **kw).login(name)
        srv.expect(f"{name} joined the chatroom")
        for other in others:
            other.expect(f"{name} joined the chatroom")
        return w

    def assert_serving(
        self, srv: Server, *members: Member, **kw: Unpack[ConnectOptions]
    ) -> None:
        """The server still serves: a fresh client logs in, is announced to the
        server and to every member as the NEXT line each prints (so nothing was
        printed for what came before), asks :Users and leaves with :Exit."""
        self._probe += 1
        name = f"probe{self._probe}"
        w = self.member(srv, name, *members, **kw)
        w.say(":Users")
        listing = w.line()
        assert listing is not None and listing.startswith("Active Users: ") \
            and listing.endswith(f", {name}" if members else name), listing
        srv.expect(f"{name}: searched up active users")
        w.say(":Exit")
        w.expect(":bye")
        w.expect_closed()
        srv.expect(f"{name} left the chatroom")
        for m in members:
            m.expect(f"{name} left the chatroom")

    def close(self) -> list[str]:
        problems = []
        for fn in reversed(self.cleanups):
            try:
                fn()
            except Exception as exc:  # teardown must go on
                problems.append(f"cleanup failed: {exc!r}")
        for proc in self.clients:
            if "Traceback" in proc.stderr_text():
                problems.append(f"client.py printed a traceback:\n{proc.describe()}")
        for w in self.wires:
            w.close()
        for srv in self.servers:
            err = srv.close()
            if err:
                print(f"\nserver stderr: {err!r}")
            if "Traceback" in err:
                problems.append(f"the server printed a traceback:\n{err}")
        return problems


@pytest.fixture
def lab() -> Iterator[Lab]:
    the_lab = Lab()
    yield the_lab
    problems = the_lab.close()
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class LineCollector:
    """Reads one Wire's lines on a thread until `stop` is seen or time runs out."""

    def __init__(self, wire: Wire, stop: str, timeout: float, limit: int) -> None:
        self.wire = wire
        self.stop = stop
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self._deadline = time.monotonic() + timeout
        self._limit = limit
        self._thread = threading.Thread(target=self._run, name=f"collect-{wire.label}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for _ in range(self._limit):
                left = self._deadline - time.monotonic()
                if left <= 0:
                    return
                raw = self.wire.raw_line(left)
                if raw is None:
                    return
                text = check_safe_line(raw, self.wire.label)
                self.lines.append(text)
                if text == self.stop:
                    return
        except BaseException as exc:  # reported by join()
            self.error = exc

    def count(self) -> int:
        return len(self.lines)

    def join(self) -> list[str]:
        self._thread.join(max(0.0, self._deadline - time.monotonic()) + 1)
        assert not self._thread.is_alive(), f"{self.wire.label}: reader still running"
        if self.error is not None:
            raise AssertionError(f"{self.wire.label}: {self.error!r}")
        return self.lines


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- flooding the room ------------------------------------------------------------------


def flood_line(i: int, size: int) -> str:
    return f"{i:06d} " + "x" * size


class FloodResult:
    def __init__(self) -> None:
        self.sent = 0
        self.dropped_after = -1  # messages sent when the first reader saw the drop
        self.rss_samples: list[int] = []
        self.seconds = 0.0

    @property
    def rss_peak(self) -> int:
        return max(self.rss_samples)


class RssSampler:
    """Samples a process's RSS on a thread every millisecond or so, for the peak."""

    def __init__(self, pid: int, timeout: float = 60.0) -> None:
        self.pid = pid
        self.samples = [rss_kib(pid)]
        self._stop = threading.Event()
        self._deadline = time.monotonic() + timeout
        self._thread = threading.Thread(target=self._run, name=f"rss-{pid}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                self.samples.append(rss_kib(self.pid))
            except (OSError, AssertionError):
                return
            self._stop.wait(0.001)

    def stop(self) -> int:
        """Stop sampling; return the peak in KiB."""
        self._stop.set()
        self._thread.join(5)
        return max(self.samples)


def flood_until_dropped(srv: Server, flooder: Wire, readers: list[LineCollector],
                        victims: str | Sequence[str], *,
                        size: int = 1000, max_messages: int = 30000, after: int = 300,
                        batch: int = 50, max_lag: int = 1000, timeout: float = 30.0,
                        followers: Sequence[Callable[[], int]] = ()) -> FloodResult:
    """`flooder` sends numbered lines of `size` bytes, `batch` per write, until the first
    reader has seen '<victim> left the chatroom' for every victim and `after` more
    lines were sent
    (at most `max_messages`, at most `timeout` seconds), then the line 'done'.
    The flooder waits for the readers (and `followers`, which count the lines other
    receivers got) whenever they lag more than `max_lag` lines, so that only the
    victims, which do not read, can fall behind. The server's RSS is sampled on a
    thread all along."""
    result = FloodResult()
    waiting = {f"{v} left the chatroom" for v in ([victims] if isinstance(victims, str)
                                                  else victims)}
    first = readers[0]
    scanned = 0
    start = time.monotonic()
    deadline = start + timeout
    stop_at = max_messages
    sampler = RssSampler(srv.pid, timeout + 5)
    while result.sent < stop_at:
        assert time.monotonic() < deadline, f"flood: still going after {timeout} s"
        n = min(batch, stop_at - result.sent)
        flooder.send("".join(flood_line(result.sent + k, size) + "\n" for k in range(n)))
        result.sent += n
        if waiting:
            lines = first.lines
            for idx in range(scanned, len(lines)):
                waiting.discard(lines[idx])
            scanned = len(lines)
            if not waiting:
                result.dropped_after = result.sent
                stop_at = min(max_messages, result.sent + after)
        for _ in range(100_000):  # let the readers catch up (bounded by the deadline)
            behind = result.sent - max_lag
            if (all(r.count() >= behind or r.error or not r._thread.is_alive() for r in readers)
                    and all(f() >= behind for f in followers)) or time.monotonic() > deadline:
                break
            time.sleep(0.001)
    flooder.say("done")
    for r in readers:
        r.join()
    sampler.stop()
    result.rss_samples = sampler.samples
    result.seconds = time.monotonic() - start
    return result


def check_flow(lines: list[str], sender: str, sent: int, size: int, also: list[str]) -> None:
    """`lines` are every flood line in order, the 'done' line last, and the lines of
    `also` (each once) somewhere among them."""
    rest = list(lines)
    for extra in also:
        assert rest.count(extra) == 1, f"expected {extra!r} once among the lines received"
        rest.remove(extra)
    expected = [f"{sender}: {flood_line(i, size)}" for i in range(sent)] + [f"{sender}: done"]
    if rest != expected:
        for i, (got, want) in enumerate(zip(rest, expected, strict=False)):
            if got != want:
                raise AssertionError(f"line {i}: expected {want[:40]!r}..., got {got[:40]!r}...")
        raise AssertionError(f"got {len(rest)} lines, expected {len(expected)}; "
                             f"last: {rest[-1:]!r}")


def read_all(sock: socket.socket, limit: int, timeout: float) -> bytes:
    """Everything `sock` receives until the peer closes (at most `limit` bytes)."""
    data = bytearray()
    deadline = time.monotonic() + timeout
    while len(data) < limit:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the connection was not closed within {timeout} s "
                                 f"({len(data)} bytes read)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        except TimeoutError:
            continue
        if not chunk:
            break
        data += chunk
    return bytes(data)
