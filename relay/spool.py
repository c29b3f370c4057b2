"""Durable local spool: events the broker could not confirm wait here, on disk, until forwarded.

SQLite in WAL mode with ``synchronous=FULL``: a commit returns only after the write-ahead log is
fsync'd, so a spooled event survives a process crash and a power cut (not the loss of the disk).
All SQLite work happens on one writer thread, off the event loop. Writes that arrive while a
commit is in progress are batched into the next transaction — one fsync for many callbacks
(group commit) instead of one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from relay.errors import SpoolError, SpoolFull
from relay.events import EVENT_TYPE, Envelope

log = structlog.get_logger()

DB_NAME = "spool.db"
LOCK_NAME = "spool.lock"
# Accounted per row on top of the stored bytes: SQLite's record, index and page overhead.
ROW_OVERHEAD = 128
_MAX_BATCH = 1024
_REOPEN_INTERVAL = 5.0
_HEADROOM = 64 * 1024

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    routing_key TEXT NOT NULL,
    body BLOB NOT NULL,
    amqp_timestamp INTEGER NOT NULL,
    source TEXT NOT NULL,
    subject TEXT NOT NULL,
    time TEXT NOT NULL,
    conversation_key TEXT NOT NULL,
    spooled_at REAL NOT NULL,
    size INTEGER NOT NULL
)
"""
_REVOKED_PREFIX = EVENT_TYPE + "."
_COLUMNS = "seq, event_id, routing_key, body, amqp_timestamp, source, subject, time, conversation_key, spooled_at, size"


def is_request_event(routing_key: str) -> bool:
    """An event the relay publishes because a caller asked for something (the recall gateway's
    audit events), rather than one a provider's callback reported (``message.revoked``). Such
    events may take only ``RELAY_SPOOL_GATEWAY_SHARE`` of the spool, so callbacks, which are
    never retried, always find room."""
    return not routing_key.startswith(_REVOKED_PREFIX)


def envelope_size(envelope: Envelope) -> int:
    """Bytes an envelope is charged against ``RELAY_SPOOL_MAX_BYTES``."""
    return (
        len(envelope.body)
        + len(envelope.event_id)
        + len(envelope.routing_key)
        + len(envelope.source)
        + len(envelope.subject)
        + len(envelope.time)
        + len(envelope.conversation_key)
        + ROW_OVERHEAD
    )


@dataclass(frozen=True, slots=True)
class SpooledEvent:
    seq: int
    envelope: Envelope
    spooled_at: float
    size: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    events: int
    bytes: int
    oldest_spooled_at: float | None

    def oldest_age(self, now: float) -> float:
        return 0.0 if self.oldest_spooled_at is None else max(0.0, now - self.oldest_spooled_at)


class SpoolStore:
    """Synchronous access to the spool database; used by the writer thread and the CLI."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = directory / DB_NAME
        self.max_bytes = max_bytes
        self.events = 0
        self.bytes = 0
        self.request_bytes = 0  # of which events made on request (is_request_event)
        self.oldest_spooled_at: float | None = None
        self.commits = 0  # write transactions committed (each one fsync): shows group-commit batching
        self._db: sqlite3.Connection | None = None

    def open(self, *, readonly: bool = False) -> None:
        if readonly:
            if not self.path.exists():
                raise SpoolError(f"no spool at {self.path}")
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        else:
            # The spool holds user IDs at rest: only the relay's user may read it.
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            # FULL: the WAL is fsync'd at every commit, so a commit that returned survives power loss.
            db.execute("PRAGMA synchronous=FULL")
            # Checkpoints run on a connection of their own (Spool._checkpointer), never inside a
            # callback's commit: a checkpoint fsyncs the database file and would stall that batch.
            db.execute("PRAGMA wal_autocheckpoint=0")
            db.execute(_SCHEMA)
            page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
            # Backstop against unbounded growth: the database may not exceed twice the budget.
            db.execute(f"PRAGMA max_page_count={math.ceil(2 * self.max_bytes / page_size) + 64}")
        self._db = db
        events, size = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM events").fetchone()
        self.events, self.bytes = int(events), int(size)
        (requested,) = db.execute(
            "SELECT COALESCE(SUM(size), 0) FROM events WHERE substr(routing_key, 1, ?) != ?",
            (len(_REVOKED_PREFIX), _REVOKED_PREFIX),
        ).fetchone()
        self.request_bytes = int(requested)
        self._refresh_oldest()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError("spool is not open")
        return self._db

    def insert(self, db: sqlite3.Connection, envelopes: Sequence[Envelope], now: float) -> _Staged:
        """Stage rows for *envelopes*; the returned effect updates the counters once committed."""
        rows = [
            (
                e.event_id,
                e.routing_key,
                e.body,
                e.timestamp,
                e.source,
                e.subject,
                e.time,
                e.conversation_key,
                now,
                envelope_size(e),
            )
            for e in envelopes
        ]
        db.executemany(
            "INSERT INTO events (event_id, routing_key, body, amqp_timestamp, source, subject, time,"
            " conversation_key, spooled_at, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
        added = sum(row[-1] for row in rows)
        requested = sum(row[-1] for row in rows if is_request_event(row[1]))

        def committed() -> None:
            self.events += len(rows)
            self.bytes += added
            self.request_bytes += requested
            if self.oldest_spooled_at is None:
                self.oldest_spooled_at = now

        return None, committed

    def delete(self, db: sqlite3.Connection, seqs: Sequence[int]) -> _Staged:
        """Stage the deletion of rows by sequence number (missing rows are ignored)."""
        removed = 0
        freed = 0
        freed_requested = 0
        for seq in seqs:
            row = db.execute("DELETE FROM events WHERE seq = ? RETURNING size, routing_key", (seq,)).fetchone()
            if row is not None:
                removed += 1
                freed += int(row[0])
                if is_request_event(row[1]):
                    freed_requested += int(row[0])

        def committed() -> None:
            self.events -= removed
            self.bytes -= freed
            self.request_bytes -= freed_requested
            self._refresh_oldest()

        return removed, committed

    def oldest(self, limit: int, after_seq: int = 0) -> list[SpooledEvent]:
        cursor = self.db.execute(
            f"SELECT {_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608 - constant column list
            (after_seq, limit),
        )
        return [_row_to_event(row) for row in cursor]

    def iterate(self, chunk: int = 1000) -> Iterator[SpooledEvent]:
        after = 0
        while batch := self.oldest(chunk, after):
            yield from batch
            after = batch[-1].seq

    def stats(self) -> SpoolStats:
        return SpoolStats(self.events, self.bytes, self.oldest_spooled_at)

    def _refresh_oldest(self) -> None:
        row = self.db.execute("SELECT spooled_at FROM events ORDER BY seq LIMIT 1").fetchone()
        self.oldest_spooled_at = None if row is None else float(row[0])


# A staged write: its result, and what to apply to the store's counters once it is committed.
_Staged = tuple[Any, Callable[[], None]]


def _row_to_event(row: tuple[Any, ...]) -> SpooledEvent:
    seq, event_id, routing_key, body, amqp_ts, source, subject, time_, conversation_key, spooled_at, size = row
    envelope = Envelope(
        event_id=event_id,
        routing_key=routing_key,
        body=bytes(body),
        timestamp=int(amqp_ts),
        source=source,
        subject=subject,
        time=time_,
        conversation_key=conversation_key,
    )
    return SpooledEvent(int(seq), envelope, float(spooled_at), int(size))


class SpoolLock:
    """An exclusive ``flock`` on the spool directory: one process (relay or ``relay spool drain``) at a time."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"spool {self.path.parent} is in use by another process") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True, slots=True)
class _Op:
    """Work for the writer thread. A write stages SQL on the connection and is committed with its batch;
    a read runs against the store directly."""

    future: asyncio.Future[Any]
    write: Callable[[sqlite3.Connection], _Staged] | None = None
    read: Callable[[SpoolStore], Any] | None = None


class Spool:
    """The asyncio face of the spool: ``put`` returns once the events are durable on disk."""

    def __init__(self, directory: Path, max_bytes: int, *, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.store = SpoolStore(directory, max_bytes)
        self._clock = clock
        self._lock = SpoolLock(directory)
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reserved = 0
        self._reserved_requested = 0
        self._pending = 0
        self.available = False
        self.last_error: str | None = None
        self._last_open_attempt = 0.0
        self.nonempty = asyncio.Event()  # set by put(); cleared by the drainer when it finds the spool empty
        self._checkpointer: threading.Thread | None = None
        self._stop_checkpoints = threading.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the writer thread and open the database; on failure stay up but unavailable."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._writer, name="spool-writer", daemon=True)
        self._thread.start()
        await self._try_open()

    async def _try_open(self) -> None:
        self._last_open_attempt = time.monotonic()
        try:
            await self._read(self._open_store)
        except (SpoolError, OSError, sqlite3.Error) as exc:
            self._mark_unavailable(exc)
            return
        self.available = True
        self.last_error = None
        if self._checkpointer is None:
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, name="spool-checkpoint", daemon=True)
            self._checkpointer.start()
        if self.store.events:
            self.nonempty.set()
        log.info("relay.spool_opened", path=str(self.store.path), events=self.store.events, bytes=self.store.bytes)

    def _open_store(self, store: SpoolStore) -> None:
        if store.is_open:
            store.db.execute("SELECT 1 FROM events LIMIT 1")  # a retry after a failed write: probe only
            return
        self._lock.acquire()
        try:
            store.open()
        except BaseException:
            self._lock.release()
            raise

    async def close(self) -> None:
        if self._thread is None:
            return
        self._stop_checkpoints.set()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.join)
            self._checkpointer = None
        self._ops.put(None)
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        self.available = False
        log.info("relay.spool_closed", events=self.store.events, bytes=self.store.bytes)

    # -- state ---------------------------------------------------------------------------------

    @property
    def events(self) -> int:
        return self.store.events

    @property
    def bytes(self) -> int:
        return self.store.bytes

    @property
    def backlog(self) -> bool:
        """True while anything is spooled or being spooled: new events must queue behind it."""
        return self.store.events > 0 or self._pending > 0

    @property
    def has_room(self) -> bool:
        """Available, with headroom for at least another typical callback (readiness uses this)."""
        return self.available and self.store.bytes + self._reserved + _HEADROOM <= self.max_bytes

    def oldest_age(self) -> float:
        return self.store.stats().oldest_age(self._clock())

    # -- operations ----------------------------------------------------------------------------

    async def put(self, envelopes: Sequence[Envelope], *, share: float | None = None) -> None:
        """Return once *envelopes* are committed and fsync'd; raise SpoolFull or SpoolError otherwise.

        *share*: the events made on request (:func:`is_request_event`) among *envelopes* may bring
        those in the spool to at most this fraction of its budget."""
        if not self.available:
            if time.monotonic() - self._last_open_attempt >= _REOPEN_INTERVAL:
                await self._try_open()
            if not self.available:
                raise SpoolError(f"spool unavailable: {self.last_error}")
        size = sum(envelope_size(e) for e in envelopes)
        if self.store.bytes + self._reserved + size > self.max_bytes:
            raise SpoolFull(f"spool holds {self.store.bytes} of {self.max_bytes} bytes")
        requested = sum(envelope_size(e) for e in envelopes if is_request_event(e.routing_key))
        if share is not None and requested:
            held = self.store.request_bytes + self._reserved_requested
            if held + requested > share * self.max_bytes:
                raise SpoolFull(
                    f"events made on request hold {held} bytes, their share is {share:g} of {self.max_bytes}"
                )
        self._reserved += size
        self._reserved_requested += requested
        self._pending += 1
        now = self._clock()
        try:
            await self._write(lambda db: self.store.insert(db, envelopes, now))
        except sqlite3.Error as exc:
            # Disk full, I/O error, permissions: visible in readiness until a retry succeeds.
            self._mark_unavailable(exc)
            if _is_full(exc):
                raise SpoolFull(str(exc)) from exc
            raise SpoolError(str(exc)) from exc
        finally:
            self._reserved -= size
            self._reserved_requested -= requested
            self._pending -= 1
        self.nonempty.set()

    async def oldest(self, limit: int) -> list[SpooledEvent]:
        result: list[SpooledEvent] = await self._read(lambda store: store.oldest(limit))
        return result

    async def delete(self, events: Sequence[SpooledEvent]) -> None:
        seqs = [e.seq for e in events]
        await self._write(lambda db: self.store.delete(db, seqs))

    def _mark_unavailable(self, exc: BaseException) -> None:
        self.available = False
        self.last_error = repr(exc)[:300]
        log.error("relay.spool_unavailable", path=str(self.store.path), error=self.last_error)

    # -- the writer thread ---------------------------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], _Staged]) -> Any:
        return await self._submit(lambda future: _Op(future, write=fn))

    async def _read(self, fn: Callable[[SpoolStore], Any]) -> Any:
        return await self._submit(lambda future: _Op(future, read=fn))

    async def _submit(self, make: Callable[[asyncio.Future[Any]], _Op]) -> Any:
        if self._thread is None or self._loop is None:
            raise SpoolError("spool is closed")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._ops.put(make(future))
        return await future

    def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database once a second, on a connection of its own (PASSIVE:
        never blocks the writer), so commits carry only their own fsync and the WAL stays small."""
        try:
            db = sqlite3.connect(self.store.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            log.error("relay.spool_checkpoint_failed", error=repr(exc)[:300])
            return
        try:
            while not self._stop_checkpoints.wait(1.0):
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error as exc:
                    log.warning("relay.spool_checkpoint_failed", error=repr(exc)[:300])
        finally:
            db.close()

    def _writer(self) -> None:
        """Run operations in arrival order; all writes waiting at one time share a transaction (one fsync)."""
        while True:
            first = self._ops.get()
            if first is None:
                break
            batch = [first]
            stop = False
            while len(batch) < _MAX_BATCH:
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
            results: list[_Result] = []
            self._commit_writes([op for op in batch if op.write is not None], results)
            for op in batch:
                if op.read is not None:
                    try:
                        results.append((op.future, op.read(self.store), None))
                    except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                        results.append((op.future, None, exc))
            assert self._loop is not None
            self._loop.call_soon_threadsafe(_resolve, results)
            if stop:
                break
        with contextlib.suppress(sqlite3.Error, SpoolError):
            self.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # leave a compact database behind
        self.store.close()
        self._lock.release()

    def _commit_writes(self, writes: list[_Op], results: list[_Result]) -> None:
        """One transaction (one fsync) for all *writes*. Normally without savepoints; if one write
        fails, the batch is rolled back and redone with a savepoint per write, so one failure
        spares the others."""
        if not writes:
            return
        if not self._commit(writes, results, isolate=False):
            self._commit(writes, results, isolate=True)

    def _commit(self, writes: list[_Op], results: list[_Result], *, isolate: bool) -> bool:
        staged: list[tuple[_Op, Any, Callable[[], None]]] = []
        failed: list[_Result] = []
        try:
            db = self.store.db
            db.execute("BEGIN IMMEDIATE")
            for op in writes:
                assert op.write is not None
                if isolate:
                    db.execute("SAVEPOINT op")
                try:
                    value, effect = op.write(db)
                except sqlite3.Error as exc:
                    if not isolate:
                        db.execute("ROLLBACK")
                        return False  # redo with savepoints
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    failed.append((op.future, None, exc))
                    continue
                if isolate:
                    db.execute("RELEASE op")
                staged.append((op, value, effect))
            db.execute("COMMIT")  # with synchronous=FULL this is the fsync
            self.store.commits += 1
        except (sqlite3.Error, SpoolError) as exc:
            with contextlib.suppress(sqlite3.Error, SpoolError):
                self.store.db.execute("ROLLBACK")
            # Nothing of this batch is on disk: every write fails with the reason.
            results.extend((op.future, None, exc) for op in writes)
            return True
        results.extend(failed)
        for op, value, effect in staged:
            effect()
            results.append((op.future, value, None))
        return True


_Result = tuple["asyncio.Future[Any]", Any, BaseException | None]


def _resolve(results: list[_Result]) -> None:
    for future, value, exc in results:
        if future.done():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(value)


def _is_full(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc).lower()
