"""The token bucket under a fake clock: burst, steady rate, FIFO order, the bounded wait, stalls."""

from __future__ import annotations

import asyncio

import pytest

from relay.gateway.ratelimit import Busy, TokenBucket


class FakeTime:
    """A clock that only moves when someone sleeps (by *overshoot* more than asked, to mimic a stall)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.overshoot = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds + self.overshoot
        await asyncio.sleep(0)


def bucket(t: FakeTime, rate: float = 10.0, burst: float = 3.0) -> TokenBucket:
    return TokenBucket(rate, burst, clock=t.clock, sleep=t.sleep)


async def test_burst_is_immediate_then_one_per_interval() -> None:
    """The first *burst* callers pass at once; the next waits 1/rate."""
    t = FakeTime()
    b = bucket(t)
    assert [0.0, 0.0, 0.0] == [await b.acquire() for _ in range(3)]
    assert 0.1 == pytest.approx(await b.acquire())


async def test_no_window_of_one_second_exceeds_rate_plus_burst() -> None:
    """Over 200 takes, any one-second window holds at most rate + burst of them."""
    t = FakeTime()
    b = bucket(t)
    times = []
    for _ in range(200):
        await b.acquire()
        times.append(t.now)
    worst = max(sum(1 for x in times if start <= x < start + 1.0) for start in times)
    assert worst <= 10 + 3
    assert (200 - 3) / 10 == pytest.approx(times[-1] - times[0])


async def test_waiters_are_served_in_arrival_order() -> None:
    """Concurrent callers get their tokens in the order they asked."""
    t = FakeTime()
    b = bucket(t, burst=1.0)
    order: list[int] = []

    async def take(i: int) -> None:
        await b.acquire()
        order.append(i)

    await asyncio.gather(*(take(i) for i in range(8)))
    assert list(range(8)) == order


async def test_bounded_wait_refuses_without_taking() -> None:
    """A caller that would wait longer than max_wait gets Busy at once, and leaves the bucket as it was."""
    t = FakeTime()
    b = bucket(t, burst=1.0)
    await b.acquire()
    assert 0.1 == pytest.approx(b.expected_wait())
    with pytest.raises(Busy) as info:
        await b.acquire(max_wait=0.05)
    assert 0.1 == pytest.approx(info.value.wait)
    assert 0.1 == pytest.approx(await b.acquire(max_wait=0.1))


async def test_expected_wait_counts_the_queue() -> None:
    """Callers already waiting lengthen the wait a newcomer is quoted."""
    t = FakeTime()
    b = bucket(t, burst=1.0)
    await b.acquire()
    gate = asyncio.Event()

    async def slow_sleep(seconds: float) -> None:
        await gate.wait()
        t.now += seconds

    b._sleep = slow_sleep
    waiters = [asyncio.create_task(b.acquire()) for _ in range(4)]
    await asyncio.sleep(0)
    assert 0.5 == pytest.approx(b.expected_wait())
    with pytest.raises(Busy):
        await b.acquire(max_wait=0.4)
    gate.set()
    await asyncio.gather(*waiters)


async def test_idle_time_refills_only_up_to_burst() -> None:
    """After a long idle spell only *burst* callers pass at once."""
    t = FakeTime()
    b = bucket(t)
    t.now += 3600
    waits = [await b.acquire() for _ in range(4)]
    assert [0.0, 0.0, 0.0] == waits[:3]
    assert waits[3] > 0


async def test_a_stalled_loop_releases_at_most_burst_at_once() -> None:
    """If the loop wakes the waiters a second late, they still pass at most *burst* at one instant."""
    t = FakeTime()
    b = bucket(t)
    for _ in range(3):
        await b.acquire()
    t.overshoot = 1.0  # every sleep returns a second late
    stamps: list[float] = []

    async def take() -> None:
        await b.acquire()
        stamps.append(t.now)

    await asyncio.gather(*(take() for _ in range(12)))
    assert max(stamps.count(s) for s in stamps) <= 3


def test_nonsense_rates_are_refused() -> None:
    """A zero rate or a burst below one token is a ValueError."""
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 5)
    with pytest.raises(ValueError, match="burst"):
        TokenBucket(10, 0.5)
