#!/usr/bin/env python3
"""Plot delivered lines per second against N (closed loop) for each server.

    python3 bench/plot.py [bench/results/latest.json] [-o docs/perf-throughput.png]

matplotlib is a bench-only dependency (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LABEL = {"ours": "ours (server.py)", "ours-uvloop": "ours on uvloop", "ngircd": "ngircd"}
STYLE = {"ours": ("tab:blue", "o"), "ours-uvloop": ("tab:green", "s"), "ngircd": ("tab:red", "^")}
DASH = {1: "-", 4: "--"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="?", default=str(HERE / "results" / "latest.json"))
    ap.add_argument("-o", "--out", default=str(HERE.parent / "docs" / "perf-throughput.png"))
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py: needs matplotlib (pip install matplotlib)", file=sys.stderr)
        return 2
    data = json.loads(Path(args.results).read_text())
    series: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in data["runs"]:
        if r.get("mode") != "closed" or "error" in r:
            continue
        series.setdefault((r["server"], r["senders"]), []).append(
            (r["receivers"], r["lines_per_s"]))
    if not series:
        print("plot.py: no closed-loop runs in the results", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for (server, senders), points in sorted(series.items()):
        points.sort()
        color, marker = STYLE.get(server, ("black", "x"))
        ax.plot([p[0] for p in points], [p[1] / 1e6 for p in points], DASH.get(senders, ":"),
                color=color, marker=marker,
                label=f"{LABEL.get(server, server)}, {senders} sender{'s' * (senders > 1)}")
    ax.set_xscale("log")
    ax.set_xlabel("receivers in the room (N)")
    ax.set_ylabel("delivered lines per second (millions)")
    grid = data["meta"].get("grid", {})
    ax.set_title(f"Closed loop, {grid.get('window', '?')} lines in flight per sender; "
                 f"{data['meta'].get('cpus', '?')}-core machine")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
