"""Normalization over every documented recall payload variant (pure: no event loop, no broker)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay.errors import Reject, Rejection
from relay.events import event_id
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL, CallbackQuery
from relay.tencent.normalize import MAX_ITEMS, group_server_key, normalize
from tests.helpers import APP, validate_event

RECEIVED_MS = 1_767_225_605_000  # 2026-01-01T00:00:05.000Z


def query(command: str | None, platform: str | None = "Android") -> CallbackQuery:
    return CallbackQuery(sdk_app_id=APP, command=command, client_ip="198.51.100.7", platform=platform)


def run(
    body: dict[str, Any] | bytes, command: str | None = None, platform: str | None = "Android"
) -> list[dict[str, Any]]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    if command is None and isinstance(body, dict):
        command = body.get("CallbackCommand")
    result = normalize(raw, query(command, platform), RECEIVED_MS)
    out = [e.to_dict() for e in result.events]
    for event in out:
        validate_event(event)
    return out


C2C_INTL = {
    "CallbackCommand": C2C_RECALL,
    "From_Account": "u_alice",
    "To_Account": "u_bob",
    "MsgKey": "90211_3019944112_1767225540",
    "UnreadMsgNum": 3,
}
C2C_CN = {
    "CallbackCommand": C2C_RECALL,
    "From_Account": "u_alice",
    "To_Account": "u_bob",
    "MsgKey": "90211_3019944112_1767225540",
    "EventTime": 1767225601234,
}
GROUP_TOPIC = {
    "CallbackCommand": GROUP_RECALL,
    "Operator_Account": "u_mod01",
    "Type": "Community",
    "GroupId": "@TGS#_@TGS#cSYNTHX01",
    "MsgSeqList": [{"MsgSeq": 8801, "MsgId": "144115200000000001-1767225500-2200001111"}],
    "TopicId": "@TGS#_@TGS#cSYNTHX01@TOPIC#_general",
    "EventTime": "1767225601999",
}
GROUP_OLD_INTL = {
    "CallbackCommand": GROUP_RECALL,
    "Operator_Account": "admin",
    "Type": "Public",
    "GroupId": "@TGS#2J4SZEAEL",
    "MsgSeqList": [{"MsgSeq": 1}, {"MsgSeq": 2}, {"MsgSeq": 3}],
}
OFFICIAL = {
    "CallbackCommand": OFFICIAL_ACCOUNT_RECALL,
    "Official_Account": "@TOA#_news01",
    "WithdrawMsgList": [{"MsgKey": "77_1_1767225000"}, {"MsgKey": "78_1_1767225001"}],
    "EventTime": 1767225602000,
}


def test_c2c_intl_variant_is_one_event_with_every_field() -> None:
    """A C2C recall without EventTime becomes one complete event timed at receipt."""
    expected = {
        "version": 4,
        "eventID": event_id(APP, "c2c", "90211_3019944112_1767225540"),
        "type": "message.revoked",
        "provider": "tencent",
        "msgID": "90211_3019944112_1767225540",
        "msgKey": "90211_3019944112_1767225540",
        "msgSeq": None,
        "clientMsgID": None,
        "operator": {"userID": "u_alice", "role": "sender", "assertedBy": None, "verifiedBy": None},
        "reason": None,
        "sender": "u_alice",
        "conversation": {
            "type": "c2c",
            "receiver": "u_bob",
            "groupID": None,
            "groupType": None,
            "topicID": None,
            "officialAccount": None,
        },
        "sdkAppID": APP,
        "callbackCommand": C2C_RECALL,
        "platform": "Android",
        "clientIP": "198.51.100.7",
        "eventTime": "2026-01-01T00:00:05.000Z",
        "receivedAt": "2026-01-01T00:00:05.000Z",
        "enrichment": "disabled",
        "sentAt": None,
        "evidence": None,
        "recallRequest": None,
    }
    assert [expected] == run(C2C_INTL)


def test_c2c_cn_variant_uses_event_time_in_milliseconds() -> None:
    """The CN doc's integer EventTime (ms) becomes eventTime; the eventID is the same as without it."""
    (event,) = run(C2C_CN)
    assert "2026-01-01T00:00:01.234Z" == event["eventTime"]
    assert run(C2C_INTL)[0]["eventID"] == event["eventID"]


def test_c2c_rest_recall_is_an_app_admin_with_unknown_account() -> None:
    """OptPlatform=RESTAPI marks an admin recall; the callback does not name the admin."""
    (event,) = run(C2C_CN, platform="RESTAPI")
    assert {"userID": None, "role": "app_admin", "assertedBy": None, "verifiedBy": None} == event["operator"]
    assert "u_alice" == event["sender"]


def test_group_topic_variant_uses_sdk_msg_id() -> None:
    """A topic recall carrying MsgId uses it as msgID; the eventID still derives from the server key."""
    (event,) = run(GROUP_TOPIC)
    key = group_server_key("@TGS#_@TGS#cSYNTHX01", "@TGS#_@TGS#cSYNTHX01@TOPIC#_general", 8801)
    assert {
        "eventID": event_id(APP, "group", key),
        "msgID": "144115200000000001-1767225500-2200001111",
        "clientMsgID": "144115200000000001-1767225500-2200001111",
        "msgKey": None,
        "msgSeq": 8801,
        "operator": {"userID": "u_mod01", "role": "unknown", "assertedBy": None, "verifiedBy": None},
        "sender": None,
        "eventTime": "2026-01-01T00:00:01.999Z",
    } == {
        k: event[k] for k in ("eventID", "msgID", "clientMsgID", "msgKey", "msgSeq", "operator", "sender", "eventTime")
    }
    assert {
        "type": "group",
        "receiver": None,
        "groupID": "@TGS#_@TGS#cSYNTHX01",
        "groupType": "Community",
        "topicID": "@TGS#_@TGS#cSYNTHX01@TOPIC#_general",
        "officialAccount": None,
    } == event["conversation"]


def test_group_with_three_items_yields_three_events() -> None:
    """Each MsgSeqList item is its own event with its own eventID and server-key msgID."""
    events = run(GROUP_OLD_INTL)
    assert ["@TGS#2J4SZEAEL/1", "@TGS#2J4SZEAEL/2", "@TGS#2J4SZEAEL/3"] == [e["msgID"] for e in events]
    assert 3 == len({e["eventID"] for e in events})
    assert all(e["eventTime"] == e["receivedAt"] for e in events)


def test_group_rest_recall_names_the_operator_as_app_admin() -> None:
    """A REST group recall keeps the named operator account with role app_admin."""
    events = run(GROUP_OLD_INTL, platform="RESTAPI")
    assert {"userID": "admin", "role": "app_admin", "assertedBy": None, "verifiedBy": None} == events[0]["operator"]


def test_official_account_yields_one_event_per_withdrawn_message() -> None:
    """Each WithdrawMsgList item becomes an event whose sender is the official account."""
    events = run(OFFICIAL)
    assert ["77_1_1767225000", "78_1_1767225001"] == [e["msgID"] for e in events]
    assert {"@TOA#_news01"} == {e["sender"] for e in events}
    assert {"official_account"} == {e["conversation"]["type"] for e in events}
    assert events[0]["conversation"]["officialAccount"] == "@TOA#_news01"


@pytest.mark.parametrize("field", ["Reason", "RecallReason"])
def test_reason_is_carried_when_present(field: str) -> None:
    """A reason in the callback (under either documented name) reaches the event unchanged."""
    (event,) = run({**C2C_CN, field: "spam"})
    assert "spam" == event["reason"]


@pytest.mark.parametrize(
    ("event_time", "expected"),
    [
        pytest.param(1767225601234, "2026-01-01T00:00:01.234Z", id="int"),
        pytest.param("1767225601234", "2026-01-01T00:00:01.234Z", id="numeric-string"),
        pytest.param(1767225601234.0, "2026-01-01T00:00:01.234Z", id="integral-float"),
        pytest.param("", "2026-01-01T00:00:05.000Z", id="empty-string"),
        pytest.param(None, "2026-01-01T00:00:05.000Z", id="null"),
    ],
)
def test_event_time_variants(event_time: object, expected: str) -> None:
    """EventTime is accepted as integer, numeric string or integral float; absent means receipt time."""
    (event,) = run({**C2C_INTL, "EventTime": event_time})
    assert expected == event["eventTime"]


@pytest.mark.parametrize(
    "event_time",
    [
        pytest.param(-5, id="negative"),
        pytest.param(1.5, id="fractional"),
        pytest.param("12abc", id="not-numeric"),
        pytest.param(1767225601, id="seconds-not-ms"),
        pytest.param(10**17, id="year-5000"),
        pytest.param(True, id="bool"),
        pytest.param({"ms": 1}, id="object"),
    ],
)
def test_bad_event_time_falls_back_to_receipt_and_is_reported(event_time: object) -> None:
    """An unusable EventTime never loses the event: eventTime = receivedAt and an anomaly is named."""
    result = normalize(orjson.dumps({**C2C_INTL, "EventTime": event_time}), query(C2C_RECALL), RECEIVED_MS)
    assert ("EventTime",) == result.anomalies
    assert "2026-01-01T00:00:05.000Z" == result.events[0].to_dict()["eventTime"]


def test_ill_typed_optional_field_is_dropped_not_fatal() -> None:
    """A TopicId of the wrong type is ignored (reported), and the recall still becomes an event."""
    result = normalize(orjson.dumps({**GROUP_OLD_INTL, "TopicId": 7}), query(GROUP_RECALL), RECEIVED_MS)
    assert ("TopicId",) == result.anomalies
    assert 3 == len(result.events)


def test_bad_item_is_rejected_alone() -> None:
    """One malformed MsgSeqList item is rejected; the valid items beside it still become events."""
    body = {**GROUP_OLD_INTL, "MsgSeqList": [{"MsgSeq": 1}, {"MsgSeq": "2"}, "x", {"MsgSeq": True}, {"MsgSeq": 5}]}
    result = normalize(orjson.dumps(body), query(GROUP_RECALL), RECEIVED_MS)
    assert [1, 5] == [e.msg_seq for e in result.events]
    assert [(1, Reject.INVALID_FIELD), (2, Reject.INVALID_FIELD), (3, Reject.INVALID_FIELD)] == [
        (r.index, r.code) for r in result.rejected_items
    ]


def test_repeated_item_is_one_event() -> None:
    """The same MsgSeq listed twice in one callback is a single recall and a single event."""
    body = {**GROUP_OLD_INTL, "MsgSeqList": [{"MsgSeq": 1}, {"MsgSeq": 1}]}
    assert 1 == len(run(body))


def test_command_may_come_from_the_body_alone() -> None:
    """Without CallbackCommand in the query, the body's command is used."""
    result = normalize(orjson.dumps(C2C_CN), query(None), RECEIVED_MS)
    assert C2C_RECALL == result.command


@pytest.mark.parametrize(
    ("body", "command", "code"),
    [
        pytest.param(b"{not json", C2C_RECALL, Reject.INVALID_JSON, id="not-json"),
        pytest.param(b"", C2C_RECALL, Reject.INVALID_JSON, id="empty"),
        pytest.param(b'"\\ud800"', C2C_RECALL, Reject.INVALID_JSON, id="lone-surrogate"),
        pytest.param(b"[NaN]", C2C_RECALL, Reject.INVALID_JSON, id="nan"),
        pytest.param(b"[" * 5000 + b"]" * 5000, C2C_RECALL, Reject.INVALID_JSON, id="deep-nesting"),
        pytest.param(b"[1,2]", C2C_RECALL, Reject.NOT_AN_OBJECT, id="array"),
        pytest.param(b'"text"', C2C_RECALL, Reject.NOT_AN_OBJECT, id="string"),
        pytest.param({**C2C_CN, "MsgKey": None}, C2C_RECALL, Reject.MISSING_FIELD, id="c2c-no-msgkey"),
        pytest.param({**C2C_CN, "MsgKey": 42}, C2C_RECALL, Reject.INVALID_FIELD, id="c2c-int-msgkey"),
        pytest.param({**C2C_CN, "From_Account": ""}, C2C_RECALL, Reject.MISSING_FIELD, id="c2c-empty-from"),
        pytest.param({**C2C_CN, "To_Account": ["u"]}, C2C_RECALL, Reject.INVALID_FIELD, id="c2c-list-to"),
        pytest.param({**C2C_CN, "MsgKey": "k" * 2000}, C2C_RECALL, Reject.INVALID_FIELD, id="c2c-huge-msgkey"),
        pytest.param({**GROUP_OLD_INTL, "GroupId": None}, GROUP_RECALL, Reject.MISSING_FIELD, id="group-no-id"),
        pytest.param({**GROUP_OLD_INTL, "MsgSeqList": []}, GROUP_RECALL, Reject.INVALID_FIELD, id="group-empty-list"),
        pytest.param(
            {**GROUP_OLD_INTL, "MsgSeqList": {"MsgSeq": 1}},
            GROUP_RECALL,
            Reject.INVALID_FIELD,
            id="group-list-is-object",
        ),
        pytest.param(
            {**GROUP_OLD_INTL, "MsgSeqList": [{"MsgSeq": i} for i in range(MAX_ITEMS + 1)]},
            GROUP_RECALL,
            Reject.TOO_MANY_ITEMS,
            id="group-too-many",
        ),
        pytest.param(
            {**OFFICIAL, "WithdrawMsgList": None}, OFFICIAL_ACCOUNT_RECALL, Reject.MISSING_FIELD, id="oa-no-list"
        ),
        pytest.param(C2C_CN, GROUP_RECALL, Reject.COMMAND_MISMATCH, id="command-mismatch"),
        pytest.param({**C2C_CN, "CallbackCommand": 5}, C2C_RECALL, Reject.INVALID_FIELD, id="command-not-string"),
    ],
)
def test_rejections(body: dict[str, Any] | bytes, command: str, code: Reject) -> None:
    """Unusable callbacks are refused with the stable error code, never with another exception."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    with pytest.raises(Rejection) as info:
        normalize(raw, query(command), RECEIVED_MS)
    assert code == info.value.code


def test_missing_command_everywhere_is_rejected() -> None:
    """A callback naming no command in the query or the body is refused as missing_parameter."""
    body = {k: v for k, v in C2C_CN.items() if k != "CallbackCommand"}
    with pytest.raises(Rejection) as info:
        normalize(orjson.dumps(body), query(None), RECEIVED_MS)
    assert Reject.MISSING_PARAMETER == info.value.code


def test_group_server_key_is_unambiguous() -> None:
    """A slash inside a custom group ID cannot make two different messages share a key."""
    assert group_server_key("a/b", None, 1) != group_server_key("a", "b", 1)
    assert "a%2Fb/1" == group_server_key("a/b", None, 1)


def test_event_ids_depend_on_app_type_and_key_only() -> None:
    """eventID changes with app, conversation type or key, and with nothing else."""
    base = event_id(APP, "c2c", "k1")
    assert base == event_id(APP, "c2c", "k1")
    assert (
        len(
            {
                base,
                event_id("1400000002", "c2c", "k1"),
                event_id(APP, "official_account", "k1"),
                event_id(APP, "c2c", "k2"),
            }
        )
        == 4
    )
    # A redelivery (different receive time, platform and IP) keeps the eventID.
    first = normalize(orjson.dumps(C2C_CN), query(C2C_RECALL), RECEIVED_MS).events[0]
    again = normalize(orjson.dumps(C2C_CN), query(C2C_RECALL, "iOS"), RECEIVED_MS + 9999).events[0]
    assert first.event_id == again.event_id
