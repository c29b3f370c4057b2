"""Where send records live until a recall asks for them: Redis (shared by replicas) or memory.

The send path is the hot path (sends vastly outnumber recalls), so recording never waits: records
go into a bounded queue and a writer task flushes them in batches, one pipelined round trip per
batch. The recall path asks once per callback (MGET) under a small time budget; enrichment is
best effort and never delays a recall past that budget nor fails it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import quote

import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from relay.errors import RelayError
from relay.events import ConversationType, Enrichment, Operator, RecallRequest, RevokeEvent
from relay.metrics import Metrics

log = structlog.get_logger()

KEY_PREFIX = "revoke-relay:send:"
GATEWAY_PREFIX = "revoke-relay:"  # + recall:… / request:… / msgid:…
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
    # Where the message lives, in the recall gateway's request vocabulary ({"conversation": …,
    # "message": …}): indexed under its client msgID so a recall request may name it by msgID.
    locator: dict[str, Any] | None = None

    @property
    def index_key(self) -> str | None:
        """The gateway key of this message's msgID index entry, when it has a msgID and a locator."""
        if self.client_msg_id is None or self.locator is None:
            return None
        return msg_id_key(self.key.partition("/")[0], self.client_msg_id)

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


def msg_id_key(sdk_app_id: str, client_msg_id: str) -> str:
    """Gateway key of the msgID index: client msgID → where the message lives (its locator)."""
    return f"msgid:{sdk_app_id}/{client_msg_id}"


class StoreError(RelayError):
    """The correlation store could not read or write what the recall gateway needs."""


class StoreFull(StoreError):
    """The embedded store holds as many unexpired gateway records as it may: it evicts none."""


class CorrelationStore(Protocol):
    """Send records and their msgID index (best effort, batched, evictable) and the recall
    gateway's records (awaited, all-or-error, never evicted before they expire).

    Gateway keys are namespaced by kind (``request:…`` leases and answers, ``attribution:…``,
    ``recall:…`` join records) and never share the bounded send-record space, so a flood of sends
    cannot evict a pending request."""

    name: str
    local: bool  # in-process: a lookup never waits, so it needs no deadline
    index_msg_ids: bool  # also write the msgID index of each send record (the gateway is on)

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, records: Sequence[SendRecord]) -> None:
        """Record; when the store is behind, wait a bounded time for room, then drop (counted)."""

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        """Send records: one round trip for all *keys*; raises on store failure."""

    async def locate(self, keys: Sequence[str]) -> list[bytes | None]:
        """msgID index entries (``msgid:…``, written with the send records); raises :class:`StoreError`."""

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        """Gateway records, one round trip; raises :class:`StoreError`."""

    async def put(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        """Write gateway records in one round trip, each expiring after *ttl* s; raises :class:`StoreError`."""

    async def claim(self, key: str, value: bytes, ttl: float) -> bool:
        """Write *key* only if it does not exist (an idempotency lease); False if it does."""

    async def reserve(self, items: Sequence[tuple[str, bytes]], ttl: float) -> list[bool]:
        """Write each key unless it holds another value (a join record another request owns): one
        round trip, True where written (or already ours)."""

    async def take(self, keys: Sequence[str]) -> list[bytes | None]:
        """Read and delete gateway records at once (a join record is used once)."""

    async def delete(self, key: str) -> None:
        """Remove a gateway record; raises :class:`StoreError`."""

    async def delete_if(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Remove each key only while it still holds the given value (never another request's record)."""


class MemoryStore:
    """Embedded store for a single replica, lost on restart. Three spaces: send records and their
    msgID index (bounded, oldest dropped first: a lost one only means an unenriched recall) and
    gateway records (bounded too, but never evicted before they expire: past the bound a request
    is refused with :class:`StoreFull`, because a dropped lease would let a retry recall twice)."""

    name = "memory"
    local = True

    def __init__(
        self,
        ttl: float,
        max_entries: int,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        index_msg_ids: bool = False,
        max_gateway_entries: int | None = None,
    ):
        self._ttl = ttl
        self._max = max_entries
        self._max_gateway = max_gateway_entries or max_entries
        self._metrics = metrics
        self._clock = clock
        self.index_msg_ids = index_msg_ids
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._index: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._gateway: dict[str, tuple[float, bytes]] = {}
        self._expiries: list[tuple[float, str]] = []  # heap; stale entries skipped when popped

    def __len__(self) -> int:
        return len(self._data)

    async def start(self) -> None:
        self._metrics.correlation_memory_entries.set_function(lambda: len(self._data))

    async def close(self) -> None:
        self._data.clear()
        self._index.clear()
        self._gateway.clear()
        self._expiries.clear()

    async def submit(self, records: Sequence[SendRecord]) -> None:
        expires = self._clock() + self._ttl
        for record in records:
            self._data.pop(record.key, None)
            # orjson's bytes keep their ~4 KiB output buffer; an exact-size copy is ~40x smaller
            # (measured: 4,098 -> 110 bytes a record), which is what a 100,000-record store holds.
            self._data[record.key] = (expires, bytes(memoryview(record.encode())))
            index = record.index_key if self.index_msg_ids else None
            if index is not None:
                self._index.pop(index, None)
                self._index[index] = (expires, orjson.dumps(record.locator))
        for space in (self._data, self._index):
            while len(space) > self._max:  # oldest first: insertion order is send order
                space.popitem(last=False)
        self._metrics.correlation_writes.inc(len(records))

    async def locate(self, keys: Sequence[str]) -> list[bytes | None]:
        return _read(self._index, keys, self._clock())

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        return _read(self._gateway, keys, self._clock())

    async def put(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        self._room([key for key, _ in items])
        for key, value in items:
            self._set(key, value, ttl)

    async def claim(self, key: str, value: bytes, ttl: float) -> bool:
        if (await self.get([key]))[0] is not None:
            return False
        await self.put([(key, value)], ttl)
        return True

    async def reserve(self, items: Sequence[tuple[str, bytes]], ttl: float) -> list[bool]:
        held = await self.get([key for key, _ in items])
        mine = [(key, value) for (key, value), h in zip(items, held, strict=True) if h is None or h == value]
        await self.put(mine, ttl)
        return [h is None or h == value for (_, value), h in zip(items, held, strict=True)]

    async def take(self, keys: Sequence[str]) -> list[bytes | None]:
        values = await self.get(keys)
        for key in keys:
            self._gateway.pop(key, None)
        return values

    async def delete(self, key: str) -> None:
        self._gateway.pop(key, None)

    async def delete_if(self, items: Sequence[tuple[str, bytes]]) -> None:
        for key, value in items:
            entry = self._gateway.get(key)
            if entry is not None and entry[1] == value:
                del self._gateway[key]

    def _room(self, keys: Sequence[str]) -> None:
        """Make room for *keys* by dropping expired records only; raise StoreFull if that is not enough."""
        new = len({k for k in keys if k not in self._gateway})
        if len(self._gateway) + new <= self._max_gateway:
            return
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, key = heapq.heappop(self._expiries)
            entry = self._gateway.get(key)
            if entry is not None and entry[0] <= now:
                del self._gateway[key]
        if len(self._gateway) + new > self._max_gateway:
            raise StoreFull(f"the embedded store holds {len(self._gateway)} unexpired gateway records (the limit)")

    def _set(self, key: str, value: bytes, ttl: float) -> None:
        expires = self._clock() + ttl
        self._gateway[key] = (expires, value)
        heapq.heappush(self._expiries, (expires, key))
        if len(self._expiries) > 4 * max(self._max_gateway, 1024):
            # Rewritten keys leave stale heap entries behind: rebuild from what is held.
            self._expiries = [(e, k) for k, (e, _) in self._gateway.items()]
            heapq.heapify(self._expiries)

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        return _read(self._data, keys, self._clock())


def _read(space: dict[str, tuple[float, bytes]], keys: Sequence[str], now: float) -> list[bytes | None]:
    out: list[bytes | None] = []
    for key in keys:
        entry = space.get(key)
        if entry is not None and entry[0] <= now:
            del space[key]
            entry = None
        out.append(None if entry is None else entry[1])
    return out


# Compare-and-set / compare-and-delete on one key (so one hash slot in a cluster), atomic in Redis.
_RESERVE = """
local held = redis.call('GET', KEYS[1])
if held == false or held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_DELETE_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisStore:
    """Shared store: ``SET key value EX ttl`` per send, pipelined in batches; ``MGET`` per recall."""

    name = "redis"
    local = False

    def __init__(self, url: str, ttl: int, metrics: Metrics, *, index_msg_ids: bool = False) -> None:
        self._client = aioredis.Redis.from_url(
            url, socket_connect_timeout=1.0, socket_timeout=1.0, health_check_interval=30
        )
        self._ttl = ttl
        self.index_msg_ids = index_msg_ids
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
                        index = record.index_key if self.index_msg_ids else None
                        if index is not None:
                            pipe.set(GATEWAY_PREFIX + index, orjson.dumps(record.locator), ex=self._ttl)
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

    async def get(self, keys: Sequence[str]) -> list[bytes | None]:
        values = await self._gateway_op("get", self._client.mget([GATEWAY_PREFIX + key for key in keys]))
        return [_bytes(v) for v in values]

    async def locate(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self.get(keys)  # one namespace in Redis: the index is TTL'd like the send records

    async def reserve(self, items: Sequence[tuple[str, bytes]], ttl: float) -> list[bool]:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.eval(_RESERVE, 1, GATEWAY_PREFIX + key, value, int(ttl * 1000))
            return [bool(r) for r in await self._gateway_op("put", pipe.execute())]

    async def take(self, keys: Sequence[str]) -> list[bytes | None]:
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.getdel(GATEWAY_PREFIX + key)
            return [_bytes(v) for v in await self._gateway_op("get", pipe.execute())]

    async def delete_if(self, items: Sequence[tuple[str, bytes]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.eval(_DELETE_IF, 1, GATEWAY_PREFIX + key, value)
            await self._gateway_op("put", pipe.execute())

    async def put(self, items: Sequence[tuple[str, bytes]], ttl: float) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for key, value in items:
                pipe.set(GATEWAY_PREFIX + key, value, px=int(ttl * 1000))
            await self._gateway_op("put", pipe.execute())

    async def claim(self, key: str, value: bytes, ttl: float) -> bool:
        return bool(
            await self._gateway_op("put", self._client.set(GATEWAY_PREFIX + key, value, px=int(ttl * 1000), nx=True))
        )

    async def delete(self, key: str) -> None:
        await self._gateway_op("put", self._client.delete(GATEWAY_PREFIX + key))

    async def _gateway_op(self, op: str, call: Awaitable[Any]) -> Any:
        """Await a gateway round trip; a Redis failure becomes :class:`StoreError` (logged, counted)."""
        started = time.perf_counter()
        try:
            result = await call
        except (redis.exceptions.RedisError, OSError) as exc:
            self._metrics.correlation_store_errors.labels(op).inc()
            self._log_error(op, exc)
            raise StoreError(f"correlation store {op} failed: {exc!r}"[:300]) from exc
        self._metrics.correlation_store_seconds.labels(op).observe(time.perf_counter() - started)
        return result

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
    """Applies send records and recall-gateway requests to recall events; never raises, never
    waits past its budget. *sends*: send records are kept (``RELAY_ENRICHMENT``); *recalls*: the
    recall gateway is on, so recall callbacks the gateway caused are joined to their requests.
    *admin*: the App admin the gateway calls Tencent as (``RELAY_TENCENT_ADMIN``): a REST recall
    that names another operator was not the gateway's."""

    def __init__(
        self,
        store: CorrelationStore | None,
        metrics: Metrics,
        *,
        budget: float,
        evidence: bool,
        sends: bool = True,
        recalls: bool = False,
        admin: str = "administrator",
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._budget = budget
        self._evidence = evidence
        self.sends = sends and store is not None
        self._recalls = recalls and store is not None
        self._admin = admin
        self._open_until = 0.0  # circuit breaker: skip lookups briefly after a failure

    async def record(self, records: Sequence[SendRecord]) -> None:
        if self.store is not None and self.sends and records:
            await self.store.submit(records)

    @property
    def unmatched(self) -> Enrichment:
        """What an event says when no send record is found for it: ``normalize`` marks events so
        from the start, and most events then need no copy here."""
        return "miss" if self.sends else "disabled"

    async def enrich(self, events: Sequence[RevokeEvent]) -> list[RevokeEvent]:
        if not events:
            return []
        store = self.store
        if store is None or not (self.sends or self._recalls):
            return self._mark(events, "disabled")
        joins = [recall_key_of(e, self._admin) for e in events] if self._recalls else []
        wanted = [k for k in joins if k is not None]
        if not self.sends and not wanted:
            self._count_unmatched(events, joins)
            return self._mark(events, "disabled")
        if time.monotonic() < self._open_until:
            self._count_joins(wanted, "error")
            return self._mark(events, "error") if self.sends else list(events)
        # A provider other than Tencent computes its own store key (Matrix: room and event ID);
        # Tencent's events carry none and use the eventID's name, as their send records do.
        keys = [
            e.correlation_key or correlation_key(e.sdk_app_id or "", e.conversation.type, e.server_key) for e in events
        ]
        try:
            if store.local:
                found, requests = await self._lookups(store, keys, wanted)  # in-process: nothing to wait for
            else:
                async with asyncio.timeout(self._budget):
                    found, requests = await self._lookups(store, keys, wanted)
        except Exception:  # noqa: BLE001 - timeout or store failure: publish unenriched
            self._open_until = time.monotonic() + _BREAKER_SECONDS
            self._count_joins(wanted, "error")
            return self._mark(events, "error") if self.sends else list(events)
        enriched = self._apply_sends(events, keys, found) if self.sends else self._mark(events, "disabled")
        if self._recalls:
            by_key = dict(zip(wanted, requests, strict=True))
            enriched = [
                self._join(event, by_key.get(key) if key else None) for event, key in zip(enriched, joins, strict=True)
            ]
        return enriched

    async def _lookups(
        self, store: CorrelationStore, keys: list[str], joins: list[str]
    ) -> tuple[list[bytes | None], list[bytes | None]]:
        """Send records and recall requests, in parallel when both are wanted."""
        if not joins:
            return await store.lookup(keys) if self.sends else [], []
        if not self.sends:
            return [], await self._requests(store, joins)
        found, requests = await asyncio.gather(store.lookup(keys), self._requests(store, joins))
        return found, requests

    @staticmethod
    async def _requests(store: CorrelationStore, joins: list[str]) -> list[bytes | None]:
        """Take each join record (it is used once: a later recall of the same message is not this
        request's) and read the attribution it points to: two round trips, only for REST recalls."""
        pointers = await store.take(joins)
        wanted = sorted({p.decode() for p in pointers if p is not None})
        if not wanted:
            return [None] * len(joins)
        records = dict(zip(wanted, await store.get(wanted), strict=True))
        return [None if p is None else records.get(p.decode()) for p in pointers]

    def _apply_sends(
        self, events: Sequence[RevokeEvent], keys: list[str], found: list[bytes | None]
    ) -> list[RevokeEvent]:
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

    def _join(self, event: RevokeEvent, raw: bytes | None) -> RevokeEvent:
        if raw is not None:
            try:
                joined = apply_request(event, raw)
            except ValueError:
                self._metrics.child(self._metrics.recall_joins, "error").inc()
                return event
            self._metrics.child(self._metrics.recall_joins, "joined").inc()
            return joined
        if _is_rest(event):
            # Recalled over REST, but not through this gateway (another tool or admin, or the record
            # expired or was used).
            self._metrics.child(self._metrics.recall_joins, "unmatched").inc()
        return event

    def _count_unmatched(self, events: Sequence[RevokeEvent], joins: Sequence[str | None]) -> None:
        if self._recalls:
            rest = sum(1 for e, k in zip(events, joins, strict=True) if k is None and _is_rest(e))
            if rest:
                self._metrics.child(self._metrics.recall_joins, "unmatched").inc(rest)

    def _count_joins(self, wanted: Sequence[str], result: str) -> None:
        if wanted:
            self._metrics.child(self._metrics.recall_joins, result).inc(len(wanted))

    def _mark(self, events: Sequence[RevokeEvent], result: Enrichment) -> list[RevokeEvent]:
        self._metrics.child(self._metrics.correlation_lookups, result).inc(len(events))
        return [e if e.enrichment == result else replace(e, enrichment=result) for e in events]


def recall_key(sdk_app_id: str, conversation_type: ConversationType, parts: Sequence[str]) -> str:
    """Gateway key of a recall request for one message: the join key of the issue, each part
    percent-encoded so ``/`` only separates. C2C: (sender, receiver, MsgKey); group: (GroupId,
    TopicId or "", MsgSeq); official account: (account, MsgKey)."""
    return f"recall:{sdk_app_id}/{conversation_type}/" + "/".join(quote(part, safe="") for part in parts)


def recall_key_of(event: RevokeEvent, admin: str) -> str | None:
    """The join key a recall callback's event is looked up under; None when the gateway cannot
    have caused it: only a REST recall (``OptPlatform=RESTAPI``) made as *admin* can be (a group
    recall names its operator; C2C and official-account recalls name none)."""
    if event.provider != "tencent" or event.sdk_app_id is None or not _is_rest(event):
        return None  # a user's or group admin's own recall from a client, or no platform given
    if event.operator.user_id is not None and event.operator.user_id != admin:
        return None  # another admin account's REST recall: not ours
    c = event.conversation
    if c.type == "c2c":
        if event.sender is None or c.receiver is None or event.msg_key is None:
            return None
        return recall_key(event.sdk_app_id, "c2c", (event.sender, c.receiver, event.msg_key))
    if c.type == "group":
        if c.group_id is None or event.msg_seq is None:
            return None
        return recall_key(event.sdk_app_id, "group", (c.group_id, c.topic_id or "", str(event.msg_seq)))
    if c.official_account is None or event.msg_key is None:
        return None
    return recall_key(event.sdk_app_id, "official_account", (c.official_account, event.msg_key))


def _is_rest(event: RevokeEvent) -> bool:
    return event.platform is not None and event.platform.lower() == "restapi"


@dataclass(frozen=True, slots=True)
class Attribution:
    """What a gateway request says about the recalls it causes: who asked, why, naming which
    moderator, and how the moderator is known (asserted by the key, or verified by an issuer).
    Stored once per request; each message's join record points to it."""

    request: RecallRequest
    reason: str
    moderator: str
    asserted_by: str | None
    verified_by: str | None

    def encode(self) -> bytes:
        r = self.request
        return orjson.dumps(
            {
                "i": r.request_id,
                "b": r.requested_by,
                "t": r.requested_at_ms,
                "r": self.reason,
                "m": self.moderator,
                "a": self.asserted_by,
                "v": self.verified_by,
            }
        )


def apply_request(event: RevokeEvent, raw: bytes) -> RevokeEvent:
    """The event with the reason and moderator of the gateway request that caused it."""
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("attribution record is not an object")
    request_id, by, at, reason, moderator = (data.get(k) for k in ("i", "b", "t", "r", "m"))
    if not (isinstance(request_id, str) and isinstance(by, str) and isinstance(reason, str)):
        raise ValueError("attribution record lacks requestID, requestedBy or reason")
    if not isinstance(at, int) or not isinstance(moderator, str):
        raise ValueError("attribution record lacks requestedAt or moderator")
    asserted, verified = _str(data.get("a")), _str(data.get("v"))
    if (asserted is None) == (verified is None):
        raise ValueError("attribution record must say who asserted or verified the moderator")
    return replace(
        event,
        reason=reason,
        operator=Operator(moderator, "moderator", asserted_by=asserted, verified_by=verified),
        recall_request=RecallRequest(request_id, by, at),
    )


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


def _bytes(value: object) -> bytes | None:
    # decode_responses is off, so values are bytes (or None for a miss).
    return value if isinstance(value, bytes) or value is None else str(value).encode()


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _obj(value: object) -> dict[str, Any] | None:
    return value if isinstance(value, dict) else None
