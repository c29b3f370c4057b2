"""A token bucket that keeps the REST calls of one (app, API) under Tencent's limit.

Tencent allows 200 calls/s per API per app and answers a rate-limit code past it. Callers queue in
arrival order for a token instead of failing; the queue is bounded by the wait a newcomer would face.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from relay.errors import RelayError

_EPSILON = 1e-9


class Busy(RelayError):
    """The queue for a token is longer than the caller agreed to wait; ``wait`` is the estimate (s)."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"a token would take {wait:.2f} s")
        self.wait = wait


class TokenBucket:
    """At most *rate* tokens per second on average and *burst* at once.

    The tokens are counted against the real time at which each caller takes one, capped at *burst*:
    if the event loop stalls, the waiters that wake together still get at most *burst* tokens, so
    no one-second window ever sees more than ``rate + burst`` calls.
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = burst
        self._stamp = clock()
        self._lock = asyncio.Lock()  # FIFO: waiters take tokens in arrival order
        self._waiting = 0

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def expected_wait(self) -> float:
        """Seconds a caller arriving now would wait, the callers queued before it included."""
        self._refill()
        return max(0.0, (self._waiting + 1 - self._tokens) / self.rate)

    async def acquire(self, max_wait: float | None = None) -> float:
        """Take one token and return the seconds waited for it.

        With *max_wait*, raise :class:`Busy` at once (taking nothing) if the wait would be longer.
        """
        if max_wait is not None:
            wait = self.expected_wait()
            if wait > max_wait:
                raise Busy(wait)
        start = self._clock()
        self._waiting += 1
        try:
            async with self._lock:
                while True:
                    self._refill()
                    # Float rounding can leave 0.999…9 after an exact sleep: count that as a token
                    # instead of sleeping for a nanosecond the clock cannot show.
                    if self._tokens >= 1 - _EPSILON:
                        self._tokens -= 1
                        break
                    await self._sleep((1 - self._tokens) / self.rate)
        finally:
            self._waiting -= 1
        return self._clock() - start

    def try_acquire(self) -> float:
        """Take a token if one is free now and nobody is queued for one: return 0.0. Otherwise take
        nothing and return the seconds a caller would wait (for a ``Retry-After``)."""
        wait = self.expected_wait()
        if wait > 0:
            return wait
        self._tokens -= 1
        return 0.0
