"""``relay tail``'s one-line summary, for revocations and for the recall gateway's audit events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import orjson
from aio_pika.abc import AbstractIncomingMessage

from relay.gateway.audit import FAILED, REQUESTED, audit_envelope
from relay.gateway.request import Moderator
from relay.tail import render
from tests.helpers import recall_command


@dataclass
class Message:
    body: bytes
    routing_key: str
    message_id: str


def line(body: bytes, routing_key: str = "message.x") -> list[str]:
    return render(cast(AbstractIncomingMessage, Message(body, routing_key, "m1")), as_json=False).split()


def test_an_audit_event_shows_its_request_time_moderator_and_kind() -> None:
    """Audit events carry no eventTime or operator: the line shows requestedAt, the moderator and the
    conversation's sender in the usual columns, then the kind and requestID (and a failure's cause)."""
    cmd = recall_command(
        {"type": "c2c", "sender": "u_alice", "receiver": "u_bob"},
        [{"msgKey": "31906_833502_1572869830"}],
        request_id="ticket-4712",
    )
    kw: dict[str, Any] = {
        "requested_by": "svc",
        "moderator": Moderator("mod_7", asserted_by="svc"),
        "requested_at_ms": 1_796_199_018_526,
        "at_ms": 1_796_199_018_600,
    }
    requested = audit_envelope(REQUESTED, cmd, cmd.messages[0], tencent_reason=None, **kw)
    failed = audit_envelope(
        FAILED, cmd, cmd.messages[0], tencent_reason=None, status="rejected", tencent_code=10007, **kw
    )
    key = "31906_833502_1572869830"
    assert [
        "2026-12-02T08:10:18.526Z",
        "c2c",
        requested.event_id,
        "by=moderator/mod_7",
        "from=u_alice",
        f"msg={key}",
        "[message.recall_requested",
        "request=ticket-4712]",
        'reason="spam',
        'link"',
    ] == line(requested.body)
    assert [
        f"msg={key}",
        "[message.recall_failed",
        "request=ticket-4712",
        "status=rejected",
        "tencentCode=10007]",
        'reason="spam',
        'link"',
    ] == line(failed.body)[5:]


def test_a_revocation_line_is_unchanged() -> None:
    """A message.revoked event keeps its six columns and nothing after the msgID."""
    event = {
        "type": "message.revoked",
        "eventTime": "2026-12-02T08:10:18.530Z",
        "conversation": {"type": "group"},
        "eventID": "e1",
        "operator": {"role": "moderator", "userID": "mod_7"},
        "sender": None,
        "msgID": "144115-@TGS#demo-101",
    }
    assert [
        "2026-12-02T08:10:18.530Z",
        "group",
        "e1",
        "by=moderator/mod_7",
        "from=-",
        "msg=144115-@TGS#demo-101",
    ] == line(orjson.dumps(event))


def test_a_revocation_with_a_reason_shows_its_request_and_reason() -> None:
    """A joined revocation ends with its requestID and its reason, quoted and cleaned."""
    event = {
        "type": "message.revoked",
        "eventTime": "2026-12-02T08:10:18.530Z",
        "conversation": {"type": "group"},
        "eventID": "e1",
        "operator": {"role": "moderator", "userID": "mod_7"},
        "sender": None,
        "msgID": "144115-@TGS#demo-101",
        "reason": 'spam "link"',
        "recallRequest": {"requestID": "ticket-4711"},
    }
    assert ["msg=144115-@TGS#demo-101", "[request=ticket-4711]", 'reason="spam', "'link'\""] == line(
        orjson.dumps(event)
    )[5:]
