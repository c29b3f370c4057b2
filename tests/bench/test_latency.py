"""bench/latency.py: slow slices are attributed to what the relay saw, and a smoke run goes end to end.
No speed is asserted."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.latency import Run, analyse

ROOT = Path(__file__).resolve().parents[2]


def line(t: float, *, lag: float = 0.0005, gc: float = 0.0, confirm: float | None = 0.005) -> dict[str, object]:
    return {
        "t": t,
        "worker": 0,
        "loop_lag_max": lag,
        "gc_max": gc,
        "gc_n": 1 if gc else 0,
        "requests": {"n": 10, "max_le": 0.01},
        "wait": {"n": 10, "max_le": 0.0005},
        "confirms": {"n": 10, "max_le": confirm},
        "spool_writes": {"n": 0, "max_le": None},
    }


def test_each_slow_slice_names_what_the_relay_saw() -> None:
    args = argparse.Namespace(slow=0.020)
    run = Run()
    # Requests ending in slices 100 (fast), 101 (slow: loop), 103 (slow: GC), 105 (slow: confirm),
    # 107 (slow: nothing seen). Monotonic time + offset 0 = wall time here.
    for index, latency in ((100, 0.004), (101, 0.030), (103, 0.025), (105, 0.040), (107, 0.050)):
        run.requests.append((index * 0.1 + 0.05 - latency, latency))
    run.requests.append((100.0, 0.003))
    run.confirms = [(10.0, 0.004), (10.1, 0.006)]
    run.phases = [("relay", 10.0, 10.8), ("broker", 10.8, 11.0)]
    run.slices = [
        line(10.05),
        line(10.15, lag=0.018),
        line(10.35, gc=0.012),
        line(10.55, confirm=0.05),
        line(10.75),
        line(10.85),
    ]
    result = analyse(run, args, wall_offset=0.0)
    causes = {s["t"]: s["causes"] for s in result["slow_slices"]}
    assert causes == {
        0.1: ["loop"],
        0.3: ["gc"],
        0.5: ["broker confirms"],
        0.7: ["nothing the relay can see"],
    }
    assert result["slow_slice_causes"] == {"loop": 1, "gc": 1, "broker confirms": 1, "nothing the relay can see": 1}
    assert result["broker_p99_ms"] == pytest.approx(6.0, abs=0.1)
    assert result["relay_p99_ms"] > 40 and not result["within_2ms"]


@pytest.mark.broker
def test_a_smoke_run_writes_its_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.latency", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = tmp_path.glob("latency-*-smoke.json")
    (row,) = json.loads(result.read_text())["runs"]
    assert row["requests"] > 100 and row["broker_confirms"] > 100 and row["failures"] == 0
    assert "| 1 |" in result.with_suffix(".md").read_text()
