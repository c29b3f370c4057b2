"""The history's pure parts: WHEN, filters, the window, --unique, topic matching and the CSV row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from relay.history.export import CSV_COLUMNS, csv_row
from relay.history.select import Selection, binding_matches, parse_filter, parse_when

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("first", None, id="first"),
        pytest.param("30m", NOW - timedelta(minutes=30), id="minutes"),
        pytest.param("2h", NOW - timedelta(hours=2), id="hours"),
        pytest.param("7d", NOW - timedelta(days=7), id="days"),
        pytest.param("2026-12-01T09:30:00+01:00", datetime(2026, 12, 1, 8, 30, tzinfo=UTC), id="iso-offset"),
        pytest.param("2026-12-01T08:30:00Z", datetime(2026, 12, 1, 8, 30, tzinfo=UTC), id="iso-z"),
    ],
)
def test_when_forms(text: str, expected: datetime | None) -> None:
    """Each WHEN form becomes the UTC time it names (first: None, the stream's start)."""
    assert expected == parse_when(text, NOW)


@pytest.mark.parametrize("text", ["2026-12-01T08:30:00", "yesterday", "-2h", "2w", "0m"])
def test_bad_when_is_refused_with_the_forms(text: str) -> None:
    """A time without an offset or an unknown duration: ValueError listing the accepted forms."""
    with pytest.raises(ValueError, match="ISO-8601 time with an offset"):
        parse_when(text, NOW)


def test_first_is_not_an_until() -> None:
    """--until first means nothing: refused."""
    with pytest.raises(ValueError, match="expected an ISO-8601"):
        parse_when("first", NOW, allow_first=False)


def test_window_is_since_inclusive_until_exclusive() -> None:
    """receivedAt == since is in, == until is out; an audit event's CloudEvents time stands in for receivedAt."""
    selection = Selection(since=NOW, until=NOW + timedelta(hours=1))
    assert selection.matches({"receivedAt": "2026-12-01T12:00:00.000Z"})
    assert not selection.matches({"receivedAt": "2026-12-01T13:00:00.000Z"})
    assert not selection.matches({"receivedAt": "2026-12-01T11:59:59.999Z"})
    assert selection.matches({"type": "message.recall_failed"}, "2026-12-01T12:30:00.000Z")


def test_filters_follow_dotted_paths_and_compare_as_text() -> None:
    """operator.userID=alice matches; a missing path is null; numbers compare as written."""
    event = {"operator": {"userID": "alice"}, "msgSeq": 42, "reason": None}
    assert Selection(filters=(parse_filter("operator.userID=alice"), parse_filter("msgSeq=42"))).matches(event)
    assert Selection(filters=(parse_filter("reason=null"), parse_filter("missing.path=null"))).matches(event)
    assert not Selection(filters=(parse_filter("operator.userID=bob"),)).matches(event)


def test_a_filter_needs_a_field_and_an_equals_sign() -> None:
    """``operator`` alone or ``.x=1``: ValueError."""
    for text in ("operator", ".x=1", "a..b=1"):
        with pytest.raises(ValueError, match="FIELD=VALUE"):
            parse_filter(text)


def test_unique_refuses_a_seen_event_id() -> None:
    """The first copy of an eventID passes, the second does not."""
    selection = Selection(unique=True)
    assert [True, True, False] == [selection.matches({"eventID": e}) for e in ("a", "b", "a")]


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("message.#", "message.revoked.c2c", True),
        ("message.#", "message", True),
        ("message.#", "replay.message", False),
        ("message.*.c2c", "message.revoked.c2c", True),
        ("message.*", "message.revoked.c2c", False),
        ("#", "anything.at.all", True),
    ],
)
def test_topic_binding_matches(pattern: str, key: str, expected: bool) -> None:
    """AMQP topic rules: * one word, # zero or more."""
    assert expected == binding_matches(pattern, key)


def test_csv_row_of_a_revocation_and_of_an_audit_event() -> None:
    """The documented columns, a moderator for an audit event, and a formula-like reason neutralised."""
    revoked = {
        "eventID": "e1",
        "type": "message.revoked",
        "sdkAppID": "1400000001",
        "conversation": {"type": "group", "groupID": "@TGS#1", "topicID": None},
        "msgID": "m1",
        "sender": "u1",
        "operator": {"userID": "admin", "role": "group_admin"},
        "reason": "=HYPERLINK(1)",
        "receivedAt": "2026-12-01T12:00:00.000Z",
        "recallRequest": {"requestID": "r1", "requestedBy": "svc"},
    }
    row = dict(zip(CSV_COLUMNS, csv_row(revoked, None), strict=True))
    assert ("group/@TGS#1", "admin", "group_admin", "'=HYPERLINK(1)", "svc", "r1") == (
        row["conversation"],
        row["operator"],
        row["role"],
        row["reason"],
        row["requestedBy"],
        row["requestID"],
    )
    audit = {
        "eventID": "a1",
        "type": "message.recall_requested",
        "requestID": "r2",
        "requestedBy": "svc",
        "conversation": {"type": "c2c", "receiver": "u2", "sender": "u3"},
        "moderator": {"userID": "mod"},
    }
    row = dict(zip(CSV_COLUMNS, csv_row(audit, "2026-12-01T12:00:00.000Z"), strict=True))
    assert ("2026-12-01T12:00:00.000Z", "c2c/u2", "u3", "mod", "moderator", "r2") == (
        row["time"],
        row["conversation"],
        row["sender"],
        row["operator"],
        row["role"],
        row["requestID"],
    )
