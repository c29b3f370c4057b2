"""Send-then-recall sequences against a real Redis and a real RabbitMQ: the published events carry
the right operator.role, sender, clientMsgID and evidence; a Redis outage never blocks a recall."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from relay.store import KEY_PREFIX
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL
from relay.tencent.samples import callback_query
from relay.tencent.sends import C2C_SEND, GROUP_SEND, OFFICIAL_ACCOUNT_SEND
from tests.broker.test_publish import read_messages, start_relay
from tests.helpers import APP, TOKEN, validate_event

pytestmark = pytest.mark.broker
ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


class Scenario:
    """A relay wired to real Redis and RabbitMQ, plus helpers to send and recall unique messages."""

    def __init__(
        self,
        client: TestClient,
        amqp: aio_pika.abc.AbstractChannel,
        queue: str,  # type: ignore[type-arg]
        redis_client: aioredis.Redis,
    ) -> None:
        self.client = client
        self.amqp = amqp
        self.queue = queue
        self.redis = redis_client
        self.tag = uuid.uuid4().hex[:10]

    async def post(self, command: str, body: dict[str, Any], platform: str = "Android") -> int:
        url = f"/tencent-im/callback?{callback_query(command, APP, TOKEN, platform=platform)}"
        response = await self.client.post(url, data=orjson.dumps(body))
        return response.status

    async def sent(self, command: str, body: dict[str, Any], key: str) -> None:
        """Post a send callback and wait until its record is in Redis (writes are asynchronous)."""
        assert 200 == await self.post(command, {"CallbackCommand": command, "MsgTime": int(time.time()), **body})
        async with asyncio.timeout(5):
            while not await self.redis.exists(KEY_PREFIX + key):
                await asyncio.sleep(0.02)

    async def recalled(
        self, command: str, body: dict[str, Any], count: int = 1, platform: str = "Android"
    ) -> list[dict[str, Any]]:
        assert 200 == await self.post(command, {"CallbackCommand": command, **body}, platform)
        events = [orjson.loads(m.body) for m in await read_messages(self.amqp, self.queue, count)]
        for event in events:
            validate_event(event)
        return events


ScenarioFactory = Callable[..., Awaitable[Scenario]]


@pytest.fixture
def make_scenario(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    redis_url: str,
    redis_client: aioredis.Redis,
) -> ScenarioFactory:
    """A relay on real Redis and RabbitMQ; keyword arguments override its RELAY_* settings."""

    async def make(**env: str) -> Scenario:
        settings = {"RELAY_REDIS_URL": redis_url, "RELAY_CORRELATION_TTL": "120", "RELAY_ENRICHMENT_TIMEOUT": "0.5"}
        client = await start_relay(aiohttp_client, amqp_url, names, tmp_path, **{**settings, **env})
        return Scenario(client, amqp, names["queue"], redis_client)

    return make


@pytest.fixture
async def scenario(make_scenario: ScenarioFactory) -> Scenario:
    return await make_scenario()


async def test_c2c_send_then_recall(scenario: Scenario) -> None:
    """A C2C recall after its send carries the SDK msgID (msgID and clientMsgID), the sender and sentAt."""
    key = f"{scenario.tag}_1_1767225540"
    msg_id = f"144115212345678901-1767225540-{scenario.tag}"
    await scenario.sent(
        C2C_SEND,
        {
            "From_Account": "u_alice",
            "To_Account": "u_bob",
            "MsgKey": key,
            "MsgId": msg_id,
            "MsgBody": [],
            "SendMsgResult": 0,
        },
        f"{APP}/c2c/{key}",
    )
    (event,) = await scenario.recalled(C2C_RECALL, {"From_Account": "u_alice", "To_Account": "u_bob", "MsgKey": key})
    assert (
        "hit",
        msg_id,
        msg_id,
        key,
        "u_alice",
        {"userID": "u_alice", "role": "sender", "assertedBy": None, "verifiedBy": None},
    ) == (
        event["enrichment"],
        event["msgID"],
        event["clientMsgID"],
        event["msgKey"],
        event["sender"],
        event["operator"],
    )
    assert event["sentAt"] is not None
    assert event["evidence"] is None  # RELAY_EVIDENCE is off by default


@pytest.mark.parametrize(
    ("operator", "platform", "role"),
    [
        pytest.param("u_carol", "Android", "sender", id="sender-recalls-own"),
        pytest.param("u_mod01", "iOS", "group_admin", id="admin-recalls-another"),
        pytest.param("administrator", "RESTAPI", "app_admin", id="rest-recall"),
    ],
)
async def test_group_send_then_recall(scenario: Scenario, operator: str, platform: str, role: str) -> None:
    """A group recall learns whose message it was and in which role it was recalled."""
    group = f"@TGS#{scenario.tag}"
    await scenario.sent(
        GROUP_SEND, {"GroupId": group, "From_Account": "u_carol", "MsgSeq": 7, "MsgId": "m-7"}, f"{APP}/group/{group}/7"
    )
    (event,) = await scenario.recalled(
        GROUP_RECALL, {"Operator_Account": operator, "GroupId": group, "MsgSeqList": [{"MsgSeq": 7}]}, platform=platform
    )
    assert ("hit", "u_carol", {"userID": operator, "role": role, "assertedBy": None, "verifiedBy": None}, "m-7") == (
        event["enrichment"],
        event["sender"],
        event["operator"],
        event["clientMsgID"],
    )


async def test_topic_send_then_recall(scenario: Scenario) -> None:
    """Topic messages are matched by group, topic and sequence together."""
    group = f"@TGS#_{scenario.tag}"
    topic = f"{group}@TOPIC#_general"
    await scenario.sent(
        GROUP_SEND,
        {"GroupId": group, "TopicId": topic, "From_Account": "u_dave", "MsgSeq": 9},
        f"{APP}/group/{group}/{topic}/9",
    )
    (event,) = await scenario.recalled(
        GROUP_RECALL, {"Operator_Account": "u_mod02", "GroupId": group, "TopicId": topic, "MsgSeqList": [{"MsgSeq": 9}]}
    )
    assert ("hit", "u_dave", "group_admin", topic) == (
        event["enrichment"],
        event["sender"],
        event["operator"]["role"],
        event["conversation"]["topicID"],
    )


async def test_official_account_send_then_recall(scenario: Scenario) -> None:
    """An official-account recall after its send carries the send time."""
    key = f"77_{scenario.tag}_1767225000"
    await scenario.sent(
        OFFICIAL_ACCOUNT_SEND, {"Official_Account": "@TOA#_news01", "MsgKey": key}, f"{APP}/official_account/{key}"
    )
    (event,) = await scenario.recalled(
        OFFICIAL_ACCOUNT_RECALL, {"Official_Account": "@TOA#_news01", "WithdrawMsgList": [{"MsgKey": key}]}
    )
    assert ("hit", "@TOA#_news01") == (event["enrichment"], event["sender"])
    assert event["sentAt"] is not None


async def test_recall_without_send_is_a_miss(scenario: Scenario) -> None:
    """A recall whose send was never reported is published with enrichment=miss and role unknown."""
    (event,) = await scenario.recalled(
        GROUP_RECALL, {"Operator_Account": "u_mod01", "GroupId": f"@TGS#{scenario.tag}", "MsgSeqList": [{"MsgSeq": 1}]}
    )
    assert ("miss", None, "unknown") == (event["enrichment"], event["sender"], event["operator"]["role"])


async def test_redis_down_publishes_unenriched(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """With Redis unreachable, sends are still answered OK and recalls are published with enrichment=error."""
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path, RELAY_REDIS_URL="redis://127.0.0.1:1/0")
    send = {"CallbackCommand": C2C_SEND, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "1_2_3"}
    url = f"/tencent-im/callback?{callback_query(C2C_SEND, APP, TOKEN)}"
    assert 200 == (await client.post(url, data=orjson.dumps(send))).status
    recall = {"CallbackCommand": C2C_RECALL, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "1_2_3"}
    url = f"/tencent-im/callback?{callback_query(C2C_RECALL, APP, TOKEN)}"
    started = time.monotonic()
    assert 200 == (await client.post(url, data=orjson.dumps(recall))).status
    assert time.monotonic() - started < 2
    (message,) = await read_messages(amqp, names["queue"], 1)
    event = orjson.loads(message.body)
    assert ("error", "1_2_3") == (event["enrichment"], event["msgID"])


async def test_records_expire_after_the_ttl(make_scenario: ScenarioFactory, redis_client: aioredis.Redis) -> None:
    """With RELAY_CORRELATION_TTL=1 a recall two seconds after the send finds nothing."""
    s = await make_scenario(RELAY_CORRELATION_TTL="1")
    key = f"{s.tag}_5_1767225540"
    await s.sent(C2C_SEND, {"From_Account": "u_a", "To_Account": "u_b", "MsgKey": key}, f"{APP}/c2c/{key}")
    assert 0 < await redis_client.ttl(KEY_PREFIX + f"{APP}/c2c/{key}") <= 1
    await asyncio.sleep(2.1)
    (event,) = await s.recalled(C2C_RECALL, {"From_Account": "u_a", "To_Account": "u_b", "MsgKey": key})
    assert "miss" == event["enrichment"]


@pytest.mark.parametrize("evidence", ["on", "off"])
async def test_evidence_on_and_off(make_scenario: ScenarioFactory, redis_client: aioredis.Redis, evidence: str) -> None:
    """With RELAY_EVIDENCE=on the recalled message's body reaches the event; off, it is neither stored nor sent."""
    s = await make_scenario(RELAY_EVIDENCE=evidence)
    key = f"{s.tag}_8_1767225540"
    body = [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "abusive text"}}]
    await s.sent(
        C2C_SEND,
        {"From_Account": "u_a", "To_Account": "u_b", "MsgKey": key, "MsgBody": body, "CloudCustomData": "x"},
        f"{APP}/c2c/{key}",
    )
    stored = await redis_client.get(KEY_PREFIX + f"{APP}/c2c/{key}")
    assert stored is not None
    assert (b"abusive text" in stored) == (evidence == "on")
    (event,) = await s.recalled(C2C_RECALL, {"From_Account": "u_a", "To_Account": "u_b", "MsgKey": key})
    expected = {"msgBody": body, "cloudCustomData": "x"} if evidence == "on" else None
    assert ("hit", expected) == (event["enrichment"], event["evidence"])


async def test_purge_deletes_only_that_senders_records(
    scenario: Scenario, redis_client: aioredis.Redis, redis_url: str
) -> None:
    """`relay correlation purge --user` removes every record of that sender and keeps the others'."""
    from prometheus_client import CollectorRegistry

    from relay.metrics import Metrics
    from relay.store.redis import RedisStore

    victim, other = f"u_gone_{scenario.tag}", f"u_stays_{scenario.tag}"
    keys = []
    for i, sender in enumerate([victim, victim, other]):
        key = f"{scenario.tag}_{i}_1767225540"
        await scenario.sent(C2C_SEND, {"From_Account": sender, "To_Account": "u_b", "MsgKey": key}, f"{APP}/c2c/{key}")
        keys.append(KEY_PREFIX + f"{APP}/c2c/{key}")
    store = RedisStore.from_url(redis_url, 60, Metrics(CollectorRegistry()))
    try:
        assert 2 == await store.purge_sender(victim)
    finally:
        await store.close()
    assert [0, 0, 1] == [await redis_client.exists(k) for k in keys]
