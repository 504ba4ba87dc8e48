"""Fixtures shared by every test: the interpreters, and rooms to chat in."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import PROGRAM_DIR, Room


def _version_of(exe: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run(
            [exe, "-c", "import sys; print(*sys.version_info[:3])"],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return tuple(int(x) for x in out) if len(out) == 3 else None


def find_python310() -> str | None:
    """The newest Python 3.10 here: pyenv's versions first, then python3.10 on PATH."""
    candidates = []
    roots = [os.environ.get("PYENV_ROOT", "")]
    if shutil.which("pyenv"):
        try:
            roots.append(
                subprocess.run(
                    ["pyenv", "root"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    stdin=subprocess.DEVNULL,
                ).stdout.strip()
            )
        except (OSError, subprocess.SubprocessError):
            pass
    roots.append(os.path.expanduser("~/.pyenv"))
    for root in filter(None, dict.fromkeys(roots)):
        candidates += glob.glob(os.path.join(root, "versions", "3.10*", "bin", "python3"))
    on_path = shutil.which("python3.10")
    if on_path:
        candidates.append(on_path)
    best: tuple[tuple[int, ...], str] | None = None
    for exe in dict.fromkeys(candidates):
        version = _version_of(exe)
        if version and version[:2] == (3, 10) and (best is None or version > best[0]):
            best = (version, exe)
    return best[1] if best else None


PY310 = find_python310()
CURRENT_ID = "py{}.{}".format(*sys.version_info[:2])


def base_python(exe: str) -> str:
    """The interpreter without this virtualenv (nothing of the project installed)."""
    if exe == sys.executable and sys.prefix != sys.base_prefix:
        return getattr(sys, "_base_executable", exe)
    return exe


@pytest.fixture(params=["current", "3.10"], ids=[CURRENT_ID, "py3.10"])
def python(request: pytest.FixtureRequest) -> str:
    """The interpreter that runs server.py and client.py: the one running the tests,
    and the newest Python 3.10 (Ubuntu 22.04's version, the oldest supported)."""
    if request.param == "current":
        return sys.executable
    if PY310 is None:
        pytest.skip("no Python 3.10 here")
    return PY310


@pytest.fixture
def room(python: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Room]:
    """A Room run from the repository root, or, for tests marked `standalone`, from
    two empty folders holding one copy each of server.py and client.py, run by the
    bare interpreter in isolated mode (-I: no site-packages of the user, no
    PYTHON* variables, not even the script's own folder on sys.path)."""
    if request.node.get_closest_marker("standalone"):
        server_dir, client_dir = tmp_path / "server-alone", tmp_path / "client-alone"
        for folder, program in ((server_dir, "server.py"), (client_dir, "client.py")):
            folder.mkdir()
            if (PROGRAM_DIR / program).is_file():  # else Room says it is missing
                shutil.copy(PROGRAM_DIR / program, folder / program)
        the_room = Room(base_python(python), server_dir, client_dir, extra_python_args=["-I"])
    else:
        the_room = Room(python, PROGRAM_DIR, PROGRAM_DIR)
    yield the_room
    tracebacks = the_room.close()
    if tracebacks:
        pytest.fail("a process printed a traceback:\n" + "\n".join(tracebacks), pytrace=False)


@pytest.fixture
def chat(room: Room) -> Room:
    """A running server with alice, bob and carol in the room, all output consumed."""
    room.start_server()
    for name in ("alice", "bob", "carol"):
        room.join(name)
    return room
