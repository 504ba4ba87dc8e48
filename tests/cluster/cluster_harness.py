"""Helpers for the cluster tests: a real redis-server, and several server.py
processes joined through it, with clients on each.

Same rules as tests/harness.py: every wait is "this line, within N seconds";
proving that nothing else was printed uses an in-order barrier
(`Cluster.assert_quiet`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import pytest
from harness import (
    DEFAULT_TIMEOUT,
    PASSCODE,
    ROOT,
    START_RE,
    Client,
    Member,
    Peer,
    Proc,
    free_port,
)

REDIS_SERVER = shutil.which("redis-server")


def need(what: str) -> None:
    """Skip for lack of `what` on a developer's machine; fail under CI, where
    scripts/test installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI must provide it: see scripts/test)", pytrace=False)
    pytest.skip(what)


# -- Redis -------------------------------------------------------------------------


class RedisServer:
    """A redis-server of our own on a free loopback port."""

    def __init__(self, workdir: Path, persistent: bool = False) -> None:
        assert REDIS_SERVER is not None
        self.workdir = workdir
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def argv(self) -> list[str]:
        argv = [REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--daemonize", "no", "--dir", str(self.workdir)]
        if self.persistent:
            return [*argv, "--appendonly", "yes", "--appendfsync", "always"]
        return [*argv, "--appendonly", "no"]

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING") == "PONG":
                    return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server did not come up on port {self.port}:\n{text}",
                            pytrace=False)
            time.sleep(0.02)  # polling a port that is coming up, bounded by the deadline

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """SIGTERM: Redis writes its append-only file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def command(self, *args: str) -> object:
        """One command over RESP; the reply as str, int, list or None."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            out = f"*{len(args)}\r\n".encode()
            for a in args:
                b = a.encode()
                out += b"$%d\r\n%s\r\n" % (len(b), b)
            s.sendall(out)
            return _read_reply(s.makefile("rb"))


def _read_reply(f: IO[bytes]) -> object:
    line = f.readline()
    if not line:
        raise OSError("redis closed the connection")
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+":
        return rest
    if kind == b"-":
        raise OSError(f"redis error: {rest}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode()
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise OSError(f"unexpected reply {line!r}")


# -- the cluster --------------------------------------------------------------------


class Cluster:
    """Several server.py processes on one Redis, and the members on them."""

    def __init__(self, redis_url: str, python: str = sys.executable) -> None:
        self.url = redis_url
        self.python = python
        self.servers: list[Proc] = []
        self.ports: list[int] = []
        self.down: set[int] = set()  # servers that were stopped or killed
        self.members: list[Member] = []  # in the room, in join order
        self.procs: list[Proc] = []
        self.peers: list[Peer] = []
        self._sync = 0

    # -- servers -----------------------------------------------------------------

    def spawn_server(self, *args: str, label: str = "server", env: dict[str, str] | None = None,
                     python_args: Sequence[str] = ()) -> Proc:
        proc = Proc([self.python, *python_args, "server.py", *args], cwd=ROOT, label=label,
                    env=env)
        self.procs.append(proc)
        return proc

    def start_server(self, *extra: str) -> int:
        """Start one more server on the cluster (with `extra` flags); its index."""
        i = len(self.servers)
        proc = self.spawn_server("-start", "-port", "0", "-passcode", PASSCODE,
                                 "-redis", self.url, *extra, label=f"server{i}")
        first = proc.next_line()
        m = START_RE.fullmatch(first or "")
        if m is None:
            proc.fail(f"server{i}: expected the start line, got {first!r}")
        self.servers.append(proc)
        self.ports.append(int(m.group(1)))
        return i

    def start(self, n: int) -> Cluster:
        for _ in range(n):
            self.start_server()
        return self

    def live(self) -> list[Proc]:
        return [s for i, s in enumerate(self.servers) if i not in self.down]

    def kill(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Signal server i; it counts as gone from now on."""
        self.servers[i].signal(sig)
        self.down.add(i)

    # -- members -------------------------------------------------------------------

    def nc(self, on: int, label: str = "nc") -> Peer:
        peer = Peer.connect(self.ports[on], label)
        self.peers.append(peer)
        return peer

    def nc_join(self, name: str, on: int) -> Peer:
        peer = self.nc(on, label=f"{name}@{on}")
        peer.expect(":hello chatroom 1")
        peer.send(f"LOGIN {PASSCODE} {name}")
        peer.expect(f":ok {name}")
        peer.name = name
        self.announced_join(peer)
        return peer

    def join(self, name: str, on: int) -> Client:
        """A real client.py in the room through server `on`."""
        port = self.ports[on]
        client = Client(name, [self.python, "client.py", "-join", "-host", "127.0.0.1",
                               "-port", str(port), "-username", name, "-passcode", PASSCODE],
                        cwd=ROOT, label=f"{name}@{on}")
        self.procs.append(client)
        client.expect(f"Connected to 127.0.0.1 on port {port}")
        self.announced_join(client)
        return client

    def announced_join(self, member: Member) -> None:
        """Every server and every member already in print the join line."""
        line = f"{member.name} joined the chatroom"
        for server in self.live():
            server.expect(line)
        for other in self.members:
            other.expect(line)
        self.members.append(member)

    def announced_leave(self, member: Member, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.members.remove(member)
        line = f"{member.name} left the chatroom"
        for who in (*self.live(), *self.members):
            who.expect(line, timeout)

    def leave(self, member: Member) -> None:
        member.send(":Exit")
        self.announced_leave(member)
        if isinstance(member, Peer):
            member.expect(":bye")
            member.expect_closed()
        else:
            status, rest, err = member.finish()
            assert (status, rest, err) == (0, [], []), member.describe()

    def others(self, member: Member) -> list[Member]:
        return [m for m in self.members if m is not member]

    def say(self, member: Member, text: str, shown: str | None = None) -> None:
        """Plain text: every server and every other member print it."""
        line = f"{member.name}: {text if shown is None else shown}"
        member.send(text)
        for who in (*self.live(), *self.others(member)):
            who.expect(line)

    def users_line(self) -> str:
        return "Active Users: " + ", ".join(m.name for m in self.members)

    def assert_quiet(self, via: Member | None = None) -> None:
        """In-order barrier (see tests/harness.py Room.assert_quiet), for every
        server and member of the cluster."""
        via = via or self.members[0]
        self._sync += 1
        via.send(":Users")
        via.expect(self.users_line())
        for server in self.live():
            server.expect(f"{via.name}: searched up active users")
        self.say(via, f"barrier {self._sync}")

    def close(self) -> list[str]:
        for peer in self.peers:
            peer.close()
        bad = []
        servers = set(map(id, self.servers))
        for proc in sorted(self.procs, key=lambda p: id(p) in servers):
            proc.cleanup()
            if "Traceback" in proc.stderr_text():
                bad.append(proc.describe())
        return bad
