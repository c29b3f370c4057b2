"""``relay export``'s rows: the event as JSON lines, or the stable CSV columns of docs/history.md. Pure."""

from __future__ import annotations

from collections.abc import Mapping

from relay.history.select import lookup

# The contract: documented in docs/history.md; add columns only at the end.
CSV_COLUMNS = (
    "time",
    "eventID",
    "type",
    "sdkAppID",
    "conversation",
    "msgID",
    "sender",
    "operator",
    "role",
    "reason",
    "requestedBy",
    "requestID",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _text(value: object) -> str:
    return "" if value is None else str(value)


def conversation(event: Mapping[str, object]) -> str:
    """``group/<groupID>[/<topicID>]``, ``c2c/<receiver>`` or ``official_account/<account>``."""
    kind = _text(lookup(event, ("conversation", "type")))
    if kind == "group":
        topic = _text(lookup(event, ("conversation", "topicID")))
        return f"group/{_text(lookup(event, ('conversation', 'groupID')))}" + (f"/{topic}" if topic else "")
    if kind == "c2c":
        return f"c2c/{_text(lookup(event, ('conversation', 'receiver')))}"
    if kind == "official_account":
        return f"official_account/{_text(lookup(event, ('conversation', 'officialAccount')))}"
    return kind


def csv_row(event: Mapping[str, object], time: str | None) -> list[str]:
    """One row in :data:`CSV_COLUMNS` order. A revocation's operator and recall request; for the recall
    gateway's audit events the moderator (role ``moderator``), the request and the message's sender."""
    audit = "recallRequest" not in event and "requestID" in event
    sender: object
    operator: object
    role: object
    if audit:
        sender, operator, role = (
            lookup(event, ("conversation", "sender")),
            lookup(event, ("moderator", "userID")),
            ("moderator"),
        )
        requested_by, request_id = event.get("requestedBy"), event.get("requestID")
    else:
        sender, operator = event.get("sender"), lookup(event, ("operator", "userID"))
        role = lookup(event, ("operator", "role"))
        requested_by = lookup(event, ("recallRequest", "requestedBy"))
        request_id = lookup(event, ("recallRequest", "requestID"))
    values = (
        event.get("receivedAt") or time,
        event.get("eventID"),
        event.get("type"),
        event.get("sdkAppID"),
        conversation(event),
        event.get("msgID"),
        sender,
        operator,
        role,
        event.get("reason"),
        requested_by,
        request_id,
    )
    return [_safe(_text(v)) for v in values]


def _safe(cell: str) -> str:
    """A cell a spreadsheet will not run as a formula (a reason is user text): quoted with ``'``."""
    return "'" + cell if cell.startswith(_FORMULA_START) else cell
