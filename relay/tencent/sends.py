"""After-send callbacks → correlation records (pure: no I/O).

The IM backend reports every sent message on the same callback URL. Recording, per message, the
server key → client msgID, sender and send time lets a later recall event say which message the
SDK knows, who wrote it, and (with evidence on) what it said. Keys use the same server key as the
eventID, so a recall finds its send record without any other index.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from relay.errors import Reject, Rejection
from relay.store import SendRecord, correlation_key
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import MAX_ID_CHARS, group_server_key, parse_object, resolve_command

C2C_SEND = "C2C.CallbackAfterSendMsg"
GROUP_SEND = "Group.CallbackAfterSendMsg"
OFFICIAL_ACCOUNT_SEND = "OfficialAccount.CallbackAfterSendMsg"
SEND_COMMANDS = frozenset({C2C_SEND, GROUP_SEND, OFFICIAL_ACCOUNT_SEND})


def parse_send(
    body: bytes, query: CallbackQuery, *, evidence: bool = False, evidence_max_bytes: int = 4096
) -> list[SendRecord]:
    """Records for a send callback; [] for a failed send. Raises Rejection for an unusable body."""
    data = parse_object(body)
    command = resolve_command(query, data)
    app = query.sdk_app_id or ""
    result = data.get("SendMsgResult")
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        return []  # the message was not delivered: it can never be recalled
    sent_at_ms = _seconds_to_ms(data.get("MsgTime"))
    proof = _evidence(data, evidence_max_bytes) if evidence else None
    # The locator says where the message lives in the recall gateway's request vocabulary, so a
    # recall request may name the message by its client msgID (docs/recall-gateway.md).
    if command == C2C_SEND:
        msg_key = _required(data, "MsgKey")
        key = correlation_key(app, "c2c", msg_key)
        sender = _required(data, "From_Account")
        receiver = _str(data.get("To_Account"))
        # Without the receiver the message cannot be recalled by msgID (admin_msgwithdraw needs it).
        locator = None if not receiver else _locator({"type": "c2c", "sender": sender, "receiver": receiver}, msg_key)
    elif command == GROUP_SEND:
        seq = data.get("MsgSeq")
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
            raise Rejection(Reject.INVALID_FIELD, "MsgSeq is not a non-negative integer")
        topic = _str(data.get("TopicId")) or None
        group = _required(data, "GroupId")
        key = correlation_key(app, "group", group_server_key(group, topic, seq))
        sender = _required(data, "From_Account")
        locator = {"conversation": {"type": "group", "groupID": group, "topicID": topic}, "message": {"msgSeq": seq}}
    elif command == OFFICIAL_ACCOUNT_SEND:
        msg_key = _required(data, "MsgKey")
        key = correlation_key(app, "official_account", msg_key)
        sender = _required(data, "Official_Account")
        locator = _locator({"type": "official_account", "officialAccount": sender}, msg_key)
    else:
        raise ValueError(f"{command!r} is not a send command")  # caller routes only sends here
    msg_id = data.get("MsgId")
    client_msg_id = msg_id if isinstance(msg_id, str) and 0 < len(msg_id) <= MAX_ID_CHARS else None
    return [SendRecord(key, client_msg_id, sender, sent_at_ms, proof, locator)]


def _locator(conversation: dict[str, Any], msg_key: str) -> dict[str, Any]:
    return {"conversation": conversation, "message": {"msgKey": msg_key}}


def _required(data: Mapping[str, object], name: str) -> str:
    value = data.get(name)
    if value is None or value == "":
        raise Rejection(Reject.MISSING_FIELD, f"{name} is missing")
    if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
        raise Rejection(Reject.INVALID_FIELD, f"{name} must be a string of at most {MAX_ID_CHARS} chars")
    return value


def _evidence(data: Mapping[str, object], limit: int) -> dict[str, Any]:
    """The message content for moderation, or a marker when it is larger than the cap (never cut:
    a truncated MsgBody could misrepresent what was said)."""
    proof = {"msgBody": data.get("MsgBody"), "cloudCustomData": data.get("CloudCustomData")}
    size = len(orjson.dumps(proof))
    return proof if size <= limit else {"omitted": "too_large", "bytes": size}


def _seconds_to_ms(value: object) -> int | None:
    # MsgTime is Unix seconds in send callbacks (EventTime is milliseconds).
    if isinstance(value, int) and not isinstance(value, bool) and 946_684_800 <= value < 4_102_444_800:
        return value * 1000
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
