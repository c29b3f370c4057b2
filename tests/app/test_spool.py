"""The spool on a real SQLite file: durability, group commit, bounds, failures, the lock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.errors import SpoolError, SpoolFull
from relay.spool import Spool, SpoolStore, envelope_size
from tests.helpers import NOW, envelopes


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[Spool]:
    s = Spool(tmp_path / "spool", 16 * 1024 * 1024, clock=lambda: NOW)
    await s.open()
    yield s
    await s.close()


async def test_put_then_read_back_in_order_with_every_field(spool: Spool) -> None:
    """Spooled envelopes come back oldest first, byte-for-byte and field-for-field identical."""
    items = envelopes(3)
    for item in items:
        await spool.put([item])
    back = await spool.oldest(10)
    assert items == [e.envelope for e in back]
    assert [e.seq for e in back] == sorted(e.seq for e in back)
    assert (3, sum(envelope_size(e) for e in items)) == (spool.events, spool.bytes)


async def test_delete_updates_counts_and_oldest_age(tmp_path: Path) -> None:
    """Deleting confirmed events lowers the counters; the oldest age follows the remaining head."""
    now = [NOW]
    spool = Spool(tmp_path, 16 * 1024 * 1024, clock=lambda: now[0])
    await spool.open()
    try:
        first, second = envelopes(2)
        await spool.put([first])
        now[0] += 10
        await spool.put([second])
        now[0] += 5
        assert 15.0 == spool.oldest_age()
        head = (await spool.oldest(1))[0]
        await spool.delete([head])
        assert (1, 5.0) == (spool.events, spool.oldest_age())
        await spool.delete(await spool.oldest(5))
        assert (0, 0, 0.0) == (spool.events, spool.bytes, spool.oldest_age())
    finally:
        await spool.close()


async def test_events_survive_close_and_reopen(tmp_path: Path) -> None:
    """What a previous process spooled is there, unchanged, when the next one opens the directory."""
    items = envelopes(5)
    first = Spool(tmp_path, 16 * 1024 * 1024)
    await first.open()
    await first.put(items)
    await first.close()

    second = Spool(tmp_path, 16 * 1024 * 1024)
    await second.open()
    try:
        assert items == [e.envelope for e in await second.oldest(10)]
        assert 5 == second.events
        assert second.nonempty.is_set()
    finally:
        await second.close()


async def test_concurrent_puts_share_commits(spool: Spool) -> None:
    """200 concurrent callbacks are made durable in far fewer fsync'd transactions (group commit)."""
    items = envelopes(200)
    before = spool.store.commits
    await asyncio.gather(*(spool.put([item]) for item in items))
    commits = spool.store.commits - before
    assert 200 == spool.events
    assert commits < 100, commits


async def test_full_spool_refuses_without_writing(tmp_path: Path) -> None:
    """A put that would pass RELAY_SPOOL_MAX_BYTES raises SpoolFull and stores nothing of it."""
    items = envelopes(3)
    spool = Spool(tmp_path, envelope_size(items[0]) * 2)
    await spool.open()
    try:
        await spool.put(items[:2])
        with pytest.raises(SpoolFull):
            await spool.put(items[2:])
        assert 2 == spool.events
        assert not spool.has_room
    finally:
        await spool.close()


async def test_unwritable_directory_leaves_spool_unavailable(tmp_path: Path) -> None:
    """A spool path that cannot be a directory is reported unavailable; puts fail with SpoolError."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    spool = Spool(blocker, 16 * 1024 * 1024)
    await spool.open()
    try:
        assert not spool.available
        assert not spool.has_room
        assert spool.last_error is not None
        with pytest.raises(SpoolError):
            await spool.put(envelopes(1))
    finally:
        await spool.close()


async def test_second_process_cannot_share_a_spool_directory(spool: Spool) -> None:
    """Two relays on one spool directory would double-publish; the second is refused by the lock."""
    other = Spool(spool.directory, 16 * 1024 * 1024)
    await other.open()
    try:
        assert not other.available
        assert "in use" in (other.last_error or "")
    finally:
        await other.close()


async def test_store_reads_while_relay_holds_the_spool(spool: Spool) -> None:
    """Operators can read stats and export while the relay runs (read-only, no lock needed)."""
    await spool.put(envelopes(2))
    store = SpoolStore(spool.directory, spool.max_bytes)
    store.open(readonly=True)
    try:
        assert 2 == store.stats().events
        assert 2 == len(list(store.iterate()))
    finally:
        store.close()


async def test_a_failing_write_spares_the_rest_of_its_batch(spool: Spool) -> None:
    """When one write of a group commit fails, the batch is redone write by write: the others commit."""
    import sqlite3

    first, second = envelopes(2)
    results = await asyncio.gather(
        spool.put([first]),
        spool._write(lambda db: (db.execute("INSERT INTO no_such_table VALUES (1)"), lambda: None)),
        spool.put([second]),
        return_exceptions=True,
    )
    assert [None, sqlite3.OperationalError, None] == [r if r is None else type(r) for r in results]
    assert [first, second] == [e.envelope for e in await spool.oldest(10)]


async def test_close_leaves_no_write_ahead_log_behind(tmp_path: Path) -> None:
    """Closing checkpoints the WAL into the database: the -wal file is empty or gone."""
    spool = Spool(tmp_path, 16 * 1024 * 1024)
    await spool.open()
    await spool.put(envelopes(50))
    await spool.close()
    wal = tmp_path / "spool.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0
