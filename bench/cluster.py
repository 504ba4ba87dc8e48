#!/usr/bin/env python3
"""The bench's cluster mode: the same workload as bench/loadgen.py,
on one server alone and across two servers joined through Redis.

    python3 bench/cluster.py            # N=100 receivers, S=1 and 4 senders
    python3 bench/cluster.py --quick    # tiny sizes, a few seconds

Optional: it needs Debian's `redis-server` and redis-py (pip install '.[redis]')
in the interpreter that runs server.py; without them it says so in one line
and exits with status 2. It starts its own Redis on a free loopback port (no
persistence), then for each cell runs:

- alone:   one server.py without -redis; senders and receivers on it;
- redis-1: one server.py with -redis: the same, with every line going through
           Redis and back (the cost of the shared log alone);
- redis-2: two servers on the same Redis; the senders on server A, every
           receiver on server B: each line crosses from one server to the other.

Delivered lines/s and latency mean what they mean in loadgen.py (a line is
delivered when every receiver has it; latency from the sender's write to the
receiver's read). Loss, duplication and order are checked at the receivers.
Results go to bench/results/cluster-latest.json (--out: another folder).

loadgen.Workload has one port for senders and receivers alike; here the
senders (connected by loadgen's conductor, in this process) are sent to
server A and the receivers (connected by its worker processes) to server B,
by wrapping loadgen.connect_all for this process only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import loadgen  # noqa: E402

PASSCODE = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Any, what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise RuntimeError(f"{what} within {timeout:.0f} s")


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        start_new_session=True)

    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    try:
        wait_for(up, f"redis-server did not answer on port {port}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)


class Server:
    """server.py, its stdout (every room line) to a file."""

    def __init__(self, workdir: Path, name: str, redis_url: str | None) -> None:
        args = [sys.executable, str(ROOT / "server.py"), "-start", "-port", "0",
                "-passcode", PASSCODE, "-line-rate", "0", "-byte-rate", "0"]  # raw speed
        if redis_url:
            args += ["-redis", redis_url]
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

        def started() -> int | None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server.py exited: {self.err.read_text()[-500:]}")
            first = self.out.read_bytes().split(b"\n", 1)
            if len(first) < 2:
                return None
            return int(first[0].split()[4].rstrip(b"."))

        try:
            self.port: int = wait_for(started, "server.py did not start")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def senders_to(port: int) -> Iterator[None]:
    """Connect the senders (this process) to `port`; receivers (the worker
    processes loadgen forks) keep the workload's port."""
    me, real, senders_port = os.getpid(), loadgen.connect_all, port

    async def connect_all(loop: asyncio.AbstractEventLoop, port: int,
                          clients: list[loadgen.Client], concurrency: int, timeout: float) -> None:
        await real(loop, senders_port if os.getpid() == me else port, clients, concurrency,
                   timeout)

    loadgen.connect_all = connect_all
    try:
        yield
    finally:
        loadgen.connect_all = real


def run_cell(layout: str, workdir: Path, redis_url: str, **workload: Any) -> dict[str, Any]:
    servers = []
    try:
        if layout == "alone":
            servers.append(Server(workdir, "alone", None))
        elif layout == "redis-1":
            servers.append(Server(workdir, "a", redis_url))
        else:
            servers += [Server(workdir, "a", redis_url), Server(workdir, "b", redis_url)]
        receiving = servers[-1]
        w = loadgen.Workload(kind="ours", port=receiving.port, passcode=PASSCODE,
                             server_pid=receiving.proc.pid, name_prefix=f"{layout[:1]}",
                             **workload)
        with senders_to(servers[0].port) if len(servers) == 2 else contextlib.nullcontext():
            res = loadgen.run_workload(w)
        row = {"layout": layout, **vars(res)}
        return row
    finally:
        for s in servers:
            s.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("-n", "--receivers", type=int, default=100)
    ap.add_argument("-s", "--senders", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--modes", nargs="+", choices=["closed", "paced"],
                    default=["closed", "paced"])
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--rate", type=float, default=50_000)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.receivers, args.senders, args.window = 5, [1], 16
        args.rate, args.duration, args.warmup = 5_000, 0.4, 0.2
    if shutil.which("redis-server") is None:
        sys.stderr.write("bench/cluster.py: needs redis-server (apt-get install redis-server)\n")
        return 2
    probe = subprocess.run([sys.executable, "-c", "import redis"], capture_output=True)
    if probe.returncode:
        sys.stderr.write("bench/cluster.py: needs redis-py: pip install '.[redis]'\n")
        return 2
    loadgen.raise_nofile()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp, \
            redis_server(Path(tmp)) as url:
        for mode in args.modes:
            for s in args.senders:
                for layout in ("alone", "redis-1", "redis-2"):
                    row = run_cell(layout, Path(tmp), url, receivers=args.receivers,
                                   senders=s, mode=mode, window=args.window, rate=args.rate,
                                   duration=args.duration, warmup=args.warmup)
                    rows.append(row)
                    p50, p99 = row["p50_us"], row["p99_us"]
                    print(f"{mode:6} S={s:<2} N={args.receivers:<5} {layout:8} "
                          f"{row['lines_per_s']:>12,.0f} lines/s  "
                          f"p50 {'-' if p50 is None else f'{p50:,.0f}':>8} us  "
                          f"p99 {'-' if p99 is None else f'{p99:,.0f}':>8} us  "
                          f"lost {row['lost']} dup {row['duplicated']} "
                          f"order {row['out_of_order']}"
                          + (f"  ({'; '.join(row['notes'])})" if row["notes"] else ""),
                          flush=True)
    results = Path(args.out)
    results.mkdir(parents=True, exist_ok=True)
    (results / "cluster-latest.json").write_text(json.dumps(rows, indent=1, default=str))
    bad = [r for r in rows if r["lost"] or r["duplicated"] or r["out_of_order"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
