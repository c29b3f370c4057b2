"""relay.consumer.Event: typed fields from each kind of published event, newer versions parsed and
marked, older or broken ones refused."""

from __future__ import annotations

import orjson
import pytest

from relay.consumer import Event, EventError
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import sample_body
from tests.helpers import APP


def test_a_revocation_parses_into_typed_fields() -> None:
    """The relay's own message.revoked body: eventID, msgID, operator, conversation, receivedAt."""
    envelope = normalize(orjson.dumps(sample_body("group")), CallbackQuery(sdk_app_id=APP), 1_767_225_600_000).events[0]
    event = Event.parse(envelope.envelope().body)
    assert (envelope.event_id, "message.revoked", 4, envelope.msg_id, APP) == (
        event.event_id,
        event.type,
        event.version,
        event.msg_id,
        event.sdk_app_id,
    )
    assert (envelope.operator.user_id, "group") == (event.operator.user_id, event.conversation["type"])
    assert event.received_at is not None
    assert 1_767_225_600 == int(event.received_at.timestamp())
    assert not event.newer


def test_an_audit_event_names_the_moderator_and_the_request() -> None:
    """message.recall_requested: the moderator as operator (role moderator), requestID and requestedBy."""
    body = {
        "version": 2,
        "eventID": "a1",
        "type": "message.recall_requested",
        "requestID": "r1",
        "requestedBy": "svc",
        "requestedAt": "2026-12-01T12:00:00.000Z",
        "moderator": {"userID": "mod"},
        "conversation": {"type": "c2c", "sender": "u1"},
        "reason": "spam",
    }
    event = Event.parse(orjson.dumps(body))
    assert ("mod", "moderator", "r1", "svc", "u1", "spam") == (
        event.operator.user_id,
        event.operator.role,
        event.request_id,
        event.requested_by,
        event.sender,
        event.reason,
    )


def test_a_newer_version_is_parsed_by_the_known_fields_and_marked() -> None:
    """Version 9 with a field the kit does not know: parsed, newer=True, the field kept in raw."""
    event = Event.parse(orjson.dumps({"version": 9, "eventID": "e", "type": "message.revoked", "msgID": "m", "x": 1}))
    assert (True, "m", 1) == (event.newer, event.msg_id, event.raw["x"])


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1]", id="not-an-object"),
        pytest.param(orjson.dumps({"version": 1, "type": "message.revoked"}), id="no-event-id"),
        pytest.param(orjson.dumps({"version": 0, "eventID": "e", "type": "message.revoked"}), id="version-0"),
        pytest.param(orjson.dumps({"eventID": "e", "type": "message.revoked"}), id="no-version"),
    ],
)
def test_unreadable_or_older_events_are_errors(body: bytes) -> None:
    """Not JSON, no eventID, or a version older than any known: EventError."""
    with pytest.raises(EventError):
        Event.parse(body)


def test_event_is_frozen() -> None:
    """An Event cannot be changed by a handler."""
    event = Event.parse(orjson.dumps({"version": 4, "eventID": "e", "type": "message.revoked"}))
    with pytest.raises(AttributeError):
        event.reason = "x"  # type: ignore[misc]
