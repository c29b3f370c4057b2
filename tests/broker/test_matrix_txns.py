"""The Redis transaction log of the Matrix endpoint against a real Redis: shared, namespaced, TTL'd,
and harmless when Redis is gone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from relay.matrix.transactions import KEY_PREFIX, TTL_SECONDS, RedisTransactionLog

pytestmark = pytest.mark.broker


@pytest.fixture
async def namespace(redis_url: str) -> AsyncIterator[str]:
    name = uuid.uuid4().hex[:16]
    yield name
    client = aioredis.Redis.from_url(redis_url)
    async for key in client.scan_iter(match=f"{KEY_PREFIX}{name}:*"):
        await client.delete(key)
    await client.aclose()


async def test_an_answered_transaction_is_seen_by_every_replica_for_a_day(
    redis_url: str,
    namespace: str,
) -> None:
    """What one relay remembers (the digest of the transaction's events) another sees (same
    registration), with a one-day TTL; another registration's namespace does not see it."""
    first, second = RedisTransactionLog(redis_url, namespace), RedisTransactionLog(redis_url, namespace)
    other = RedisTransactionLog(redis_url, "other-" + namespace)
    try:
        assert await second.answered("17") is None
        await first.remember("17", b"digest-17")
        assert (b"digest-17", None) == (await second.answered("17"), await other.answered("17"))
        client = aioredis.Redis.from_url(redis_url)
        ttl = await client.ttl(f"{KEY_PREFIX}{namespace}:17")
        await client.aclose()
        assert TTL_SECONDS - 5 <= ttl <= TTL_SECONDS
    finally:
        for log in (first, second, other):
            await log.close()


async def test_an_unreachable_redis_counts_as_not_answered_and_never_raises() -> None:
    """Without Redis a lookup says "not answered" (the transaction is handled again, with the same
    eventIDs) and a write is dropped; both are logged, neither raises."""
    txns = RedisTransactionLog("redis://127.0.0.1:1/0", "ns")
    with capture_logs() as logs:
        await txns.remember("1", b"d")
        assert await txns.answered("1") is None
    await txns.close()
    assert ["put"] == [e["op"] for e in logs if e["event"] == "relay.matrix_txn_log_error"]
