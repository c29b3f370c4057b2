"""The benchmark harness (bench/) stays alive: pieces checked in-process, and a seconds-long smoke run
of ``python -m bench.run`` end to end. No test here asserts a speed.

The smoke run needs wrk (``bench/ensure-tools.sh``) and a RabbitMQ on RELAY_TEST_AMQP_URL: without
wrk it skips, unless ``RELAY_REQUIRE_TOOLS=1`` (CI); without a broker it skips, unless
``RELAY_REQUIRE_BROKER=1`` (CI). Either way CI fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from bench.load import body_template
from bench.services import parse_metrics
from relay.events import RevokeEvent
from relay.tencent.callback import C2C_RECALL, CallbackQuery
from relay.tencent.normalize import normalize
from tests.helpers import AMQP_URL, answers

ROOT = Path(__file__).resolve().parents[2]


def _require(present: bool, message: str, env: str) -> None:
    if present:
        return
    if os.environ.get(env) == "1":
        pytest.fail(f"{message} and {env}=1", pytrace=False)
    pytest.skip(message)


def test_wrk_body_template_fills_into_a_distinct_recall() -> None:
    """The body wrk sends, with a MsgKey and EventTime filled in, normalizes into one C2C event keyed by it."""
    template = body_template()
    assert template.count("{KEY}") == 1
    assert template.count("{MS}") == 1
    query = CallbackQuery(sdk_app_id="1400000001", command=C2C_RECALL)
    events: list[RevokeEvent] = []
    for key in ("000001_12345601000000001_1700000000", "000002_12345601000000002_1700000000"):
        body = template.replace("{KEY}", key).replace("{MS}", "1700000000000").encode()
        events += normalize(body, query, 0).events
    assert [e.msg_key for e in events] == [
        "000001_12345601000000001_1700000000",
        "000002_12345601000000002_1700000000",
    ]
    assert events[0].envelope().event_id != events[1].envelope().event_id


def test_metrics_parser_sums_the_counters_the_checks_use() -> None:
    """parse_metrics sums accepted callbacks over commands and reads the spooled and in-flight series."""
    text = "\n".join(
        [
            "# HELP relay_callbacks_total Callbacks received.",
            'relay_callbacks_total{command="C2C.CallbackAfterMsgWithDraw",outcome="accepted"} 7.0',
            'relay_callbacks_total{command="Group.CallbackAfterRecallMsg",outcome="accepted"} 2.0',
            'relay_callbacks_total{command="C2C.CallbackAfterMsgWithDraw",outcome="rejected"} 5.0',
            "relay_events_spooled_total 3.0",
            "relay_requests_in_flight 1.0",
        ]
    )
    parsed = parse_metrics(text)
    assert (parsed["accepted"], parsed["spooled"], parsed["in_flight"]) == (9.0, 3.0, 1.0)


@pytest.mark.broker
@pytest.mark.timeout(600)
def test_smoke_run_measures_every_section(tmp_path: Path) -> None:
    """``bench.run --smoke`` exits 0 and writes JSON and markdown with A, B, R and S measured and checked."""
    _require(
        shutil.which("wrk") is not None, "wrk not found (bench/ensure-tools.sh installs it)", "RELAY_REQUIRE_TOOLS"
    )
    _require(answers(AMQP_URL, 5672), f"no RabbitMQ answers at {urlsplit(AMQP_URL).hostname}", "RELAY_REQUIRE_BROKER")
    env = {**os.environ, "RELAY_AMQP_URL": AMQP_URL}
    # --workers 2 exercises the RW path: measured once `relay serve --workers` exists, skipped until then.
    command = [sys.executable, "-m", "bench.run", "--smoke", "--workers", "2", "--out", str(tmp_path)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540, check=False)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-4000:]}\nstderr:\n{done.stderr[-4000:]}"

    result = json.loads((tmp_path / "latest-smoke.json").read_text())
    assert result["errors"] == []
    assert result["checks_failed"] == []
    for key in ("A", "R", "RH", "S"):
        (row,) = result[key]["rows"]
        assert row["ok"] > 0, key
        assert row["latency_ms"]["p99"] > 0, key
    assert {r["variant"] for r in result["B"]["rows"]} == {"aio-pika", "aiormq", "raw"}
    assert result["R"]["rows"][0]["queue_check"] is True
    assert result["R"]["rows"][0]["spooled"] == 0
    assert result["RH"]["rows"][0]["queue_check"] is True
    assert result["ratios"]["per_connections"][0]["R/RH"] is not None
    assert result["S"]["rows"][0]["spool_check"] is True
    assert "rows" in result["RW"] or "skipped" in result["RW"]
    assert result["SW"]["rows"][0]["spool_check"] is True
    assert result["ratios"]["best"]["R/A"] is not None

    markdown = (tmp_path / "latest-smoke.md").read_text()
    headings = ("## Ratios", "## A ", "## B ", "## R ", "## RH ", "## S ", "## RW ", "## SW ", "## What else used")
    assert [h for h in headings if h not in markdown] == []
    assert len(list(tmp_path.glob("2*-smoke.json"))) == 1
    assert len(list(tmp_path.glob("2*-smoke.md"))) == 1
