"""server.py and client.py each run alone: copied into an empty folder of its
own, run by a bare interpreter in isolated mode (`python -I`: nothing
installed, not even the script's own folder on sys.path), on every Python
3.10 or newer found on this machine.

Where to look: pyenv's versions (`~/.pyenv/versions/*/bin/python3.X`, or
under $PYENV_ROOT / `pyenv root`), `python3` and `python3.10` ... `python3.14`
on PATH, and /usr/bin/python3 and /usr/local/bin/python3. Each interpreter is
a test case of its own; a minor version from 3.10 to 3.14 with no interpreter
here is reported as skipped, so the summary shows what was not tried.

The `python` fixture below replaces conftest.py's (the interpreter running the
tests and 3.10) for this file; conftest.py's `room` fixture sees the
`standalone` mark and builds the empty folders.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from harness import Room, expect_one_error_line, time_line_re

pytestmark = [pytest.mark.e2e, pytest.mark.standalone]

MINORS = range(10, 15)  # 3.10 ... 3.14: the versions a user may have today
PROBE = "import os, sys; print(*sys.version_info[:3], os.path.realpath(sys.executable))"


def _pyenv_roots() -> list[str]:
    roots = [os.environ.get("PYENV_ROOT", ""), os.path.expanduser("~/.pyenv")]
    if shutil.which("pyenv"):
        try:
            roots.append(subprocess.run(["pyenv", "root"], capture_output=True, text=True,
                                        timeout=20, stdin=subprocess.DEVNULL).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    return [r for r in dict.fromkeys(roots) if r]


def _candidates() -> list[str]:
    found: list[str] = []
    for root in _pyenv_roots():
        for exe in sorted(glob.glob(os.path.join(root, "versions", "*", "bin", "python3.*"))):
            if re.fullmatch(r"python3\.\d+", os.path.basename(exe)):
                found.append(exe)
    for name in ["python3", *(f"python3.{minor}" for minor in MINORS)]:
        on_path = shutil.which(name)
        if on_path:
            found.append(on_path)
    found += ["/usr/bin/python3", "/usr/local/bin/python3"]
    return [exe for exe in dict.fromkeys(found) if os.access(exe, os.X_OK)]


def interpreters() -> list[Any]:
    """One pytest.param per distinct interpreter >= 3.10 (by its real path),
    and a skipped one for each minor version in MINORS that is not here."""
    by_path: dict[str, tuple[int, int, int]] = {}
    for exe in _candidates():
        try:
            out = subprocess.run([exe, "-c", PROBE], capture_output=True, text=True, timeout=20,
                                 stdin=subprocess.DEVNULL).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue  # e.g. a pyenv shim for a version that is not selected
        if len(out) == 4 and all(x.isdigit() for x in out[:3]):
            version = (int(out[0]), int(out[1]), int(out[2]))
            if version >= (3, 10):
                by_path.setdefault(out[3], version)
    params: list[Any] = []
    seen_ids: set[str] = set()
    for path, version in sorted(by_path.items(), key=lambda item: (item[1], item[0])):
        ident = "py{}.{}.{}".format(*version)
        if ident in seen_ids:  # two builds of one version (e.g. pyenv's and Debian's)
            ident += "-" + path.strip("/").replace("/", "-")
        seen_ids.add(ident)
        params.append(pytest.param(path, id=ident))
    have = {version[:2] for version in by_path.values()}
    for minor in MINORS:
        if (3, minor) not in have:
            params.append(pytest.param(
                None, id=f"py3.{minor}",
                marks=pytest.mark.skip(reason=f"no Python 3.{minor} here")))
    return params


@pytest.fixture(params=interpreters())
def python(request: pytest.FixtureRequest) -> str:
    """Every Python >= 3.10 here, in turn (overrides conftest.py's)."""
    exe: str = request.param
    return exe


def test_conversation(room: Room) -> None:
    """Two people join, talk, list the users, whisper, ask the time and leave:
    every line checked to the byte, on every side."""
    server = room.start_server()
    alice = room.join("alice")
    bob = room.join("bob")
    room.say(alice, "hello there")
    room.say(bob, ":)", "[feeling happy]")
    alice.send(":Users")
    server.expect("alice: searched up active users")
    alice.expect("Active Users: alice, bob")
    alice.send(":Msg bob psst")
    server.expect("alice: send message to bob")
    bob.expect("[Message from alice]: psst")
    alice.send(":mytime")
    line = server.expect_match(time_line_re("alice")).group(0)
    alice.expect(line)
    bob.expect(line)
    room.assert_quiet(alice)
    room.leave(alice)
    room.leave(bob)


def test_end_of_input_from_a_file(room: Room, tmp_path: Path) -> None:
    room.start_server()
    script = tmp_path / "script.txt"
    script.write_text("hi\n:Users\n")
    with script.open("rb") as stdin:
        alice = room.spawn_client(*room.client_args("alice"), name="alice", stdin=stdin)
    alice.expect(f"Connected to 127.0.0.1 on port {room.port}")
    room.announced_join(alice)
    assert room.server is not None
    room.server.expect("alice: hi")
    room.server.expect("alice: searched up active users")
    alice.expect("Active Users: alice")
    room.announced_leave(alice)
    assert alice.finish() == (0, [], [])


def test_stopping_the_server(room: Room) -> None:
    server = room.start_server()
    alice = room.join("alice")
    server.signal(signal.SIGINT)
    assert server.wait() == 0, server.describe()
    server.assert_no_traceback()
    expect_one_error_line(alice, status=1)


def test_errors(room: Room) -> None:
    expect_one_error_line(room.spawn_server("-start", "-port", "0"), status=2)
    expect_one_error_line(room.spawn_client("-join"), status=2)
    room.start_server()
    client = room.spawn_client(*room.client_args("alice", passcode="wrong"), name="alice")
    status, rest, _ = client.finish()
    assert (status, rest) == (1, ["Incorrect passcode"]), client.describe()
