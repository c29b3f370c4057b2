"""The Matrix normalizer: transactions → redaction events and message records, bad input → typed refusals."""

from __future__ import annotations

import json
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.enricher import apply
from relay.events import EVENT_ID_NAMESPACE, event_id
from relay.matrix.errors import MatrixReject, MatrixRejection
from relay.matrix.normalize import MAX_EVENTS, Transaction, name, normalize, parse_transaction
from tests.helpers import validate_event
from tests.unit.test_properties import _ABSENT, field, json_values, key_ids

ROOM = "!wHNoRvaLsNtTqQyJ:example.org"
NOW_MS = 1_767_225_605_000
SENT_MS = 1_767_225_600_000


def message(event_id: str = "$msg1", sender: str = "@bob:example.org", **extra: Any) -> dict[str, Any]:
    return {
        "type": "m.room.message",
        "event_id": event_id,
        "room_id": ROOM,
        "sender": sender,
        "origin_server_ts": SENT_MS,
        "content": {"msgtype": "m.text", "body": "hello"},
        **extra,
    }


def redaction(
    target: str = "$msg1", sender: str = "@mod:example.org", version: int = 11, **content: Any
) -> dict[str, Any]:
    """A redaction as a homeserver serializes it: ``redacts`` at the top up to room version 10,
    in the content from 11 (Synapse writes both in every version)."""
    event: dict[str, Any] = {
        "type": "m.room.redaction",
        "event_id": f"$red-{uuid.uuid4().hex[:8]}",
        "room_id": ROOM,
        "sender": sender,
        "origin_server_ts": NOW_MS - 5,
        "content": {**content, **({"redacts": target} if version >= 11 else {})},
    }
    if version <= 10:
        event["redacts"] = target
    return event


def read(*events: object, evidence: bool = False, limit: int = 4096) -> Transaction:
    body = orjson.dumps({"events": list(events)})
    return normalize(parse_transaction(body), NOW_MS, evidence=evidence, evidence_max_bytes=limit, enrichment="miss")


@pytest.mark.parametrize("version", [10, 11])
def test_a_redaction_maps_to_a_group_event_of_provider_matrix(version: int) -> None:
    """Each field of the documented mapping, for both places a room version keeps ``redacts`` in."""
    (event,) = read(redaction(version=version, reason="spam")).redactions
    body = event.to_dict()
    validate_event(body)
    assert {
        "provider": "matrix",
        "msgID": "$msg1",
        "clientMsgID": "$msg1",
        "msgKey": None,
        "msgSeq": None,
        "operator": {"userID": "@mod:example.org", "role": "unknown", "assertedBy": None, "verifiedBy": None},
        "reason": "spam",
        "sender": None,
        "conversation": {
            "type": "group",
            "receiver": None,
            "groupID": ROOM,
            "groupType": None,
            "topicID": None,
            "officialAccount": None,
        },
        "sdkAppID": None,
        "callbackCommand": "m.room.redaction",
        "platform": None,
        "clientIP": None,
        "eventTime": "2026-01-01T00:00:04.995Z",
        "receivedAt": "2026-01-01T00:00:05.000Z",
        "enrichment": "miss",
    } == {k: body[k] for k in body if k not in ("version", "eventID", "type", "sentAt", "evidence", "recallRequest")}
    envelope = event.envelope()
    assert ("message.revoked.group", f"matrix/{ROOM}", "$msg1") == (
        envelope.routing_key,
        envelope.source,
        envelope.subject,
    )


def test_the_top_level_redacts_wins_over_the_contents() -> None:
    """Up to version 10 only the top-level ``redacts`` is authoritative (the content's is any
    client's text), and Synapse writes the real target there in version 11 too."""
    event = {**redaction("$real", version=10), "content": {"redacts": "$decoy"}}
    (found,) = read(event).redactions
    assert "$real" == found.msg_id


def test_event_id_is_uuid5_of_a_name_that_no_tencent_event_can_have() -> None:
    """eventID = uuid5(namespace, ``matrix/<room>/<event>``), each part percent-encoded so ``/``
    only separates; Tencent's names start with the digits of an SdkAppid."""
    (event,) = read(redaction("$a/b%c")).redactions
    assert f"matrix/{ROOM}/$a%2Fb%25c" == name(ROOM, "$a/b%c") == event.correlation_key
    assert str(uuid.uuid5(EVENT_ID_NAMESPACE, name(ROOM, "$a/b%c"))) == event.event_id
    assert name("!a/b:hs", "$c") != name("!a:hs", "b/$c")
    assert event.event_id != event_id("1400000001", "group", f"{ROOM}/$a%2Fb%25c")


def test_the_same_message_redacted_twice_in_one_transaction_is_one_event() -> None:
    """Two redactions of one message (its sender, then a moderator) name the same eventID: one event."""
    result = read(redaction(sender="@bob:example.org"), redaction())
    assert 1 == len(result.redactions)
    assert {"redaction": 2, "message": 0, "other": 0} == result.kinds


def test_a_record_makes_the_role_sender_or_group_admin() -> None:
    """Enrichment from the message's record says who sent it, so whether its sender or someone
    else (a moderator: only they may) redacted it."""
    result = read(message(), redaction(sender="@bob:example.org"))
    (record,) = result.records
    (own,) = result.redactions
    assert ("sender", "@bob:example.org", "hit") == (
        apply(own, record, evidence=False).operator.role,
        apply(own, record, evidence=False).sender,
        apply(own, record, evidence=False).enrichment,
    )
    (other,) = read(redaction(sender="@mod:example.org")).redactions
    assert "group_admin" == apply(other, record, evidence=False).operator.role
    assert "2026-01-01T00:00:00.000Z" == apply(other, record, evidence=False).to_dict()["sentAt"]


def test_messages_become_records_and_keep_evidence_only_when_asked() -> None:
    """A message's record holds its sender and time; its content only with evidence on, a size
    marker when too large, and nothing when the message arrived already redacted (pruned)."""
    plain = read(message()).records[0]
    assert (name(ROOM, "$msg1"), "@bob:example.org", SENT_MS, None) == (
        plain.key,
        plain.sender,
        plain.sent_at_ms,
        plain.evidence,
    )
    kept = read(message(), evidence=True).records[0]
    assert {"msgBody": {"msgtype": "m.text", "body": "hello"}, "cloudCustomData": None} == kept.evidence
    big = read(message(content={"body": "x" * 5000}), evidence=True).records[0]
    size = len(orjson.dumps({"msgBody": {"body": "x" * 5000}, "cloudCustomData": None}))
    assert {"omitted": "too_large", "bytes": size} == big.evidence
    pruned = read(message(content={}, unsigned={"redacted_because": {}}), evidence=True).records[0]
    assert pruned.evidence is None
    for kind in ("m.sticker", "m.room.encrypted"):
        assert 1 == len(read(message(type=kind)).records)


def test_other_event_types_are_counted_and_never_published() -> None:
    """Membership, reactions, state and unknown types are acknowledged and counted as other."""
    result = read(
        {**message(), "type": "m.room.member", "state_key": "@bob:example.org"},
        {**message(), "type": "m.reaction"},
        {**message(), "type": "com.example.custom"},
    )
    assert ((), (), {"redaction": 0, "message": 0, "other": 3}) == (result.redactions, result.records, result.kinds)


def test_unusable_events_are_skipped_with_index_and_code_and_the_rest_kept() -> None:
    """An event that is not an object, lacks an ID, or holds an ID of the wrong type is skipped
    (and named); the valid redaction next to them is still an event."""
    result = read(
        5,
        {**redaction(), "room_id": None},
        {**redaction(version=10), "redacts": 7},
        {k: v for k, v in redaction().items() if k != "type"},
        {**redaction(version=10), "content": {}, "redacts": None},
        {**message(), "sender": "@" + "x" * 2000},
        redaction("$good"),
    )
    assert ["$good"] == [e.msg_id for e in result.redactions]
    assert [
        (0, MatrixReject.NOT_AN_OBJECT),
        (1, MatrixReject.MISSING_FIELD),
        (2, MatrixReject.INVALID_FIELD),
        (3, MatrixReject.MISSING_FIELD),
        (4, MatrixReject.MISSING_FIELD),
        (5, MatrixReject.INVALID_FIELD),
    ] == [(s.index, s.code) for s in result.skipped]


def test_bad_optional_fields_are_anomalies_and_the_event_is_kept() -> None:
    """A reason that is not a string, a timestamp that is not a plausible ms time and content that
    is not an object are ignored and named; the redaction is still an event."""
    event = {**redaction(version=10), "origin_server_ts": 1_767_225_600, "content": {"reason": 42}}
    result = read(event, {**redaction("$b", version=10), "origin_server_ts": "soon", "content": []})
    assert 2 == len(result.redactions)
    assert (None, NOW_MS) == (result.redactions[0].reason, result.redactions[0].event_time_ms)
    assert ("origin_server_ts", "reason", "content") == result.anomalies


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", MatrixReject.INVALID_JSON),
        (b'{"events": [NaN]}', MatrixReject.INVALID_JSON),
        (b"[" * 2000 + b"]" * 2000, MatrixReject.INVALID_JSON),
        (b"[]", MatrixReject.NOT_AN_OBJECT),
        (b'{"ephemeral": []}', MatrixReject.MISSING_FIELD),
        (b'{"events": {}}', MatrixReject.INVALID_FIELD),
        (orjson.dumps({"events": [{}] * (MAX_EVENTS + 1)}), MatrixReject.TOO_MANY_EVENTS),
    ],
    ids=["truncated", "nan", "too-deep", "array", "no-events", "events-object", "too-many"],
)
def test_an_unreadable_transaction_is_refused_with_a_stable_code(body: bytes, code: MatrixReject) -> None:
    """Only a body that is not a transaction at all is refused as a whole."""
    with pytest.raises(MatrixRejection) as refused:
        parse_transaction(body)
    assert code == refused.value.code


def test_a_transaction_of_max_events_is_read() -> None:
    """Exactly MAX_EVENTS events (ten times Synapse's batch) is accepted."""
    events = [redaction(f"$m{i}") for i in range(MAX_EVENTS)]
    assert MAX_EVENTS == len(read(*events).redactions)


ids = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=60)


def some_of(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """An object with each of *fields* mostly plausible, sometimes anything, sometimes absent."""
    return st.fixed_dictionaries({k: field(v) for k, v in fields.items()}).map(
        lambda d: {k: v for k, v in d.items() if v is not _ABSENT}
    )


matrix_event = some_of(
    {
        "type": st.sampled_from(["m.room.redaction", "m.room.message", "m.room.member"]),
        "event_id": key_ids,
        "room_id": key_ids,
        "sender": key_ids,
        "redacts": ids,
        "origin_server_ts": st.integers(min_value=-(2**64), max_value=2**64),
        "content": some_of({"reason": ids, "redacts": ids, "body": ids}),
        "unsigned": some_of({"redacted_because": json_values}),
    }
)


@given(events=st.lists(st.one_of(matrix_event, json_values), max_size=6), evidence=st.booleans())
def test_normalizing_any_transaction_is_total_and_honours_the_contract(events: list[Any], evidence: bool) -> None:
    """Whatever the events (lone surrogates included), the body is refused with a code or read;
    every event read serializes and satisfies the schema, before and after enrichment."""
    body = json.dumps({"events": events}).encode()
    try:
        parsed = parse_transaction(body)
    except MatrixRejection as refused:
        code = refused.code
        parsed = None
    if parsed is None:
        assert MatrixReject.INVALID_JSON == code  # lone surrogates, NaN: refused as JSON, never a crash
        return
    result = normalize(parsed, NOW_MS, evidence=evidence, enrichment="miss")
    assert len(parsed) == sum(result.kinds.values()) + len(result.skipped)
    records = {r.key: r for r in result.records}
    for event in result.redactions:
        validate_event(orjson.loads(event.envelope().body))
        record = records.get(event.correlation_key or "")
        if record is not None:
            validate_event(orjson.loads(apply(event, record, evidence=evidence).envelope().body))
