"""The real client.py process against a fake server scripted by each test.

The fake server is a plain listening socket on 127.0.0.1 (port 0) that the
test body drives step by step, following docs/PROTOCOL.md: accept, read a line,
answer. The client's stdout and stderr are read line by line as bytes by
threads, so every wait is "this line, within TIMEOUT seconds": no sleeps.

`python` (from conftest.py) runs each test on the interpreter running the
tests and on Python 3.10, the oldest supported.
"""

from __future__ import annotations

import os
import queue
import re
import select
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENT = ROOT / "client.py"
TIMEOUT = 10.0
PASSCODE = "abc12"
# What a child's stdin or stdout can be: subprocess.PIPE or DEVNULL, a file
# descriptor, a file.
Stdio = int | IO[bytes]


def child_env() -> dict[str, str]:
    """No PYTHONUNBUFFERED (it would hide a missing flush) and a UTF-8 locale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["LANG"] = "C.UTF-8"
    env["TZ"] = "UTC"  # the times of replayed lines are local
    return env


class Lines:
    """One pipe of the client, read by a thread into a queue of lines."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._queue: queue.Queue[bytes | None] = queue.Queue()
        self._ended = False
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe: IO[bytes]) -> None:
        for raw in iter(pipe.readline, b""):
            self._queue.put(raw)
        self._queue.put(None)

    def next(self, timeout: float = TIMEOUT) -> str | None:
        """The next line without its \\n; None at the end of the stream."""
        if self._ended:
            return None
        try:
            raw = self._queue.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no line from the client within {timeout} s")
        if raw is None:
            self._ended = True
            return None
        assert raw.endswith(b"\n"), f"a line without its newline: {raw!r}"
        return raw[:-1].decode("utf-8")

    def rest_until(self, last: str) -> list[str]:
        """The lines up to `last`, included."""
        lines: list[str] = []
        while not lines or lines[-1] != last:
            line = self.next()
            assert line is not None, f"the stream ended before {last!r}: {lines}"
            lines.append(line)
        return lines

    def rest(self) -> list[str]:
        """Every line left, up to the end of the stream."""
        lines = []
        while (line := self.next()) is not None:
            lines.append(line)
        return lines


@dataclass
class Result:
    status: int
    stdout: list[str]
    stderr: list[str]


class Client:
    """A client.py process with piped stdin, stdout and stderr."""

    def __init__(
        self,
        python: str,
        args: list[str],
        stdin: Stdio = subprocess.PIPE,
        stdout: Stdio = subprocess.PIPE,
    ) -> None:
        self.proc = subprocess.Popen(
            [python, str(CLIENT), *args],
            stdin=stdin,
            stdout=stdout,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=ROOT,
        )
        assert self.proc.stderr is not None
        self._stdout: Lines | None = None
        if stdout == subprocess.PIPE:
            assert self.proc.stdout is not None
            self._stdout = Lines(self.proc.stdout)
        self.stderr = Lines(self.proc.stderr)

    @property
    def stdout(self) -> Lines:
        """The client's stdout, line by line (only when the test left it piped)."""
        assert self._stdout is not None, "this client's stdout is not a pipe"
        return self._stdout

    def type(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        for line in lines:
            self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def end_input(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = TIMEOUT) -> Result:
        """Wait for the exit; the rest of stdout and stderr. Never a traceback."""
        status = self.proc.wait(timeout)
        result = Result(status, self._stdout.rest() if self._stdout else [], self.stderr.rest())
        assert not any("Traceback" in line for line in result.stderr), result.stderr
        return result


class Peer:
    """The fake server's end of one connection, read and written by the test."""

    def __init__(self, sock: socket.socket) -> None:
        sock.settimeout(TIMEOUT)
        self.sock = sock
        self._buffer = b""

    def line(self) -> bytes:
        """The next line the client sent, without its \\n."""
        while b"\n" not in self._buffer:
            data = self.sock.recv(4096)
            assert data, f"the client closed the connection; unfinished: {self._buffer!r}"
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def expect_eof(self) -> None:
        """The client closes the connection without sending anything more."""
        assert self._buffer == b""
        assert self.sock.recv(4096) == b""

    def send(self, *lines: str | bytes) -> None:
        self.sock.sendall(
            b"".join((x.encode() if isinstance(x, str) else x) + b"\n" for x in lines)
        )

    def close(self) -> None:
        self.sock.close()

    def log_in(self, name: str = "alice") -> None:
        assert self.line() == f"LOGIN {PASSCODE} {name}".encode()
        self.send(":hello chatroom 1", f":ok {name}")


class FakeServer:
    """A listening socket; each accept() gives a Peer."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.peers: list[Peer] = []

    def accept(self) -> Peer:
        peer = Peer(self.listener.accept()[0])
        self.peers.append(peer)
        return peer

    def assert_nobody_connected(self) -> None:
        self.listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            self.listener.accept()

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.listener.close()


@pytest.fixture
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    yield fake
    fake.close()


StartClient = Callable[..., Client]


@pytest.fixture
def start_client(python: str, server: FakeServer) -> Iterator[StartClient]:
    """start_client(*extra, username=, passcode=, host=, port=, stdin=, stdout=) -> Client."""
    started: list[Client] = []

    def start(
        *extra: str,
        username: str = "alice",
        passcode: str = PASSCODE,
        host: str = "127.0.0.1",
        port: int | None = None,
        stdin: Stdio = subprocess.PIPE,
        stdout: Stdio = subprocess.PIPE,
    ) -> Client:
        args = ["-join", "-host", host, "-port", str(port or server.port)]
        args += ["-username", username, "-passcode", passcode, *extra]
        started.append(Client(python, args, stdin=stdin, stdout=stdout))
        return started[-1]

    yield start
    for process in started:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def connect(
    server: FakeServer, start_client: StartClient, **options: object
) -> tuple[Client, Peer]:
    """A client logged in as alice, its Connected line already checked."""
    extra = options.pop("extra", ())
    assert isinstance(extra, tuple)
    chat_client = start_client(*extra, **options)
    peer = server.accept()
    peer.log_in()
    host = options.get("host", "127.0.0.1")
    assert chat_client.stdout.next() == f"Connected to {host} on port {server.port}"
    return chat_client, peer


def leave_with_bye(chat_client: Client, peer: Peer, before_bye: tuple[str, ...] = ()) -> Result:
    """End the input; the client sends :Exit; the server answers and says :bye."""
    chat_client.end_input()
    assert peer.line() == b":Exit"
    peer.send(*before_bye, ":bye")
    peer.close()
    return chat_client.finish()


# --- logging in ----------------------------------------------------------------------


def test_login_is_sent_without_waiting_for_hello(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client = start_client()
    peer = server.accept()
    assert peer.line() == b"LOGIN abc12 alice"  # the server has said nothing yet
    peer.send(":hello chatroom 1", ":ok alice")
    assert chat_client.stdout.next() == f"Connected to 127.0.0.1 on port {server.port}"
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


def test_connected_line_shows_the_host_as_typed(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client, host="localhost")
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


def test_lines_before_ok_are_ignored_and_lines_with_ok_are_kept(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client = start_client()
    peer = server.accept()
    peer.line()
    peer.send(":hello chatroom 1", "stray display line", ":future thing", ":ok alice", "bob: hi")
    result = leave_with_bye(chat_client, peer)
    connected = f"Connected to 127.0.0.1 on port {server.port}"
    assert result == Result(0, [connected, "bob: hi"], [])


def test_wrong_passcode(server: FakeServer, start_client: StartClient) -> None:
    chat_client = start_client(passcode="zzz")
    peer = server.accept()
    assert peer.line() == b"LOGIN zzz alice"
    peer.send(":hello chatroom 1", ":error passcode Incorrect passcode")
    peer.close()
    assert chat_client.finish() == Result(1, ["Incorrect passcode"], [])


@pytest.mark.parametrize("passcode", ["", "abcdef", "ab!", "a b", "äb"])
def test_invalid_passcode_is_incorrect_without_being_sent(
    server: FakeServer, start_client: StartClient, passcode: str
) -> None:
    chat_client = start_client(passcode=passcode)
    peer = server.accept()
    assert chat_client.finish() == Result(1, ["Incorrect passcode"], [])
    peer.expect_eof()


@pytest.mark.parametrize(
    "error",
    [
        ":error name-taken The username alice is already in the room",
        ":error bad-username The username alice breaks the rules",
        ":error throttled Too many wrong passcodes; try again later",
        ":error full The server is full",
        ":error some-new-code Something new went wrong",
    ],
)
def test_refused_login_prints_the_text_on_stderr(
    server: FakeServer, start_client: StartClient, error: str
) -> None:
    chat_client = start_client()
    peer = server.accept()
    peer.line()
    peer.send(":hello chatroom 1", error)
    peer.close()
    text = error.split(" ", 2)[2]
    assert chat_client.finish() == Result(1, [], [text])


@pytest.mark.parametrize("hello", [":hello chatroom 2", ":hello ircd 1", ":hello"])
def test_another_protocol_in_hello_is_one_line_and_status_1(
    server: FakeServer, start_client: StartClient, hello: str
) -> None:
    chat_client = start_client()
    peer = server.accept()
    peer.line()
    peer.send(hello, ":ok alice")  # not read: the greeting already ended the login
    result = chat_client.finish()
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert f"greeted with '{hello}'" in result.stderr[0]
    assert "this client speaks 'chatroom 1'" in result.stderr[0]


def test_connection_closed_before_ok_hints_at_tls(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client = start_client()
    peer = server.accept()
    peer.line()
    peer.close()
    result = chat_client.finish()
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert result.stderr[0].startswith("client.py: ")
    assert "-tls" in result.stderr[0]


# --- in the room ----------------------------------------------------------------------


def test_display_lines_are_neutralised(server: FakeServer, start_client: StartClient) -> None:
    chat_client, peer = connect(server, start_client)
    peer.send(
        b"bob: \x1b[31mred\x1b[0m \x07bell \xc2\x9b csi",
        b"bob: not utf-8 \xff\xfe, del \x7f, nul \x00",
        b"carol: crlf line end\r",
        "dave: héllo 日本",
    )
    assert chat_client.stdout.next() == "bob: \ufffd[31mred\ufffd[0m \ufffdbell \ufffd csi"
    assert chat_client.stdout.next() == "bob: not utf-8 \ufffd\ufffd, del \ufffd, nul \ufffd"
    assert chat_client.stdout.next() == "carol: crlf line end"
    assert chat_client.stdout.next() == "dave: héllo 日本"
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


def test_end_of_input_sends_exit_and_prints_everything_before_bye(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client)
    chat_client.type("Hello Room", ":Users", "  spaced  ", "")
    chat_client.end_input()
    assert peer.line() == b"Hello Room"
    assert peer.line() == b":Users"
    assert peer.line() == b"  spaced  "
    assert peer.line() == b""
    assert peer.line() == b":Exit"
    # Only now, after :Exit, the replies: the client must still be there to print them.
    peer.send("Active Users: alice, bob", ":some-future-word 1 2", "bob: late", ":bye")
    peer.close()
    assert chat_client.finish() == Result(0, ["Active Users: alice, bob", "bob: late"], [])


def test_typed_exit_leaves_although_input_goes_on(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client)
    chat_client.type("hi", ":Exit", "never sent")  # stdin stays open
    assert peer.line() == b"hi"
    assert peer.line() == b":Exit"
    peer.send("carol: bye alice", ":bye")
    assert chat_client.finish() == Result(0, ["carol: bye alice"], [])
    peer.expect_eof()


def test_input_from_a_file(server: FakeServer, start_client: StartClient, tmp_path: Path) -> None:
    script = tmp_path / "script.txt"
    script.write_bytes(b"one\r\ntwo\n\\:Exit\nthree")  # CRLF, an escaped :Exit, no last \n
    with script.open("rb") as stdin:
        chat_client = start_client(stdin=stdin)
        peer = server.accept()
        peer.log_in()
        assert [peer.line() for _ in range(5)] == [b"one", b"two", b"\\:Exit", b"three", b":Exit"]
    peer.send(":bye")
    connected = f"Connected to 127.0.0.1 on port {server.port}"
    assert chat_client.finish() == Result(0, [connected], [])


def test_error_lines_go_to_stderr_and_the_chat_goes_on(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client)
    chat_client.type(":Msg zed hi")
    assert peer.line() == b":Msg zed hi"
    peer.send(":error no-such-user No user named zed is in the chatroom", "bob: still here")
    assert chat_client.stderr.next() == "No user named zed is in the chatroom"
    assert chat_client.stdout.next() == "bob: still here"
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


def test_over_long_line_is_dropped_with_a_note(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client)
    peer.send("bob: " + "x" * 100_000, "bob: after")
    assert chat_client.stdout.next() == "bob: after"
    note = chat_client.stderr.next()
    assert note is not None and note.startswith("client.py: dropped a line")
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


def test_server_closing_without_bye(server: FakeServer, start_client: StartClient) -> None:
    chat_client, peer = connect(server, start_client)
    peer.send("bob: last words")
    peer.close()  # stdin stays open: the client must notice on its own
    result = chat_client.finish()
    assert result == Result(1, ["bob: last words"], ["client.py: the server closed the connection"])


def test_error_before_close_is_the_only_line(server: FakeServer, start_client: StartClient) -> None:
    chat_client, peer = connect(server, start_client)
    peer.send(":error shutdown The server is shutting down")
    peer.close()
    assert chat_client.finish() == Result(1, [], ["The server is shutting down"])


def test_closed_stdout_is_no_traceback(server: FakeServer, start_client: StartClient) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # nobody reads stdout, as in `client.py ... | true`
    chat_client = start_client(stdout=writer)
    os.close(writer)
    peer = server.accept()
    peer.log_in()
    peer.send(*(f"bob: line {n}" for n in range(100)))
    chat_client.type("still typing")
    assert peer.line() == b"still typing"
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


# --- signals ------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_signal_sends_exit_and_ends_cleanly(
    server: FakeServer, start_client: StartClient, signum: int
) -> None:
    chat_client, peer = connect(server, start_client)
    chat_client.signal(signum)
    assert peer.line() == b":Exit"
    peer.send("bob: see you", ":bye")
    assert chat_client.finish() == Result(0, ["bob: see you"], [])


def test_second_ctrl_c_while_waiting_for_bye(server: FakeServer, start_client: StartClient) -> None:
    chat_client, peer = connect(server, start_client)
    chat_client.signal(signal.SIGINT)
    assert peer.line() == b":Exit"
    chat_client.signal(signal.SIGINT)  # the server never says :bye
    started = time.monotonic()
    assert chat_client.finish() == Result(0, [], [])
    assert time.monotonic() - started < 3 + 2  # LEAVE_TIMEOUT and some slack


def test_ctrl_c_during_login(server: FakeServer, start_client: StartClient) -> None:
    chat_client = start_client()
    peer = server.accept()
    assert peer.line() == b"LOGIN abc12 alice"  # no answer: the client waits
    chat_client.signal(signal.SIGINT)
    assert chat_client.finish() == Result(0, [], [])
    peer.expect_eof()


def stall_input(chat_client: Client, data: bytes) -> int:
    """Write `data` to the client's stdin until it stops reading for 2 s
    (or takes it all); how much it took."""
    assert chat_client.proc.stdin is not None
    fd = chat_client.proc.stdin.fileno()
    os.set_blocking(fd, False)
    taken = 0
    while taken < len(data) and select.select([], [fd], [], 2.0)[1]:
        try:
            taken += os.write(fd, data[taken : taken + 65536])
        except BlockingIOError:
            pass
    os.set_blocking(fd, True)
    return taken


# 24 MiB of input: far more than the client holds (1 MiB) plus what the
# kernel buffers between it and the fake server (a few MiB at most).
FLOOD = (b"x" * 1023 + b"\n") * (24 * 1024)


def test_piped_input_waits_for_a_server_that_does_not_read(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client)
    taken = stall_input(chat_client, FLOOD)
    assert taken < len(FLOOD), "the client read all its input into memory"
    assert chat_client.proc.stdin is not None
    stdin = chat_client.proc.stdin

    def write_the_rest() -> None:
        os.write(stdin.fileno(), FLOOD[taken:])  # blocking: the client reads on
        stdin.close()

    writer = threading.Thread(target=write_the_rest, daemon=True)
    writer.start()
    for _ in range(FLOOD.count(b"\n")):  # everything arrives, in order
        assert peer.line() == b"x" * 1023
    assert peer.line() == b":Exit"
    writer.join(TIMEOUT)
    peer.send(":bye")
    assert chat_client.finish() == Result(0, [], [])


def test_a_signal_ends_a_client_held_by_a_server_that_does_not_read(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client)
    assert stall_input(chat_client, FLOOD) < len(FLOOD)
    started = time.monotonic()
    chat_client.signal(signal.SIGTERM)  # :Exit is queued behind the rest; no :bye comes
    assert chat_client.finish() == Result(0, [], [])
    assert time.monotonic() - started < 3 + 2  # LEAVE_TIMEOUT and some slack


# --- errors a person can cause ------------------------------------------------------------


def test_cannot_connect(server: FakeServer, start_client: StartClient) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    result = start_client(port=port).finish()
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert result.stderr[0].startswith(f"client.py: cannot connect to 127.0.0.1 port {port}: ")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"username": "toolongname"}, "-username"),
        ({"username": "a b"}, "-username"),
        ({"username": "a:b"}, "-username"),
        ({"username": "a\tb"}, "-username"),
        ({"username": ""}, "-username"),
        ({"port": 70000}, "-port"),
    ],
)
def test_bad_arguments_exit_2_without_connecting(
    server: FakeServer, start_client: StartClient, options: dict[str, str | int], message: str
) -> None:
    result = start_client(**options).finish()
    assert (result.status, result.stdout, len(result.stderr)) == (2, [], 1)
    assert result.stderr[0].startswith("client.py: error: ")
    assert message in result.stderr[0]
    server.assert_nobody_connected()


def test_missing_join_exits_2(python: str) -> None:
    args = ["-host", "127.0.0.1", "-port", "1", "-username", "al", "-passcode", "p"]
    result = Client(python, args, stdin=subprocess.DEVNULL).finish()
    assert result == Result(
        2, [], ["client.py: error: the following arguments are required: -join"]
    )


# --- TLS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a certificate it signed for localhost and 127.0.0.1, and another CA."""
    trustme = pytest.importorskip("trustme")
    folder = tmp_path_factory.mktemp("tls")
    trustme.CA().cert_pem.write_to_path(str(folder / "other-ca.pem"))
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.private_key_and_cert_chain_pem.write_to_path(str(folder / "server.pem"))
    return folder


def tls_peer(server: FakeServer, tls_files: Path) -> Peer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(tls_files / "server.pem"))
    conn = server.listener.accept()[0]
    conn.settimeout(TIMEOUT)
    peer = Peer(context.wrap_socket(conn, server_side=True))
    server.peers.append(peer)
    return peer


def test_tls_with_a_trusted_ca(
    server: FakeServer, start_client: StartClient, tls_files: Path
) -> None:
    chat_client = start_client("-tls-ca", str(tls_files / "ca.pem"), host="localhost")
    peer = tls_peer(server, tls_files)
    peer.log_in()
    peer.send("bob: over TLS")
    assert chat_client.stdout.next() == f"Connected to localhost on port {server.port}"
    assert chat_client.stdout.next() == "bob: over TLS"
    chat_client.type("hello secure room")
    assert peer.line() == b"hello secure room"
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


@pytest.mark.parametrize("trusted", [None, "other-ca.pem"])
def test_tls_certificate_that_does_not_verify(
    server: FakeServer, start_client: StartClient, tls_files: Path, trusted: str | None
) -> None:
    chat_client = start_client(*(["-tls-ca", str(tls_files / trusted)] if trusted else ["-tls"]))
    with pytest.raises(ssl.SSLError):
        tls_peer(server, tls_files)  # the client rejects the certificate
    result = chat_client.finish()
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert result.stderr[0].startswith("client.py: TLS certificate of 127.0.0.1 did not verify: ")


def test_tls_certificate_for_another_host(
    server: FakeServer, start_client: StartClient, tmp_path: Path
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    ca.issue_cert("elsewhere.example").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    chat_client = start_client("-tls-ca", str(tmp_path / "ca.pem"))
    with pytest.raises(ssl.SSLError):
        tls_peer(server, tmp_path)
    result = chat_client.finish()
    assert result.status == 1
    assert result.stderr[0].startswith("client.py: TLS certificate of 127.0.0.1 did not verify: ")
    assert "127.0.0.1" in result.stderr[0].split("verify: ")[1]


def test_tls_client_meets_a_plaintext_server(server: FakeServer, start_client: StartClient) -> None:
    chat_client = start_client("-tls")
    peer = server.accept()
    peer.send(":hello chatroom 1")  # a plaintext server greets at once
    result = chat_client.finish()
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert "TLS handshake" in result.stderr[0] and "is the server using TLS?" in result.stderr[0]


@pytest.mark.slow
def test_tls_client_meets_a_silent_plaintext_server(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client = start_client("-tls")
    server.accept()  # says nothing, reads nothing: the handshake must time out
    result = chat_client.finish(timeout=TIMEOUT + 10)
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert "TLS handshake" in result.stderr[0]


def test_plaintext_client_meets_a_tls_server(
    server: FakeServer, start_client: StartClient, tls_files: Path
) -> None:
    chat_client = start_client()
    with pytest.raises(ssl.SSLError):
        tls_peer(server, tls_files)  # the LOGIN line is no TLS handshake
    result = chat_client.finish()
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert "-tls" in result.stderr[0]


def test_unusable_ca_file_is_a_bad_argument(
    server: FakeServer, start_client: StartClient, tmp_path: Path
) -> None:
    result = start_client("-tls-ca", str(tmp_path / "missing.pem")).finish()
    assert (result.status, result.stdout, len(result.stderr)) == (2, [], 1)
    assert result.stderr[0].startswith("client.py: error: argument -tls-ca: ")
    server.assert_nobody_connected()


# --- history (a server with -history) -------------------------------------------------


def test_replay_is_shown_with_its_time_then_who_is_here(
    server: FakeServer, start_client: StartClient
) -> None:
    today = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    chat_client = start_client()
    peer = server.accept()
    peer.log_in()
    peer.send(
        ":past 17 2025-03-04T05:06:07Z alice: Hello Room",
        f":past 18 {today} bob joined the chatroom",
        b":past 19 2025-03-04T05:06:09Z bob: \x1b[31mred",
        ":past broken",
        ":here alice bob",
        "bob: live",
    )
    result = leave_with_bye(chat_client, peer)
    assert result == Result(0, [
        f"Connected to 127.0.0.1 on port {server.port}",
        "[2025-03-04 05:06] alice: Hello Room",
        f"[{today[11:16]}] bob joined the chatroom",
        "[2025-03-04 05:06] bob: \ufffd[31mred",
        "Active Users: alice, bob",
        "bob: live",
    ], [])


def test_no_colour_on_a_pipe_even_without_no_color(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client)
    peer.send("bob: hi", "[Message from bob]: psst")
    result = leave_with_bye(chat_client, peer)
    assert result == Result(0, ["bob: hi", "[Message from bob]: psst"], [])


# --- -reconnect ---------------------------------------------------------------------------


def trying_again(line: str | None, why: str = "the server closed the connection") -> None:
    """`line` is the note of a connection lost or refused: why, and the pause."""
    assert line is not None
    assert re.fullmatch(rf"client\.py: {re.escape(why)}; trying again in [0-9.]+ s", line), line


def connected_again(server: FakeServer) -> str:
    return f"client.py: connected again to 127.0.0.1 port {server.port}"


def test_reconnect_logs_in_again_and_shows_only_what_was_missed(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client = start_client("-reconnect")
    peer = server.accept()
    peer.log_in()
    peer.send(":past 1 2025-03-04T05:06:07Z bob: before", ":here bob alice", "bob: live")
    assert chat_client.stdout.rest_until("bob: live") == [
        f"Connected to 127.0.0.1 on port {server.port}",
        "[2025-03-04 05:06] bob: before",
        "Active Users: bob, alice",
        "bob: live",
    ]
    chat_client.type("sent")
    assert peer.line() == b"sent"
    peer.close()
    trying_again(chat_client.stderr.next())
    chat_client.type("typed while away", ":Users")  # held until the new login
    peer = server.accept()
    peer.log_in()
    peer.send(
        ":past 1 2025-03-04T05:06:07Z bob: before",
        ":past 2 2025-03-04T05:06:08Z bob: live",  # shown live
        ":past 3 2025-03-04T05:06:09Z alice: sent",  # typed here
        ":past 4 2025-03-04T05:06:10Z bob: lost in flight",
        ":past 5 2025-03-04T05:06:11Z alice left the chatroom",
        ":past 6 2025-03-04T05:06:12Z alice joined the chatroom",
        ":here bob alice",
    )
    assert chat_client.stderr.next() == connected_again(server)
    assert peer.line() == b"typed while away"
    assert peer.line() == b":Users"
    peer.send("Active Users: bob, alice")
    assert leave_with_bye(chat_client, peer, ("bob: after",)) == Result(0, [
        "[2025-03-04 05:06] bob: lost in flight",
        "[2025-03-04 05:06] alice left the chatroom",
        "[2025-03-04 05:06] alice joined the chatroom",
        "Active Users: bob, alice",
        "Active Users: bob, alice",
        "bob: after",
    ], [])


def test_reconnect_tries_again_after_a_busy_server(
    server: FakeServer, start_client: StartClient
) -> None:
    chat_client, peer = connect(server, start_client, extra=("-reconnect",))
    peer.close()
    trying_again(chat_client.stderr.next())
    peer = server.accept()
    peer.line()
    peer.close()  # no answer at all
    trying_again(
        chat_client.stderr.next(),
        f"127.0.0.1 port {server.port} closed the connection before the login was accepted"
        " (does the server require -tls?)",
    )
    peer = server.accept()
    peer.line()
    peer.send(":hello chatroom 1", ":error full The server is full")
    peer.close()
    trying_again(chat_client.stderr.next(), "refused: The server is full")
    peer = server.accept()
    peer.log_in()
    assert chat_client.stderr.next() == connected_again(server)
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


@pytest.mark.parametrize(
    ("answer", "result"),
    [
        (":error bad-username Usernames are 1 to 8 characters",
         Result(1, [], ["Usernames are 1 to 8 characters"])),
        (":error passcode Incorrect passcode", Result(1, ["Incorrect passcode"], [])),
        (":error bad-login Say LOGIN first", Result(1, [], ["Say LOGIN first"])),
    ],
)
def test_reconnect_ends_on_a_refusal(
    server: FakeServer, start_client: StartClient, answer: str, result: Result
) -> None:
    chat_client, peer = connect(server, start_client, extra=("-reconnect",))
    peer.close()
    trying_again(chat_client.stderr.next())
    peer = server.accept()
    peer.line()
    peer.send(":hello chatroom 1", answer)
    peer.close()
    assert chat_client.finish() == result


@pytest.mark.parametrize(
    "refusal",
    [
        "throttled Too many connections from your address",
        # The server has not yet dropped this client's vanished connection.
        "name-taken The username alice is already in the room",
    ],
)
def test_reconnect_tries_again_after_a_refusal_that_time_mends(
    server: FakeServer, start_client: StartClient, refusal: str
) -> None:
    chat_client, peer = connect(server, start_client, extra=("-reconnect",))
    peer.close()
    trying_again(chat_client.stderr.next())
    peer = server.accept()
    peer.line()
    peer.send(":hello chatroom 1", ":error " + refusal)
    peer.close()
    trying_again(chat_client.stderr.next(), "refused: " + refusal.split(" ", 1)[1])
    peer = server.accept()
    peer.log_in()
    assert chat_client.stderr.next() == connected_again(server)
    assert leave_with_bye(chat_client, peer) == Result(0, [], [])


def test_reconnect_ends_on_another_protocol(server: FakeServer, start_client: StartClient) -> None:
    chat_client, peer = connect(server, start_client, extra=("-reconnect",))
    peer.send(":error shutdown The server is shutting down")
    peer.close()
    assert chat_client.stderr.next() == "The server is shutting down"
    trying_again(chat_client.stderr.next())
    peer = server.accept()
    peer.line()
    peer.send(":hello chatroom 2")
    result = chat_client.finish()
    assert (result.status, result.stdout, len(result.stderr)) == (1, [], 1)
    assert "greeted with ':hello chatroom 2'" in result.stderr[0]


def test_ctrl_c_while_waiting_to_reconnect(server: FakeServer, start_client: StartClient) -> None:
    chat_client, peer = connect(server, start_client, extra=("-reconnect",))
    peer.close()
    trying_again(chat_client.stderr.next())
    chat_client.signal(signal.SIGINT)
    started = time.monotonic()
    assert chat_client.finish() == Result(0, [], [])
    assert time.monotonic() - started < 2


def test_reconnect_not_after_exit(server: FakeServer, start_client: StartClient) -> None:
    chat_client, peer = connect(server, start_client, extra=("-reconnect",))
    chat_client.end_input()
    assert peer.line() == b":Exit"
    peer.close()  # without :bye
    result = chat_client.finish()
    assert result == Result(1, [], ["client.py: the server closed the connection"])
    server.assert_nobody_connected()
