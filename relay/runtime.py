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
import time
from typing import Any, Protocol


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class LoopLag:
    """Every ``interval`` seconds, how late a timer fired: the time a ready callback waited."""

    def __init__(self, histogram: Observer, interval: float = 0.025) -> None:
        self._histogram = histogram
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.worst = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self._interval
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        # The loop may run a timer up to its clock resolution early; that is not lag.
        lag = max(now - self._due, 0.0)
        self._histogram.observe(lag)
        if lag > self.worst:
            self.worst = lag
        self._due = now + self._interval
        self._handle = loop.call_at(self._due, self._tick, loop)

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
