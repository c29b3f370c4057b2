"""The relay's published events as a consumer sees them: one typed, frozen :class:`Event` for a
revocation (``message.revoked``, versions 1-4) or a recall-gateway audit event (versions 1-2). Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

# The newest version of each kind that this kit knows (docs/events.md, "Versions").
KNOWN_VERSIONS = {"message.revoked": 4, "message.recall_requested": 2, "message.recall_failed": 2}


class EventError(ValueError):
    """Not an event this kit can read: not JSON, no eventID, or a version older than any it knows."""


@dataclass(frozen=True, slots=True)
class Operator:
    """Who recalled: the provider's operator, or for an audit event the moderator (role ``moderator``)."""

    user_id: str | None
    role: str | None


@dataclass(frozen=True, slots=True)
class Event:
    """One event. Fields not listed here stay in ``raw``; ``newer`` marks a version above the kit's."""

    event_id: str
    type: str
    version: int
    msg_id: str | None
    reason: str | None
    operator: Operator
    sender: str | None
    sdk_app_id: str | None
    conversation: Mapping[str, Any]
    received_at: datetime | None
    request_id: str | None
    requested_by: str | None
    raw: Mapping[str, Any]
    newer: bool = False

    @classmethod
    def parse(cls, body: bytes) -> Event:
        """Parse a published body; raises :class:`EventError`."""
        try:
            raw = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise EventError(f"not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise EventError("not a JSON object")
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Event:
        event_id, kind, version = raw.get("eventID"), raw.get("type"), raw.get("version")
        if not isinstance(event_id, str) or not event_id:
            raise EventError("no eventID")
        if not isinstance(kind, str):
            raise EventError(f"event {event_id}: no type")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise EventError(f"event {event_id}: version {version!r} is older than any this kit knows")
        known = KNOWN_VERSIONS.get(kind)
        conversation = raw.get("conversation") if isinstance(raw.get("conversation"), dict) else {}
        assert isinstance(conversation, dict)
        if kind == "message.revoked":
            operator = _dict(raw.get("operator"))
            who = Operator(_str(operator.get("userID")), _str(operator.get("role")))
            request = _dict(raw.get("recallRequest"))
            sender, request_id, requested_by = (
                _str(raw.get("sender")),
                request.get("requestID"),
                request.get("requestedBy"),
            )
        else:
            who = Operator(_str(_dict(raw.get("moderator")).get("userID")), "moderator")
            sender, request_id, requested_by = conversation.get("sender"), raw.get("requestID"), raw.get("requestedBy")
        return cls(
            event_id=event_id,
            type=kind,
            version=version,
            msg_id=_str(raw.get("msgID")),
            reason=_str(raw.get("reason")),
            operator=who,
            sender=_str(sender),
            sdk_app_id=_str(raw.get("sdkAppID")),
            conversation=conversation,
            received_at=_time(raw.get("receivedAt") or raw.get("requestedAt")),
            request_id=_str(request_id),
            requested_by=_str(requested_by),
            raw=raw,
            newer=known is None or version > known,
        )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
