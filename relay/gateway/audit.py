"""The recall gateway's audit events: ``message.recall_requested`` and ``message.recall_failed``.

Contract: relay/schema/recall-audit.v2.json and docs/events.md ("Recall audit events"). Pure: a
command and a target in, an :class:`~relay.events.Envelope` out, published like every event
(persistent, confirmed, spooled when the broker is down). eventIDs are deterministic over the
caller, the requestID, the message and the kind, so a request carried out again after a crash
(a redelivered command) publishes the same IDs, which consumers deduplicate.
"""

from __future__ import annotations

from typing import Final, Literal
from urllib.parse import quote

import orjson

from relay.events import Envelope, event_id, name_id, rfc3339_ms
from relay.gateway.request import Moderator, RecallCommand, Target
from relay.tencent.normalize import group_server_key

AUDIT_VERSION = 2  # 2: moderator.assertedBy / moderator.verifiedBy
REQUESTED: Final = "message.recall_requested"
FAILED: Final = "message.recall_failed"
AuditKind = Literal["message.recall_requested", "message.recall_failed"]


def server_key(command: RecallCommand, target: Target) -> str:
    """The message's server key, the one its ``message.revoked`` eventID is made from."""
    c = command.conversation
    if c.type == "group":
        if c.group_id is None or target.msg_seq is None:
            raise ValueError("a group message is addressed by GroupId and MsgSeq")
        return group_server_key(c.group_id, c.topic_id, target.msg_seq)
    if target.msg_key is None:
        raise ValueError("an unresolved message has no server key")
    return target.msg_key


def revoked_event_id(command: RecallCommand, target: Target) -> str:
    """The eventID the recall's ``message.revoked`` event carries: audit and revocation join on it."""
    return event_id(command.sdk_app_id, command.conversation.type, server_key(command, target))


def audit_envelope(
    kind: AuditKind,
    command: RecallCommand,
    target: Target,
    *,
    requested_by: str,
    moderator: Moderator,
    requested_at_ms: int,
    at_ms: int,
    tencent_reason: str | None,
    status: str | None = None,
    tencent_code: int | None = None,
    tencent_info: str | None = None,
) -> Envelope:
    """One audit event for one message of *command*; *status* and the codes only for ``recall_failed``."""
    c = command.conversation
    key = server_key(command, target)
    given_kind, given_value = target.given
    name = "/".join(
        quote(part, safe="")
        for part in ("gateway", kind, requested_by, command.request_id, given_kind, str(given_value))
    )
    eid = name_id(name)
    msg_id = target.client_msg_id or key
    body = {
        "version": AUDIT_VERSION,
        "eventID": eid,
        "type": kind,
        "provider": "tencent",
        "requestID": command.request_id,
        "requestedBy": requested_by,
        "requestedAt": rfc3339_ms(requested_at_ms),
        "sdkAppID": command.sdk_app_id,
        "conversation": c.to_dict(),
        "msgID": msg_id,
        "msgKey": target.msg_key,
        "msgSeq": target.msg_seq,
        "clientMsgID": target.client_msg_id,
        "revokedEventID": event_id(command.sdk_app_id, c.type, key),  # = revoked_event_id()
        "reason": command.reason,
        "tencentReason": tencent_reason,
        "moderator": moderator.to_dict(),
        "status": status,
        "tencentCode": tencent_code,
        "tencentInfo": tencent_info,
    }
    time = rfc3339_ms(at_ms)
    return Envelope(
        event_id=eid,
        routing_key=f"{kind}.{c.type}",
        body=orjson.dumps(body),
        timestamp=at_ms // 1000,
        source=f"tencent-im/{command.sdk_app_id}",
        subject=msg_id,
        time=time,
        conversation_key=_conversation_key(command),
    )


def _conversation_key(command: RecallCommand) -> str:
    """As :attr:`relay.events.Conversation.key` (stored with spooled events; only ever informative)."""
    c = command.conversation
    if c.type == "c2c":
        return f"c2c/{c.receiver}"
    if c.type == "group":
        return f"group/{c.group_id}/{c.topic_id or ''}"
    return f"official_account/{c.official_account}"
