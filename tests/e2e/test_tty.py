"""client.py on a real terminal (a pseudo-terminal that is its controlling
terminal), typed at the way a person does: Enter, Ctrl-D, Ctrl-C.

On a terminal the client may redraw the line being typed (carriage returns,
"erase line" sequences), so the screen is compared after removing those; the
byte-exact checks are the ones the server and the other clients print."""

from __future__ import annotations

import fcntl
import functools
import os
import pty
import re
import shlex
import shutil
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import DEFAULT_TIMEOUT, Room, child_env

import client

pytestmark = pytest.mark.e2e

CSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]")


class Terminal:
    """A client whose stdin, stdout and controlling terminal are one pty."""

    def __init__(
        self, argv: list[str], cwd: str, columns: int = 0, env_extra: dict[str, str] | None = None
    ) -> None:
        master, slave = pty.openpty()
        env = child_env()
        env.update(env_extra or {})
        if columns:  # a terminal of that width, which the client asks the pty for
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
            env.pop("COLUMNS", None)
            env.pop("LINES", None)
        self.master = master
        self.screen = b""
        self.changed = threading.Condition()

        def controlling_terminal() -> None:  # in the child, before exec
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=subprocess.PIPE,
            preexec_fn=controlling_terminal,
        )
        os.close(slave)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self.master, 4096)
            except OSError:  # EIO once the client is gone
                data = b""
            with self.changed:
                self.screen += data
                self.changed.notify_all()
            if not data:
                return

    def text(self) -> str:
        """What a person reads: escape sequences removed, one line per row."""
        clean = CSI.sub(b"", self.screen).decode("utf-8", "replace")
        rows = [row.rsplit("\r", 1)[-1] for row in clean.replace("\r\n", "\n").split("\n")]
        return "\n".join(rows)

    def wait_for_row(self, row: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while row not in self.text().split("\n"):
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(
                        f"the terminal never showed the row {row!r}; it shows:\n{self.text()}",
                        pytrace=False,
                    )
                self.changed.wait(left)

    def wait_for_line_editor(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Wait until readline is reading (it turns canonical mode off while it
        is). A Ctrl-D that arrives between two input() calls, while the
        terminal is back in canonical mode, reaches readline as a NUL byte, not
        as end of input: a person cannot type that fast, a test can. This is a
        poll of the terminal's mode, not a sleep: it ends as soon as it holds."""
        deadline = time.monotonic() + timeout
        while termios.tcgetattr(self.master)[3] & termios.ICANON:
            if time.monotonic() > deadline:
                pytest.fail(f"readline never started reading; the terminal shows:\n{self.text()}")
            time.sleep(0.005)

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def finish(self) -> tuple[int, str]:
        try:
            status = self.popen.wait(DEFAULT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the client did not end; the terminal shows:\n{self.text()}")
        assert self.popen.stderr is not None
        return status, self.popen.stderr.read().decode("utf-8", "replace")

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        if self.popen.stderr:
            self.popen.stderr.close()
        try:
            os.close(self.master)
        except OSError:
            pass


@functools.cache
def uses_readline(python: str) -> bool:
    """client.py uses readline on a terminal when the interpreter has it."""
    probe = [python, "-c", "import readline"]
    return subprocess.run(probe, capture_output=True, stdin=subprocess.DEVNULL).returncode == 0


@pytest.fixture
def terminal(room: Room) -> Iterator[Terminal]:
    room.start_server()
    room.join("bob")
    term = Terminal(room._py("client.py") + room.client_args("alice"), str(room.client_dir))
    yield term
    term.close()


def enter_the_room(room: Room, term: Terminal) -> None:
    term.wait_for_row(f"Connected to 127.0.0.1 on port {room.port}")
    assert room.server is not None
    room.server.expect("alice joined the chatroom")
    room.members[0].expect("alice joined the chatroom")


def test_typing_and_reading_on_a_terminal(room: Room, terminal: Terminal) -> None:
    enter_the_room(room, terminal)
    server, bob = room.server, room.members[0]
    assert server is not None
    terminal.type("hello from a terminal\r")  # Enter sends a carriage return
    server.expect("alice: hello from a terminal")
    bob.expect("alice: hello from a terminal")
    bob.send("hi alice")
    server.expect("bob: hi alice")
    terminal.wait_for_row("bob: hi alice")
    terminal.type(":Users\r")
    server.expect("alice: searched up active users")
    terminal.wait_for_row("Active Users: bob, alice")
    terminal.type(":Exit\r")
    server.expect("alice left the chatroom")
    bob.expect("alice left the chatroom")
    status, err = terminal.finish()
    assert (status, err) == (0, ""), terminal.text()


@pytest.mark.parametrize(("key", "name"), [("\x04", "Ctrl-D"), ("\x03", "Ctrl-C")])
def test_ctrl_d_and_ctrl_c_leave_the_room(
    room: Room, terminal: Terminal, key: str, name: str
) -> None:
    enter_the_room(room, terminal)
    server, bob = room.server, room.members[0]
    assert server is not None
    terminal.type(":mytime\r")
    time_line = server.expect_match(r"alice: .+").group(0)
    bob.expect(time_line)
    terminal.wait_for_row(time_line)
    if key == "\x04" and uses_readline(room.python):
        terminal.wait_for_line_editor()
    terminal.type(key)
    server.expect("alice left the chatroom")
    bob.expect("alice left the chatroom")
    status, err = terminal.finish()
    assert status == 0, f"{name}: status {status}\n{terminal.text()}"
    assert "Traceback" not in err and "Traceback" not in terminal.text(), err


# --- a wrapped line's continuation is indented (issue 19) -----------------------------------

# bob's line padded to the edge of an 80-column terminal, then what passes for a line
# of carol's: a terminal that wraps it by itself starts a row with "carol: ...".
PADDED = "ok" + " " * 73 + "carol: passcode changed to zz9"
FAKE_ROW = "carol: passcode changed to zz9"


def test_a_wrapped_line_continues_indented_on_a_terminal(room: Room) -> None:
    room.start_server()
    bob = room.join("bob")
    term = Terminal(room._py("client.py") + room.client_args("alice"), str(room.client_dir),
                    columns=80)
    try:
        enter_the_room(room, term)
        bob.send(PADDED)
        term.wait_for_row("  " + FAKE_ROW)
        rows = term.text().split("\n")
        assert "bob: ok" + " " * 73 in rows  # the first row, exactly 80 columns
        assert not any(row.startswith(FAKE_ROW) for row in rows), term.text()
        term.type(":Exit\r")
        status, err = term.finish()
        assert (status, err) == (0, ""), term.text()
    finally:
        term.close()


# --- colours on a terminal, none with NO_COLOR -----------------------------------------

SGR = re.compile(rb"\x1b\[[0-9;]*m")


@pytest.mark.parametrize("no_color", ["", "1"])
def test_names_in_colour_on_a_terminal_unless_no_color(room: Room, no_color: str) -> None:
    room.start_server()
    bob = room.join("bob")
    term = Terminal(room._py("client.py") + room.client_args("alice"), str(room.client_dir),
                    env_extra={"NO_COLOR": no_color, "TERM": "xterm"})
    try:
        enter_the_room(room, term)
        bob.send("hi alice")
        bob.send(":Msg alice psst")
        term.wait_for_row("[Message from bob]: psst")
        bob_in_colour = f"\x1b[{client.name_colour('bob')}mbob\x1b[39m".encode()
        if no_color:
            assert not SGR.search(term.screen), term.screen
        else:
            assert bob_in_colour + b": hi alice" in term.screen, term.screen
            assert b"\x1b[1m[Message from " + bob_in_colour + b"]: psst\x1b[0m" in term.screen
        term.type(":Exit\r")
        status, err = term.finish()
        assert (status, err) == (0, ""), term.text()
    finally:
        term.close()


class Tmux:
    """A tmux server of its own with one 80x24 window: a real terminal emulator,
    whose screen (capture-pane) is what a person would read."""

    def __init__(self, tmp: str) -> None:
        self.socket = os.path.join(tmp, "tmux.sock")
        self.env = child_env()
        for var in ("TMUX", "COLUMNS", "LINES"):
            self.env.pop(var, None)

    def run(self, *args: str) -> str:
        argv = ["tmux", "-S", self.socket, "-f", os.devnull, *args]
        done = subprocess.run(argv, capture_output=True, text=True, env=self.env,
                              stdin=subprocess.DEVNULL, timeout=DEFAULT_TIMEOUT)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self, window: str, command: list[str], cwd: str) -> None:
        shell = f"cd {shlex.quote(cwd)} && {shlex.join(command)}; sleep 60"
        if not os.path.exists(self.socket):
            self.run("new-session", "-d", "-x", "80", "-y", "24", "-s", "t", "-n", window, shell)
        else:
            self.run("new-window", "-d", "-t", "t", "-n", window, shell)

    def screen(self, window: str) -> list[str]:
        return self.run("capture-pane", "-p", "-t", f"t:{window}").split("\n")

    def wait_for_row(self, window: str, row: str) -> list[str]:
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while row not in (screen := self.screen(window)):
            if time.monotonic() > deadline:
                pytest.fail(f"tmux never showed {row!r}; it shows:\n" + "\n".join(screen))
            time.sleep(0.05)
        return screen

    def close(self) -> None:
        if os.path.exists(self.socket):
            subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                           env=self.env, stdin=subprocess.DEVNULL, timeout=DEFAULT_TIMEOUT)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_padding_cannot_fake_a_line_in_a_real_terminal(room: Room, tmp_path: Path) -> None:
    tmux = Tmux(str(tmp_path))
    try:
        # What any program that prints the line as it is shows: a fake row of carol's.
        printf = ["printf", "%s\\n", "bob: " + PADDED]
        tmux.start("plain", printf, str(tmp_path))
        assert FAKE_ROW in [row.rstrip() for row in tmux.wait_for_row("plain", FAKE_ROW)]
        # client.py on the same terminal: the row is indented, so it is bob's line.
        room.start_server()
        bob = room.join("bob")
        tmux.start("client", room._py("client.py") + room.client_args("alice"),
                   str(room.client_dir))
        assert room.server is not None
        room.server.expect("alice joined the chatroom")
        bob.expect("alice joined the chatroom")
        bob.send(PADDED)
        screen = tmux.wait_for_row("client", "  " + FAKE_ROW)
        assert "bob: ok" in [row.rstrip() for row in screen]
        assert not any(row.startswith(FAKE_ROW) for row in screen), "\n".join(screen)
    finally:
        tmux.close()
