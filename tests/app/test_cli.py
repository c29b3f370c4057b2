"""The operator commands: check-config, spool stats and export (no broker needed)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from relay.cli import main
from relay.spool import Spool
from tests.helpers import envelopes


def test_check_config_ok_prints_redacted_settings(capsys: pytest.CaptureFixture[str]) -> None:
    """A valid environment exits 0 and prints the settings without secrets."""
    env = {"RELAY_CALLBACK_TOKENS": "1400000001=hunter2", "RELAY_AMQP_URL": "amqp://u:pw123@h/"}
    assert 0 == main(["check-config"], env)
    out = capsys.readouterr().out
    assert "configuration OK" in out
    assert "hunter2" not in out
    assert "pw123" not in out


def test_check_config_names_each_bad_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid environment exits 1 and names every bad variable on stderr."""
    assert 1 == main(["check-config"], {"RELAY_SDKAPPIDS": "1", "RELAY_PORT": "x", "RELAY_LOG_FORMAT": "xml"})
    err = capsys.readouterr().err
    assert "RELAY_PORT" in err
    assert "RELAY_LOG_FORMAT" in err


async def spool_with(directory: Path, n: int) -> list[str]:
    items = envelopes(n)
    spool = Spool(directory, 16 * 1024 * 1024)
    await spool.open()
    await spool.put(items)
    await spool.close()
    return [e.event_id for e in items]


async def test_spool_stats_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stats reports count and bytes as JSON; export prints one JSON line per event, oldest first."""
    ids = await spool_with(tmp_path, 3)
    capsys.readouterr()  # drop the spool's own log lines
    assert 0 == main(["spool", "stats", "--dir", str(tmp_path)], {})
    stats = orjson.loads(capsys.readouterr().out)
    assert 3 == stats["events"]
    assert stats["bytes"] > 0
    assert 0 == main(["spool", "export", "--dir", str(tmp_path)], {})
    lines = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ids == [line["eventID"] for line in lines]
    assert ids == [line["event"]["eventID"] for line in lines]
    assert "message.revoked.c2c" == lines[0]["routingKey"]


def test_spool_stats_without_a_spool_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pointing at a directory with no spool exits 1 with a message, not a traceback."""
    assert 1 == main(["spool", "stats", "--dir", str(tmp_path / "none")], {})
    assert "no spool" in capsys.readouterr().err
