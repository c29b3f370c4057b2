"""Which events of the history a command wants: a time window on ``receivedAt``, dotted-path filters
and ``--unique``. Pure: no I/O, no event loop."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"([1-9][0-9]{0,6})([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime, *, allow_first: bool = True) -> datetime | None:
    """``first`` (None: from the stream's start), an ISO-8601 time with an offset, or a duration back
    from *now* (``30m``, ``2h``, ``7d``). Raises ``ValueError`` with what was expected."""
    raw = text.strip()
    if raw == "first" and allow_first:
        return None
    match = _DURATION.fullmatch(raw)
    if match:
        return now - timedelta(**{_UNITS[match[2]]: int(match[1])})
    try:
        at = datetime.fromisoformat(raw)
    except ValueError:
        at = None
    if at is None or at.tzinfo is None:
        forms = "first, " if allow_first else ""
        raise ValueError(
            f"expected {forms}an ISO-8601 time with an offset (2026-12-01T08:00:00+00:00) or a duration"
            f" (30m, 2h, 7d), got {text!r}"
        )
    return at.astimezone(UTC)


def parse_filter(text: str) -> tuple[tuple[str, ...], str]:
    """``FIELD=VALUE`` with FIELD a dotted path (``operator.userID``); raises ``ValueError``."""
    path, sep, value = text.partition("=")
    keys = tuple(path.strip().split("."))
    if not sep or not all(keys):
        raise ValueError(f"expected FIELD=VALUE with FIELD a dotted path (operator.userID=alice), got {text!r}")
    return keys, value


def lookup(event: Mapping[str, object], path: tuple[str, ...]) -> object:
    """The value at *path* in *event*, or None where any step is missing."""
    value: object = event
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def as_text(value: object) -> str:
    """A JSON value as a filter compares it: strings as they are, ``null``, ``true``/``false``, numbers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def event_time(event: Mapping[str, object], fallback: str | None) -> datetime | None:
    """When the relay received the event: ``receivedAt``; the recall gateway's audit events have none,
    so their CloudEvents time (*fallback*: when the request was carried out)."""
    raw = event.get("receivedAt")
    text = raw if isinstance(raw, str) else fallback
    if text is None:
        return None
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


@dataclass
class Selection:
    """The window [since, until) on the event's time, every filter matching, and ``--unique``."""

    since: datetime | None = None
    until: datetime | None = None
    filters: tuple[tuple[tuple[str, ...], str], ...] = ()
    unique: bool = False
    _seen: set[str] = field(default_factory=set, repr=False)

    def matches(self, event: Mapping[str, object], fallback_time: str | None = None) -> bool:
        """Whether *event* is selected; with ``unique``, a selected eventID is remembered and refused after."""
        if self.since is not None or self.until is not None:
            at = event_time(event, fallback_time)
            if at is None:
                return False
            if (self.since is not None and at < self.since) or (self.until is not None and at >= self.until):
                return False
        if not all(as_text(lookup(event, path)) == value for path, value in self.filters):
            return False
        if self.unique:
            event_id = event.get("eventID")
            key = event_id if isinstance(event_id, str) else ""
            if key in self._seen:
                return False
            self._seen.add(key)
        return True


def binding_matches(pattern: str, routing_key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and (p[0] in ("*", k[0])) and match(p[1:], k[1:])

    return match(pattern.split("."), routing_key.split("."))


def utc_now() -> datetime:
    return datetime.now(UTC)
