"""Property-based tests: normalization is total and everything it emits honours the contract.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default, a few hundred examples per property) and
``long`` (20,000 per property; ``HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/unit/test_properties.py``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.errors import Rejection
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL, CallbackQuery
from relay.tencent.normalize import normalize
from tests.helpers import APP, validate_event

settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

RECEIVED_MS = 1_767_225_605_000

# What a sender can put on the wire: any code point, lone surrogates included (as \\uXXXX escapes).
wire_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | wire_text
)
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(wire_text, inner, max_size=4), max_leaves=12
)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes anything at all (or absent, via the sentinel)."""
    return st.one_of(valid, valid, valid, json_values, st.just(_ABSENT))


_ABSENT = object()
ids = st.text(st.characters(codec=None, exclude_categories=()), min_size=0, max_size=60)
# Identifying fields: non-empty when "valid", so the event-producing path is reached often.
key_ids = st.text(st.characters(codec=None, exclude_categories=()), min_size=1, max_size=60)
event_time = st.one_of(st.integers(min_value=0, max_value=5 * 10**12), st.integers().map(str), json_values)
seq_item = st.fixed_dictionaries({"MsgSeq": field(st.integers(min_value=-5, max_value=2**64)), "MsgId": field(ids)})


def payload(command: str) -> st.SearchStrategy[dict[str, Any]]:
    common = {"CallbackCommand": field(st.just(command)), "EventTime": field(event_time), "Reason": field(ids)}
    if command == C2C_RECALL:
        shape = {
            "From_Account": field(key_ids),
            "To_Account": field(key_ids),
            "MsgKey": field(key_ids),
            "UnreadMsgNum": field(st.integers()),
        }
    elif command == GROUP_RECALL:
        shape = {
            "GroupId": field(key_ids),
            "Operator_Account": field(ids),
            "Type": field(ids),
            "TopicId": field(ids),
            "MsgSeqList": field(st.lists(field(seq_item), min_size=1, max_size=6)),
        }
    else:
        shape = {
            "Official_Account": field(key_ids),
            "WithdrawMsgList": field(
                st.lists(field(st.fixed_dictionaries({"MsgKey": field(key_ids)})), min_size=1, max_size=6)
            ),
        }
    return st.fixed_dictionaries({**common, **shape}).map(_strip_absent)


def _strip_absent(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_absent(v) for k, v in value.items() if v is not _ABSENT}
    if isinstance(value, list):
        return [_strip_absent(v) for v in value if v is not _ABSENT]
    return value


def encode(value: Any) -> bytes:
    """Serialize like a sender could: stdlib json with ASCII escapes (so lone surrogates survive) and
    NaN/Infinity allowed (invalid JSON that a careless sender might still emit)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


def check_total(body: bytes, command: str | None, platform: str | None) -> None:
    """The property: a Rejection, or events that validate and round-trip as UTF-8 JSON."""
    query = CallbackQuery(sdk_app_id=APP, command=command, platform=platform, client_ip="198.51.100.7")
    try:
        result = normalize(body, query, RECEIVED_MS)
    except Rejection:
        return
    for event in result.events:
        data = event.to_dict()
        validate_event(data)
        encoded = event.envelope().body
        encoded.decode("utf-8")  # strict: no surrogates can reach the publisher
        assert data == orjson.loads(encoded)
    again = normalize(body, query, RECEIVED_MS + 1)
    assert [e.event_id for e in result.events] == [e.event_id for e in again.events]


commands = st.sampled_from([C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL])
platforms = st.one_of(st.none(), st.sampled_from(["RESTAPI", "restapi", "Android", "iOS"]), ids)


@given(st.data(), commands, platforms)
def test_recall_shaped_payloads(data: st.DataObject, command: str, platform: str | None) -> None:
    """Recall payloads with any field mangled never make normalization fail other than by Rejection."""
    body = data.draw(payload(command))
    check_total(encode(body), command, platform)


@given(json_values, st.one_of(st.none(), commands))
def test_arbitrary_json(value: Any, command: str | None) -> None:
    """Any JSON document, with or without a command in the query, is handled totally."""
    check_total(encode(value), command, None)


@given(st.binary(max_size=300), commands)
def test_arbitrary_bytes(body: bytes, command: str) -> None:
    """Arbitrary bytes (invalid UTF-8, truncated JSON) are rejected cleanly, never raised through."""
    check_total(body, command, None)


def test_generator_reaches_events_partials_and_anomalies() -> None:
    """The recall strategy is not vacuous: it yields events, partial rejections and anomalies, not only
    whole-callback rejections (a deterministic, generate-only pass that counts outcomes)."""
    from collections import Counter

    from hypothesis import Phase

    seen: Counter[str] = Counter()

    @settings(max_examples=400, derandomize=True, database=None, deadline=None, phases=[Phase.generate])
    @given(payload(GROUP_RECALL))
    def sample(body: dict[str, Any]) -> None:
        try:
            result = normalize(encode(body), CallbackQuery(sdk_app_id=APP, command=GROUP_RECALL), RECEIVED_MS)
        except Rejection:
            seen["rejected"] += 1
            return
        seen["events"] += bool(result.events)
        seen["partial"] += bool(result.events and result.rejected_items)
        seen["anomaly"] += bool(result.events and result.anomalies)

    sample()
    assert all(seen[k] > 0 for k in ("rejected", "events", "partial", "anomaly")), seen


@given(st.text(st.characters(codec="utf-8"), max_size=80), st.sampled_from(["c2c", "group", "official_account"]))
def test_event_id_is_uuid5_of_the_documented_name(key: str, ctype: str) -> None:
    """The hand-rolled eventID equals uuid.uuid5(namespace, "<app>/<type>/<key>") — the documented recipe."""
    import uuid

    from relay.events import EVENT_ID_NAMESPACE, event_id

    assert str(uuid.uuid5(EVENT_ID_NAMESPACE, f"{APP}/{ctype}/{key}")) == event_id(APP, ctype, key)  # type: ignore[arg-type]
