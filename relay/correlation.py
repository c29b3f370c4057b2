"""Where send records live until a recall asks for them: Redis (shared by replicas) or memory.

The send path is the hot path (sends vastly outnumber recalls), so recording never waits: records
go into a bounded queue and a writer task flushes them in batches, one pipelined round trip per
batch. The recall path asks once per callback (MGET) under a small time budget; enrichment is
best effort and never delays a recall past that budget nor fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from relay.events import ConversationType, Enrichment, RevokeEvent
from relay.metrics import Metrics

log = structlog.get_logger()

KEY_PREFIX = "revoke-relay:send:"
_BATCH = 512
_QUEUE_LIMIT = 20_000
# A send callback whose records find the write queue full waits this long for room before they
# are dropped: under a burst the callbacks slow down to the store's pace instead of losing
# records (Tencent waits 2 s for an answer and ignores it for after-send callbacks).
_SUBMIT_WAIT = 1.0
_BREAKER_SECONDS = 1.0


def correlation_key(sdk_app_id: str, conversation_type: ConversationType, server_key: str) -> str:
    """The store key of a message: the eventID's own name, so send and recall meet without an index."""
    return f"{sdk_app_id}/{conversation_type}/{server_key}"


@dataclass(frozen=True, slots=True)
class SendRecord:
    """What a send callback tells about one message. Stored compactly; never logged."""

    key: str
    client_msg_id: str | None
    sender: str | None
    sent_at_ms: int | None
    evidence: dict[str, Any] | None = None

    def encode(self) -> bytes:
        record: dict[str, Any] = {"m": self.client_msg_id, "s": self.sender, "t": self.sent_at_ms}
        if self.evidence is not None:
            record["e"] = self.evidence
        return orjson.dumps(record)

    @classmethod
    def decode(cls, key: str, raw: bytes) -> SendRecord:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("correlation record is not an object")
        return cls(key, _str(data.get("m")), _str(data.get("s")), _int(data.get("t")), _obj(data.get("e")))


class CorrelationStore(Protocol):
    name: str
    local: bool  # in-process: a lookup never waits, so it needs no deadline

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, records: Sequence[SendRecord]) -> None:
        """Record; when the store is behind, wait a bounded time for room, then drop (counted)."""

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """One round trip for all *keys*; raises on store failure."""


class MemoryStore:
    """Embedded store for a single replica: a bounded, TTL'd map, lost on restart."""

    name = "memory"
    local = True

    def __init__(self, ttl: float, max_entries: int, metrics: Metrics, clock: Callable[[], float] = time.monotonic):
        self._ttl = ttl
        self._max = max_entries
        self._metrics = metrics
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def start(self) -> None:
        self._metrics.correlation_memory_entries.set_function(lambda: len(self._data))

    async def close(self) -> None:
        self._data.clear()

    async def submit(self, records: Sequence[SendRecord]) -> None:
        expires = self._clock() + self._ttl
        for record in records:
            self._data.pop(record.key, None)
            # orjson's bytes keep their ~4 KiB output buffer; an exact-size copy is ~40x smaller
            # (measured: 4,098 -> 110 bytes a record), which is what a 100,000-record store holds.
            self._data[record.key] = (expires, bytes(memoryview(record.encode())))
        while len(self._data) > self._max:  # oldest first: insertion order is send order
            self._data.popitem(last=False)
        self._metrics.correlation_writes.inc(len(records))

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        now = self._clock()
        out: list[bytes | None] = []
        for key in keys:
            entry = self._data.get(key)
            if entry is not None and entry[0] <= now:
                del self._data[key]
                entry = None
            out.append(None if entry is None else entry[1])
        return out


class RedisStore:
    """Shared store: ``SET key value EX ttl`` per send, pipelined in batches; ``MGET`` per recall."""

    name = "redis"
    local = False

    def __init__(self, url: str, ttl: int, metrics: Metrics) -> None:
        self._client = aioredis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=1.0, health_check_interval=30
        )
        self._ttl = ttl
        self._metrics = metrics
        self._queue: asyncio.Queue[SendRecord] = asyncio.Queue(_QUEUE_LIMIT)
        self._writer: asyncio.Task[None] | None = None
        self._last_error_log = 0.0

    async def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="correlation-writer")

    async def close(self) -> None:
        if self._writer is not None:
            # Give queued records a moment to reach Redis, then stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await self._queue.join()
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
        await self._client.aclose()

    async def submit(self, records: Sequence[SendRecord], wait: float = _SUBMIT_WAIT) -> None:
        deadline: float | None = None
        for record in records:
            if not self._queue.full():
                self._queue.put_nowait(record)
                continue
            # Behind by _QUEUE_LIMIT records: wait for the writer (FIFO among waiters), bounded.
            deadline = deadline or asyncio.get_running_loop().time() + wait
            try:
                async with asyncio.timeout_at(deadline):
                    await self._queue.put(record)
            except TimeoutError:
                self._metrics.correlation_dropped.inc()

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for record in batch:
                        pipe.set(KEY_PREFIX + record.key, record.encode(), ex=self._ttl)
                    await pipe.execute()
                self._metrics.correlation_writes.inc(len(batch))
                self._metrics.correlation_store_seconds.labels("put").observe(time.perf_counter() - started)
            except (redis.exceptions.RedisError, OSError) as exc:
                # Best effort: a lost send record only means a later recall is not enriched.
                self._metrics.correlation_store_errors.labels("put").inc()
                self._metrics.correlation_dropped.inc(len(batch))
                self._log_error("put", exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        started = time.perf_counter()
        try:
            values = await self._client.mget([KEY_PREFIX + key for key in keys])
        except (redis.exceptions.RedisError, OSError) as exc:
            self._metrics.correlation_store_errors.labels("get").inc()
            self._log_error("get", exc)
            raise
        self._metrics.correlation_store_seconds.labels("get").observe(time.perf_counter() - started)
        # decode_responses is off, so values are bytes (or None for a miss).
        return [v if isinstance(v, bytes) or v is None else str(v).encode() for v in values]

    async def purge_sender(self, sender: str, *, batch: int = 500) -> int:
        """Delete every record whose sender is *sender* (SCAN; for privacy requests, not the hot path)."""
        deleted = 0
        keys: list[bytes] = []

        async def flush() -> int:
            values = await self._client.mget(keys)
            doomed = [
                k
                for k, v in zip(keys, values, strict=True)
                if isinstance(v, bytes) and SendRecord.decode("", v).sender == sender
            ]
            keys.clear()
            return int(await self._client.delete(*doomed)) if doomed else 0

        async for key in self._client.scan_iter(match=KEY_PREFIX + "*", count=batch):
            keys.append(key)
            if len(keys) >= batch:
                deleted += await flush()
        if keys:
            deleted += await flush()
        return deleted

    def _log_error(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:  # a Redis outage must not flood the log
            self._last_error_log = now
            log.warning("relay.correlation_store_error", op=op, error=repr(exc)[:300])


class Enricher:
    """Applies send records to recall events; never raises, never waits past its budget."""

    def __init__(self, store: CorrelationStore | None, metrics: Metrics, *, budget: float, evidence: bool) -> None:
        self.store = store
        self._metrics = metrics
        self._budget = budget
        self._evidence = evidence
        self._open_until = 0.0  # circuit breaker: skip lookups briefly after a failure

    async def record(self, records: Sequence[SendRecord]) -> None:
        if self.store is not None and records:
            await self.store.submit(records)

    @property
    def unmatched(self) -> Enrichment:
        """What an event says when no send record is found for it: ``normalize`` marks events so
        from the start, and most events then need no copy here."""
        return "disabled" if self.store is None else "miss"

    async def enrich(self, events: Sequence[RevokeEvent]) -> list[RevokeEvent]:
        if not events:
            return []
        if self.store is None:
            return self._mark(events, "disabled")
        if time.monotonic() < self._open_until:
            return self._mark(events, "error")
        # A provider other than Tencent computes its own store key (Matrix: room and event ID);
        # Tencent's events carry none and use the eventID's name, as their send records do.
        keys = [
            e.correlation_key or correlation_key(e.sdk_app_id or "", e.conversation.type, e.server_key) for e in events
        ]
        try:
            if self.store.local:
                found = await self.store.lookup(keys)  # in-process: nothing to wait for
            else:
                async with asyncio.timeout(self._budget):
                    found = await self.store.lookup(keys)
        except Exception:  # noqa: BLE001 - timeout or store failure: publish unenriched
            self._open_until = time.monotonic() + _BREAKER_SECONDS
            return self._mark(events, "error")
        enriched: list[RevokeEvent] = []
        for event, key, raw in zip(events, keys, found, strict=True):
            if raw is None:
                enriched.append(self._mark([event], "miss")[0])
                continue
            try:
                record = SendRecord.decode(key, raw)
            except ValueError:
                enriched.append(self._mark([event], "error")[0])
                continue
            self._metrics.child(self._metrics.correlation_lookups, "hit").inc()
            enriched.append(apply(event, record, evidence=self._evidence))
        return enriched

    def _mark(self, events: Sequence[RevokeEvent], result: Enrichment) -> list[RevokeEvent]:
        self._metrics.child(self._metrics.correlation_lookups, result).inc(len(events))
        return [e if e.enrichment == result else replace(e, enrichment=result) for e in events]


def apply(event: RevokeEvent, record: SendRecord, *, evidence: bool) -> RevokeEvent:
    """The event with what its send record adds. eventID never changes (it names the server key)."""
    client_msg_id = event.client_msg_id or record.client_msg_id
    sender = event.sender or record.sender
    operator = event.operator
    if event.conversation.type == "group" and operator.role == "unknown" and sender and operator.user_id:
        # A client recall in a group is the sender's own, or an owner/admin removing someone else's.
        operator = replace(operator, role="sender" if operator.user_id == sender else "group_admin")
    return replace(
        event,
        client_msg_id=client_msg_id,
        msg_id=client_msg_id or event.msg_id,
        sender=sender,
        operator=operator,
        sent_at_ms=record.sent_at_ms,
        evidence=record.evidence if evidence else None,
        enrichment="hit",
    )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _obj(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
