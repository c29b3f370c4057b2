"""What the process itself was doing: event-loop lag and garbage-collector pauses (docs/metrics.md).

A slow callback is either waiting on something outside (the broker's confirm, the spool's fsync) or
on the process: a loop busy with other work, or a collection that stopped every thread. These two
watchers make the second kind visible, per worker, next to the first:

* :class:`LoopLag` schedules a callback every ``interval`` on the loop and records how late it ran
  (a sampler on the loop itself, not a thread: a thread would see the GIL, not the loop);
* :class:`GcPauses` times each collection through :data:`gc.callbacks`, by generation.

Both keep the worst value seen since :meth:`take_max` was last called, for the benchmark's
recorder (``bench/latency.py``), which reads them in 100 ms slices.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from pathlib import Path
from typing import Any, Protocol

import orjson
from prometheus_client import Histogram


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LoopLag:
    """Every ``interval`` seconds, how late a timer fired: the time a ready callback waited.

    Under uvloop timers fire on a millisecond grid, so up to about 1 ms of lag is the timer's own
    granularity; more is the loop being busy (or the process not being scheduled)."""

    def __init__(self, histogram: Observer, interval: float = 0.025) -> None:
        self._histogram = histogram
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.worst = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = time.perf_counter() + self._interval
        self._handle = loop.call_later(self._interval, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        # perf_counter, not loop.time(): uvloop's loop.time() is libuv's cached, millisecond clock.
        now = time.perf_counter()
        lag = max(now - self._due, 0.0)
        self._histogram.observe(lag)
        if lag > self.worst:
            self.worst = lag
        self._due = now + self._interval
        self._handle = loop.call_later(self._interval, self._tick, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def take_max(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


class GcPauses:
    """The duration of every garbage collection, by generation (``gc.callbacks``)."""

    def __init__(self, histogram: Any) -> None:
        self._children = [histogram.labels(generation=str(g)) for g in range(3)]
        self._started = 0.0
        self.worst = 0.0
        self.collections = 0

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # Collections never overlap (the interpreter holds its GC lock), so one start time will do,
        # whichever thread triggered it.
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info.get("generation", 0)
        self._children[generation if 0 <= generation < 3 else 2].observe(pause)
        self.collections += 1
        if pause > self.worst:
            self.worst = pause

    def take_max(self) -> float:
        worst, self.worst = self.worst, 0.0
        return worst


class _Buckets:
    """A histogram's cumulative bucket counts (summed over its labels), to diff between slices."""

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        self._last = self._read()

    def _read(self) -> dict[float, float]:
        counts: dict[float, float] = {}
        for metric in self._histogram.collect():
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    counts[bound] = counts.get(bound, 0.0) + sample.value
        return counts

    def take(self) -> dict[str, float | None]:
        """Since the last take: how many were observed, and the upper bound of the slowest one's bucket."""
        now = self._read()
        last, self._last = self._last, now
        diffs = sorted((bound, count - last.get(bound, 0.0)) for bound, count in now.items())
        total = diffs[-1][1] if diffs else 0.0
        slowest: float | None = None
        below = 0.0
        for bound, cumulative in diffs:
            if cumulative > below:
                slowest = bound
            below = cumulative
        return {"n": total, "max_le": slowest if total else None}


class SliceLog:
    """``RELAY_SLICE_LOG``: every ``interval`` one JSON line of what the process did and waited on
    (bench/latency.py reads it beside each request's latency). Lines from several workers go to one
    file, each written whole (``O_APPEND``)."""

    def __init__(
        self, path: Path, metrics: Any, lag: LoopLag, gc_pauses: GcPauses, worker: int, interval: float = 0.1
    ) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._lag, self._gc = lag, gc_pauses
        self._worker = worker
        self._interval = interval
        self._collections = gc_pauses.collections
        self._histograms = {
            "requests": _Buckets(metrics.request_seconds),
            "wait": _Buckets(metrics.request_wait_seconds),
            "confirms": _Buckets(metrics.confirm_seconds),
            "spool_writes": _Buckets(metrics.spool_write_seconds),
        }
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self._interval, self._write, loop)

    def _write(self, loop: asyncio.AbstractEventLoop) -> None:
        collections = self._gc.collections
        line: dict[str, object] = {
            "t": time.time(),
            "worker": self._worker,
            "loop_lag_max": self._lag.take_max(),
            "gc_max": self._gc.take_max(),
            "gc_n": collections - self._collections,
        }
        self._collections = collections
        for name, buckets in self._histograms.items():
            line[name] = buckets.take()
        os.write(self._fd, orjson.dumps(line) + b"\n")
        self._handle = loop.call_later(self._interval, self._write, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            os.close(self._fd)
