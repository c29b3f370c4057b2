"""Pure: a Matrix transaction body → redaction events to publish and message records to keep.

No I/O. Policy for bad input (docs/matrix.md, "What the relay accepts"):

* the body is not a JSON object with an ``events`` array of at most :data:`MAX_EVENTS` →
  the transaction is refused (:class:`~relay.matrix.errors.MatrixRejection`);
* one event in it is unusable (not an object, an ID missing or not a string) → that event is
  skipped and reported in ``skipped``; the rest of the transaction is handled. Refusing the
  whole transaction instead would not help: the homeserver would retry the same body forever
  and hold back every later transaction behind it;
* an optional field has the wrong type or an absurd value → treated as absent, named in
  ``anomalies``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import orjson

from relay.events import Conversation, Enrichment, Operator, RevokeEvent, name_id
from relay.matrix.errors import MatrixReject, MatrixRejection
from relay.store import SendRecord

# Synapse puts at most 100 events in a transaction; ten times that bounds the work of one request
# without refusing any homeserver's real batches.
MAX_EVENTS = 1000
# Matrix caps IDs at 255 bytes; this bound only keeps absurd values out of keys and logs.
MAX_ID_CHARS = 1024
MAX_REASON_CHARS = 4096
REDACTION = "m.room.redaction"
# What a client shows as a message, and so what a redaction "recalls". A redaction of anything
# else (a reaction, a state event) is published too: the relay cannot tell the target's type
# unless it recorded the target.
MESSAGE_TYPES = frozenset({"m.room.message", "m.sticker", "m.room.encrypted"})
# origin_server_ts (ms) outside [2000-01-01, 2100-01-01) is absurd and ignored.
_MIN_TS = 946_684_800_000
_MAX_TS = 4_102_444_800_000
# Percent-encode everything but these, so "/" only ever separates the parts of a name.
_SAFE = "!$&'()*+,;=:@-._~"


def name(room_id: str, event_id: str) -> str:
    """``matrix/<room ID>/<event ID>``, each percent-encoded: the eventID's name and the store key.

    Tencent's names start with the digits of an SdkAppid, so the two can never collide."""
    return f"matrix/{quote(room_id, safe=_SAFE)}/{quote(event_id, safe=_SAFE)}"


def source(room_id: str) -> str:
    """The CloudEvents ``source`` of a Matrix event: ``matrix/<room ID>`` (percent-encoded)."""
    return f"matrix/{quote(room_id, safe=_SAFE)}"


@dataclass(frozen=True, slots=True)
class Skipped:
    """One event of a transaction that could not be read (it is acknowledged, never published)."""

    index: int
    code: MatrixReject
    detail: str


@dataclass(frozen=True, slots=True)
class Transaction:
    redactions: tuple[RevokeEvent, ...]
    records: tuple[SendRecord, ...]
    skipped: tuple[Skipped, ...]
    kinds: Mapping[str, int]  # redaction, message, other (skipped ones are "invalid")
    anomalies: tuple[str, ...] = ()


def parse_transaction(body: bytes) -> list[object]:
    """The ``events`` array of a transaction body (orjson: strict UTF-8, no NaN, depth ≤ 1024)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MatrixRejection(MatrixReject.INVALID_JSON, str(exc)[:200]) from exc
    if not isinstance(parsed, dict):
        raise MatrixRejection(MatrixReject.NOT_AN_OBJECT, f"body is a JSON {type(parsed).__name__}")
    events = parsed.get("events")
    if events is None:
        raise MatrixRejection(MatrixReject.MISSING_FIELD, "events is missing")
    if not isinstance(events, list):
        raise MatrixRejection(MatrixReject.INVALID_FIELD, "events is not an array")
    if len(events) > MAX_EVENTS:
        raise MatrixRejection(MatrixReject.TOO_MANY_EVENTS, f"{len(events)} events, the cap is {MAX_EVENTS}")
    return cast(list[object], events)


def normalize(
    events: list[object],
    received_at_ms: int,
    *,
    evidence: bool = False,
    evidence_max_bytes: int = 4096,
    enrichment: Enrichment = "disabled",
) -> Transaction:
    """Read every event of a transaction, in order: redactions become events (each marked
    *enrichment* until a record is found for it), messages become records."""
    reader = _Reader(received_at_ms, evidence, evidence_max_bytes, enrichment)
    for index, item in enumerate(events):
        try:
            reader.read(item)
        except _Unusable as exc:
            reader.skipped.append(Skipped(index, exc.code, exc.detail))
    return Transaction(
        tuple(reader.redactions),
        tuple(reader.records),
        tuple(reader.skipped),
        dict(reader.kinds),
        tuple(dict.fromkeys(reader.anomalies)),
    )


class _Unusable(Exception):
    def __init__(self, code: MatrixReject, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


@dataclass(slots=True)
class _Reader:
    received_at_ms: int
    evidence: bool
    evidence_max_bytes: int
    enrichment: Enrichment
    redactions: list[RevokeEvent] = field(default_factory=list)
    records: list[SendRecord] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=lambda: {"redaction": 0, "message": 0, "other": 0})
    seen: set[str] = field(default_factory=set)

    def read(self, item: object) -> None:
        if not isinstance(item, dict):
            raise _Unusable(MatrixReject.NOT_AN_OBJECT, f"event is a JSON {type(item).__name__}")
        event = cast(dict[str, Any], item)
        kind = _id(event, "type")
        if kind == REDACTION:
            self.redaction(event)
        elif kind in MESSAGE_TYPES:
            self.message(event)
        else:
            self.kinds["other"] += 1

    def redaction(self, event: Mapping[str, Any]) -> None:
        room_id, sender = _id(event, "room_id"), _id(event, "sender")
        _id(event, "event_id")  # a well-formed event has one, even though nothing here uses it
        content = self.content(event)
        # Up to room version 10 the target is the top-level "redacts"; from 11 it is in the
        # content. Synapse sends both in every version (the top-level one is always the real
        # target), other homeservers may send only the content's in version 11 rooms.
        target = event.get("redacts")
        if target is None:
            target = content.get("redacts")
            if target is None:
                raise _Unusable(MatrixReject.MISSING_FIELD, "redacts is missing")
        target = _check_id(target, "redacts")
        self.kinds["redaction"] += 1
        key = name(room_id, target)
        if key in self.seen:
            return  # the same message redacted twice in one transaction: one recall, one event
        self.seen.add(key)
        event_time_ms = self.timestamp(event) or self.received_at_ms
        self.redactions.append(
            RevokeEvent(
                event_id=name_id(key),
                msg_id=target,
                msg_key=None,
                msg_seq=None,
                client_msg_id=target,  # clients know a message by its event ID
                # Who sent the redacted message is known only from its record: the enricher
                # makes the role sender or group_admin when it finds one.
                operator=Operator(sender, "unknown"),
                reason=self.reason(content),
                sender=None,
                conversation=Conversation(type="group", group_id=room_id),
                sdk_app_id=None,
                callback_command=REDACTION,
                platform=None,
                client_ip=None,
                event_time_ms=event_time_ms,
                received_at_ms=self.received_at_ms,
                server_key=key,
                enrichment=self.enrichment,
                provider="matrix",
                source=source(room_id),
                correlation_key=key,
            )
        )

    def message(self, event: Mapping[str, Any]) -> None:
        room_id, sender, event_id = _id(event, "room_id"), _id(event, "sender"), _id(event, "event_id")
        content = self.content(event)
        proof: dict[str, Any] | None = None
        unsigned = event.get("unsigned")
        # A message redacted before the homeserver delivered it arrives pruned: no content left.
        pruned = isinstance(unsigned, dict) and "redacted_because" in unsigned
        if self.evidence and not pruned:
            proof = {"msgBody": content, "cloudCustomData": None}
            size = len(orjson.dumps(proof))
            if size > self.evidence_max_bytes:
                proof = {"omitted": "too_large", "bytes": size}  # never cut: a cut body could mislead
        self.kinds["message"] += 1
        self.records.append(SendRecord(name(room_id, event_id), None, sender, self.timestamp(event), proof))

    def content(self, event: Mapping[str, Any]) -> dict[str, Any]:
        content = event.get("content")
        if content is None:
            return {}
        if not isinstance(content, dict):
            self.anomalies.append("content")
            return {}
        return cast(dict[str, Any], content)

    def reason(self, content: Mapping[str, Any]) -> str | None:
        reason = content.get("reason")
        if reason is None or reason == "":
            return None
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            self.anomalies.append("reason")
            return None
        return reason

    def timestamp(self, event: Mapping[str, Any]) -> int | None:
        ts = event.get("origin_server_ts")
        if ts is None:
            return None
        if isinstance(ts, bool) or not isinstance(ts, int) or not _MIN_TS <= ts < _MAX_TS:
            self.anomalies.append("origin_server_ts")
            return None
        return ts


def _id(event: Mapping[str, Any], field_name: str) -> str:
    value = event.get(field_name)
    if value is None or value == "":
        raise _Unusable(MatrixReject.MISSING_FIELD, f"{field_name} is missing")
    return _check_id(value, field_name)


def _check_id(value: object, field_name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise _Unusable(MatrixReject.INVALID_FIELD, f"{field_name} must be a string of 1 to {MAX_ID_CHARS} chars")
    return value
