"""The installed package: a wheel built from this tree holds the two programs
inside the `chatroom` package (never as top-level modules named `server` and
`client`), and installing it gives the commands chatroom-server and
chatroom-client, which behave as the two files do.

Everything here works offline: the wheel is built with the setuptools of the
environment running the tests (`--no-build-isolation --no-index`), and
installed without its dependencies (it has none) into a new, empty venv."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PASSCODE = "abc12"
TIMEOUT = 30

# What the build needs from the tree; the rest (tests, bench, caches, the venv) stays out.
SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                              "__pycache__", ".*_cache", ".hypothesis", "tests", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the tree (so the build leaves nothing in it)."""
    pytest.importorskip("setuptools", minversion="77",
                        reason="building offline needs setuptools >= 77 here "
                               "(pip install -e '.[test]' brings it)")
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=SKIP)
    built = base / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "-w", str(built), str(source)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [found] = built.glob("chatroom-*.whl")
    return found


def test_the_wheel_holds_the_package_not_top_level_server_and_client(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert "server.py" not in top_level and "client.py" not in top_level, names
    assert {"chatroom/server.py", "chatroom/client.py", "chatroom_ext/__init__.py",
            "chatroom_ext/cluster.py", "chatroom_ext/fastloop.py"} <= set(names), names
    # The installed modules are the two root files, byte for byte.
    with zipfile.ZipFile(wheel) as z:
        for program in ("server.py", "client.py"):
            assert z.read(f"chatroom/{program}") == (ROOT / program).read_bytes(), program
        [info] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(info).decode()
        [metadata] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "chatroom-server = chatroom.server:main" in entry_points, entry_points
    assert "chatroom-client = chatroom.client:main" in entry_points, entry_points
    assert "License-Expression: MIT" in meta
    assert "Description-Content-Type: text/markdown" in meta


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv (no pip of its own) with the wheel installed: its bin folder."""
    env = tmp_path_factory.mktemp("venv") / "env"
    venv.create(env, with_pip=False)
    bindir = env / ("Scripts" if sys.platform == "win32" else "bin")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install",
         "--no-deps", "--no-index", "--disable-pip-version-check", str(wheel)],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return bindir


def test_the_commands_hold_a_conversation(installed: Path, tmp_path: Path) -> None:
    server = subprocess.Popen(
        [str(installed / "chatroom-server"), "-start", "-port", "0", "-passcode", PASSCODE],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=tmp_path)
    try:
        assert server.stdout is not None and server.stderr is not None
        first = server.stdout.readline()
        assert first.startswith("Server started on port "), first + server.stderr.read()
        port = first.split()[4].rstrip(".")
        client = subprocess.run(
            [str(installed / "chatroom-client"), "-join", "-host", "127.0.0.1", "-port", port,
             "-username", "alice", "-passcode", PASSCODE],
            input="hello\n:Users\n", capture_output=True, text=True, timeout=TIMEOUT,
            cwd=tmp_path)
        assert (client.returncode, client.stdout, client.stderr) == (
            0, f"Connected to 127.0.0.1 on port {port}\nActive Users: alice\n", "")
        server.send_signal(signal.SIGINT)
        out, err = server.communicate(timeout=TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert (server.returncode, out, err) == (
        0, "alice joined the chatroom\nalice: hello\nalice: searched up active users\n"
           "alice left the chatroom\n", "")


def test_the_commands_take_the_files_flags(installed: Path, tmp_path: Path) -> None:
    def run(command: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(installed / command), *args], capture_output=True,
                              text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL,
                              cwd=tmp_path)

    for command in ("chatroom-server", "chatroom-client"):
        done = run(command, "-h")
        assert done.returncode == 0 and done.stdout.startswith("usage:"), done
    bad = run("chatroom-client", "-join")
    assert bad.returncode == 2 and bad.stdout == "" and bad.stderr.count("\n") == 1, bad
    # The optional capabilities are found by the names server.py imports
    # (chatroom_ext.*); only their third-party package is missing in this venv.
    for flag, package in (("-redis", "redis"), ("-uvloop", "uvloop")):
        args = ["-start", "-port", "0", "-passcode", PASSCODE, flag]
        if flag == "-redis":
            args.append("redis://127.0.0.1:6379/0")
        done = run("chatroom-server", *args)
        assert done.returncode == 2 and done.stdout == "", done
        assert done.stderr.endswith(f"(could not import {package})\n"), done.stderr
    # No module named server or client was installed at the top level.
    probe = subprocess.run(
        [str(installed / "python"), "-c",
         "import importlib.util as u; print(u.find_spec('server'), u.find_spec('client'))"],
        capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert probe.stdout == "None None\n", probe
