"""The process's own waits (relay/runtime.py): a blocked loop and a collection are seen and timed."""

from __future__ import annotations

import asyncio
import gc
import time
from pathlib import Path

import orjson
from prometheus_client import CollectorRegistry

from relay.metrics import Metrics
from relay.runtime import GcPauses, LoopLag, SliceLog


async def test_a_blocked_loop_is_measured_as_lag() -> None:
    metrics = Metrics(CollectorRegistry())
    lag = LoopLag(metrics.loop_lag_seconds, interval=0.005)
    lag.start()
    try:
        await asyncio.sleep(0.05)
        quiet = lag.take_max()
        time.sleep(0.08)  # the loop can run nothing for 80 ms
        await asyncio.sleep(0.02)
        blocked = lag.take_max()
    finally:
        lag.stop()
    assert quiet < 0.03
    assert blocked >= 0.06
    count = metrics.registry.get_sample_value("relay_event_loop_lag_seconds_count") or 0
    slow = metrics.registry.get_sample_value("relay_event_loop_lag_seconds_bucket", {"le": "0.05"}) or 0
    assert count >= 5 and slow < count  # at least one sample above 50 ms
    assert lag.take_max() < blocked  # taken: the slice's worst starts again


def test_each_collection_is_timed_by_generation() -> None:
    metrics = Metrics(CollectorRegistry())
    pauses = GcPauses(metrics.gc_pause_seconds)
    pauses.start()
    try:
        pauses.start()  # idempotent: one callback, one observation per collection
        gc.collect(0)
        gc.collect(2)
    finally:
        pauses.stop()
    gc.collect(2)  # after stop(): not seen

    def count(generation: str) -> float:
        return metrics.registry.get_sample_value("relay_gc_pause_seconds_count", {"generation": generation}) or 0

    assert count("0") >= 1 and count("2") == 1
    assert pauses.collections == count("0") + count("1") + count("2")
    assert 0 < pauses.take_max() < 1


async def test_the_slice_log_says_what_each_slice_waited_on(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    lag, pauses = LoopLag(metrics.loop_lag_seconds, interval=0.005), GcPauses(metrics.gc_pause_seconds)
    lag.start()
    pauses.start()
    log = SliceLog(tmp_path / "slices.jsonl", metrics, lag, pauses, worker=1, interval=0.05)
    log.start()
    try:
        await asyncio.sleep(0.07)  # one quiet slice
        metrics.confirm_seconds.observe(0.003)
        metrics.confirm_seconds.observe(0.03)
        metrics.request_seconds.labels("accepted").observe(0.04)
        gc.collect(1)
        time.sleep(0.06)  # the loop is stuck in this slice
        await asyncio.sleep(0.07)
    finally:
        log.stop()
        pauses.stop()
        lag.stop()
    lines = [orjson.loads(line) for line in (tmp_path / "slices.jsonl").read_bytes().splitlines()]
    assert len(lines) >= 2 and all(line["worker"] == 1 for line in lines)
    assert lines[0]["confirms"] == {"n": 0, "max_le": None}
    busy = next(line for line in lines if line["confirms"]["n"])
    assert busy["confirms"] == {"n": 2, "max_le": 0.05}  # the slower one's bucket: 25-50 ms
    assert busy["requests"] == {"n": 1, "max_le": 0.05}
    assert busy["gc_n"] >= 1
    assert max(line["loop_lag_max"] for line in lines) >= 0.04
