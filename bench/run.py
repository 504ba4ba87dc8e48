#!/usr/bin/env python3
"""Run our server and ngircd through the same grid, side by side.

    python3 bench/run.py                    # the full grid (about 25 minutes)
    python3 bench/run.py --quick            # tiny sizes, a few seconds
    python3 bench/run.py --servers ours     # our server only (no apt-get needed)
    python3 bench/run.py --uvloop           # also our server on uvloop, if installed

Grid: receivers N = 10, 100, 1000; senders S = 1 and 4; a closed loop (at
most W lines per sender in flight, a line counting as delivered when every
receiver has it) for throughput and a paced run (a fixed total delivery rate)
for latency. Then 10,000 clients in one room at once: every join notice must
reach everyone who joined before, and the server's memory per idle client is
(RSS after - RSS before) / clients. Each cell starts a fresh server.

Prints tables with ratios (ours / ngircd) and writes JSON to
bench/results/<timestamp>.json and bench/results/latest.json (a --quick run:
bench/results/<timestamp>-quick.json only).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import ircd  # noqa: E402
import loadgen  # noqa: E402

PASSCODE = "bench"


BUDGET_OFF = ["-line-rate", "0", "-byte-rate", "0"]


def budget_off(script: Path) -> list[str]:
    """The flags that turn off each member's budget (the flood limit), for a
    server.py that has one: the bench measures raw speed, and one sender here
    sends thousands of lines a second, which the defaults slow to ten."""
    return BUDGET_OFF if b"-line-rate" in script.read_bytes() else []


class OurServer(ircd.ServerProcess):
    """server.py on a port the OS chooses, its stdout (every room line) to a file."""

    kind = "ours"

    def __init__(self, python: str = sys.executable, uvloop: bool = False,
                 cpus: set[int] | None = None, script: Path | None = None,
                 flags: Sequence[str] = ()) -> None:
        super().__init__(cpus)
        # The server runs in a folder of its own, so a relative path is made
        # absolute (abspath, not resolve: a venv's python is a symlink).
        self.python = os.path.abspath(python) if os.sep in python else python
        self.uvloop = uvloop
        self.script = script or ROOT / "server.py"
        self.flags = list(flags)  # more of server.py's options (relative paths: its folder)

    def start(self) -> OurServer:
        self.dir = ircd.scratch_dir("bench-ours-")
        folder = Path(self.dir.name)
        cmd = [self.python, str(self.script), "-start", "-port", "0", "-passcode", PASSCODE]
        cmd += budget_off(self.script) + self.flags
        if self.uvloop:
            cmd.append("-uvloop")
        out, err = self.open_file("stdout"), self.open_file("stderr")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=err, start_new_session=True, cwd=folder,
                                     preexec_fn=ircd.pin(self.cpus))
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server.py exited with status {self.proc.returncode}: "
                                       + self.stderr_tail())
                first = (folder / "stdout").read_bytes().split(b"\n", 1)
                if len(first) > 1:
                    words = first[0].split()
                    if first[0].startswith(b"Server started on port ") and len(words) > 4:
                        self.port = int(words[4].rstrip(b"."))
                        ircd.wait_accepting(self.port, self.proc, 5)
                        return self
                    raise RuntimeError(f"server.py printed {first[0]!r} first")
                time.sleep(0.02)
            raise RuntimeError("server.py did not say it started within 15 s")
        except BaseException:
            self.stop()
            raise

    def stderr_tail(self) -> str:
        return self.file_tail("stderr", 5, sep=" | ")


@dataclasses.dataclass
class Grid:
    receivers: list[int]
    senders: list[int]
    modes: list[str]
    window: int
    rate: float
    duration: float
    warmup: float
    joins: int  # clients at once, our server only, `join_burst` logins in progress
    joins_both: int  # clients at once, every server, `join_steady` logins in progress
    procs: int
    sampled: int  # receivers that parse every line (closed loop)
    paced_sampled: int = 32  # ... in the paced runs, where parsing costs little
    paced_reps: int = 5  # paced runs per cell, servers taking turns; the median p99 is kept
    # ... and where a run is short (N <= small_n) more of them: a small room's
    # p99 is a few hundred microseconds, so the machine's noise is largest
    # there (9 until 2026-11-30 11:05; docs/PERFORMANCE.md, "How many runs")
    paced_reps_small: int = 15
    small_n: int = 100
    paced_duration: float = 3.0
    # ... and measured for longer: a paced run's p99 is its worst 1 % of the
    # time, 30 ms of a 3-second run, so a few of the machine's own stalls
    # set it (3.0 until 2026-12-02 18:20; docs/PERFORMANCE.md, "Latency tails")
    paced_duration_small: float = 6.0
    join_burst: int = 200
    join_steady: int = 8  # ngircd listens with a backlog of 10: more drops SYNs


FULL = Grid(receivers=[10, 100, 1000], senders=[1, 4], modes=["closed", "paced"], window=64,
            rate=50_000, duration=4.0, warmup=1.0, joins=10_000, joins_both=2_000, procs=1,
            sampled=8)
QUICK = Grid(receivers=[5], senders=[1, 2], modes=["closed", "paced"], window=16,
             rate=5_000, duration=0.4, warmup=0.2, joins=0, joins_both=40, procs=1, sampled=3,
             paced_sampled=3, paced_reps=1, paced_reps_small=1, paced_duration=0.4,
             paced_duration_small=0.4)

UVLOOP_BURST = 2000  # clients in uvloop's many-clients burst (see run_grid)

LABEL = {"ours": "ours", "ours-uvloop": "ours+uvloop", "ngircd": "ngircd"}


def make_server(name: str, args: argparse.Namespace) -> Any:
    flags = getattr(args, "server_flags", ())  # bench/variants.py gives each copy its own
    if name == "ours":
        return OurServer(python=args.server_python, cpus=args.server_cpus, script=args.script,
                         flags=flags)
    if name == "ours-uvloop":
        return OurServer(python=args.uvloop_python, uvloop=True, cpus=args.server_cpus,
                         script=args.script)
    if name == "ngircd":
        return ircd.Ngircd(args.ngircd_exe, cpus=args.server_cpus)
    raise ValueError(name)


def wait_quiet(limit_pct: float, max_wait: float) -> float:
    """Wait (at most max_wait s) until the machine's other load is under
    limit_pct of one CPU over a second; return the last load seen (%)."""
    deadline = time.monotonic() + max_wait
    said = False
    while True:
        b0, _ = loadgen.machine_cpu_seconds()
        t0 = time.monotonic()
        time.sleep(1.0)
        b1, _ = loadgen.machine_cpu_seconds()
        busy = 100 * (b1 - b0) / (time.monotonic() - t0)
        if busy <= limit_pct or time.monotonic() >= deadline:
            if said:
                log(f"  ... machine load now {busy:.0f}%")
            return busy
        if not said:
            log(f"  waiting for the machine to quieten (other load {busy:.0f}% of a CPU) ...")
            said = True


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_cell(name: str, n: int, s: int, mode: str, grid: Grid,
             args: argparse.Namespace) -> dict[str, Any]:
    """One cell on a fresh server. The machine is shared: when other processes
    used more than --quiet-load % of a CPU during the measured window, the
    cell is run again (at most --retries times) and the quietest try kept."""
    tries: list[dict[str, Any]] = []
    for _ in range(1 + max(0, args.retries)):
        server = make_server(name, args)
        paced = mode == "paced"
        w = loadgen.Workload(
            kind="ours" if name.startswith("ours") else "irc", port=0,
            receivers=n, senders=s, mode=mode, window=grid.window, rate=grid.rate,
            duration=((grid.paced_duration_small if n <= grid.small_n else grid.paced_duration)
                      if paced else grid.duration),
            warmup=min(grid.warmup, 0.5) if paced else grid.warmup,
            sampled=grid.paced_sampled if paced else grid.sampled,
            procs=grid.procs, passcode=PASSCODE)
        row: dict[str, Any] = {"server": name}
        if args.quiet_wait > 0:
            row["load_before_pct"] = round(wait_quiet(args.quiet_load, args.quiet_wait), 1)
        t = time.monotonic()
        try:
            with server:
                w.port, w.server_pid = server.port, server.pid
                row["server_rss_idle_kib"] = loadgen.proc_rss_kib(server.pid)
                res = loadgen.run_workload(w)
                row.update(dataclasses.asdict(res))
        except (loadgen.BenchError, RuntimeError, OSError) as exc:
            row.update(kind=w.kind, mode=mode, receivers=n, senders=s,
                       error=f"{type(exc).__name__}: {exc}")
        row["wall_s"] = round(time.monotonic() - t, 2)
        tries.append(row)
        if "error" in row or row["others_cpu_pct"] <= args.quiet_load:
            break
        log(f"  {LABEL[name]:<11} N={n:<5} S={s} {mode:<6} (other load "
            f"{row['others_cpu_pct']:.0f}% of a CPU: again)")
    ok = [r for r in tries if "error" not in r]
    best = min(ok, key=lambda r: r["others_cpu_pct"]) if ok else tries[-1]
    best["tries"] = [{k: r.get(k) for k in ("others_cpu_pct", "lines_per_s", "p50_us", "p99_us",
                                            "error")} for r in tries]
    return best


def median_run(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one cell, the one with the median p99 (all are kept
    in its `reps`)."""
    if len(rows) == 1:
        rows[0].pop("latency_hist", None)
        return rows[0]
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r["p99_us"] or 0.0)
    best = dict(ok[(len(ok) - 1) // 2]) if ok else dict(rows[-1])
    best["reps"] = [{k: r.get(k) for k in ("p50_us", "p99_us", "p999_us", "lines_per_s",
                                           "others_cpu_pct", "lost", "out_of_order", "error")}
                    for r in rows]
    if ok:
        for k in ("lost", "duplicated", "out_of_order"):  # count every rep's
            best[k] = sum(r[k] for r in ok)
        hists = [r["latency_hist"] for r in ok if r.get("latency_hist")]
        if len(hists) == len(ok):  # every run's samples together: a steadier tail
            best["pooled_p50_us"], best["pooled_p99_us"] = loadgen.pooled_percentiles(
                hists, (0.50, 0.99))
    best.pop("latency_hist", None)  # bulky; the pooled figures stand for them
    return best


def rotated(items: list[Any], k: int) -> list[Any]:
    """`items` starting from its k-th (modulo its length): in repeated runs,
    no server always runs first, right after a different kind of cell."""
    k %= len(items) or 1
    return items[k:] + items[:k]


def run_grid(servers: list[str], grid: Grid, args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    joins: list[dict[str, Any]] = []
    for n in grid.receivers:
        for s in grid.senders:
            for mode in grid.modes:
                reps = 1 if mode != "paced" else (
                    grid.paced_reps_small if n <= grid.small_n else grid.paced_reps)
                done: dict[str, list[dict[str, Any]]] = {name: [] for name in servers}
                for k in range(reps):  # the servers take turns, each going first in turn
                    for name in rotated(servers, k):
                        row = run_cell(name, n, s, mode, grid, args)
                        done[name].append(row)
                        tag = f" ({k + 1}/{reps})" if reps > 1 else ""
                        log(f"  {LABEL[name]:<11} N={n:<5} S={s} {mode:<6}{tag} " + summary(row))
                for name in servers:
                    runs.append(median_run(done[name]))
    plan = [(name, grid.joins_both, grid.join_steady) for name in servers if grid.joins_both]
    # uvloop gets a smaller burst: libuv accepts one connection per pass of its
    # loop, so the logins, and the join notices they cause, come one per pass,
    # and each pass writes to every member (docs/PERFORMANCE.md). 10,000 took
    # minutes that way.
    plan += [(name, min(grid.joins, UVLOOP_BURST) if name == "ours-uvloop" else grid.joins,
              grid.join_burst) for name in servers if grid.joins and name.startswith("ours")]
    for name, clients, concurrency in plan:
        server = make_server(name, args)
        row = {"server": name}
        if args.quiet_wait > 0:
            row["load_before_pct"] = round(wait_quiet(args.quiet_load, args.quiet_wait), 1)
        t = time.monotonic()
        try:
            with server:
                jr = loadgen.run_joincheck("ours" if name.startswith("ours") else "irc",
                                           server.port, clients, PASSCODE, server.pid,
                                           concurrency=concurrency, timeout=args.join_timeout)
                row.update(dataclasses.asdict(jr))
        except (loadgen.BenchError, RuntimeError, OSError) as exc:
            row.update(clients=clients, concurrency=concurrency,
                       error=f"{type(exc).__name__}: {exc}")
        row["wall_s"] = round(time.monotonic() - t, 2)
        joins.append(row)
        log(f"  {LABEL[name]:<11} {clients} clients at once ({concurrency} logging in at a time): "
            + (row.get("error") or
               f"all joins delivered={row['all_joins_delivered']} "
               f"in {row['all_joins_s']:.1f} s, "
               f"{(row['bytes_per_client'] or 0) / 1024:.2f} KiB/client ({row['wall_s']} s)"))
    return {"runs": runs, "joins": joins}


def summary(row: dict[str, Any]) -> str:
    if "error" in row:
        return "ERROR " + str(row["error"])
    p99 = row.get("p99_us")
    return (f"{row['lines_per_s']:>12,.0f} lines/s  p99 {p99 or 0:>9,.0f} us  "
            f"srv {row.get('server_cpu_pct') or 0:>3.0f}%  gen {row['gen_cpu_pct']:>3.0f}%  "
            f"others {row['others_cpu_pct']:>3.0f}%  "
            f"lost {row['lost']} ooo {row['out_of_order']}  ({row['wall_s']} s)")


# -- the report ---------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(x: float | None, spec: str = ",.0f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def compare(data: dict[str, Any], servers: list[str]) -> list[dict[str, Any]]:
    """One row per grid cell, with each server's figures and ours/ngircd ratios."""
    cells: dict[tuple[int, int, str], dict[str, Any]] = {}
    for r in data["runs"]:
        key = (r["receivers"], r["senders"], r["mode"])
        cells.setdefault(key, {"receivers": key[0], "senders": key[1], "mode": key[2]})
        cells[key][r["server"]] = r
    out = []
    for key in sorted(cells, key=lambda k: (k[2], k[0], k[1])):
        c = cells[key]
        o, g = c.get("ours", {}), c.get("ngircd", {})
        c["ratio"] = {
            "lines_per_s": ratio(o.get("lines_per_s"), g.get("lines_per_s")),
            "p50_us": ratio(o.get("p50_us"), g.get("p50_us")),
            "p99_us": ratio(o.get("p99_us"), g.get("p99_us")),
            "pooled_p99_us": ratio(o.get("pooled_p99_us"), g.get("pooled_p99_us")),
            "connect_join_s": ratio(o.get("connect_join_s"), g.get("connect_join_s")),
            "server_rss_kib": ratio(o.get("server_rss_kib"), g.get("server_rss_kib")),
            "server_cpu_s": ratio(o.get("server_cpu_s"), g.get("server_cpu_s")),
        }
        out.append(c)
    return out


def render(head: list[str], rows: list[list[str]]) -> list[str]:
    """Right-aligned columns, as wide as their widest cell."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    out = ["  ".join(c.rjust(w) for c, w in zip(head, widths, strict=True))]
    out.append("-" * len(out[0]))
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return out


def table(cmp: list[dict[str, Any]], servers: list[str]) -> str:
    both = "ours" in servers and "ngircd" in servers
    cols = [s for s in ("ours", "ours-uvloop", "ngircd") if s in servers]
    short = {"ours": "ours", "ours-uvloop": "uvloop", "ngircd": "ngircd"}
    lines: list[str] = []
    for mode, title in (("closed", "CLOSED LOOP (throughput)"), ("paced", "PACED (latency)")):
        cells = [c for c in cmp if c["mode"] == mode]
        if not cells:
            continue
        head = ["N", "S"]
        head += [f"{short[s]} lines/s" for s in cols] + (["ratio"] if both else [])
        head += [f"{short[s]} p50 us" for s in cols] + [f"{short[s]} p99 us" for s in cols]
        head += ["p99 ratio"] if both else []
        pooled = mode == "paced" and any("pooled_p99_us" in (c.get(s) or {})
                                         for c in cells for s in cols)
        if pooled:  # every run's samples together
            head += [f"{short[s]} pooled p99" for s in cols] + (["pooled ratio"] if both else [])
        head += [f"{short[s]} join s" for s in cols] + [f"{short[s]} RSS MiB" for s in cols]
        head += [f"{short[s]} CPU s (%)" for s in cols]
        head += ["gen CPU %", "others %", "lost/dup/ooo"]
        rows = []
        for c in cells:
            def get(s: str, k: str, c: dict[str, Any] = c) -> Any:
                r = c.get(s) or {}
                return None if "error" in r else r.get(k)

            row = [str(c["receivers"]), str(c["senders"])]
            row += [("ERROR" if "error" in (c.get(s) or {}) else fmt(get(s, "lines_per_s")))
                    for s in cols]
            row += [fmt(c["ratio"]["lines_per_s"], ".2f")] if both else []
            row += [fmt(get(s, "p50_us")) for s in cols] + [fmt(get(s, "p99_us")) for s in cols]
            row += [fmt(c["ratio"]["p99_us"], ".2f")] if both else []
            if pooled:
                row += [fmt(get(s, "pooled_p99_us")) for s in cols]
                row += [fmt(c["ratio"]["pooled_p99_us"], ".2f")] if both else []
            row += [fmt(get(s, "connect_join_s"), ".2f") for s in cols]
            row += [fmt(None if get(s, "server_rss_kib") is None
                        else get(s, "server_rss_kib") / 1024, ".1f") for s in cols]
            row += [f"{fmt(get(s, 'server_cpu_s'), '.2f')} ({fmt(get(s, 'server_cpu_pct'))})"
                    for s in cols]
            row.append("/".join(fmt(get(s, "gen_cpu_pct")) for s in cols))
            row.append("/".join(fmt(get(s, "others_cpu_pct")) for s in cols))
            row.append(" ".join(f"{get(s, 'lost')}/{get(s, 'duplicated')}/{get(s, 'out_of_order')}"
                                for s in cols))
            rows.append(row)
        lines += ["", title, *render(head, rows)]
    return "\n".join(lines)


def join_table(joins: list[dict[str, Any]]) -> str:
    if not joins:
        return ""
    head = ["server", "clients", "logging in at once", "all in, s", "all joins, s", "join lines",
            "every join delivered", "RSS before MiB", "RSS after MiB", "per client KiB",
            "server CPU s"]
    rows = []
    for j in joins:
        if "error" in j:
            rows.append([LABEL[j["server"]], str(j["clients"]), str(j.get("concurrency", "?")),
                         "ERROR: " + j["error"], *[""] * 7])
            continue
        rows.append([
            LABEL[j["server"]], str(j["clients"]), str(j["concurrency"]),
            fmt(j["connect_join_s"], ".2f"), fmt(j["all_joins_s"], ".2f"),
            f"{j['join_lines_received']}/{j['join_lines_expected']}",
            f"{j['all_joins_delivered']} ({j['clients_checked_ok']} ok)",
            fmt((j["server_rss_before_kib"] or 0) / 1024, ".1f"),
            fmt((j["server_rss_after_kib"] or 0) / 1024, ".1f"),
            fmt(None if j["bytes_per_client"] is None else j["bytes_per_client"] / 1024, ".2f"),
            fmt(j["server_cpu_s"], ".2f")])
    return "\n".join(["", "MANY CLIENTS AT ONCE (join notices, memory per idle client)",
                      *render(head, rows)])


# Memory per idle client is (RSS after - RSS before) / clients: with few clients
# the interpreter's own growth dominates, so the 4 KiB target is judged only
# from this many clients at once (the full grid has 10,000).
MEMORY_JUDGED_FROM = 1000
# Paced p99 is held to ngircd's in rooms of at most this many receivers.
SMALL_ROOM = 100


def targets(cmp: list[dict[str, Any]], joins: list[dict[str, Any]], grid: Grid,
            quick: bool = False) -> dict[str, Any]:
    """The performance targets, judged on this run (None: not judged in this run,
    because it did not measure it or was too small to tell: a --quick run
    judges only that every line and every join notice arrived)."""
    big = max(grid.receivers)
    thr = [c["ratio"]["lines_per_s"] for c in cmp
           if c["mode"] == "closed" and c["receivers"] == big]
    thr_one = [c["ratio"]["lines_per_s"] for c in cmp
               if c["mode"] == "closed" and c["receivers"] == big and c["senders"] == 1]
    p99 = [c["ratio"]["p99_us"] for c in cmp if c["mode"] == "paced"]
    # The p99 target is judged on every sample of a cell's repeated runs
    # together (pooled): the 99th percentile of all the traffic the cell
    # measured. One run's p99 is its worst 1 % of the time, which the
    # machine's own stalls decide (the "wake-up lateness" in the report);
    # the run with the median p99 is shown beside it. A cell run once has
    # no pooled figure and is judged on its one run.
    small = [c for c in cmp if c["mode"] == "paced" and c["receivers"] <= SMALL_ROOM]
    p99_small = [c["ratio"]["pooled_p99_us"] if c["ratio"].get("pooled_p99_us") is not None
                 else c["ratio"]["p99_us"] for c in small]
    p99_small_median = [c["ratio"]["p99_us"] for c in small]
    ours_runs = [c["ours"] for c in cmp if "ours" in c]
    big_n = grid.joins or grid.joins_both
    j = next((x for x in joins if x["server"] == "ours" and x.get("clients") == big_n
              and "error" not in x), None)
    t: dict[str, Any] = {
        "throughput_ratio_at_max_n": thr,
        "throughput_3x_one_sender_at_max_n": (
            all(r is not None and r >= 3 for r in thr_one)
            if thr_one and None not in thr_one and not quick else None),
        "paced_p99_ratios": p99,
        "paced_pooled_p99_ratios": [c["ratio"]["pooled_p99_us"] for c in cmp
                                    if c["mode"] == "paced"],
        "paced_p99_within_1_5x_small_rooms": (
            all(r is not None and r <= 1.5 for r in p99_small)
            if p99_small and None not in p99_small and not quick else None),
        "paced_median_run_p99_within_1_5x_small_rooms": (
            all(r is not None and r <= 1.5 for r in p99_small_median)
            if p99_small_median and None not in p99_small_median and not quick else None),
        "ours_no_loss_no_reorder": (all("error" not in r and r["lost"] == 0
                                        and r["duplicated"] == 0 and r["out_of_order"] == 0
                                        for r in ours_runs) if ours_runs else None),
        "many_clients": big_n,
        "many_clients_all_joins_delivered": j["all_joins_delivered"] if j else None,
        "bytes_per_idle_client": j["bytes_per_client"] if j else None,
        "bytes_per_idle_client_at_most_4KiB": (j["bytes_per_client"] <= 4096
                                               if j and j["bytes_per_client"] is not None
                                               and big_n >= MEMORY_JUDGED_FROM and not quick
                                               else None),
    }
    return t


def targets_text(t: dict[str, Any], servers: list[str], quick: bool = False) -> str:
    """The targets in words: met, MISSED, or not judged and why (a quick run
    is too small to judge most of them, which is no failure)."""
    no_ngircd = "not judged (no ngircd in this run)"
    too_small = "not judged (too small a run: --quick)"
    unjudged = no_ngircd if "ngircd" not in servers else too_small if quick else "not measured"

    def verdict(value: bool | None, why_not: str) -> str:
        return why_not if value is None else ("met" if value else "MISSED")

    def ratios(values: list[float | None]) -> str:
        if not values or all(v is None for v in values):
            return ("not measured (no ngircd in this run)" if "ngircd" not in servers
                    else "not measured")
        return ", ".join("-" if v is None else f"{v:.2f}" for v in values)

    per_client = t["bytes_per_idle_client"]
    n = t["many_clients"]
    small = (too_small if quick else f"not judged (too small a run: {n:,} clients at once; "
             f"judged from {MEMORY_JUDGED_FROM:,})")
    rows = [
        ("throughput at the largest N, ours / ngircd", ratios(t["throughput_ratio_at_max_n"])),
        ("  at least 3x with one sender", verdict(t["throughput_3x_one_sender_at_max_n"],
                                                   unjudged)),
        ("paced p99 of every run's samples, ours / ngircd",
         ratios(t["paced_pooled_p99_ratios"])),
        (f"  at most 1.5x where N <= {SMALL_ROOM}",
         verdict(t["paced_p99_within_1_5x_small_rooms"], unjudged)),
        ("paced p99 of the median run, ours / ngircd", ratios(t["paced_p99_ratios"])),
        ("ours: no loss, duplicate or reordering", verdict(t["ours_no_loss_no_reorder"],
                                                           "not measured")),
        (f"{n:,} clients at once: every join notice delivered",
         verdict(t["many_clients_all_joins_delivered"], "not measured")),
        ("memory per idle client", "not measured" if per_client is None
         else f"{per_client / 1024:.2f} KiB"),
        ("  at most 4 KiB", verdict(t["bytes_per_idle_client_at_most_4KiB"],
                                    small if per_client is not None else "not measured")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "TARGETS", *(f"  {k:<{width}}  {v}" for k, v in rows)])


def snapshot(folder: Path) -> Path:
    """Copy server.py (and chatroom_ext, for -uvloop) into `folder`: every cell
    of a run then runs the same code, even if the work tree changes meanwhile."""
    shutil.copy2(ROOT / "server.py", folder / "server.py")
    if (ROOT / "chatroom_ext").is_dir():
        shutil.copytree(ROOT / "chatroom_ext", folder / "chatroom_ext",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return folder / "server.py"


def interpreter(python: str) -> dict[str, str]:
    """Which Python a server runs on: its path, version and configure options.
    The build matters (docs/PERFORMANCE.md, "The interpreter"), but the options
    do not always show it: Debian keeps its PGO and LTO flags out of them."""
    code = ("import sys, sysconfig; print(sys.version.split()[0]); "
            "print(sysconfig.get_config_var('CONFIG_ARGS') or '')")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True,
                             timeout=30).stdout.split("\n", 1)
    except (OSError, subprocess.SubprocessError):
        return {"path": python}
    return {"path": python, "version": out[0],
            "config_args": out[1].strip() if len(out) > 1 else ""}


LATENESS_CODE = """
import json, sys, time
seconds, nap = float(sys.argv[1]), 0.0005
late = []
end = time.perf_counter() + seconds
while time.perf_counter() < end:
    t = time.perf_counter()
    time.sleep(nap)
    late.append(time.perf_counter() - t - nap)
late.sort()
print(json.dumps({f"p{q:g}_us": round(late[min(len(late) - 1, int(q / 100 * len(late)))] * 1e6)
                  for q in (50, 99, 99.9)} | {"max_us": round(late[-1] * 1e6)}))
"""


def wakeup_lateness(cpus: set[int] | None, seconds: float = 5.0) -> dict[str, Any]:
    """How late the machine wakes a process that sleeps 0.5 ms, again and
    again for `seconds`, on the servers' CPU with nothing else running: the
    floor under any latency measured here. On a quiet machine it is tens of
    microseconds; a shared virtual machine can be milliseconds late at p99,
    and then so is every server's p99."""
    try:
        out = subprocess.run([sys.executable, "-c", LATENESS_CODE, str(seconds)],
                             capture_output=True, text=True, timeout=seconds + 30,
                             preexec_fn=ircd.pin(cpus))
        return dict(json.loads(out.stdout))
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def lateness_text(before: dict[str, Any], after: dict[str, Any]) -> str:
    def one(x: dict[str, Any]) -> str:
        if "error" in x:
            return "not measured"
        return (f"p50 {x['p50_us']:,} us, p99 {x['p99_us']:,} us, p99.9 {x['p99.9_us']:,} us, "
                f"max {x['max_us']:,} us")
    return ("\nTHE MACHINE: how late a 0.5 ms sleep wakes on the servers' CPU\n"
            f"  before the grid  {one(before)}\n  after the grid   {one(after)}")


def meta(args: argparse.Namespace, grid: Grid, servers: list[str]) -> dict[str, Any]:
    server_py = args.script.read_bytes()
    m: dict[str, Any] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": args.quick,
        "servers": servers,
        "grid": dataclasses.asdict(grid),
        "python": sys.version.split()[0],
        "server_python": interpreter(args.server_python),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "server_py_sha256": hashlib.sha256(server_py).hexdigest(),
        "nofile_limit": loadgen.raise_nofile(),
    }
    try:
        m["git_head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                                       capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    if "ngircd" in servers and args.ngircd_exe:
        m["ngircd"] = ircd.ngircd_version(args.ngircd_exe)
    try:
        m["loadavg_before"] = os.getloadavg()
    except OSError:
        pass
    return m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few seconds")
    ap.add_argument("--servers", default="ours,ngircd", help="comma-separated: ours, ngircd")
    ap.add_argument("--uvloop", action="store_true",
                    help="also run our server on uvloop, if the interpreter has it")
    ap.add_argument("--server-python", default=sys.executable,
                    help="interpreter that runs our server on the default loop "
                         "(default: this one)")
    ap.add_argument("--uvloop-python", default=sys.executable,
                    help="interpreter with uvloop installed (default: this one)")
    ap.add_argument("--receivers", help="override N, e.g. 10,100,1000")
    ap.add_argument("--senders", help="override S, e.g. 1,4")
    ap.add_argument("--modes", help="override modes: closed,paced")
    ap.add_argument("--window", type=int, help="closed loop: lines in flight per sender")
    ap.add_argument("--rate", type=float, help="paced: deliveries per second")
    ap.add_argument("--duration", type=float, help="seconds measured per cell")
    ap.add_argument("--joins", type=int,
                    help="clients at once for our server's join check (0: skip)")
    ap.add_argument("--joins-both", type=int,
                    help="clients at once for every server's join check (0: skip)")
    ap.add_argument("--procs", type=int, help="receiver worker processes")
    ap.add_argument("--join-timeout", type=float, default=240.0)
    ap.add_argument("--quiet-load", type=float, default=30.0,
                    help="before each cell, wait until other load is under this %% of a CPU")
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="... for at most this many seconds (default 60; 0 with --quick)")
    ap.add_argument("--retries", type=int, default=None,
                    help="re-runs of a cell disturbed by other load (default 2; 0 with --quick)")
    ap.add_argument("--no-pin", action="store_true",
                    help="don't pin the server to CPU 0 and the generator to the others")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = ap.parse_args(argv)

    grid = dataclasses.replace(QUICK if args.quick else FULL)
    for name, conv in (("receivers", int), ("senders", int)):
        v = getattr(args, name)
        if v:
            setattr(grid, name, [conv(x) for x in v.split(",") if x])
    if args.modes:
        grid.modes = [m for m in args.modes.split(",") if m]
    for name in ("window", "rate", "duration", "procs"):
        if getattr(args, name) is not None:
            setattr(grid, name, getattr(args, name))
    if args.joins is not None:
        grid.joins = args.joins
    if args.joins_both is not None:
        grid.joins_both = args.joins_both

    if args.quiet_wait is None:
        args.quiet_wait = 0.0 if args.quick else 60.0
    if args.retries is None:
        args.retries = 0 if args.quick else 2
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    bad = [s for s in servers if s not in ("ours", "ngircd")]
    if bad:
        ap.error(f"unknown server(s): {', '.join(bad)}")
    if args.uvloop:
        probe = subprocess.run([args.uvloop_python, "-c", "import uvloop"],
                               capture_output=True, timeout=30)
        if probe.returncode == 0:
            servers.insert(servers.index("ours") + 1 if "ours" in servers else 0, "ours-uvloop")
        else:
            log(f"bench: --uvloop: {args.uvloop_python} cannot import uvloop; skipped")
    args.ngircd_exe = None
    if "ngircd" in servers:
        try:
            args.ngircd_exe = ircd.ensure_ngircd()
        except RuntimeError as exc:
            log(f"bench: {exc}")
            return 1

    loadgen.raise_nofile()
    code_dir = ircd.scratch_dir("bench-code-")
    args.script = snapshot(Path(code_dir.name))
    # Both servers are single-threaded: each gets CPU 0 to itself, and the
    # generator (this process and its workers) the other CPUs, so neither
    # waits for the other's CPU.
    args.server_cpus = None
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not args.no_pin and len(cpus) >= 2:
        args.server_cpus = {cpus[0]}
        os.sched_setaffinity(0, set(cpus[1:]))
    info = meta(args, grid, servers)
    info["server_cpus"] = sorted(args.server_cpus) if args.server_cpus else None
    info["generator_cpus"] = sorted(os.sched_getaffinity(0)) if cpus else None
    log(f"bench: our server runs with {' '.join(BUDGET_OFF)} (no per-member flood limit)")
    log(f"bench: servers {', '.join(LABEL[s] for s in servers)}; N={grid.receivers} "
        f"S={grid.senders} modes={grid.modes} W={grid.window} rate={grid.rate:,.0f}/s "
        f"{grid.duration}s per cell; {grid.joins_both} clients at once on each server, "
        f"{grid.joins} on ours")
    t0 = time.monotonic()
    lateness_seconds = 1.0 if args.quick else 5.0
    info["wakeup_lateness_before"] = wakeup_lateness(args.server_cpus, lateness_seconds)
    try:
        data = run_grid(servers, grid, args)
    finally:
        code_dir.cleanup()
    info["wakeup_lateness_after"] = wakeup_lateness(args.server_cpus, lateness_seconds)
    info["wall_s"] = round(time.monotonic() - t0, 1)
    now = hashlib.sha256((ROOT / "server.py").read_bytes()).hexdigest()
    if now != info["server_py_sha256"]:
        info["note"] = ("server.py changed in the work tree during the run; "
                        "the run used the copy taken at its start")
    cmp = compare(data, servers)
    result = {"meta": info, "runs": data["runs"], "joins": data["joins"], "comparison": cmp,
              "targets": targets(cmp, data["joins"], grid, args.quick)}

    print(f"W = {grid.window} lines in flight per sender (closed); paced at "
          f"{grid.rate:,.0f} deliveries/s; ratio = ours / ngircd")
    print(table(cmp, servers))
    print(join_table(data["joins"]))
    print(targets_text(result["targets"], servers, args.quick))
    print(lateness_text(info["wakeup_lateness_before"], info["wakeup_lateness_after"]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    text = json.dumps(result, indent=1, default=str)
    # A quick run (a check that the bench works) leaves latest.json, which
    # the plot and docs/PERFORMANCE.md are drawn from, to real runs.
    paths = [out / f"{stamp}-quick.json"] if args.quick else [out / f"{stamp}.json",
                                                               out / "latest.json"]
    for path in paths:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    print(f"\nwrote {paths[-1]} ({info['wall_s']} s)")
    errors = [r for r in data["runs"] + data["joins"] if "error" in r]
    return 1 if errors else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
