"""Which transactions the relay has answered 200, so a retried ``txnId`` publishes nothing twice.

The homeserver retries a transaction until it gets a 200, and it may send one again whose 200 was
lost on the way back. Its events carry deterministic eventIDs, so a repeat would only make
duplicates that consumers drop; remembering the answered ``txnId`` avoids publishing them at all.

Redis when ``RELAY_REDIS_URL`` is set (shared by replicas and workers, so a retry that lands on
another replica is still recognized, and kept across restarts), else a bounded in-process map.
Either way best effort: a lookup that fails counts as "not answered" (the transaction is handled
again, with the same eventIDs), and a failed write only means a possible repeat later. What is
kept is a digest of the transaction's events, so a txnId reused for other events is told apart
from a retry.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import orjson
import redis.asyncio as aioredis
import redis.exceptions
import structlog

log = structlog.get_logger()

KEY_PREFIX = "revoke-relay:matrix-txn:"
# A homeserver retries within minutes (Synapse backs off up to 8.5 min); a day also covers one
# that was down meanwhile. In memory, 10,000 transactions are hours of a busy homeserver's traffic.
TTL_SECONDS = 24 * 3600
MAX_ENTRIES = 10_000
_REDIS_TIMEOUT = 1.0


LEGACY_ENTRY = b"1"  # what a relay before the digest kept: answered, content unknown


def digest(events: list[object]) -> bytes:
    """What identifies a transaction's content: the IDs of its events, hashed. Not the events' JSON:
    a homeserver's retry carries the same events with other ``unsigned`` data (Synapse updates
    ``unsigned.age``), measured against a real Synapse (tests/synapse)."""
    ids = sorted(
        e["event_id"] if isinstance(e, dict) and isinstance(e.get("event_id"), str) else orjson.dumps(e).decode()
        for e in events
    )
    return hashlib.sha256("\n".join(ids).encode()).hexdigest().encode()


class TransactionLog(Protocol):
    name: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def answered(self, txn_id: str) -> bytes | None:
        """The digest of the transaction *txn_id* answered 200 before, or None (also when the log
        cannot tell). ``b"1"``: answered by a relay that kept no digest."""

    async def remember(self, txn_id: str, digest: bytes) -> None:
        """Record that *txn_id*, whose events have *digest*, was answered 200; never raises."""


class MemoryTransactionLog:
    """One process's memory: bounded (oldest dropped first) and TTL'd; lost on restart."""

    name = "memory"

    def __init__(
        self, ttl: float = TTL_SECONDS, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._answered: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answered)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self._answered.clear()

    async def answered(self, txn_id: str) -> bytes | None:
        entry = self._answered.get(txn_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._answered[txn_id]
            return None
        return entry[1]

    async def remember(self, txn_id: str, digest: bytes) -> None:
        self._answered.pop(txn_id, None)
        self._answered[txn_id] = (self._clock() + self._ttl, digest)
        while len(self._answered) > self._max:
            self._answered.popitem(last=False)


class RedisTransactionLog:
    """``SET <prefix><namespace>:<txnId> <digest> EX ttl`` after each 200, ``GET`` before handling.

    *namespace* separates registrations: a homeserver whose database was reset numbers its
    transactions from 1 again, and under a new ``hs_token`` those are new transactions."""

    name = "redis"

    def __init__(self, url: str, namespace: str, ttl: int = TTL_SECONDS) -> None:
        self._client = aioredis.Redis.from_url(url, socket_connect_timeout=1.0, socket_timeout=1.0)
        self._prefix = f"{KEY_PREFIX}{namespace}:"
        self._ttl = ttl
        self._last_error_log = 0.0

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self._client.aclose()

    async def answered(self, txn_id: str) -> bytes | None:
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                value = await self._client.get(self._prefix + txn_id)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self._log_error("get", exc)
            return None
        return value if isinstance(value, bytes) or value is None else str(value).encode()

    async def remember(self, txn_id: str, digest: bytes) -> None:
        try:
            async with asyncio.timeout(_REDIS_TIMEOUT):
                await self._client.set(self._prefix + txn_id, digest, ex=self._ttl)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            self._log_error("put", exc)

    def _log_error(self, op: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:  # an outage must not flood the log
            self._last_error_log = now
            log.warning("relay.matrix_txn_log_error", op=op, error=repr(exc)[:300])
