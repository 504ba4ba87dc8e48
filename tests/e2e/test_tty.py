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
import subprocess
import termios
import threading
import time
from collections.abc import Iterator

import pytest
from harness import DEFAULT_TIMEOUT, Room, child_env

pytestmark = pytest.mark.e2e

CSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][A-Z0-9]|\x1b[=>]")


class Terminal:
    """A client whose stdin, stdout and controlling terminal are one pty."""

    def __init__(self, argv: list[str], cwd: str) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.screen = b""
        self.changed = threading.Condition()

        def controlling_terminal() -> None:  # in the child, before exec
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=child_env(),
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
