"""docs/asyncapi.yaml agrees with the code: event schema and version, routing keys, operations, headers, examples.

What the broker actually receives (exchange, AMQP properties, mandatory) is checked against the same
document in tests/broker/test_asyncapi.py.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from relay.events import EVENT_TYPE, EVENT_VERSION
from relay.gateway.audit import FAILED, REQUESTED
from relay.metrics import CONVERSATION_TYPES
from relay.settings import Settings
from relay.tencent.samples import KINDS
from tests.api_docs import ASYNCAPI, event_message, load_asyncapi, resolve, validator
from tests.helpers import EVENT_SCHEMA, envelopes, load_schema, validate_event


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    return load_asyncapi()


def test_document_is_asyncapi_3_for_the_current_event_version(spec: dict[str, Any]) -> None:
    """The document declares AsyncAPI 3.0.0, and its info.version is the event version the relay publishes."""
    assert ("3.0.0", str(EVENT_VERSION)) == (spec["asyncapi"], spec["info"]["version"])


def test_payload_references_the_packaged_event_schema(spec: dict[str, Any]) -> None:
    """The payload is a $ref to relay/schema/event.v<EVENT_VERSION>.json, the very file the package ships and the
    test suite validates published events against."""
    payload = event_message(spec)["payload"]
    target = (ASYNCAPI.parent / payload["schema"]["$ref"]).resolve()
    packaged = Path(str(resources.files("relay").joinpath(f"schema/event.v{EVENT_VERSION}.json"))).resolve()
    assert packaged == target
    assert EVENT_SCHEMA == json.loads(target.read_text(encoding="utf-8"))
    assert payload["schemaFormat"].startswith("application/schema+json;")


AUDIT_ADDRESSES = {f"{kind}.{{conversationType}}" for kind in (REQUESTED, FAILED)}


def test_channels_are_the_routing_keys_the_relay_produces(spec: dict[str, Any]) -> None:
    """The channel addresses are message.revoked.<type> for every conversation type (every sample kind
    normalizes to one of them) and the two audit kinds with the conversation type as a parameter."""
    documented = {channel["address"] for channel in spec["channels"].values()}
    revoked = {f"{EVENT_TYPE}.{ctype}" for ctype in CONVERSATION_TYPES}
    assert revoked | AUDIT_ADDRESSES == documented
    assert revoked == {envelopes(1, kind)[0].routing_key for kind in KINDS}
    assert list(CONVERSATION_TYPES) == spec["components"]["parameters"]["conversationType"]["enum"]


def test_every_channel_has_one_send_operation_carrying_its_event(spec: dict[str, Any]) -> None:
    """Each channel is published by exactly one `send` operation, whose message is the channel's event kind."""
    per_channel: dict[str, list[str]] = {}
    for op_id, operation in spec["operations"].items():
        assert "send" == operation["action"]
        channel = resolve(spec, operation["channel"])
        per_channel.setdefault(channel["address"], []).append(op_id)
        (sent,) = (resolve(spec, m) for m in operation["messages"])
        assert channel["address"].split(".")[:2] == sent["name"].split(".")
    assert {ch["address"] for ch in spec["channels"].values()} == set(per_channel)
    assert all(1 == len(ops) for ops in per_channel.values())


@pytest.mark.parametrize("name", ["messageRecallRequested", "messageRecallFailed"])
def test_audit_messages_reference_their_schema_and_their_examples_hold(spec: dict[str, Any], name: str) -> None:
    """The audit messages point at the packaged recall-audit schema; their examples validate, headers included."""
    message = spec["components"]["messages"][name]
    target = (ASYNCAPI.parent / message["payload"]["schema"]["$ref"]).resolve()
    assert load_schema("recall-audit.v2.json") == json.loads(target.read_text(encoding="utf-8"))
    audit = validator(load_schema("recall-audit.v2.json"))
    headers = resolve(spec, message["headers"])
    for example in message["examples"]:
        audit.validate(example["payload"])
        validator(headers).validate(example["headers"])
        assert message["name"] == example["payload"]["type"] == example["headers"]["cloudEvents_type"][3:]
        assert example["payload"]["eventID"] == example["headers"]["cloudEvents_id"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_documented_headers_are_the_envelope_headers(spec: dict[str, Any], kind: str) -> None:
    """The documented header names are exactly the keys of Envelope.headers(), and real headers satisfy them."""
    headers_schema = event_message(spec)["headers"]
    (envelope, *_) = envelopes(1, kind)
    actual = envelope.headers()
    assert set(actual) == set(headers_schema["properties"])
    assert set(actual) == set(headers_schema["required"])
    validator(headers_schema).validate(actual)


def test_examples_satisfy_the_schemas_and_agree_with_each_other(spec: dict[str, Any]) -> None:
    """Each documented example has a valid payload and headers, and the headers carry the payload's values."""
    msg = event_message(spec)
    assert msg["examples"]
    for example in msg["examples"]:
        payload, headers = example["payload"], example["headers"]
        validate_event(payload)
        validator(msg["headers"]).validate(headers)
        assert (payload["eventID"], payload["msgID"], payload["eventTime"], f"tencent-im/{payload['sdkAppID']}") == (
            headers["cloudEvents_id"],
            headers["cloudEvents_subject"],
            headers["cloudEvents_time"],
            headers["cloudEvents_source"],
        )


def test_documented_exchange_is_the_default_exchange(spec: dict[str, Any]) -> None:
    """Every channel names the relay's default exchange (RELAY_EXCHANGE unset), a durable topic exchange."""
    exchanges = {
        (b["exchange"]["name"], b["exchange"]["type"], b["exchange"]["durable"])
        for b in (resolve(spec, channel["bindings"])["amqp"] for channel in spec["channels"].values())
    }
    assert {(Settings().exchange, "topic", True)} == exchanges
