#!/usr/bin/env python3
"""Copies of server.py (and ngircd) through the same cells, taking turns.

    python3 bench/variants.py before.py after.py --ngircd          # paced, N=10, S=1 and 4
    python3 bench/variants.py a.py b_uv.py -n 100 --reps 3          # a name ending in
                                                                    # `uv` runs with -uvloop
    python3 bench/variants.py a.py a.py@/usr/bin/python3            # FILE@PYTHON: another
                                                                    # interpreter
    python3 bench/variants.py server.py "server.py -history 100"    # FILE FLAGS: options
                                                                    # for that copy

For trying a change to server.py before it lands: each file is a whole
server.py. Every cell runs on a fresh server with the same method as
bench/run.py (pinning, quiet-wait, retries); the variants take turns within
each repetition, each going first in turn, so slow drifts of the machine
hit all of them alike. It prints each run and then the median per variant,
and writes the rows as JSON (--out). Latency tails on a shared machine vary
from run to run: compare medians over several repetitions, not single runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ircd
import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variants", nargs="*", help="copies of server.py (FILE or FILE@PYTHON)")
    ap.add_argument("--ngircd", action="store_true", help="also run ngircd")
    ap.add_argument("-n", "--receivers", type=int, default=10)
    ap.add_argument("-s", "--senders", default="1,4")
    ap.add_argument("--mode", choices=["paced", "closed"], default="paced")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--uvloop-python", default=sys.executable)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one run, no waiting")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = ap.parse_args(argv)
    entries: list[tuple[str, str, Path | None, str, list[str]]] = []
    # label, kind, copy, interpreter, its options
    for spec in a.variants:
        # FILE@PYTHON runs that copy on another interpreter; words after it are its options
        first, *flags = shlex.split(spec)
        name, _, python = first.partition("@")
        path = Path(name).resolve()
        label = " ".join([path.stem + (f"@{Path(python).name}" if python else ""), *flags])
        entries.append((label, "ours-uvloop" if path.stem.endswith("uv") else "ours", path,
                        python or sys.executable, flags))
    if a.ngircd:
        entries.append(("ngircd", "ngircd", None, sys.executable, []))
    if not entries:
        ap.error("nothing to run: give server.py copies and/or --ngircd")
    cpus = sorted(os.sched_getaffinity(0))
    grid = run.QUICK if a.quick else run.FULL
    reps = 1 if a.quick else a.reps
    args = argparse.Namespace(retries=0 if a.quick else 1, quiet_load=30.0,
                              quiet_wait=0.0 if a.quick else 30.0,
                              server_cpus={cpus[0]} if len(cpus) > 1 else None,
                              ngircd_exe=ircd.ensure_ngircd() if a.ngircd else None,
                              uvloop_python=a.uvloop_python, script=None)
    if len(cpus) > 1:
        os.sched_setaffinity(0, set(cpus[1:]))
    rows: list[dict[str, Any]] = []
    for s in (int(x) for x in a.senders.split(",")):
        for rep in range(reps):
            for label, kind, path, python, flags in run.rotated(entries, rep):
                args.script, args.server_python, args.server_flags = path, python, flags
                row = run.run_cell(kind, a.receivers, s, a.mode, grid, args)
                row.update(variant=label, rep=rep, server_python=args.server_python)
                rows.append(row)
                print(f"{label:>14} N={a.receivers} S={s} run {rep + 1}: "
                      f"p50 {row.get('p50_us') or 0:7.0f} us  "
                      f"p99 {row.get('p99_us') or 0:7.0f} us  "
                      f"{row.get('lines_per_s') or 0:12,.0f} lines/s  "
                      f"server CPU {row.get('server_cpu_pct') or 0:5.1f}%  "
                      f"others {row.get('others_cpu_pct') or 0:4.0f}%  {row.get('error', '')}",
                      flush=True)
    print()
    for s in (int(x) for x in a.senders.split(",")):
        for label, *_ in entries:
            mine = [r for r in rows if r["variant"] == label and r.get("senders") == s
                    and "error" not in r]
            if not mine:
                continue
            p99 = sorted(round(r["p99_us"]) for r in mine)
            p50 = statistics.median(r["p50_us"] for r in mine)
            print(f"{label:>14} S={s}: median p50 {p50:6.0f}"
                  f"  median p99 {statistics.median(p99):6.0f} {p99}"
                  f"  CPU {statistics.median(r['server_cpu_pct'] or 0 for r in mine):5.1f}%"
                  f"  lines/s {statistics.median(r['lines_per_s'] for r in mine):12,.0f}")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"variants-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
