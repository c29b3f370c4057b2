"""Joining recall callbacks to gateway requests, and the audit events (embedded store, no I/O)."""

from __future__ import annotations

from typing import Any

import jsonschema
import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay.enricher import Enricher
from relay.events import RecallRequest, RevokeEvent, event_id
from relay.gateway.audit import FAILED, REQUESTED, audit_envelope, revoked_event_id
from relay.gateway.request import Moderator
from relay.joins import Attribution, recall_key, recall_key_of
from relay.metrics import Metrics
from relay.store import StoreFull, msg_id_key
from relay.store.memory import MemoryStore
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL, CallbackQuery
from relay.tencent.normalize import group_server_key, normalize
from relay.tencent.sends import C2C_SEND, parse_send
from tests.helpers import APP, load_schema, recall_command, validate_event

AUDIT = jsonschema.Draft202012Validator(load_schema("recall-audit.v2.json"), format_checker=jsonschema.FormatChecker())
REQUEST = RecallRequest("ticket-4711", "moderation-svc", 1_767_225_600_123)
ATTRIBUTION = "attribution:moderation-svc/ticket-4711"
RECORD = Attribution(REQUEST, "spam link — 广告", "mod_7", "moderation-svc", None).encode()
ADMIN = "administrator"
MODERATOR = Moderator("mod_7", asserted_by="svc")
AUDIT_KW: dict[str, Any] = {
    "requested_by": "svc",
    "moderator": MODERATOR,
    "requested_at_ms": 1,
    "at_ms": 2,
    "tencent_reason": None,
}


def recall(body: dict[str, Any], platform: str | None) -> RevokeEvent:
    query = CallbackQuery(sdk_app_id=APP, command=str(body["CallbackCommand"]), platform=platform)
    return normalize(orjson.dumps(body), query, 1_767_225_601_000).events[0]


C2C = {"CallbackCommand": C2C_RECALL, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "1_2_3"}
GROUP = {
    "CallbackCommand": GROUP_RECALL,
    "Operator_Account": "administrator",
    "GroupId": "@TGS#1",
    "TopicId": "@TGS#1@TOPIC#x",
    "MsgSeqList": [{"MsgSeq": 101}],
}
OFFICIAL = {
    "CallbackCommand": OFFICIAL_ACCOUNT_RECALL,
    "Official_Account": "@TOA#n",
    "WithdrawMsgList": [{"MsgKey": "k9"}],
}


def gateway(*, sends: bool = True) -> tuple[Enricher, MemoryStore, Metrics]:
    metrics = Metrics(CollectorRegistry())
    store = MemoryStore(60, 1000, metrics, index_msg_ids=True)
    return Enricher(store, metrics, budget=0.5, evidence=False, sends=sends, recalls=True, admin=ADMIN), store, metrics


async def on_record(store: MemoryStore, event: RevokeEvent) -> str:
    """Put the request's attribution and the event's join record in *store*, as the service does."""
    key = recall_key_of(event, ADMIN)
    assert key is not None
    await store.put([(ATTRIBUTION, RECORD)], 60)
    assert [True] == await store.reserve([(key, ATTRIBUTION.encode())], 60)
    return key


@pytest.mark.parametrize(
    ("body", "key"),
    [
        pytest.param(C2C, recall_key(APP, "c2c", ("u_a", "u_b", "1_2_3")), id="c2c"),
        pytest.param(GROUP, recall_key(APP, "group", ("@TGS#1", "@TGS#1@TOPIC#x", "101")), id="group-topic"),
        pytest.param(OFFICIAL, recall_key(APP, "official_account", ("@TOA#n", "k9")), id="official-account"),
    ],
)
def test_a_rest_recall_is_looked_up_under_the_issue_join_key(body: dict[str, Any], key: str) -> None:
    """(app, sender, receiver, MsgKey), (app, GroupId, TopicId, MsgSeq), (app, account, MsgKey)."""
    assert key == recall_key_of(recall(body, "RESTAPI"), ADMIN)


@pytest.mark.parametrize("platform", ["Android", "iOS", "Web", None])
def test_only_a_rest_recall_can_be_the_gateways(platform: str | None) -> None:
    """A user's own recall from a phone, or a callback that names no platform, is never joined."""
    assert recall_key_of(recall(C2C, platform), ADMIN) is None
    assert recall_key_of(recall(GROUP, platform), ADMIN) is None


def test_a_rest_recall_by_another_admin_account_is_not_the_gateways() -> None:
    """A group recall over REST that names an operator other than RELAY_TENCENT_ADMIN was another tool's."""
    assert recall_key_of(recall({**GROUP, "Operator_Account": "ops_admin"}, "RESTAPI"), ADMIN) is None


def test_join_keys_cannot_be_confused_by_slashes() -> None:
    """IDs holding '/' are percent-encoded, so two conversations never share a key."""
    assert recall_key(APP, "c2c", ("a/b", "c", "k")) != recall_key(APP, "c2c", ("a", "b/c", "k"))


@pytest.mark.parametrize("body", [C2C, GROUP, OFFICIAL], ids=["c2c", "group", "official-account"])
async def test_a_joined_event_carries_reason_moderator_and_request(body: dict[str, Any]) -> None:
    """A REST recall with a request on record gets the full reason, the moderator and recallRequest."""
    enricher, store, metrics = gateway()
    event = recall(body, "RESTAPI")
    await on_record(store, event)
    (joined,) = [e.to_dict() for e in await enricher.enrich([event])]
    validate_event(joined)
    assert "spam link — 广告" == joined["reason"]
    expected_operator = {"userID": "mod_7", "role": "moderator", "assertedBy": "moderation-svc", "verifiedBy": None}
    assert expected_operator == joined["operator"]
    expected_request = {
        "requestID": "ticket-4711",
        "requestedBy": "moderation-svc",
        "requestedAt": "2026-01-01T00:00:00.123Z",
    }
    assert expected_request == joined["recallRequest"]
    assert event.event_id == joined["eventID"]  # eventIDs stay as they are
    assert 1 == metrics.registry.get_sample_value("relay_recall_joins_total", {"result": "joined"})


async def test_a_rest_recall_without_a_request_is_unchanged_and_counted() -> None:
    """A REST recall made outside the gateway keeps today's shape and is counted as unmatched."""
    enricher, _, metrics = gateway()
    event = recall(C2C, "RESTAPI")
    (out,) = await enricher.enrich([event])
    assert (None, "app_admin", None) == (out.reason, out.operator.role, out.recall_request)
    assert 1 == metrics.registry.get_sample_value("relay_recall_joins_total", {"result": "unmatched"})


async def test_the_join_works_with_enrichment_off() -> None:
    """RELAY_ENRICHMENT=off still joins requests; enrichment then says disabled."""
    enricher, store, _ = gateway(sends=False)
    event = recall(GROUP, "RESTAPI")
    await on_record(store, event)
    (out,) = await enricher.enrich([event])
    assert ("disabled", "moderator") == (out.enrichment, out.operator.role)


async def test_a_join_record_joins_one_callback_only() -> None:
    """The record is used by the first matching callback: a second REST recall of the message
    (another delivery, or a later recall) keeps its own operator and gets no recallRequest."""
    enricher, store, metrics = gateway()
    event = recall(GROUP, "RESTAPI")
    key = await on_record(store, event)
    (first,) = await enricher.enrich([event])
    (second,) = await enricher.enrich([event])
    assert ("moderator", "ticket-4711") == (
        first.operator.role,
        first.recall_request and first.recall_request.request_id,
    )
    assert (ADMIN, "app_admin", None, None) == (
        second.operator.user_id,
        second.operator.role,
        second.recall_request,
        second.reason,
    )
    assert [None] == await store.get([key])
    assert 1 == metrics.registry.get_sample_value("relay_recall_joins_total", {"result": "unmatched"})


async def test_a_join_record_of_another_request_is_never_overwritten_nor_deleted() -> None:
    """reserve() refuses a key another request holds; delete_if() leaves another's record alone."""
    store = MemoryStore(60, 1000, Metrics(CollectorRegistry()))
    assert [True, True] == await store.reserve([("recall:a", b"mine"), ("recall:b", b"mine")], 60)
    assert [False, True] == await store.reserve([("recall:a", b"theirs"), ("recall:c", b"theirs")], 60)
    assert [True] == await store.reserve([("recall:a", b"mine")], 60)  # a retry of the owner
    await store.delete_if([("recall:a", b"theirs"), ("recall:b", b"mine")])
    assert [b"mine", None, b"theirs"] == await store.get(["recall:a", "recall:b", "recall:c"])


async def test_send_records_index_the_msg_id_only_with_the_gateway_on() -> None:
    """A send callback's msgID leads to where the message lives, for msgID recall requests."""
    body = {"CallbackCommand": C2C_SEND, "From_Account": "u_a", "To_Account": "u_b", "MsgKey": "1_2_3", "MsgId": "m-1"}
    records = parse_send(orjson.dumps(body), CallbackQuery(sdk_app_id=APP, command=C2C_SEND))
    enricher, store, _ = gateway()
    await enricher.record(records)
    (raw,) = await store.locate([msg_id_key(APP, "m-1")])
    assert raw is not None
    expected = {"conversation": {"type": "c2c", "sender": "u_a", "receiver": "u_b"}, "message": {"msgKey": "1_2_3"}}
    assert expected == orjson.loads(raw)
    plain = MemoryStore(60, 1000, Metrics(CollectorRegistry()))
    await plain.submit(records)
    assert [None] == await plain.locate([msg_id_key(APP, "m-1")])


async def test_gateway_records_survive_a_flood_of_send_records() -> None:
    """Send records and their msgID index past the limit evict old ones, never a pending request."""
    store = MemoryStore(60, 10, Metrics(CollectorRegistry()), index_msg_ids=True)
    assert await store.claim("request:svc/r1", b"pending", 60)
    body = {"CallbackCommand": C2C_SEND, "From_Account": "u", "To_Account": "v", "MsgKey": "k"}
    for i in range(50):
        body["MsgKey"], body["MsgId"] = f"k{i}", f"m{i}"
        await store.submit(parse_send(orjson.dumps(body), CallbackQuery(sdk_app_id=APP, command=C2C_SEND)))
    assert [b"pending"] == await store.get(["request:svc/r1"])
    assert not await store.claim("request:svc/r1", b"other", 60)
    assert [None, b"pending"] != await store.locate([msg_id_key(APP, "m0"), msg_id_key(APP, "m49")])


async def test_a_full_gateway_space_refuses_rather_than_evicts() -> None:
    """With every gateway slot held by an unexpired record the store raises StoreFull; expired
    records make room again."""
    now = [0.0]
    store = MemoryStore(60, 10, Metrics(CollectorRegistry()), clock=lambda: now[0], max_gateway_entries=3)
    for i in range(3):
        assert await store.claim(f"request:svc/r{i}", b"pending", 10 + i)
    with pytest.raises(StoreFull):
        await store.claim("request:svc/r3", b"pending", 10)
    assert [b"pending"] * 3 == await store.get([f"request:svc/r{i}" for i in range(3)])
    now[0] = 10.5  # r0 has expired
    assert await store.claim("request:svc/r3", b"pending", 10)


def test_audit_events_satisfy_their_schema_and_name_the_revocation() -> None:
    """recall_requested and recall_failed validate, and revokedEventID is the revocation's eventID."""
    cmd = recall_command({"type": "group", "groupID": "@TGS#1", "topicID": "@TGS#1@TOPIC#x"}, [{"msgSeq": 101}])
    target = cmd.messages[0]
    kw: dict[str, Any] = {
        "requested_by": "svc",
        "moderator": MODERATOR,
        "requested_at_ms": 1_767_225_600_000,
        "at_ms": 1_767_225_600_500,
    }
    requested = audit_envelope(REQUESTED, cmd, target, tencent_reason="spam link", **kw)
    failed = audit_envelope(
        FAILED, cmd, target, tencent_reason="spam link", status="rejected", tencent_code=10007, tencent_info="no", **kw
    )
    for envelope in (requested, failed):
        AUDIT.validate(orjson.loads(envelope.body))
    expected_revoked = event_id(APP, "group", group_server_key("@TGS#1", "@TGS#1@TOPIC#x", 101))
    assert expected_revoked == orjson.loads(requested.body)["revokedEventID"] == revoked_event_id(cmd, target)
    assert ("message.recall_requested.group", "message.recall_requested") == (requested.routing_key, requested.type)
    assert ("message.recall_failed", "im.message.recall_failed") == (failed.type, failed.headers()["cloudEvents_type"])
    assert requested.event_id != failed.event_id


def test_audit_event_ids_are_deterministic_per_request_and_message() -> None:
    """The same request carried out again yields the same eventIDs; another message, another ID."""
    cmd = recall_command({"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgKey": "k1"}, {"msgKey": "k2"}])
    kw: dict[str, Any] = dict(AUDIT_KW)
    first = [audit_envelope(REQUESTED, cmd, t, **kw).event_id for t in cmd.messages]
    again = [audit_envelope(REQUESTED, cmd, t, **{**kw, "at_ms": 99}).event_id for t in cmd.messages]
    assert first == again
    assert first[0] != first[1]


def test_a_failed_audit_event_without_a_status_is_invalid() -> None:
    """The schema tells the two kinds apart: recall_failed must say why."""
    cmd = recall_command({"type": "c2c", "sender": "u_a", "receiver": "u_b"}, [{"msgKey": "k1"}])
    kw: dict[str, Any] = dict(AUDIT_KW)
    body = orjson.loads(audit_envelope(FAILED, cmd, cmd.messages[0], **kw).body)
    with pytest.raises(jsonschema.ValidationError):
        AUDIT.validate(body)
