"""The recall gateway's records in a real Redis (issue 19, case 4): bounded in size and lifetime, and
the compare-and-set scripts behave as the embedded store's twin."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from relay.app import API, GATEWAY, create_app
from relay.metrics import Metrics
from relay.store import GATEWAY_PREFIX
from relay.store.memory import MemoryStore
from relay.store.redis import RedisStore
from tests.app.test_gateway_api import API_TOKEN, AUTH, SECRET, FakeTencent
from tests.helpers import APP, RecordingPublisher, make_settings

pytestmark = pytest.mark.broker
ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[MemoryStore | RedisStore]:
    metrics = Metrics(CollectorRegistry())
    if request.param == "memory":
        yield MemoryStore(60, 1000, metrics)
        return
    redis_store = RedisStore.from_url(redis_url, 60, metrics)
    yield redis_store
    await redis_store.close()


async def test_reserve_take_and_delete_if_mean_the_same_in_both_stores(store: MemoryStore | RedisStore) -> None:
    """A join record is claimed once (its owner may claim it again), read-and-deleted once, and
    deleted only by its owner: in Redis (Lua, one key per script) as in memory."""
    tag = uuid.uuid4().hex
    a, b, c = (f"recall:test/{tag}/{n}" for n in "abc")
    assert [True, True] == await store.reserve([(a, b"mine"), (b, b"mine")], 60)
    assert [False, True] == await store.reserve([(a, b"theirs"), (c, b"theirs")], 60)
    assert [True] == await store.reserve([(a, b"mine")], 60)
    await store.delete_if([(a, b"theirs"), (b, b"mine")])
    assert [b"mine", None, b"theirs"] == await store.get([a, b, c])
    assert [b"mine", b"theirs"] == await store.take([a, c])
    assert [None, None] == await store.take([a, c])


async def test_4_a_large_request_keeps_its_reason_once_and_short_lived_join_records(
    aiohttp_client: ClientFactory, tmp_path: Path, redis_url: str, redis_client: aioredis.Redis
) -> None:
    """100 messages with a 1,000-character reason of 4-byte characters: the reason is stored once,
    each join record holds a pointer, every record expires within RELAY_RECALL_JOIN_TTL, and the
    whole request costs a few tens of KB of Redis (it was 1.8 MB for 24 h)."""
    group = f"@TGS#{uuid.uuid4().hex[:10]}"
    settings = make_settings(
        tmp_path,
        RELAY_API_TOKENS=f"moderation-svc={API_TOKEN}",
        RELAY_TENCENT_SECRET_KEYS=f"{APP}={SECRET}",
        RELAY_REDIS_URL=redis_url,
        RELAY_RECALL_JOIN_TTL="600",
    )
    app = create_app(settings, publisher=RecordingPublisher(), registry=CollectorRegistry())
    app[GATEWAY].recaller = FakeTencent()
    await aiohttp_client(app)
    api = await aiohttp_client(app[API])
    request_id = f"big-{uuid.uuid4().hex[:8]}"
    body = {
        "requestID": request_id,
        "sdkAppID": APP,
        "conversation": {"type": "group", "groupID": group},
        "messages": [{"msgSeq": n} for n in range(100)],
        "reason": "😀" * 1000,
        "moderator": {"userID": "mod_7"},
    }
    response = await api.post("/v1/recalls", data=orjson.dumps(body), headers=AUTH)
    assert 200 == response.status
    joins = [k async for k in redis_client.scan_iter(match=f"{GATEWAY_PREFIX}recall:{{{APP}/group/*{group[5:]}*")]
    mine = [k async for k in redis_client.scan_iter(match=f"{GATEWAY_PREFIX}*{request_id}}}")]
    assert 100 == len(joins)
    assert 2 == len(mine)  # the attribution (reason, moderator) and the stored answer
    sizes = [int(await redis_client.memory_usage(k) or 0) for k in [*joins, *mine]]
    join_sizes = sizes[:100]
    assert max(join_sizes) < 400
    assert sum(sizes) < 64 * 1024
    ttls = {k: await redis_client.ttl(k) for k in [*joins, *mine]}
    assert all(0 < ttls[k] <= 600 for k in joins)
    answer = next(k for k in mine if k.startswith(f"{GATEWAY_PREFIX}request:".encode()))
    assert 600 < ttls[answer] <= 86400  # the idempotent answer keeps RELAY_RECALL_TTL
    await redis_client.delete(*joins, *mine)
