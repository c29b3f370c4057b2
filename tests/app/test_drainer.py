"""The drainer and the dispatcher's spool path, with a recording publisher and a real spool file."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.dispatch import Dispatcher
from relay.drainer import Drainer
from relay.errors import SpoolError
from relay.metrics import Metrics
from relay.spool import Spool, SpooledEvent
from tests.helpers import RecordingPublisher, envelopes


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path, 16 * 1024 * 1024)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


async def wait_for(condition: object, seconds: float = 5.0) -> None:
    assert callable(condition)
    async with asyncio.timeout(seconds):
        while not condition():
            await asyncio.sleep(0.01)


async def test_drainer_forwards_oldest_first_and_deletes(
    spool: Spool, publisher: RecordingPublisher, metrics: Metrics
) -> None:
    """Spooled events are published in spool order, then removed; the drained counter follows."""
    items = envelopes(300)
    for item in items:
        await spool.put([item])
    drainer = Drainer(spool, publisher, metrics, batch_size=64)
    await drainer.start()
    await wait_for(lambda: spool.events == 0)
    await drainer.stop(1)
    assert [e.event_id for e in items] == [e.event_id for e in publisher.published]
    assert 300 == metrics.registry.get_sample_value("relay_events_drained_total")


async def test_a_new_broker_connection_ends_the_drainer_backoff(
    spool: Spool, publisher: RecordingPublisher, metrics: Metrics
) -> None:
    """After failed rounds the drainer backs off, but a new publisher connection (a failover to another
    node) makes it retry at once: new callbacks wait behind the spool, so its delay is theirs."""
    await spool.put(envelopes(3))
    publisher.fail_with = "nacked"
    drainer = Drainer(spool, publisher, metrics, backoff_max=60)
    with capture_logs() as logs:
        await drainer.start()
        # Six failed rounds: the wait that follows the sixth is 1.6-3.2 s long.
        await wait_for(lambda: sum(e["event"] == "relay.drain_failed" for e in logs) >= 6)
    publisher.fail_with = None
    publisher.connections += 1
    await wait_for(lambda: spool.events == 0, seconds=1)
    await drainer.stop(1)
    assert 3 == len(publisher.published)


async def test_unconfirmed_events_stay_until_the_broker_confirms(
    spool: Spool, publisher: RecordingPublisher, metrics: Metrics
) -> None:
    """While publishes fail nothing is deleted; once they succeed every event is forwarded exactly once."""
    items = envelopes(5)
    await spool.put(items)
    publisher.fail_with = "returned"
    drainer = Drainer(spool, publisher, metrics, backoff_max=0.05)
    await drainer.start()
    await asyncio.sleep(0.3)
    assert (5, []) == (spool.events, publisher.published)
    publisher.fail_with = None
    await wait_for(lambda: spool.events == 0)
    await drainer.stop(1)
    assert [e.event_id for e in items] == [e.event_id for e in publisher.published]


async def test_drainer_waits_for_a_ready_broker(spool: Spool, publisher: RecordingPublisher, metrics: Metrics) -> None:
    """With the broker not ready the drainer does not try; it starts as soon as the broker is back."""
    publisher.ready_flag = False
    await spool.put(envelopes(2))
    drainer = Drainer(spool, publisher, metrics)
    await drainer.start()
    await asyncio.sleep(0.3)
    assert 2 == spool.events
    publisher.ready_flag = True
    await wait_for(lambda: spool.events == 0)
    await drainer.stop(1)


async def test_stop_flushes_what_it_can_then_leaves_the_rest(
    spool: Spool, publisher: RecordingPublisher, metrics: Metrics
) -> None:
    """At shutdown with no broker the drainer stops at once and the spool keeps the events."""
    publisher.ready_flag = False
    await spool.put(envelopes(3))
    drainer = Drainer(spool, publisher, metrics)
    await drainer.start()
    async with asyncio.timeout(1):
        await drainer.stop(10)
    assert 3 == spool.events


async def test_new_events_queue_behind_a_backlog(spool: Spool, publisher: RecordingPublisher, metrics: Metrics) -> None:
    """While the spool holds events, a new one is spooled too, even with the broker up: no overtaking."""
    old, new = envelopes(2)
    dispatcher = Dispatcher(publisher, spool, metrics)
    publisher.ready_flag = False
    assert 1 == (await dispatcher.dispatch([old])).spooled
    publisher.ready_flag = True
    assert 1 == (await dispatcher.dispatch([new])).spooled
    assert [] == publisher.published
    drainer = Drainer(spool, publisher, metrics)
    await drainer.start()
    await wait_for(lambda: spool.events == 0)
    await drainer.stop(1)
    assert [old.event_id, new.event_id] == [e.event_id for e in publisher.published]
    # Backlog gone: the next event takes the direct path again.
    (third,) = envelopes(1)
    assert (1, 0) == ((d := await dispatcher.dispatch([third])).published, d.spooled)


async def test_broken_spool_with_backlog_falls_back_to_the_broker(
    tmp_path: Path, publisher: RecordingPublisher, metrics: Metrics
) -> None:
    """If the spool cannot take an event but the broker can, publishing beats refusing."""
    spool = Spool(tmp_path, 16 * 1024 * 1024)
    await spool.open()
    try:
        publisher.ready_flag = False
        await Dispatcher(publisher, spool, metrics).dispatch(envelopes(1))
        spool.max_bytes = 1  # now full
        publisher.ready_flag = True
        (item,) = envelopes(1)
        result = await Dispatcher(publisher, spool, metrics).dispatch([item])
        assert (1, 0) == (result.published, result.spooled)
        assert [item.event_id] == [e.event_id for e in publisher.published]
    finally:
        await spool.close()


async def test_no_broker_and_no_spool_raises(tmp_path: Path, publisher: RecordingPublisher, metrics: Metrics) -> None:
    """Neither confirmed nor durable: dispatch raises, so the caller answers 503."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    spool = Spool(blocker, 16 * 1024 * 1024)
    await spool.open()
    try:
        publisher.ready_flag = False
        with pytest.raises(SpoolError):
            await Dispatcher(publisher, spool, metrics).dispatch(envelopes(1))
    finally:
        await spool.close()


async def test_a_failed_delete_is_retried_without_publishing_again(
    spool: Spool, publisher: RecordingPublisher, metrics: Metrics, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Confirmed events whose delete fails (SQLite on a full disk; found by the chaos run, issue 22) are
    not published again: the next round retries the delete alone, so each event reaches RabbitMQ once."""
    items = envelopes(10)
    for item in items:
        await spool.put([item])
    real_delete = spool.delete
    failures = [sqlite3.OperationalError("database or disk is full")]

    async def delete(events: Sequence[SpooledEvent]) -> None:
        if failures:
            raise failures.pop()
        await real_delete(events)

    monkeypatch.setattr(spool, "delete", delete)
    drainer = Drainer(spool, publisher, metrics, batch_size=64)
    with pytest.raises(sqlite3.OperationalError):
        await drainer.drain_once()
    assert (10, 0) == await drainer.drain_once()
    assert 0 == spool.events
    assert [e.event_id for e in items] == [e.event_id for e in publisher.published]
    assert 10 == metrics.registry.get_sample_value("relay_events_drained_total")
