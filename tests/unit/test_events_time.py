"""rfc3339_ms: the timestamps every event carries."""

from __future__ import annotations

from datetime import UTC, datetime

from relay.events import rfc3339_ms


def test_rfc3339_ms_formats_alternating_seconds_alike() -> None:
    """Timestamps of different seconds in turn (eventTime, receivedAt) each get their own second,
    and exactly three fractional digits, as datetime formats them."""
    stamps = [1_700_000_000_007, 1_765_000_000_999, 1_700_000_000_120, 0, 1_765_000_001_000]
    expected = [
        datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z" for ms in stamps
    ]
    assert expected == [rfc3339_ms(ms) for ms in stamps]
    assert "2023-11-14T22:13:20.007Z" == rfc3339_ms(1_700_000_000_007)
    assert "1970-01-01T00:00:00.000Z" == rfc3339_ms(0)
