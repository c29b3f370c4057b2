"""Send callbacks → records, and records → enriched recall events (embedded store, no I/O)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay.enricher import Enricher
from relay.errors import Reject, Rejection
from relay.events import RevokeEvent
from relay.metrics import Metrics
from relay.store import SendRecord
from relay.store.memory import MemoryStore
from relay.store.redis import RedisStore
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL, CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.sends import C2C_SEND, GROUP_SEND, OFFICIAL_ACCOUNT_SEND, parse_send
from tests.helpers import APP

C2C_SENT = {
    "CallbackCommand": C2C_SEND,
    "From_Account": "u_alice",
    "To_Account": "u_bob",
    "MsgSeq": 48374,
    "MsgRandom": 2837546,
    "MsgTime": 1767225540,
    "MsgKey": "48374_2837546_1767225540",
    "MsgId": "144115212345678901-1767225540-2837546",
    "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "hello"}}],
    "CloudCustomData": "cc",
    "SendMsgResult": 0,
}
GROUP_SENT = {
    "CallbackCommand": GROUP_SEND,
    "GroupId": "@TGS#2SAMPLE",
    "Type": "Public",
    "From_Account": "u_carol",
    "Operator_Account": "",
    "Random": 1,
    "MsgSeq": 123,
    "MsgTime": 1767225500,
    "MsgId": "144115200000000001-1767225500-1",
    "MsgBody": [{"MsgType": "TIMTextElem", "MsgContent": {"Text": "spam"}}],
    "EventTime": "1767225500123",
}


def q(command: str, platform: str = "Android") -> CallbackQuery:
    return CallbackQuery(sdk_app_id=APP, command=command, platform=platform)


def sends(body: dict[str, Any], **kw: Any) -> list[SendRecord]:
    return parse_send(orjson.dumps(body), q(str(body["CallbackCommand"])), **kw)


def recalls(body: dict[str, Any], platform: str = "Android") -> list[RevokeEvent]:
    return list(normalize(orjson.dumps(body), q(str(body["CallbackCommand"]), platform), 1_767_225_600_000).events)


def group_recall(operator: str, seq: int = 123, topic: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "CallbackCommand": GROUP_RECALL,
        "Operator_Account": operator,
        "Type": "Public",
        "GroupId": "@TGS#2SAMPLE",
        "MsgSeqList": [{"MsgSeq": seq}],
    }
    if topic:
        body["TopicId"] = topic
    return body


def c2c_recall() -> dict[str, Any]:
    return {
        "CallbackCommand": C2C_RECALL,
        "From_Account": "u_alice",
        "To_Account": "u_bob",
        "MsgKey": "48374_2837546_1767225540",
    }


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def enricher(*, evidence: bool = False, ttl: float = 60, clock: Clock | None = None) -> Enricher:
    metrics = Metrics(CollectorRegistry())
    store = MemoryStore(ttl, 1000, metrics, clock=clock or Clock())
    return Enricher(store, metrics, budget=0.5, evidence=evidence)


async def enrich(e: Enricher, sent: Sequence[SendRecord], events: Sequence[RevokeEvent]) -> list[dict[str, Any]]:
    await e.record(sent)
    return [x.to_dict() for x in await e.enrich(events)]


def test_c2c_send_record() -> None:
    """A C2C send is keyed by app and MsgKey and keeps the SDK msgID, sender and send time (ms)."""
    (record,) = sends(C2C_SENT)
    assert (
        f"{APP}/c2c/48374_2837546_1767225540",
        "144115212345678901-1767225540-2837546",
        "u_alice",
        1767225540000,
        None,
    ) == (record.key, record.client_msg_id, record.sender, record.sent_at_ms, record.evidence)


def test_failed_send_is_not_recorded() -> None:
    """A send that failed (SendMsgResult != 0) can never be recalled and is not stored."""
    assert [] == sends({**C2C_SENT, "SendMsgResult": 20006})


def test_evidence_is_kept_only_when_enabled_and_never_cut() -> None:
    """Evidence holds MsgBody and CloudCustomData when on; past the cap it is replaced by a marker."""
    assert sends(C2C_SENT)[0].evidence is None
    (kept,) = sends(C2C_SENT, evidence=True)
    assert {"msgBody": C2C_SENT["MsgBody"], "cloudCustomData": "cc"} == kept.evidence
    (big,) = sends({**C2C_SENT, "CloudCustomData": "x" * 5000}, evidence=True, evidence_max_bytes=4096)
    assert big.evidence is not None
    assert "too_large" == big.evidence["omitted"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        pytest.param({**C2C_SENT, "MsgKey": None}, Reject.MISSING_FIELD, id="c2c-no-msgkey"),
        pytest.param({**GROUP_SENT, "MsgSeq": "123"}, Reject.INVALID_FIELD, id="group-seq-string"),
        pytest.param({"CallbackCommand": OFFICIAL_ACCOUNT_SEND, "MsgKey": "k"}, Reject.MISSING_FIELD, id="oa-no-acct"),
    ],
)
def test_unusable_send_callbacks_are_rejected(body: dict[str, Any], code: Reject) -> None:
    """A send callback without its identifying fields is refused like any bad input."""
    with pytest.raises(Rejection) as info:
        sends(body)
    assert code == info.value.code


async def test_c2c_recall_gets_client_msg_id_and_send_time() -> None:
    """A C2C recall after its send carries the SDK msgID as msgID/clientMsgID, and sentAt."""
    (event,) = await enrich(enricher(), sends(C2C_SENT), recalls(c2c_recall()))
    assert (
        "hit",
        "144115212345678901-1767225540-2837546",
        "144115212345678901-1767225540-2837546",
        "2025-12-31T23:59:00.000Z",
        {"userID": "u_alice", "role": "sender", "assertedBy": None, "verifiedBy": None},
    ) == (event["enrichment"], event["msgID"], event["clientMsgID"], event["sentAt"], event["operator"])


@pytest.mark.parametrize(
    ("operator", "platform", "role"),
    [
        pytest.param("u_carol", "Android", "sender", id="sender-recalls-own"),
        pytest.param("u_mod01", "iOS", "group_admin", id="admin-recalls-another"),
        pytest.param("admin", "RESTAPI", "app_admin", id="rest-recall"),
    ],
)
async def test_group_roles(operator: str, platform: str, role: str) -> None:
    """With the send known, a group recall says whose message it was and in which role it was recalled."""
    (event,) = await enrich(enricher(), sends(GROUP_SENT), recalls(group_recall(operator), platform))
    assert ("hit", "u_carol", {"userID": operator, "role": role, "assertedBy": None, "verifiedBy": None}) == (
        event["enrichment"],
        event["sender"],
        event["operator"],
    )


async def test_topic_messages_are_keyed_per_topic() -> None:
    """The same MsgSeq in another topic is another message: no false hit across topics."""
    topic = "@TGS#2SAMPLE@TOPIC#_t1"
    e = enricher()
    await e.record(sends({**GROUP_SENT, "TopicId": topic}))
    hit, miss = await e.enrich(recalls(group_recall("u_carol", topic=topic)) + recalls(group_recall("u_carol")))
    assert ("hit", "miss") == (hit.enrichment, miss.enrichment)


async def test_official_account_recall_is_enriched() -> None:
    """An official-account send record gives its recall a send time (and evidence when on)."""
    sent = {
        "CallbackCommand": OFFICIAL_ACCOUNT_SEND,
        "Official_Account": "@TOA#_news01",
        "MsgKey": "77_1_1767225000",
        "MsgTime": 1767225000,
        "MsgBody": [{"MsgType": "TIMTextElem"}],
    }
    recall = {
        "CallbackCommand": OFFICIAL_ACCOUNT_RECALL,
        "Official_Account": "@TOA#_news01",
        "WithdrawMsgList": [{"MsgKey": "77_1_1767225000"}],
    }
    (event,) = await enrich(enricher(evidence=True), sends(sent, evidence=True), recalls(recall))
    assert ("hit", "2025-12-31T23:50:00.000Z", [{"MsgType": "TIMTextElem"}]) == (
        event["enrichment"],
        event["sentAt"],
        event["evidence"]["msgBody"],
    )


async def test_miss_leaves_the_event_as_it_was() -> None:
    """A recall with no recorded send is published with enrichment=miss and nothing invented."""
    (event,) = await enrich(enricher(), [], recalls(group_recall("u_mod01")))
    assert ("miss", None, {"userID": "u_mod01", "role": "unknown", "assertedBy": None, "verifiedBy": None}, None) == (
        event["enrichment"],
        event["sender"],
        event["operator"],
        event["sentAt"],
    )


async def test_evidence_stays_out_when_disabled() -> None:
    """Evidence recorded earlier is not published by a relay with evidence off."""
    (event,) = await enrich(enricher(evidence=False), sends(C2C_SENT, evidence=True), recalls(c2c_recall()))
    assert ("hit", None) == (event["enrichment"], event["evidence"])


async def test_entries_expire_after_the_ttl() -> None:
    """A send record older than RELAY_CORRELATION_TTL no longer enriches."""
    clock = Clock()
    e = enricher(ttl=10, clock=clock)
    await e.record(sends(C2C_SENT))
    clock.now += 11
    assert ["miss"] == [x.enrichment for x in await e.enrich(recalls(c2c_recall()))]


class Flaky:
    """A remote store whose next *slow* lookups hang (an overloaded Redis), then answer with a record."""

    name = "flaky"
    local = False

    def __init__(self, slow: int) -> None:
        self.slow = slow
        self.calls = 0

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def submit(self, records: Sequence[SendRecord]) -> None: ...

    async def lookup(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        if self.calls <= self.slow:
            await asyncio.sleep(5)
        return [b'{"m":null,"s":"u","t":null}' for _ in keys]


async def test_slow_store_is_an_error_within_the_budget() -> None:
    """A store slower than the budget yields enrichment=error quickly; after three failures in a
    row the breaker skips lookups without waiting."""
    metrics = Metrics(CollectorRegistry())
    store = Flaky(slow=100)
    e = Enricher(store, metrics, budget=0.05, evidence=False)
    loop = asyncio.get_running_loop()
    for _ in range(3):
        started = loop.time()
        (event,) = await e.enrich(recalls(c2c_recall()))
        assert "error" == event.enrichment
        assert loop.time() - started < 0.5
    assert 3 == store.calls
    assert "error" == (await e.enrich(recalls(c2c_recall())))[0].enrichment  # breaker open: no wait
    assert 3 == store.calls
    assert 4 == metrics.registry.get_sample_value("relay_correlation_lookups_total", {"result": "error"})


async def test_one_slow_lookup_does_not_skip_the_store() -> None:
    """One lookup over the budget (a pause on a busy machine) costs that lookup only: the next one
    asks the store again and is a hit."""
    metrics = Metrics(CollectorRegistry())
    store = Flaky(slow=1)
    e = Enricher(store, metrics, budget=0.05, evidence=False)
    assert "error" == (await e.enrich(recalls(c2c_recall())))[0].enrichment
    assert "hit" == (await e.enrich(recalls(c2c_recall())))[0].enrichment
    assert 2 == store.calls


async def test_lookups_that_time_out_together_count_once() -> None:
    """Ten recalls waiting when the store (or the relay's own loop) paused all overrun the budget at
    once: that is one failure, not ten, so the breaker stays closed and the next lookup is a hit."""
    metrics = Metrics(CollectorRegistry())
    store = Flaky(slow=10)
    e = Enricher(store, metrics, budget=0.05, evidence=False)
    waited = await asyncio.gather(*(e.enrich(recalls(c2c_recall())) for _ in range(10)))
    assert ["error"] * 10 == [events[0].enrichment for events in waited]
    assert "hit" == (await e.enrich(recalls(c2c_recall())))[0].enrichment
    assert 11 == store.calls


async def test_memory_store_is_bounded() -> None:
    """The embedded store keeps at most RELAY_CORRELATION_MAX_ENTRIES, dropping the oldest."""
    metrics = Metrics(CollectorRegistry())
    store = MemoryStore(60, 3, metrics)
    await store.submit([SendRecord(f"k{i}", None, "u", None) for i in range(5)])
    assert 3 == len(store)
    assert [None, None, b'{"m":null,"s":"u","t":null}'] == await store.lookup(["k0", "k1", "k4"])


async def test_memory_store_holds_records_compactly() -> None:
    """10,000 records cost well under 500 bytes each (orjson's oversized buffers are not kept)."""
    import tracemalloc

    store = MemoryStore(60, 20_000, Metrics(CollectorRegistry()))
    records = [
        SendRecord(f"{APP}/c2c/{i}_1_1767225540", f"1441152123-{i}", "u_alice", 1767225540000) for i in range(10_000)
    ]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await store.submit(records)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert used / 10_000 < 500, used / 10_000


async def test_redis_writer_falling_behind_slows_send_callbacks_instead_of_dropping() -> None:
    """A full write queue makes submit wait for room (FIFO); only past the wait is a record dropped."""
    metrics = Metrics(CollectorRegistry())
    store = RedisStore.from_url("redis://127.0.0.1:1", 60, metrics)  # never connected: the queue is what is tested
    store._queue = asyncio.Queue(2)
    await store.submit([SendRecord("k1", None, "u", None), SendRecord("k2", None, "u", None)])
    waiting = asyncio.create_task(store.submit([SendRecord("k3", None, "u", None)], wait=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the queue is full: the send callback waits
    assert "k1" == store._queue.get_nowait().key  # the writer takes one
    await asyncio.wait_for(waiting, 1)
    assert ["k2", "k3"] == [store._queue.get_nowait().key for _ in range(2)]
    assert metrics.registry.get_sample_value("relay_correlation_dropped_total") == 0

    await store.submit([SendRecord(f"f{i}", None, "u", None) for i in range(2)])
    started = asyncio.get_running_loop().time()
    await store.submit([SendRecord("late", None, "u", None)], wait=0.2)
    assert 0.15 < asyncio.get_running_loop().time() - started < 1
    assert metrics.registry.get_sample_value("relay_correlation_dropped_total") == 1
    await store.close()


async def test_while_the_writer_fails_a_full_queue_drops_without_waiting() -> None:
    """Redis down: once a batch has failed, a send callback that finds the queue full is not held
    (issue 21: callbacks never wait on Redis); the record is dropped and counted."""
    metrics = Metrics(CollectorRegistry())
    store = RedisStore.from_url("redis://127.0.0.1:1", 60, metrics)  # nothing listens: every write fails
    await store.start()
    try:
        await store.submit([SendRecord("first", None, "u", None)])
        async with asyncio.timeout(5):
            while not metrics.registry.get_sample_value("relay_correlation_dropped_total"):
                await asyncio.sleep(0.01)  # the writer tried and failed
        store._queue = asyncio.Queue(1)
        store._queue.put_nowait(SendRecord("held", None, "u", None))
        started = asyncio.get_running_loop().time()
        await store.submit([SendRecord("late", None, "u", None)], wait=5)
        assert asyncio.get_running_loop().time() - started < 0.1
        assert 2 == metrics.registry.get_sample_value("relay_correlation_dropped_total")
    finally:
        store._queue = asyncio.Queue()  # nothing left for close() to wait on
        await store.close()
