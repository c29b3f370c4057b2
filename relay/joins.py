"""The recall gateway's join records: which request caused a REST recall, and what it says."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import quote

import orjson

from relay.events import ConversationType, Operator, RecallRequest, RevokeEvent
from relay.store.base import _str


def recall_key(sdk_app_id: str, conversation_type: ConversationType, parts: Sequence[str]) -> str:
    """Gateway key of a recall request for one message: the join key of the issue, each part
    percent-encoded so ``/`` only separates. C2C: (sender, receiver, MsgKey); group: (GroupId,
    TopicId or "", MsgSeq); official account: (account, MsgKey)."""
    encoded = [quote(part, safe="") for part in parts]
    # Hash tag: the conversation (every part but the message's own), so the join records of one
    # request (one conversation) share a slot in a Redis Cluster; quote() leaves no brace inside.
    return f"recall:{{{sdk_app_id}/{conversation_type}/" + "/".join(encoded[:-1]) + "}/" + encoded[-1]


def recall_key_of(event: RevokeEvent, admin: str) -> str | None:
    """The join key a recall callback's event is looked up under; None when the gateway cannot
    have caused it: only a REST recall (``OptPlatform=RESTAPI``) made as *admin* can be (a group
    recall names its operator; C2C and official-account recalls name none)."""
    if event.provider != "tencent" or event.sdk_app_id is None or not _is_rest(event):
        return None  # a user's or group admin's own recall from a client, or no platform given
    if event.operator.user_id is not None and event.operator.user_id != admin:
        return None  # another admin account's REST recall: not ours
    c = event.conversation
    if c.type == "c2c":
        if event.sender is None or c.receiver is None or event.msg_key is None:
            return None
        return recall_key(event.sdk_app_id, "c2c", (event.sender, c.receiver, event.msg_key))
    if c.type == "group":
        if c.group_id is None or event.msg_seq is None:
            return None
        return recall_key(event.sdk_app_id, "group", (c.group_id, c.topic_id or "", str(event.msg_seq)))
    if c.official_account is None or event.msg_key is None:
        return None
    return recall_key(event.sdk_app_id, "official_account", (c.official_account, event.msg_key))


def _is_rest(event: RevokeEvent) -> bool:
    return event.platform is not None and event.platform.lower() == "restapi"


@dataclass(frozen=True, slots=True)
class Attribution:
    """What a gateway request says about the recalls it causes: who asked, why, naming which
    moderator, and how the moderator is known (asserted by the key, or verified by an issuer).
    Stored once per request; each message's join record points to it."""

    request: RecallRequest
    reason: str
    moderator: str
    asserted_by: str | None
    verified_by: str | None

    def encode(self) -> bytes:
        r = self.request
        return orjson.dumps(
            {
                "i": r.request_id,
                "b": r.requested_by,
                "t": r.requested_at_ms,
                "r": self.reason,
                "m": self.moderator,
                "a": self.asserted_by,
                "v": self.verified_by,
            }
        )


def apply_request(event: RevokeEvent, raw: bytes) -> RevokeEvent:
    """The event with the reason and moderator of the gateway request that caused it."""
    data = orjson.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("attribution record is not an object")
    request_id, by, at, reason, moderator = (data.get(k) for k in ("i", "b", "t", "r", "m"))
    if not (isinstance(request_id, str) and isinstance(by, str) and isinstance(reason, str)):
        raise ValueError("attribution record lacks requestID, requestedBy or reason")
    if not isinstance(at, int) or not isinstance(moderator, str):
        raise ValueError("attribution record lacks requestedAt or moderator")
    asserted, verified = _str(data.get("a")), _str(data.get("v"))
    if (asserted is None) == (verified is None):
        raise ValueError("attribution record must say who asserted or verified the moderator")
    return replace(
        event,
        reason=reason,
        operator=Operator(moderator, "moderator", asserted_by=asserted, verified_by=verified),
        recall_request=RecallRequest(request_id, by, at),
    )
