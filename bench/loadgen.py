#!/usr/bin/env python3
"""Load generator for the chat room (docs/PROTOCOL.md) and, with the same
workload, for an IRC server (RFC 2812 as ngircd speaks it). Standard library
only; many clients from one process, on asyncio Protocols until they are in
the room (then most receivers are read by a plain epoll loop, see below).

The workload: N receivers and S senders join one room (`#bench` on IRC), then
the senders send lines of the form `^<sender> <seq> <time.time_ns()>`. Every
receiver must get every line, in each sender's order.

- closed loop (throughput): at most S*W lines are in flight, where a line
  counts as delivered when EVERY receiver has it (all receivers see the same
  order on both servers, so "delivered to all" is the minimum over receivers
  of the lines each has seen). Delivered lines/s is N times the growth of that
  minimum over the measured window.
- paced (latency): the senders together send `rate / N` lines per second, so
  the server delivers `rate` lines per second.

Processes: the conductor (this process: the senders, the window, the clock),
bulk workers (--procs) that connect the receivers and count the `^` marks
each reads (`^` appears once in each bench line and nowhere else), and a
probe worker. Once in the room, `sampled` receivers of each bulk worker,
spread evenly over its join order, are handed to the probe (their sockets go
over SCM_RIGHTS). The probe parses every line: latency from the send stamp to
the kernel's receive stamp (SO_TIMESTAMPNS, when the server wrote the bytes),
and each sender's sequence numbers. Loss (or duplication) is checked at EVERY
receiver by count; order at the sampled ones.

Reading the receivers is most of the generator's work (in a room of 1,000,
a line sent is 1,000 lines to read), so once all of a bulk worker's
receivers are in, it leaves asyncio for a loop of its own (BulkWorker.pump):
per ready socket one recv_into() into one buffer and one C call to count the
marks, no Python work per line; after each wakeup, its progress goes to the
conductor if it grew.

Also here: `run_joincheck`, which connects many clients to one room and
checks every join notice reached everyone who joined before it, to the byte.

With `receivers_on="ws"` (`--receivers-on ws --web-port P`), the receivers
join through the server's WebSocket door (`server.py -web P`) instead of TCP;
the senders stay on TCP. A receiver then gets one text frame per line and
still counts the `^` of each (a frame's header is two bytes, the second the
length, which for every line here is below 94, the code of `^`). There is no
probe then (`sampled` is 0): loss is checked at every receiver by count, but
not order, and there are no latencies.

Run alone for one workload, e.g.:
    python3 bench/loadgen.py --kind ours --port 5000 --passcode bench -n 100 -s 4 --mode closed
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import math
import multiprocessing
import os
import re
import resource
import select
import socket
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from socket import IPPROTO_TCP, SOL_SOCKET, TCP_QUICKACK
from typing import Any

MARK = b"^"
CHANNEL = "#bench"
OPER_NAME, OPER_PASS = "bench", "benchpw"  # bench/ircd.py writes the same into ngircd.conf
LINE_RE = re.compile(rb"\^(\d+) (\d+) (\d+)")
MAX_LATENCIES = 2_000_000  # per worker; beyond that, every k-th is kept
now_ns = time.perf_counter_ns  # durations
wall_ns = time.time_ns  # send stamps: CLOCK_REALTIME, the clock of the kernel's receive stamps
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux
TIMESPEC = struct.Struct("@qq")


class BenchError(Exception):
    """The workload could not run as asked (a client was refused, a timeout)."""


def raise_nofile() -> int:
    """Lift this process's soft open-files limit to the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return int(soft)


def cpu_seconds_self() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # without guest time, which user time already counts
    return (total - idle) / tick, total / tick


def proc_rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


# ---------------------------------------------------------------------------
# One client: logs in / registers and joins, then hands its bytes to `hot`.
# ---------------------------------------------------------------------------


class Client(asyncio.Protocol):
    """A chat client of either kind. Before it is in the room it parses lines
    (login, IRC registration, OPER + MODE +F for IRC senders, JOIN); from the
    line that says it is in (`:ok`, or RPL_ENDOFNAMES 366) on, every byte goes
    to `self.hot(data, now_ns)`, which a role sets."""

    def __init__(self, kind: str, name: str, passcode: str, oper: bool,
                 joined: Callable[[Client, str | None], None], web_port: int = 0) -> None:
        self.kind, self.name, self.passcode, self.oper = kind, name, passcode, oper
        self.web_port = web_port  # kind "ws": a WebSocket to server.py's -web port
        self._joined = joined
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.is_in = False
        self.failed: str | None = None
        self.hot: Callable[[bytes, int], None] = lambda data, t: None
        self.t_start = now_ns()
        self.t_in = 0
        self.on_connect: Callable[[Client], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.on_connect is not None:
            self.on_connect(self)
        if self.kind == "ours":
            transport.write(f"LOGIN {self.passcode} {self.name}\n".encode())
        elif self.kind == "ws":
            self.upgraded = False
            transport.write(ws_request(self.web_port))
        else:
            transport.write(f"NICK {self.name}\r\nUSER {self.name} 0 * :bench\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if self.is_in:
            self.hot(data, wall_ns())
            return
        if self.kind == "ws":
            self._ws_setup(data)
            return
        buf = self.buf + data
        pos = 0
        while True:
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = buf[pos:nl].rstrip(b"\r")
            pos = nl + 1
            verdict = self._setup_line(line)
            if verdict is True:
                self.is_in, self.buf, self.t_in = True, b"", now_ns()
                self._joined(self, None)
                if pos < len(buf):
                    self.hot(buf[pos:], wall_ns())
                return
            if verdict:
                self._fail(verdict)
                return
        self.buf = buf[pos:]

    def _ws_setup(self, data: bytes) -> None:
        """Kind "ws", before it is in: the handshake's answer, then frames."""
        buf = self.buf + data
        assert self.transport is not None
        if not self.upgraded:
            head, sep, rest = buf.partition(b"\r\n\r\n")
            if not sep:
                self.buf = buf
                return
            if not head.startswith(b"HTTP/1.1 101 "):
                self._fail(f"{self.name}: WebSocket refused: {head[:80]!r}")
                return
            self.upgraded = True
            self.transport.write(ws_text(f"LOGIN {self.passcode} {self.name}".encode()))
            buf = rest
        while True:
            frame = ws_frame(buf)
            if frame is None:
                break
            opcode, payload, size = frame
            buf = buf[size:]  # setup: a few frames, slicing is fine
            if opcode == 0x8:
                self._fail(f"{self.name}: WebSocket closed: {payload[2:]!r}")
                return
            verdict = self._setup_line(payload) if opcode == 0x1 else None
            if verdict is True:
                self.is_in, self.buf, self.t_in = True, b"", now_ns()
                self._joined(self, None)
                if buf:
                    self.hot(buf, wall_ns())
                return
            if verdict:
                self._fail(verdict)
                return
        self.buf = buf

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            self._joined(self, why)
        if self.transport is not None:
            self.transport.abort()

    def _setup_line(self, line: bytes) -> bool | str | None:
        """True: now in the room; a string: why it failed; None: go on."""
        text = line.decode("utf-8", "replace")
        if self.kind in ("ours", "ws"):
            if text.startswith(":ok "):
                return True
            if text.startswith(":error"):
                return f"{self.name}: {text}"
            return None
        parts = text.split(" ")
        if parts[0].startswith(":") and len(parts) > 1:
            cmd, args = parts[1], parts[2:]
        else:
            cmd, args = parts[0], parts[1:]
        assert self.transport is not None
        if cmd == "PING":
            self.transport.write(f"PONG {' '.join(args)}\r\n".encode())
        elif cmd == "001":
            if self.oper:
                self.transport.write(f"OPER {OPER_NAME} {OPER_PASS}\r\n".encode())
            else:
                self.transport.write(f"JOIN {CHANNEL}\r\n".encode())
        elif cmd == "381":  # RPL_YOUREOPER: ask for relaxed flood protection
            self.transport.write(f"MODE {self.name} +F\r\n".encode())
        elif cmd == "MODE" and self.oper and args and args[0] == self.name \
                and "F" in args[-1]:
            self.transport.write(f"JOIN {CHANNEL}\r\n".encode())
        elif cmd == "366":
            return True
        elif cmd == "ERROR" or (cmd.isdigit() and cmd[0] in "45"):
            return f"{self.name}: {text}"
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.is_in:
            self._fail(f"{self.name}: connection lost before joining ({exc!r})")


def ws_request(port: int) -> bytes:
    """The opening handshake, as the page at http://127.0.0.1:<port>/ sends it."""
    key = "YmVuY2gtd2Vic29ja2V0IQ=="  # any 16 bytes, base64: the server only echoes a hash
    return (f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chatroom.v1\r\n"
            f"Origin: http://127.0.0.1:{port}\r\n\r\n").encode()


def ws_text(payload: bytes) -> bytes:
    """A client's text frame (short), masked with a zero key: the payload as is."""
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload), 0, 0, 0, 0]) + payload


def ws_frame(buf: bytes, pos: int = 0) -> tuple[int, bytes, int] | None:
    """(opcode, payload, where the next frame starts) of the server's frame
    at `pos` in `buf`, or None if it is not all there yet."""
    end = len(buf)
    if end - pos < 2:
        return None
    n, at = buf[pos + 1] & 0x7F, pos + 2
    if n == 126:
        if end - pos < 4:
            return None
        n, at = int.from_bytes(buf[pos + 2:pos + 4], "big"), pos + 4
    elif n == 127:
        if end - pos < 10:
            return None
        n, at = int.from_bytes(buf[pos + 2:pos + 10], "big"), pos + 10
    if at + n > end:
        return None
    return buf[pos] & 0x0F, buf[at:at + n], at + n


def message_bytes(kind: str, sid: int, first_seq: int, count: int, ts: int) -> bytes:
    """`count` bench lines of sender `sid`, from sequence number `first_seq`."""
    if kind == "ours":
        return "".join([f"^{sid} {q} {ts}\n" for q in range(first_seq, first_seq + count)]).encode()
    return "".join([f"PRIVMSG {CHANNEL} :^{sid} {q} {ts}\r\n"
                    for q in range(first_seq, first_seq + count)]).encode()


async def connect_all(loop: asyncio.AbstractEventLoop, port: int, clients: list[Client],
                      concurrency: int, timeout: float) -> None:
    """Connect `clients` (at most `concurrency` logins in progress at once) and
    wait until every one is in the room."""
    sem = asyncio.Semaphore(concurrency)
    waiters: dict[Client, asyncio.Future[None]] = {}

    async def one(client: Client) -> None:
        async with sem:
            fut = waiters[client]
            client.t_start = now_ns()
            await loop.create_connection(lambda: client, "127.0.0.1", port)
            await fut

    for c in clients:
        waiters[c] = loop.create_future()
        prev = c._joined

        def joined(client: Client, err: str | None,
                   prev: Callable[[Client, str | None], None] = prev) -> None:
            fut = waiters[client]
            if not fut.done():
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(BenchError(err))
            prev(client, err)

        c._joined = joined
    tasks = [asyncio.ensure_future(one(c)) for c in clients]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except asyncio.TimeoutError:
        missing = sum(1 for c in clients if not c.is_in)
        raise BenchError(f"{missing} of {len(clients)} clients not in the room "
                         f"after {timeout:.0f} s") from None
    finally:
        for t in tasks:
            t.cancel()


# ---------------------------------------------------------------------------
# The workload
# ---------------------------------------------------------------------------


@dataclass
class Workload:
    kind: str  # "ours" or "irc"
    port: int
    receivers: int
    senders: int = 1
    mode: str = "closed"  # "closed" or "paced"
    window: int = 64  # closed: lines in flight per sender (S*W in all)
    rate: float = 50_000.0  # paced: deliveries per second, summed over receivers
    duration: float = 4.0  # seconds measured
    warmup: float = 1.0  # seconds before the measured window
    sampled: int = 8  # receivers per worker that parse every line
    procs: int = 1  # receiver worker processes
    passcode: str = "bench"
    server_pid: int | None = None
    concurrency: int = 8  # logins in progress at once (ngircd listens with a backlog of 10)
    connect_timeout: float = 120.0
    drain_timeout: float = 30.0
    name_prefix: str = ""
    # Receivers ask for an immediate ACK after each read (TCP_QUICKACK). A
    # server that does not set TCP_NODELAY (ngircd) otherwise holds a small
    # write back until the receiver's delayed ACK (40 ms on Linux) whenever
    # earlier bytes are unacknowledged, and a closed loop stalls on that.
    quickack: bool = True
    # Latency from the kernel's receive stamp (see StampedReader) rather than
    # from when this process read the bytes.
    kernel_stamps: bool = True
    receivers_on: str = "tcp"  # "tcp", or "ws": through server.py's -web port (ours only)
    web_port: int = 0

    def __post_init__(self) -> None:
        if self.receivers_on == "ws":
            if self.kind != "ours" or not self.web_port:
                raise BenchError("WebSocket receivers need --kind ours and --web-port")
            self.sampled = 0  # no probe: it would need to take over a frame stream mid-way


@dataclass
class Result:
    kind: str
    mode: str
    receivers: int
    receivers_on: str
    senders: int
    window: int | None
    rate_target: float | None
    lines_per_s: float = 0.0
    msgs_per_s: float = 0.0
    p50_us: float | None = None
    p99_us: float | None = None
    p999_us: float | None = None
    max_us: float | None = None
    # paced runs: latencies in buckets about 1 % wide, so that repeated runs
    # can be pooled (see latency_bucket)
    latency_hist: dict[str, int] | None = None
    latency_samples: int = 0
    latency_clock: str = "kernel receive stamp"
    stamp_fallbacks: int = 0  # reads without a kernel stamp (then: when read)
    connect_join_s: float = 0.0
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    server_rss_kib: int | None = None
    server_cpu_s: float | None = None  # during the measured window
    server_cpu_pct: float | None = None  # of one core, during the measured window
    gen_cpu_s: float = 0.0  # generator, all its processes, during the measured window
    gen_cpu_pct: float = 0.0  # of one core
    measured_s: float = 0.0
    machine_busy_pct: float = 0.0  # all CPUs, in % of one, during the measured window
    others_cpu_pct: float = 0.0  # of that, neither the server nor the generator
    overloaded: bool = False
    notes: list[str] = field(default_factory=list)


# -- the receiver workers (child processes) ---------------------------------
#
# A bulk worker connects its share of the receivers, in order, and counts the
# marks each reads. The receivers picked for parsing (`sampled` per bulk
# worker, spread evenly over its join order) are handed, once in the room, to
# the probe worker: their socket goes over a Unix socket (SCM_RIGHTS) and the
# bulk worker stops reading it. The probe does little else, so it reads what
# arrives at once, and takes the kernel's receive stamp of each read as the
# time of arrival (StampedReader). Every worker reports the least number of
# marks any of its receivers has (its progress) to the conductor.

NO_LIMIT = 1 << 62  # progress of a worker with no receiver of its own


class WorkerBase:
    def __init__(self, w: Workload, conn: Any) -> None:
        self.w, self.conn = w, conn
        self.loop = asyncio.get_running_loop()
        self.counts: list[int] = []
        self.parsers: list[Parser] = []
        self.stamped: list[StampedReader] = []
        self.scheduled = False
        self.reported = -1
        self.go_window = (0, 0)
        self.cmds: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def flush(self) -> None:
        self.scheduled = False
        m = min(self.counts) if self.counts else NO_LIMIT
        if m != self.reported:
            self.reported = m
            self.conn.send(("p", m))

    def on_cmd(self) -> None:
        try:
            while self.conn.poll():
                self.cmds.put_nowait(self.conn.recv())
        except (EOFError, OSError):
            self.loop.remove_reader(self.conn.fileno())
            self.cmds.put_nowait(("close",))

    async def serve_commands(self) -> None:
        while self.command(await self.cmds.get()):
            pass

    def command(self, cmd: tuple[Any, ...]) -> bool:
        """Do one of the conductor's commands; False when it says close."""
        if cmd[0] == "go":
            self.go_window = (cmd[1], cmd[2])
        elif cmd[0] == "cpu":
            self.conn.send(("cpu", cpu_seconds_self()))
        elif cmd[0] == "collect":
            sent = cmd[1]
            lat: list[int] = []
            for p in self.parsers:
                lat += p.latencies
            if len(lat) > MAX_LATENCIES:
                lat = lat[:: len(lat) // MAX_LATENCIES + 1]
            self.conn.send(("res", {
                "receivers": len(self.counts),
                "delivered": sum(self.counts),
                "lost": sum(max(0, sent - c) for c in self.counts),
                "duplicated": sum(max(0, c - sent) for c in self.counts),
                "out_of_order": sum(p.out_of_order for p in self.parsers),
                "parsed_lines": sum(p.lines for p in self.parsers),
                "stamp_fallbacks": sum(r.fallbacks for r in self.stamped),
                "latencies": array.array("q", lat).tobytes(),
            }))
        elif cmd[0] == "close":
            return False
        return True


class BulkWorker(WorkerBase):
    def __init__(self, w: Workload, first: int, count: int, conn: Any,
                 probe_chan: socket.socket | None) -> None:
        super().__init__(w, conn)
        self.first, self.count, self.probe_chan = first, count, probe_chan
        self.clients: list[Client] = []
        k = min(w.sampled, count) if probe_chan is not None else 0
        self.sampled = {j * count // k for j in range(k)} if k else set()
        self.mine: list[Client] = []  # the receivers this worker counts, in self.counts' order

    def make(self, i: int) -> Client:
        w = self.w
        c = Client("ws" if w.receivers_on == "ws" else w.kind,
                   f"{w.name_prefix}r{self.first + i}", w.passcode, False,
                   lambda client, err: None, w.web_port)
        if i in self.sampled:
            c.on_connect = StampedReader.enable

            def handoff(client: Client, err: str | None) -> None:
                if err is None and client.transport is not None:
                    client.transport.pause_reading()
                    fd = client.transport.get_extra_info("socket").fileno()
                    assert self.probe_chan is not None
                    socket.send_fds(self.probe_chan, [b"%d\n" % (self.first + i)], [fd])

            c._joined = handoff
            return c
        j = len(self.counts)
        self.counts.append(0)
        self.mine.append(c)

        def hot(data: bytes, t: int) -> None:  # until the pump takes over
            self.counts[j] += data.count(MARK)

        c.hot = hot
        return c

    async def run(self) -> None:
        self.loop.add_reader(self.conn.fileno(), self.on_cmd)
        self.clients = [self.make(i) for i in range(self.count)]
        t0 = now_ns()
        try:
            port = self.w.web_port if self.w.receivers_on == "ws" else self.w.port
            await connect_all(self.loop, port, self.clients, self.w.concurrency,
                              self.w.connect_timeout)
        except BenchError as exc:
            self.conn.send(("err", str(exc)))
            return
        self.conn.send(("ready", t0, max((c.t_in for c in self.clients), default=t0)))
        try:
            self.pump()
        finally:
            for c in self.clients:
                if c.transport is not None:
                    c.transport.abort()

    def pump(self) -> None:
        """Everyone is in: from here on a plain epoll loop, not asyncio, reads
        the receivers. Each ready socket is read once per wakeup into one
        buffer, its marks counted in C (bytearray.count); after each wakeup
        the worker's progress goes to the conductor if it grew."""
        self.loop.remove_reader(self.conn.fileno())
        socks: dict[int, tuple[int, socket.socket]] = {}
        for j, c in enumerate(self.mine):
            assert c.transport is not None
            c.transport.pause_reading()  # asyncio lets go; the kernel keeps what is unread
            sock = socket.fromfd(c.transport.get_extra_info("socket").fileno(),
                                 socket.AF_INET, socket.SOCK_STREAM)  # a dup: ours to close
            sock.setblocking(False)
            socks[sock.fileno()] = (j, sock)
        ep = select.epoll()
        for fd in socks:
            ep.register(fd, select.EPOLLIN)
        conn_fd = self.conn.fileno()
        ep.register(conn_fd, select.EPOLLIN)
        buf = bytearray(1 << 18)
        counts, quickack = self.counts, self.w.quickack
        try:
            while not self.cmds.empty():  # any that came while it was connecting
                if not self.command(self.cmds.get_nowait()):
                    return
            self.flush()
            while True:
                for fd, _ev in ep.poll():
                    if fd == conn_fd:
                        if not self.commands():
                            return
                        continue
                    j, sock = socks[fd]
                    try:
                        n = sock.recv_into(buf)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        n = 0
                    if not n:  # closed: what it got stays counted
                        ep.unregister(fd)
                        continue
                    counts[j] += buf.count(MARK, 0, n)
                    if quickack:
                        sock.setsockopt(IPPROTO_TCP, TCP_QUICKACK, 1)
                self.flush()
        finally:
            ep.close()
            for _j, sock in socks.values():
                sock.close()

    def commands(self) -> bool:
        """Answer the conductor's commands waiting in the pipe; False on close."""
        try:
            while self.conn.poll():
                if not self.command(self.conn.recv()):
                    return False
        except (EOFError, OSError):
            return False
        return True


class ProbeWorker(WorkerBase):
    def __init__(self, w: Workload, expect: int, chans: list[socket.socket], conn: Any) -> None:
        super().__init__(w, conn)
        self.expect, self.chans = expect, chans
        self.got = asyncio.Event()
        if expect == 0:
            self.got.set()

    def on_chan(self, chan: socket.socket) -> None:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(chan, 4096, 64)
        except (BlockingIOError, InterruptedError):
            return
        if not msg and not fds:
            self.loop.remove_reader(chan.fileno())
            return
        for fd in fds:
            self.adopt(socket.socket(fileno=fd))
        if len(self.counts) >= self.expect:
            self.got.set()

    def adopt(self, sock: socket.socket) -> None:
        j = len(self.counts)
        self.counts.append(0)
        p = Parser()
        self.parsers.append(p)
        counts, loop, worker, w = self.counts, self.loop, self, self.w
        setsockopt = sock.setsockopt

        def hot(data: bytes, t: int) -> None:
            counts[j] += data.count(MARK)
            p.feed(data, t, worker.go_window)
            if w.quickack:
                setsockopt(IPPROTO_TCP, TCP_QUICKACK, 1)
            if not worker.scheduled:
                worker.scheduled = True
                loop.call_soon(worker.flush)

        reader = StampedReader(sock, hot, stamps=w.kernel_stamps)
        self.stamped.append(reader)
        reader.start(self.loop)

    async def run(self) -> None:
        self.loop.add_reader(self.conn.fileno(), self.on_cmd)
        for chan in self.chans:
            chan.setblocking(False)
            self.loop.add_reader(chan.fileno(), self.on_chan, chan)
        try:
            await asyncio.wait_for(self.got.wait(), self.w.connect_timeout + 10)
        except asyncio.TimeoutError:
            self.conn.send(("err", f"probe: got {len(self.counts)} of {self.expect} sockets"))
            return
        self.conn.send(("ready", None, None))
        self.flush()
        try:
            await self.serve_commands()
        finally:
            for r in self.stamped:
                r.stop()


class StampedReader:
    """Reads one receiver's socket with recvmsg() and, with `stamps`, the
    kernel's receive stamp (SO_TIMESTAMPNS, CLOCK_REALTIME): when the bytes
    reached the socket, which on loopback is when the server wrote them. So
    the latency measured is the server's, not how long the generator took to
    get round to the socket. (When reads lag, the kernel coalesces what waits
    and the stamp is the newest arrival's: latency can only be overstated.)"""

    def __init__(self, sock: socket.socket, on_data: Callable[[bytes, int], None],
                 stamps: bool = True) -> None:
        self.sock: socket.socket | None = sock
        self.on_data, self.stamps = on_data, stamps
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fallbacks = 0  # reads that came without a kernel stamp
        # recvmsg(262144) would cost an mmap() and munmap() of 256 KiB per
        # read (glibc serves allocations that large that way): read into
        # one buffer instead, and copy out only what came.
        self.buf = bytearray(262144)
        self.view = memoryview(self.buf)

    @staticmethod
    def enable(client: Client) -> None:
        assert client.transport is not None
        client.transport.get_extra_info("socket").setsockopt(SOL_SOCKET, SO_TIMESTAMPNS, 1)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.sock is not None
        self.sock.setblocking(False)
        self.loop = loop
        loop.add_reader(self.sock.fileno(), self.readable)

    def readable(self) -> None:
        assert self.sock is not None
        try:
            n, anc, _flags, _addr = self.sock.recvmsg_into([self.buf], 256)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            n, anc = 0, []
        if not n:
            self.stop()
            return
        data = bytes(self.view[:n])
        t = 0
        for level, kind, payload in anc:
            if level == SOL_SOCKET and kind == SO_TIMESTAMPNS and len(payload) >= 16:
                sec, nsec = TIMESPEC.unpack_from(payload)
                t = sec * 1_000_000_000 + nsec
        if not t:
            t = wall_ns()
            if self.stamps:
                self.fallbacks += 1
        self.on_data(data, t)

    def stop(self) -> None:
        if self.sock is not None:
            assert self.loop is not None
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None


class Parser:
    """Parses every bench line one receiver gets: latency and per-sender order."""

    __slots__ = ("latencies", "lines", "next", "out_of_order", "rest")

    def __init__(self) -> None:
        self.rest = b""
        self.next: dict[bytes, int] = {}
        self.latencies: list[int] = []
        self.out_of_order = 0
        self.lines = 0

    def feed(self, data: bytes, t: int, window: tuple[int, int]) -> None:
        buf = self.rest + data if self.rest else data
        end = buf.rfind(b"\n")
        if end < 0:
            self.rest = buf
            return
        self.rest = buf[end + 1:]
        lo, hi = window
        nxt, lat = self.next, self.latencies
        found = LINE_RE.findall(buf, 0, end)
        self.lines += len(found)
        for sid, seq, ts in found:
            q = int(seq)
            if nxt.get(sid, 0) != q:
                self.out_of_order += 1
            nxt[sid] = q + 1
            sent = int(ts)
            if lo <= sent < hi:
                lat.append(t - sent)


def _worker_main(make: Callable[[Any], Any], conn: Any) -> None:
    raise_nofile()
    try:
        async def work() -> None:
            await make(conn).run()

        asyncio.run(work())
    except KeyboardInterrupt:
        pass
    except BaseException as exc:  # report, don't hang the parent
        try:
            conn.send(("err", f"worker: {exc!r}"))
        except OSError:
            pass
    finally:
        conn.close()


# -- the senders and the conductor (the parent process) ---------------------


class Conductor:
    def __init__(self, w: Workload, pipes: list[Any]) -> None:
        self.w = w
        self.loop = asyncio.get_running_loop()
        self.pipes = pipes
        self.progress = [0] * len(pipes)
        self.delivered = 0  # lines every receiver has
        self.inbox: list[asyncio.Queue[tuple[Any, ...]]] = [asyncio.Queue() for _ in pipes]
        self.senders: list[Client] = []
        self.sent = [0] * w.senders
        self.sent_total = 0
        self.sending = False
        self.rr = 0
        self.drained = asyncio.Event()
        self.overloaded = False

    def on_pipe(self, k: int) -> None:
        conn = self.pipes[k]
        try:
            while conn.poll():
                msg = conn.recv()
                if msg[0] == "p":
                    self.progress[k] = msg[1]
                    d = min(self.progress)
                    if d != self.delivered:
                        self.delivered = d
                        self.on_progress()
                else:
                    self.inbox[k].put_nowait(msg)
        except (EOFError, OSError):
            self.loop.remove_reader(conn.fileno())
            self.inbox[k].put_nowait(("err", "a receiver worker died"))

    def on_progress(self) -> None:
        if self.sending and self.w.mode == "closed":
            self.send(self.delivered + self.w.senders * self.w.window - self.sent_total)
        if not self.sending and self.delivered >= self.sent_total:
            self.drained.set()

    def send(self, n: int) -> None:
        """Send n more lines, spread over the senders in turn."""
        if n <= 0:
            return
        s_count = self.w.senders
        base, extra = divmod(n, s_count)
        ts = wall_ns()
        for j in range(s_count):
            sid = (self.rr + j) % s_count
            k = base + (1 if j < extra else 0)
            if not k:
                continue
            tr = self.senders[sid].transport
            assert tr is not None
            tr.write(message_bytes(self.w.kind, sid, self.sent[sid], k, ts))
            self.sent[sid] += k
        self.rr = (self.rr + extra) % s_count
        self.sent_total += n

    async def expect(self, k: int, kind: str) -> tuple[Any, ...]:
        msg = await self.inbox[k].get()
        if msg[0] == "err":
            raise BenchError(msg[1])
        if msg[0] != kind:
            raise BenchError(f"worker said {msg[0]!r}, expected {kind!r}")
        return msg

    async def gather(self, kind: str, timeout: float) -> list[tuple[Any, ...]]:
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(self.expect(k, kind) for k in range(len(self.pipes)))), timeout)
        except asyncio.TimeoutError:
            raise BenchError(f"receiver workers did not answer {kind!r} in {timeout:.0f} s") \
                from None

    def tell(self, *msg: Any) -> None:
        for conn in self.pipes:
            conn.send(msg)

    def server_cpu(self) -> float | None:
        if self.w.server_pid is None:
            return None
        try:
            return proc_cpu_seconds(self.w.server_pid)
        except OSError:
            return None

    async def gen_cpu(self) -> float:
        self.tell("cpu")
        msgs = await self.gather("cpu", 10)
        return cpu_seconds_self() + sum(float(m[1]) for m in msgs)

    async def run(self) -> Result:
        w = self.w
        for k, conn in enumerate(self.pipes):
            self.loop.add_reader(conn.fileno(), self.on_pipe, k)
        res = Result(w.kind, w.mode, w.receivers, w.receivers_on, w.senders,
                     w.window if w.mode == "closed" else None,
                     w.rate if w.mode == "paced" else None)
        if not w.kernel_stamps:
            res.latency_clock = "when the generator read it"

        ready = await self.gather("ready", w.connect_timeout + 10)
        self.senders = [Client(w.kind, f"{w.name_prefix}s{j}", w.passcode, w.kind == "irc",
                               lambda c, e: None) for j in range(w.senders)]
        await connect_all(self.loop, w.port, self.senders, w.concurrency, w.connect_timeout)
        t_first = min(m[1] for m in ready if m[1] is not None)
        t_last = max([m[2] for m in ready if m[2] is not None] + [c.t_in for c in self.senders])
        res.connect_join_s = (t_last - t_first) / 1e9
        await asyncio.sleep(0.2)  # let the last join notices settle

        # The measured window is [t1, t2); latency counts lines sent in it.
        t0 = now_ns()
        t1 = t0 + int(w.warmup * 1e9)
        t2 = t1 + int(w.duration * 1e9)
        off = wall_ns() - now_ns()
        self.tell("go", t1 + off, t2 + off)
        self.sending = True
        snap: dict[str, Any] = {}

        async def snapshot(at: int, key: str) -> None:
            await asyncio.sleep(max(0.0, (at - now_ns()) / 1e9))
            snap[key] = (now_ns(), self.delivered, self.server_cpu(), await self.gen_cpu(),
                         machine_cpu_seconds()[0])

        snaps = asyncio.gather(snapshot(t1, "a"), snapshot(t2, "b"))
        if w.mode == "closed":
            self.send(w.senders * w.window)
            await snaps
        else:
            per_s = w.rate / w.receivers  # lines per second the senders send
            cap = max(1000.0, per_s * 2)  # in flight beyond this: overloaded, stop
            while now_ns() < t2:
                due = int((now_ns() - t0) / 1e9 * per_s) - self.sent_total
                if self.sent_total - self.delivered > cap:
                    self.overloaded = True
                    break
                self.send(due)
                await asyncio.sleep(0.001)
            await snaps
        self.sending = False
        if self.delivered >= self.sent_total:
            self.drained.set()
        try:
            await asyncio.wait_for(self.drained.wait(), w.drain_timeout)
        except asyncio.TimeoutError:
            res.notes.append(f"not drained after {w.drain_timeout:.0f} s")
        ta, da, ca, ga, ma = snap["a"]
        tb, db, cb, gb, mb = snap["b"]
        span = (tb - ta) / 1e9
        res.measured_s = span
        res.msgs_per_s = (db - da) / span
        res.lines_per_s = res.msgs_per_s * w.receivers
        if ca is not None and cb is not None:
            res.server_cpu_s = cb - ca
            res.server_cpu_pct = 100 * (cb - ca) / span
        res.gen_cpu_s = gb - ga
        res.gen_cpu_pct = 100 * (gb - ga) / span
        res.machine_busy_pct = 100 * (mb - ma) / span
        res.others_cpu_pct = max(0.0, res.machine_busy_pct - res.gen_cpu_pct
                                 - (res.server_cpu_pct or 0.0))
        if w.server_pid is not None:
            try:
                res.server_rss_kib = proc_rss_kib(w.server_pid)
            except OSError:
                pass
        self.tell("collect", self.sent_total)
        outs = await self.gather("res", 60)
        res.sent = self.sent_total
        lat = array.array("q")
        for m in outs:
            d = m[1]
            res.delivered += d["delivered"]
            res.lost += d["lost"]
            res.duplicated += d["duplicated"]
            res.out_of_order += d["out_of_order"]
            res.stamp_fallbacks += d["stamp_fallbacks"]
            lat.frombytes(d["latencies"])
        ls = sorted(lat)
        res.latency_samples = len(ls)
        if ls:
            def pct(q: float) -> float:
                return ls[min(len(ls) - 1, int(q * len(ls)))] / 1000.0
            res.p50_us, res.p99_us, res.p999_us = pct(0.50), pct(0.99), pct(0.999)
            res.max_us = ls[-1] / 1000.0
            if w.mode == "paced":
                res.latency_hist = latency_histogram(ls)
        res.overloaded = self.overloaded
        if self.overloaded:
            res.notes.append("paced rate not sustained: too many lines in flight")
        self.tell("close")
        for c in self.senders:
            if c.transport is not None:
                c.transport.abort()
        return res


def latency_bucket(ns: int) -> int:
    """The histogram bucket of a latency: 100 buckets per factor of e (about 1 %)."""
    return int(math.log(max(ns, 1)) * 100)


def latency_histogram(samples: Iterable[int]) -> dict[str, int]:
    """Samples (ns) counted per latency_bucket; string keys, as JSON keeps them."""
    hist: dict[int, int] = {}
    for ns in samples:
        key = latency_bucket(ns)
        hist[key] = hist.get(key, 0) + 1
    return {str(k): n for k, n in hist.items()}


def pooled_percentiles(hists: list[dict[str, int]], qs: tuple[float, ...]) -> list[float]:
    """Percentiles (µs, each its bucket's middle) of several runs' samples together."""
    total: dict[int, int] = {}
    for h in hists:
        for key, n in h.items():
            total[int(key)] = total.get(int(key), 0) + n
    count = sum(total.values())
    keys = sorted(total)
    out = []
    for q in qs:
        rank, seen = min(count - 1, int(q * count)), 0
        for k in keys:
            seen += total[k]
            if seen > rank:
                out.append(math.exp((k + 0.5) / 100) / 1000.0)
                break
    return out


def run_workload(w: Workload) -> Result:
    """Run one workload against a server already listening on w.port."""
    raise_nofile()
    ctx = multiprocessing.get_context("fork")
    procs, pipes, chans = [], [], []
    per = [w.receivers // w.procs + (1 if k < w.receivers % w.procs else 0)
           for k in range(w.procs)]
    probing = w.sampled > 0
    try:
        def start(make: Callable[[Any], Any]) -> None:
            mine, theirs = ctx.Pipe()
            p = ctx.Process(target=_worker_main, args=(make, theirs), daemon=True)
            p.start()
            theirs.close()
            procs.append(p)
            pipes.append(mine)

        bulk_ends, probe_ends = [], []
        if probing:
            for _ in range(w.procs):
                a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
                chans += [a, b]
                bulk_ends.append(a)
                probe_ends.append(b)
            expect = sum(min(w.sampled, n) for n in per)
            start(lambda conn: ProbeWorker(w, expect, probe_ends, conn))
        first = 0
        for k in range(w.procs):
            chan = bulk_ends[k] if probing else None
            def bulk(conn: Any, first: int = first, k: int = k,
                     chan: socket.socket | None = chan) -> BulkWorker:
                return BulkWorker(w, first, per[k], conn, chan)

            start(bulk)
            first += per[k]
        for c in chans:
            c.close()
        chans = []

        async def main() -> Result:
            return await Conductor(w, pipes).run()

        return asyncio.run(main())
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        for pipe in pipes:
            pipe.close()
        for c in chans:
            c.close()


# ---------------------------------------------------------------------------
# Many clients at once: every join notice delivered, memory per idle client
# ---------------------------------------------------------------------------


@dataclass
class JoinResult:
    kind: str
    clients: int
    concurrency: int = 0  # logins in progress at once
    connect_join_s: float = 0.0
    all_joins_s: float = 0.0  # until every join notice had arrived
    join_lines_expected: int = 0
    join_lines_received: int = 0
    clients_checked_ok: int = 0
    all_joins_delivered: bool = False
    server_rss_before_kib: int | None = None
    server_rss_after_kib: int | None = None
    bytes_per_client: float | None = None
    server_cpu_s: float | None = None
    gen_cpu_s: float = 0.0
    notes: list[str] = field(default_factory=list)


def join_name(kind: str, line: bytes) -> bytes:
    if kind == "ours":  # `<name> joined the chatroom`
        return line.split(b" ", 1)[0]
    return line[1:line.index(b"!")]  # `:<nick>!<user>@<host> JOIN :#bench`


async def _joincheck(kind: str, port: int, n: int, passcode: str, server_pid: int | None,
                     concurrency: int, timeout: float, prefix: str) -> JoinResult:
    """Client 0 joins first and keeps every byte it gets after its own join;
    the others join all at once and keep a running CRC-32 and length. At the
    end, what client k got must be exactly the part of client 0's stream after
    client k's own join notice: every later join, in the room's order."""
    loop = asyncio.get_running_loop()
    res = JoinResult(kind, n, concurrency)
    rss_before = proc_rss_kib(server_pid) if server_pid else None
    cpu_before = proc_cpu_seconds(server_pid) if server_pid else None
    gen_before = cpu_seconds_self()
    res.join_lines_expected = n * (n - 1) // 2
    received = [0]
    crc = [0] * n
    length = [0] * n
    first_stream: list[bytes] = []
    all_in = asyncio.Event()
    t_last_line = [0]

    def make(i: int) -> Client:
        c = Client(kind, f"{prefix}r{i}", passcode, False, lambda cl, e: None)

        def hot(data: bytes, t: int) -> None:
            crc[i] = zlib.crc32(data, crc[i])
            length[i] += len(data)
            received[0] += data.count(b"\n")
            if i == 0:
                first_stream.append(data)
            if received[0] >= res.join_lines_expected:
                t_last_line[0] = now_ns()
                all_in.set()

        c.hot = hot
        return c

    clients = [make(i) for i in range(n)]
    t0 = now_ns()
    try:
        await connect_all(loop, port, clients[:1], 1, timeout)
        await connect_all(loop, port, clients[1:], concurrency, timeout)
        res.connect_join_s = (max(c.t_in for c in clients) - t0) / 1e9
        if res.join_lines_expected == 0:
            all_in.set()
        try:
            await asyncio.wait_for(all_in.wait(), timeout)
        except asyncio.TimeoutError:
            res.notes.append(f"only {received[0]} of {res.join_lines_expected} join lines "
                             f"after {timeout:.0f} s")
        res.join_lines_received = received[0]
        res.all_joins_s = ((t_last_line[0] or now_ns()) - t0) / 1e9
        await asyncio.sleep(1.0)  # idle: let the server settle before reading its RSS
        # Check every client's stream against client 0's.
        stream = b"".join(first_stream)
        lines = stream.split(b"\n")[:-1]
        ends = []  # byte offset just after each line
        pos = 0
        for ln in lines:
            pos += len(ln) + 1
            ends.append(pos)
        where = {join_name(kind, ln.rstrip(b"\r")): k for k, ln in enumerate(lines)}
        view = memoryview(stream)
        ok = 1 if len(lines) == n - 1 else 0
        names = {c.name.encode() for c in clients[1:]}
        if set(where) != names:
            res.notes.append("client 0 did not see exactly the other clients join")
            ok = 0
        for i in range(1, n):
            k = where.get(clients[i].name.encode())
            if k is None:
                continue
            tail = view[ends[k]:]
            if len(tail) == length[i] and zlib.crc32(tail) == crc[i]:
                ok += 1
        res.clients_checked_ok = ok
        res.all_joins_delivered = ok == n and received[0] == res.join_lines_expected
        if server_pid:
            res.server_rss_before_kib = rss_before
            res.server_rss_after_kib = proc_rss_kib(server_pid)
            assert rss_before is not None
            res.bytes_per_client = (res.server_rss_after_kib - rss_before) * 1024 / n
            res.server_cpu_s = proc_cpu_seconds(server_pid) - (cpu_before or 0.0)
        res.gen_cpu_s = cpu_seconds_self() - gen_before
    finally:
        for c in clients:
            if c.transport is not None:
                c.transport.abort()
    return res


def run_joincheck(kind: str, port: int, n: int, passcode: str = "bench",
                  server_pid: int | None = None, concurrency: int = 200,
                  timeout: float = 180.0, prefix: str = "") -> JoinResult:
    raise_nofile()
    return asyncio.run(_joincheck(kind, port, n, passcode, server_pid, concurrency,
                                  timeout, prefix))


@dataclass
class IdleResult:
    kind: str
    receivers_on: str
    clients: int
    server_rss_before_kib: int
    server_rss_after_kib: int
    bytes_per_client: float


async def _idle(w: Workload) -> IdleResult:
    """Memory per idle member: RSS before and after `w.receivers` members
    join (over TCP or WebSocket) and sit still for a second."""
    loop = asyncio.get_running_loop()
    assert w.server_pid is not None
    before = proc_rss_kib(w.server_pid)
    kind = "ws" if w.receivers_on == "ws" else w.kind
    clients = [Client(kind, f"{w.name_prefix}i{i}", w.passcode, False, lambda c, e: None,
                      w.web_port) for i in range(w.receivers)]
    port = w.web_port if w.receivers_on == "ws" else w.port
    try:
        await connect_all(loop, port, clients, w.concurrency, w.connect_timeout)
        await asyncio.sleep(1.0)
        after = proc_rss_kib(w.server_pid)
    finally:
        for c in clients:
            if c.transport is not None:
                c.transport.abort()
    return IdleResult(w.kind, w.receivers_on, w.receivers, before, after,
                      (after - before) * 1024 / w.receivers)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="One workload against a running server.")
    ap.add_argument("--kind", choices=["ours", "irc"], default="ours")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--passcode", default="bench")
    ap.add_argument("--server-pid", type=int)
    ap.add_argument("-n", "--receivers", type=int, default=100)
    ap.add_argument("-s", "--senders", type=int, default=1)
    ap.add_argument("--mode", choices=["closed", "paced", "joins", "idle"], default="closed")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--rate", type=float, default=50_000)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--sampled", type=int, default=8)
    ap.add_argument("--receivers-on", choices=["tcp", "ws"], default="tcp",
                    help="ws: the receivers join through server.py's WebSocket door")
    ap.add_argument("--web-port", type=int, default=0, help="server.py's -web port")
    a = ap.parse_args(argv)
    if a.mode == "joins":
        out: Any = run_joincheck(a.kind, a.port, a.receivers, a.passcode, a.server_pid)
    elif a.mode == "idle":  # memory per idle member (needs --server-pid)
        raise_nofile()
        out = asyncio.run(_idle(Workload(a.kind, a.port, a.receivers, passcode=a.passcode,
                                         server_pid=a.server_pid, concurrency=64,
                                         receivers_on=a.receivers_on, web_port=a.web_port)))
    else:
        out = run_workload(Workload(a.kind, a.port, a.receivers, a.senders, a.mode, a.window,
                                    a.rate, a.duration, a.warmup, a.sampled, a.procs,
                                    a.passcode, a.server_pid, receivers_on=a.receivers_on,
                                    web_port=a.web_port))
    print(json.dumps(asdict(out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
