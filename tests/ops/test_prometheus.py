"""A real Prometheus scrapes a real relay, with the project's own config and alert rules.

One relay runs as a subprocess with a spool and no broker (nothing listens on its AMQP port), gets a
signed C2C recall, a 3-item group recall and a callback from an app it does not serve. Then
``/usr/bin/prometheus`` starts with ``deploy/prometheus/prometheus.yml`` (relay target pointed at
the subprocess, 1 s intervals) and ``alerts.yml``. The tests read everything back through the
Prometheus HTTP API: the series and their values, the loaded rules, an alert going pending, and
every Grafana dashboard query.

Needs the ``prometheus`` binary (``scripts/ensure-ops-tools.sh`` installs Debian's package): without
it the tests skip, unless ``RELAY_REQUIRE_TOOLS=1`` (CI), where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "revoke-relay.json"
APP = "1400000001"
TOKEN = "ops-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 - loopback only
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_for(what: str, check: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what}: process exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process by its PID, SIGKILL it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@dataclass
class Stack:
    relay_port: int
    prom_url: str

    def query(self, expr: str) -> list[dict[str, Any]]:
        status, body = _get(f"{self.prom_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
        reply = json.loads(body)
        assert status == 200, f"{expr}: HTTP {status} {reply}"
        assert reply["status"] == "success", reply
        result: list[dict[str, Any]] = reply["data"]["result"]
        return result

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: want one series, got {result}"
        return float(result[0]["value"][1])

    def api(self, path: str) -> dict[str, Any]:
        status, body = _get(f"{self.prom_url}{path}")
        assert status == 200, f"{path}: HTTP {status}"
        reply: dict[str, Any] = json.loads(body)
        assert reply["status"] == "success", reply
        return reply


def _prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        message = "prometheus binary not found (scripts/ensure-ops-tools.sh installs Debian's package)"
        if os.environ.get("RELAY_REQUIRE_TOOLS") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return found


def _prometheus_config(work: Path, relay_port: int) -> Path:
    """deploy/prometheus/prometheus.yml with the relay target on loopback and 1 s intervals."""
    text = (PROM_DIR / "prometheus.yml").read_text()
    replacements = {
        '"relay:8080"': f'"127.0.0.1:{relay_port}"',
        '"rabbitmq:15692"': '"127.0.0.1:1"',  # no broker here: that target is simply down
        "scrape_interval: 15s": "scrape_interval: 1s",
        "evaluation_interval: 15s": "evaluation_interval: 1s",
    }
    for old, new in replacements.items():
        assert text.count(old) == 1, f"prometheus.yml no longer contains {old!r} once; update this test"
        text = text.replace(old, new)
    shutil.copy(PROM_DIR / "alerts.yml", work / "alerts.yml")  # rule_files is relative to the config
    config = work / "prometheus.yml"
    config.write_text(text)
    return config


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = _prometheus_binary()
    work = tmp_path_factory.mktemp("ops")
    relay_port, prom_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "RELAY_SDKAPPIDS": APP,
        "RELAY_CALLBACK_TOKENS": f"{APP}={TOKEN}",
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(relay_port),
        "RELAY_SPOOL_DIR": str(work / "spool"),
        "RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
        "RELAY_SHUTDOWN_DELAY": "0",
        "RELAY_DRAIN_TIMEOUT": "1",
    }
    relay_log, prom_log = work / "relay.log", work / "prometheus.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with relay_log.open("wb") as out:
            relay = subprocess.Popen([sys.executable, "-m", "relay", "serve"], env=env, stdout=out, stderr=out)
        procs.append(relay)
        _wait_for(
            "relay /healthz",
            lambda: _get(f"http://127.0.0.1:{relay_port}/healthz")[0] == 200,
            20,
            relay,
            relay_log,
        )
        url = f"http://127.0.0.1:{relay_port}/tencent-im/callback"
        for args, expect_ok in (
            (["--kind", "c2c", "--sdkappid", APP, "--token", TOKEN], True),
            (["--kind", "group", "--items", "3", "--sdkappid", APP, "--token", TOKEN], True),
            (["--kind", "c2c", "--sdkappid", "1400000999"], False),  # app not served: 403
        ):
            sent = subprocess.run(
                [sys.executable, "-m", "relay", "send-sample", "--url", url, *args],
                env=env,
                capture_output=True,
                timeout=20,
                check=False,
            )
            assert (sent.returncode == 0) is expect_ok, sent.stdout.decode() + sent.stderr.decode()

        config = _prometheus_config(work, relay_port)
        with prom_log.open("wb") as out:
            prom = subprocess.Popen(
                [
                    prometheus,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={work / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--log.level=warn",
                ],
                stdout=out,
                stderr=out,
            )
        procs.append(prom)
        stack = Stack(relay_port, f"http://127.0.0.1:{prom_port}")

        def relay_target_up() -> bool:
            status, body = _get(f"{stack.prom_url}/api/v1/targets")
            if status != 200:
                return False
            targets = json.loads(body)["data"]["activeTargets"]
            return any(t["labels"].get("job") == "revoke-relay" and t["health"] == "up" for t in targets)

        _wait_for("prometheus scrapes the relay", relay_target_up, 30, prom, prom_log)

        def scraped_three_times() -> bool:
            result = stack.query('count_over_time(up{job="revoke-relay"}[1m])')
            return bool(result) and float(result[0]["value"][1]) >= 3  # rate() needs two samples

        _wait_for("three scrapes", scraped_three_times, 30, prom, prom_log)
        yield stack
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_relay_series_reach_prometheus(stack: Stack) -> None:
    """The scraped series carry what the relay did: 2 accepted callbacks, 4 spooled events, 1 refusal."""
    assert stack.value('up{job="revoke-relay"}') == 1
    accepted = {
        r["metric"]["command"]: float(r["value"][1]) for r in stack.query('relay_callbacks_total{outcome="accepted"}')
    }
    assert accepted["C2C.CallbackAfterMsgWithDraw"] == 1
    assert accepted["Group.CallbackAfterRecallMsg"] == 1
    assert sum(accepted.values()) == 2
    assert stack.value('relay_callback_rejections_total{reason="app_not_allowed"}') == 1
    assert stack.value('sum(relay_callbacks_total{outcome="rejected"})') == 1
    # No broker: every event of the two accepted callbacks (1 + 3) is waiting in the spool.
    assert stack.value("relay_events_spooled_total") == 4
    assert stack.value("relay_spool_events") == 4
    assert stack.value("relay_spool_available") == 1
    assert stack.value("relay_spool_capacity_bytes") > stack.value("relay_spool_bytes") > 0
    assert stack.value("relay_broker_connected") == 0
    assert stack.value('sum(relay_events_published_total{conversation_type=~"c2c|group|official_account"})') == 0
    # Each answered callback was timed (3 requests in the latency histogram).
    assert stack.value('sum(relay_request_seconds_count{outcome=~"accepted|rejected"})') == 3


def test_alert_rules_load_and_evaluate(stack: Stack) -> None:
    """Prometheus loads every rule of alerts.yml, evaluates them without error, and the broker alert goes pending."""
    expected = set(re.findall(r"^\s*- alert: (\w+)$", (PROM_DIR / "alerts.yml").read_text(), re.M))
    assert len(expected) >= 12

    deadline = time.monotonic() + 20
    while True:
        groups = stack.api("/api/v1/rules")["data"]["groups"]
        rules = {r["name"]: r for g in groups for r in g["rules"] if r["type"] == "alerting"}
        evaluated = all(r.get("health") == "ok" for r in rules.values())
        if (set(rules) == expected and evaluated) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert set(rules) == expected
    assert [g["name"] for g in groups] == ["revoke-relay"]
    bad = {name: (r.get("health"), r.get("lastError")) for name, r in rules.items() if r.get("health") != "ok"}
    assert bad == {}
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert "docs/deploy.md#" in rule["annotations"]["runbook_url"], name

    # relay_broker_connected is 0: RelayBrokerDisconnected must go pending (it fires only after 2 m).
    deadline = time.monotonic() + 20
    while True:
        alerts = stack.api("/api/v1/alerts")["data"]["alerts"]
        states = {a["labels"]["alertname"]: a["state"] for a in alerts}
        if "RelayBrokerDisconnected" in states or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert states.get("RelayBrokerDisconnected") == "pending", states
    disconnected = next(a for a in alerts if a["labels"]["alertname"] == "RelayBrokerDisconnected")
    assert disconnected["labels"]["job"] == "revoke-relay"
    assert disconnected["labels"]["severity"] == "critical"
    # Nothing about the spool is wrong: 4 small events in 256 MiB, available.
    assert "RelaySpoolNearFull" not in states
    assert "RelaySpoolUnavailable" not in states


def test_dashboard_queries_run(stack: Stack) -> None:
    """Every Grafana panel query runs on the real Prometheus; the spool and callback panels show data."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = {
        target["expr"]: panel["title"]
        for panel in dashboard["panels"]
        if panel.get("type") != "row"
        for target in panel.get("targets", [])
    }
    assert len(exprs) >= 12
    with_data = set()
    for expr, title in exprs.items():
        concrete = expr.replace("$__rate_interval", "1m").replace("$instance", ".+")
        if stack.query(concrete):
            with_data.add(title)
    for title in ("Callback rate by outcome", "Spool depth (events)", "Spool bytes vs capacity", "Broker connection"):
        assert title in with_data, f"panel {title!r} shows no data"
