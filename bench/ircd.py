#!/usr/bin/env python3
"""ngircd for the bench: install it from Debian's packages if missing, write a
config for loopback only, start it in the foreground, wait until it accepts,
stop it.

Flood protection. ngircd throttles a client that sends fast in two ways
(src/ngircd/conn.c): it handles at most 3 commands of a client per pass of
its loop (MAX_COMMANDS; 10 for a client with user mode +F), and a client that
has more waiting, or sends more than 256 bytes a second, gets a one-second
"penalty" during which it is not read at all. The config below sets
`MaxPenaltyTime = 0` ("0 to disable penalties altogether", ngircd.conf(5);
Debian's 26.1 has it), and the bench's senders log in as IRC operators
(`OPER`, an [Operator] block below) and set user mode +F ("relaxed flood
protection", settable by IRC operators only), which skips the penalty and
raises the per-pass limit to 10 commands. The per-pass limit itself cannot be
configured away; with 10 lines per sender per pass, the bench also runs
several senders.

Also off: DNS and IDENT lookups, PAM, the per-address connection limit, the
channel limit; PINGs are far apart (600 s) so idle bench clients never need
to answer one.

    python3 bench/ircd.py          # start one, print its port, stop on Enter
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TextIO, TypeVar

OPER_NAME, OPER_PASS = "bench", "benchpw"  # bench/loadgen.py uses the same

CONFIG = """\
[Global]
    Name = bench.invalid
    Info = ngircd for the chatroom bench
    Listen = 127.0.0.1
    Ports = {port}
    MotdPhrase = bench
[Limits]
    MaxConnections = 0
    MaxConnectionsIP = 0
    MaxJoins = 0
    MaxNickLength = 9
    MaxPenaltyTime = 0
    PingTimeout = 600
    PongTimeout = 600
[Options]
    DNS = no
    Ident = no
    PAM = no
    NoticeBeforeRegistration = no
    ScrubCTCP = no
[Operator]
    Name = {oper}
    Password = {oper_pass}
"""


def scratch_dir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder in memory (/dev/shm) where there is one: a server's
    log or stdout written there never waits for a disk."""
    shm = "/dev/shm"
    where = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(prefix=prefix, dir=where)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_ngircd(log: TextIO = sys.stderr) -> str:
    """The path of ngircd, installing Debian's package first if it is missing."""
    found = shutil.which("ngircd") or (os.path.exists("/usr/sbin/ngircd") and "/usr/sbin/ngircd")
    if found:
        return found
    if not shutil.which("apt-get"):
        raise RuntimeError("ngircd is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("bench: installing ngircd (apt-get install -y ngircd) ...", file=log, flush=True)

    def install() -> subprocess.CompletedProcess[str]:
        return subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "ngircd"],
                              env=env, capture_output=True, text=True, timeout=600,
                              stdin=subprocess.DEVNULL)

    done = install()
    if done.returncode != 0:  # maybe the package lists are missing or old
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True,
                       timeout=600, stdin=subprocess.DEVNULL)
        done = install()
    if done.returncode != 0:
        raise RuntimeError("apt-get install ngircd failed: "
                           + (done.stderr.strip().splitlines() or ["?"])[-1])
    found = shutil.which("ngircd") or "/usr/sbin/ngircd"
    if not os.path.exists(found):
        raise RuntimeError("ngircd installed but not found")
    return found


def ngircd_version(exe: str) -> str:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10,
                         stdin=subprocess.DEVNULL).stdout
    return out.splitlines()[0] if out else "?"


def pin(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that puts the child on `cpus` (None: leave it be)."""
    if not cpus:
        return None
    chosen = set(cpus)

    def preexec() -> None:
        os.sched_setaffinity(0, chosen)

    return preexec


def wait_accepting(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before accepting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server not accepting on port {port} after {timeout:.0f} s")


Started = TypeVar("Started", bound="ServerProcess")


class ServerProcess:
    """A server the bench starts and stops itself: its process, its scratch
    folder and the files it writes there; use as a context manager."""

    kind = ""

    def __init__(self, cpus: set[int] | None = None) -> None:
        self.cpus = cpus
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir: tempfile.TemporaryDirectory[str] | None = None
        self.files: list[IO[bytes]] = []  # closed by stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> ServerProcess:
        raise NotImplementedError

    def open_file(self, name: str) -> IO[bytes]:
        assert self.dir is not None
        handle = open(Path(self.dir.name) / name, "wb")  # noqa: SIM115 (closed in stop)
        self.files.append(handle)
        return handle

    def file_tail(self, name: str, lines: int, sep: str = "\n") -> str:
        if self.dir is None:
            return ""
        try:
            text = (Path(self.dir.name) / name).read_text(errors="replace")
        except OSError:
            return ""
        return sep.join(text.strip().splitlines()[-lines:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        for handle in self.files:
            handle.close()
        self.files = []
        if self.dir is not None:
            self.dir.cleanup()
            self.dir = None

    def __enter__(self: Started) -> Started:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Ngircd(ServerProcess):
    """One ngircd in the foreground on a free loopback port."""

    kind = "irc"

    def __init__(self, exe: str | None = None, cpus: set[int] | None = None) -> None:
        super().__init__(cpus)
        self.exe = exe or ensure_ngircd()

    def start(self) -> Ngircd:
        self.dir = scratch_dir("bench-ngircd-")
        folder = Path(self.dir.name)
        os.chmod(folder, 0o755)  # ngircd may drop root for 'nobody'; it must still read it
        self.port = free_port()
        conf = folder / "ngircd.conf"
        conf.write_text(CONFIG.format(port=self.port, oper=OPER_NAME, oper_pass=OPER_PASS))
        os.chmod(conf, 0o644)
        log = self.open_file("ngircd.log")
        self.proc = subprocess.Popen([self.exe, "-n", "-f", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=pin(self.cpus))
        try:
            wait_accepting(self.port, self.proc, 15)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 20) -> str:
        return self.file_tail("ngircd.log", lines)


def main() -> int:
    with Ngircd() as server:
        print(f"{ngircd_version(server.exe)} on 127.0.0.1 port {server.port} (pid {server.pid}); "
              "Enter stops it", flush=True)
        try:
            sys.stdin.readline()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
