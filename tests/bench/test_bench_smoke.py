"""The bench runs end to end on a tiny size against our server (no ngircd, no
apt-get) and writes its JSON. It asserts no timings: the machine is shared."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench_module(name: str) -> Any:
    """A module of bench/ (they import each other by their plain names)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "bench"))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_bench_quick_runs_and_writes_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--servers", "ours",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=170, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # A run this small cannot judge the size targets: it says so, and prints
    # nothing that reads as a failure.
    verdicts = done.stdout[done.stdout.index("\nTARGETS\n"):]
    assert "not judged (too small a run" in verdicts, verdicts
    assert "False" not in verdicts and "MISSED" not in verdicts, verdicts

    # A quick run writes its own file only: latest.json is for real runs.
    assert not (tmp_path / "latest.json").exists()
    [stamped] = tmp_path.glob("*.json")
    assert stamped.name.endswith("-quick.json"), stamped.name
    data = json.loads(stamped.read_text())
    assert set(data) >= {"meta", "runs", "joins", "comparison", "targets"}
    assert data["meta"]["quick"] is True and data["meta"]["servers"] == ["ours"]
    # The server's interpreter is recorded with how it was built.
    assert data["meta"]["server_python"]["path"] == sys.executable
    assert data["meta"]["server_python"]["version"] == sys.version.split()[0]

    runs = data["runs"]
    assert {(r["mode"], r["senders"]) for r in runs} == {
        ("closed", 1), ("closed", 2), ("paced", 1), ("paced", 2)}
    for r in runs:
        assert r["server"] == "ours" and "error" not in r, r
        for key in ("lines_per_s", "p50_us", "p99_us", "connect_join_s", "server_rss_kib",
                    "server_cpu_s", "gen_cpu_pct", "sent", "delivered"):
            assert key in r and r[key] is not None, (key, r)
        # Every receiver got every line, in each sender's order.
        assert r["sent"] > 0
        assert r["delivered"] == r["sent"] * r["receivers"], r
        assert r["lost"] == r["duplicated"] == r["out_of_order"] == 0, r

    (join,) = data["joins"]
    assert join["server"] == "ours" and "error" not in join, join
    assert join["all_joins_delivered"] is True
    assert join["join_lines_received"] == join["join_lines_expected"]
    assert join["bytes_per_client"] is not None

    targets = data["targets"]
    assert targets["ours_no_loss_no_reorder"] is True
    assert targets["many_clients_all_joins_delivered"] is True
    assert targets["throughput_3x_one_sender_at_max_n"] is None  # no ngircd in this run


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_variants_runs_copies_of_server_py_side_by_side(tmp_path: Path) -> None:
    copies = []
    for name in ("one.py", "two.py"):
        copy = tmp_path / name
        copy.write_bytes((ROOT / "server.py").read_bytes())
        copies.append(str(copy))
    # FILE@PYTHON runs a copy on the interpreter named (here the same one).
    copies[1] += f"@{sys.executable}"
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "variants.py"), *copies, "--quick", "-n", "3",
         "-s", "1", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=110, stdin=subprocess.DEVNULL, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [out] = (tmp_path / "out").glob("variants-*.json")
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["one", f"two@{Path(sys.executable).name}"]
    assert [r["server_python"] for r in rows] == [sys.executable, sys.executable]
    for r in rows:
        assert "error" not in r, r
        assert r["sent"] > 0 and r["lost"] == 0 and r["out_of_order"] == 0, r
        assert r["delivered"] == r["sent"] * 3, r


def test_pooled_percentiles_match_the_samples_within_a_bucket() -> None:
    loadgen = bench_module("loadgen")
    runs = [[1_000 * (k % 97 + 1) for k in range(500)], [250_000] * 10 + [40_000] * 490]
    hists = [loadgen.latency_histogram(samples) for samples in runs]
    everything = sorted(ns for samples in runs for ns in samples)
    for q, got in zip((0.5, 0.99), loadgen.pooled_percentiles(hists, (0.5, 0.99)), strict=True):
        exact = everything[int(q * len(everything))] / 1000.0
        assert abs(got - exact) <= 0.01 * exact, (q, got, exact)


def test_each_server_goes_first_in_turn() -> None:
    """Repeated runs of a cell rotate the servers' order, so that none always
    runs first, right after a cell of another kind."""
    run = bench_module("run")
    servers = ["ours", "ours-uvloop", "ngircd"]
    orders = [run.rotated(servers, k) for k in range(4)]
    assert orders == [["ours", "ours-uvloop", "ngircd"], ["ours-uvloop", "ngircd", "ours"],
                      ["ngircd", "ours", "ours-uvloop"], ["ours", "ours-uvloop", "ngircd"]]
    assert run.rotated([], 3) == []


def test_small_room_p99_is_judged_on_every_runs_samples() -> None:
    """The 1.5x latency target in small rooms is judged on the pooled p99 (all
    the repeated runs' samples); a cell run once is judged on its one run."""
    run = bench_module("run")
    grid = run.FULL

    def cell(n: int, median: float, pooled: float | None) -> dict[str, Any]:
        ratio = {"lines_per_s": None, "p99_us": median, "pooled_p99_us": pooled}
        return {"mode": "paced", "receivers": n, "senders": 1, "ratio": ratio}

    judged = "paced_p99_within_1_5x_small_rooms"
    shown = "paced_median_run_p99_within_1_5x_small_rooms"
    t = run.targets([cell(10, 1.7, 1.2), cell(100, 1.0, 1.1)], [], grid)
    assert t[judged] is True and t[shown] is False
    t = run.targets([cell(10, 1.2, 1.6), cell(100, 1.0, 1.1)], [], grid)
    assert t[judged] is False and t[shown] is True
    t = run.targets([cell(10, 1.6, None)], [], grid)  # one run: no pooled figure
    assert t[judged] is False
    t = run.targets([cell(1000, 3.0, 3.0), cell(10, 1.0, 1.4)], [], grid)  # large rooms: shown
    assert t[judged] is True
    assert run.targets([cell(10, 1.7, 1.2)], [], grid, quick=True)[judged] is None
