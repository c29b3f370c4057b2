"""Pure normalization: callback body bytes + query → ``message.revoked`` events, or a typed rejection.

No I/O and no event loop. Every documented payload variant is accepted (EventTime as integer or
numeric string, UnreadMsgNum or not, TopicId or not, MsgId inside MsgSeqList items or not).
Policy for bad input (docs/events.md, "What the relay accepts"):

* the callback is not a JSON object, or a field that identifies the message is missing or of the
  wrong type → the whole callback is rejected (:class:`~relay.errors.Rejection`);
* one item of a multi-message callback is bad → that item is rejected, the valid items still
  become events (nothing valid is dropped because something invalid arrived beside it);
* an optional field has the wrong type or an absurd value → it is treated as absent and named
  in ``anomalies`` so the caller can count and log it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import quote

import orjson

from relay.errors import Reject, Rejection
from relay.events import Conversation, Enrichment, Operator, RevokeEvent, event_id
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL, CallbackQuery

# Tencent's REST recall takes at most 10 messages per call; 1,000 leaves ample room for any
# future batching while bounding the work one request can cause.
MAX_ITEMS = 1000
# Tencent IDs are short (UserID ≤ 32 bytes, GroupId ≤ 48); anything past this is not an ID.
MAX_ID_CHARS = 1024
MAX_REASON_CHARS = 4096
# EventTime (milliseconds) outside [2000-01-01, 2100-01-01) is absurd and ignored.
_MIN_EVENT_MS = 946_684_800_000
_MAX_EVENT_MS = 4_102_444_800_000
_REST_PLATFORM = "restapi"
_KEY_SAFE = "@#_-.~!$&'()*+,;=:"


@dataclass(frozen=True, slots=True)
class ItemRejection:
    """One item of ``MsgSeqList`` / ``WithdrawMsgList`` that could not become an event."""

    index: int
    code: Reject
    detail: str


@dataclass(frozen=True, slots=True)
class Normalized:
    command: str
    events: tuple[RevokeEvent, ...]
    rejected_items: tuple[ItemRejection, ...] = ()
    anomalies: tuple[str, ...] = ()


def parse_object(body: bytes) -> dict[str, object]:
    """Parse the body as a JSON object (orjson: strict UTF-8, no NaN, depth ≤ 1024)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Rejection(Reject.INVALID_JSON, str(exc)[:200]) from exc
    if not isinstance(parsed, dict):
        raise Rejection(Reject.NOT_AN_OBJECT, f"body is a JSON {type(parsed).__name__}")
    return cast(dict[str, object], parsed)


def resolve_command(query: CallbackQuery, body: Mapping[str, object]) -> str:
    """The callback command, from the query and/or the body; they must agree when both are given."""
    in_body = body.get("CallbackCommand")
    if in_body is not None and not isinstance(in_body, str):
        raise Rejection(Reject.INVALID_FIELD, "CallbackCommand is not a string")
    if query.command is not None and in_body and query.command != in_body:
        raise Rejection(Reject.COMMAND_MISMATCH, "CallbackCommand differs between query and body")
    command = query.command or in_body
    if not command:
        raise Rejection(Reject.MISSING_PARAMETER, "CallbackCommand is missing")
    return command


def normalize(
    body: bytes, query: CallbackQuery, received_at_ms: int, *, enrichment: Enrichment = "disabled"
) -> Normalized:
    """Turn one recall callback into one event per recalled message, each marked *enrichment*
    (what it says until an enricher finds a send record for it)."""
    data = parse_object(body)
    command = resolve_command(query, data)
    builder = _Builder(data, query, command, received_at_ms, enrichment)
    if command == C2C_RECALL:
        return builder.c2c()
    if command == GROUP_RECALL:
        return builder.group()
    if command == OFFICIAL_ACCOUNT_RECALL:
        return builder.official_account()
    raise ValueError(f"{command!r} is not a recall command")  # caller routes only recalls here


def group_server_key(group_id: str, topic_id: str | None, msg_seq: int) -> str:
    """``GroupId/MsgSeq`` or ``GroupId/TopicId/MsgSeq``, each ID percent-encoded so ``/`` separates.

    Custom group IDs may contain almost any printable ASCII; quoting ``/`` and ``%`` makes the
    join unambiguous while leaving Tencent's usual ``@TGS#`` IDs readable.
    """
    parts = [quote(group_id, safe=_KEY_SAFE)]
    if topic_id:
        parts.append(quote(topic_id, safe=_KEY_SAFE))
    parts.append(str(msg_seq))
    return "/".join(parts)


def _as_int(raw: object) -> int | None:
    """An integer from a JSON integer, an integral float or a string of ASCII digits; else None."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float):
        return int(raw) if raw.is_integer() else None
    if isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 15:
        return int(raw)
    return None


class _Builder:
    """Reads one callback body; collects anomalies while building events."""

    def __init__(
        self,
        data: Mapping[str, object],
        query: CallbackQuery,
        command: str,
        received_at_ms: int,
        enrichment: Enrichment,
    ) -> None:
        self.enrichment = enrichment
        self.data = data
        self.query = query
        self.command = command
        self.received_at_ms = received_at_ms
        self.anomalies: list[str] = []
        self.platform = self._query_text(query.platform, "OptPlatform")
        self.client_ip = self._query_text(query.client_ip, "ClientIP")
        self.rest = (self.platform or "").lower() == _REST_PLATFORM
        self.event_time_ms = self._event_time()
        self.reason = self._reason()

    # -- field readers -------------------------------------------------------------------------

    def _query_text(self, value: str | None, name: str) -> str | None:
        """A query value copied into events: dropped (an anomaly) if it cannot be UTF-8 encoded."""
        if value is None or value.isascii():
            return value
        try:
            value.encode()
        except UnicodeEncodeError:
            self.anomalies.append(name)
            return None
        return value

    def required_id(self, source: Mapping[str, object], name: str, where: str = "") -> str:
        value = source.get(name)
        if value is None or value == "":
            raise Rejection(Reject.MISSING_FIELD, f"{where}{name} is missing")
        if not isinstance(value, str) or len(value) > MAX_ID_CHARS:
            raise Rejection(Reject.INVALID_FIELD, f"{where}{name} must be a string of at most {MAX_ID_CHARS} chars")
        return value

    def optional_str(self, source: Mapping[str, object], name: str, limit: int = MAX_ID_CHARS) -> str | None:
        value = source.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str) or len(value) > limit:
            self.anomalies.append(name)
            return None
        return value

    def items(self, name: str) -> list[object]:
        value = self.data.get(name)
        if value is None:
            raise Rejection(Reject.MISSING_FIELD, f"{name} is missing")
        if not isinstance(value, list) or not value:
            raise Rejection(Reject.INVALID_FIELD, f"{name} must be a non-empty array")
        if len(value) > MAX_ITEMS:
            raise Rejection(Reject.TOO_MANY_ITEMS, f"{name} has {len(value)} items, the cap is {MAX_ITEMS}")
        return value

    def _event_time(self) -> int:
        raw = self.data.get("EventTime")
        if raw is None or raw == "":
            return self.received_at_ms
        value = _as_int(raw)
        if value is None or not _MIN_EVENT_MS <= value < _MAX_EVENT_MS:
            self.anomalies.append("EventTime")
            return self.received_at_ms
        return value

    def _reason(self) -> str | None:
        for name in ("Reason", "RecallReason"):
            if name in self.data:
                return self.optional_str(self.data, name, MAX_REASON_CHARS)
        return None

    # -- event construction --------------------------------------------------------------------

    def event(
        self,
        conversation: Conversation,
        server_key: str,
        *,
        msg_id: str | None = None,
        msg_key: str | None = None,
        msg_seq: int | None = None,
        operator: Operator,
        sender: str | None,
    ) -> RevokeEvent:
        app = self.query.sdk_app_id or ""
        return RevokeEvent(
            event_id=event_id(app, conversation.type, server_key),
            msg_id=msg_id or server_key,
            msg_key=msg_key,
            msg_seq=msg_seq,
            client_msg_id=msg_id,
            operator=operator,
            reason=self.reason,
            sender=sender,
            conversation=conversation,
            sdk_app_id=app,
            callback_command=self.command,
            platform=self.platform,
            client_ip=self.client_ip,
            event_time_ms=self.event_time_ms,
            received_at_ms=self.received_at_ms,
            enrichment=self.enrichment,
            server_key=server_key,
        )

    def result(self, events: list[RevokeEvent], rejected: list[ItemRejection]) -> Normalized:
        return Normalized(self.command, tuple(events), tuple(rejected), tuple(dict.fromkeys(self.anomalies)))

    def c2c(self) -> Normalized:
        sender = self.required_id(self.data, "From_Account")
        receiver = self.required_id(self.data, "To_Account")
        msg_key = self.required_id(self.data, "MsgKey")
        # Only the sender can recall a C2C message from a client; a REST recall is an app admin's,
        # and the callback does not say which admin account made it.
        operator = Operator(None, "app_admin") if self.rest else Operator(sender, "sender")
        conversation = Conversation(type="c2c", receiver=receiver)
        event = self.event(conversation, msg_key, msg_key=msg_key, operator=operator, sender=sender)
        return self.result([event], [])

    def group(self) -> Normalized:
        group_id = self.required_id(self.data, "GroupId")
        items = self.items("MsgSeqList")
        topic_id = self.optional_str(self.data, "TopicId")
        conversation = Conversation(
            type="group",
            group_id=group_id,
            group_type=self.optional_str(self.data, "Type"),
            topic_id=topic_id,
        )
        operator_account = self.optional_str(self.data, "Operator_Account")
        # A client recall may be the sender's own or a group admin's; the callback cannot tell.
        operator = Operator(operator_account, "app_admin" if self.rest else "unknown")
        events: list[RevokeEvent] = []
        rejected: list[ItemRejection] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                rejected.append(ItemRejection(index, Reject.INVALID_FIELD, "MsgSeqList item is not an object"))
                continue
            seq = item.get("MsgSeq")
            if seq is None:
                rejected.append(ItemRejection(index, Reject.MISSING_FIELD, "MsgSeq is missing"))
                continue
            if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 2**63:
                rejected.append(ItemRejection(index, Reject.INVALID_FIELD, "MsgSeq is not a non-negative integer"))
                continue
            key = group_server_key(group_id, topic_id, seq)
            if key in seen:
                continue  # the same message listed twice is one recall, one event
            seen.add(key)
            msg_id = self.optional_str(item, "MsgId")
            events.append(self.event(conversation, key, msg_id=msg_id, msg_seq=seq, operator=operator, sender=None))
        return self.result(events, rejected)

    def official_account(self) -> Normalized:
        account = self.required_id(self.data, "Official_Account")
        items = self.items("WithdrawMsgList")
        conversation = Conversation(type="official_account", official_account=account)
        operator_account = self.optional_str(self.data, "Operator_Account")
        operator = Operator(operator_account, "app_admin" if self.rest else "unknown")
        events: list[RevokeEvent] = []
        rejected: list[ItemRejection] = []
        seen: set[str] = set()
        for index, item in enumerate(items):
            if not isinstance(item, dict):
                rejected.append(ItemRejection(index, Reject.INVALID_FIELD, "WithdrawMsgList item is not an object"))
                continue
            try:
                msg_key = self.required_id(item, "MsgKey", f"WithdrawMsgList[{index}].")
            except Rejection as exc:
                rejected.append(ItemRejection(index, exc.code, exc.detail))
                continue
            if msg_key in seen:
                continue
            seen.add(msg_key)
            events.append(self.event(conversation, msg_key, msg_key=msg_key, operator=operator, sender=account))
        return self.result(events, rejected)
