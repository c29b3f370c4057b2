"""docs/openapi.yaml agrees with what the relay serves, and schemathesis finds no server error in it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay.app import API, create_app
from relay.errors import STATUS, Reject
from relay.metrics import RECALL_OUTCOMES
from tests.helpers import RecordingPublisher, make_settings
from tests.tencent_sim import TencentSim

DOC = Path(__file__).parents[2] / "docs" / "openapi.yaml"


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(DOC.read_text(encoding="utf-8"))
    return loaded


def test_documented_routes_are_the_served_routes(spec: dict[str, Any], tmp_path: Path) -> None:
    """Every documented path and method is served, and nothing served is undocumented."""
    app = create_app(make_settings(tmp_path), publisher=RecordingPublisher())
    served = {
        (resource.canonical, route.method.lower())
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    documented = {(path, method) for path, item in spec["paths"].items() for method in item}
    assert served == documented


def test_error_codes_and_statuses_match_the_code(spec: dict[str, Any]) -> None:
    """The documented ErrorInfo codes are exactly Reject's, and every code's status is documented."""
    assert [code.value for code in Reject] == spec["components"]["schemas"]["Fail"]["properties"]["ErrorInfo"]["enum"]
    responses = spec["paths"]["/tencent-im/callback"]["post"]["responses"]
    assert {str(status) for status in STATUS.values()} | {"200"} == set(responses)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _schemathesis(doc: Path, tmp_path: Path, env: dict[str, str], port: int, *extra: str) -> None:
    """Start ``relay serve`` with *env*, wait for *port*, run schemathesis's checks from *doc* against it."""
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.fail("schemathesis is not installed in the test environment")
    relay = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "relay did not start"
                time.sleep(0.1)
        examples = os.environ.get("RELAY_SCHEMATHESIS_EXAMPLES", "200")
        result = subprocess.run(
            [
                cli,
                "run",
                str(doc),
                "--url",
                f"http://127.0.0.1:{port}",
                "--max-examples",
                examples,
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,"
                "response_schema_conformance,response_headers_conformance",
                "--generation-deterministic",
                "--warnings",
                "off",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=280,
            cwd=tmp_path,
        )
    finally:
        relay.send_signal(signal.SIGTERM)
        relay.wait(timeout=30)
    assert 0 == result.returncode, result.stdout[-4000:] + result.stderr[-2000:]


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    """Generated requests from the OpenAPI document never get a 5xx other than documented 503s, and every
    response (status, content type, headers, body) matches the document."""
    port = _free_port()
    env = {
        "RELAY_PORT": str(port),
        "RELAY_HOST": "127.0.0.1",
        "RELAY_SDKAPPIDS": "1400000002",  # accepted unsigned, so generated bodies reach normalization
        "RELAY_CALLBACK_TOKENS": "1400000001=schemathesis-token",
        "RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",  # no broker: every event is spooled
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "RELAY_SHUTDOWN_DELAY": "0",
        "RELAY_LOG_LEVEL": "error",
    }
    _schemathesis(DOC, tmp_path, env, port)


# -- the recall gateway's API (docs/openapi-recall.yaml) ----------------------------------------------

RECALL_DOC = Path(__file__).parents[2] / "docs" / "openapi-recall.yaml"
SIM_KEY = "schemathesis-secret-key"
GATEWAY_ENV = {
    "RELAY_API_TOKENS": "schemathesis=schemathesis-api-token",
    "RELAY_TENCENT_SECRET_KEYS": f"1400000002={SIM_KEY}",
}


@pytest.fixture(scope="module")
def recall_spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(RECALL_DOC.read_text(encoding="utf-8"))
    return loaded


def test_the_recall_api_serves_what_its_document_says(recall_spec: dict[str, Any], tmp_path: Path) -> None:
    """The documented paths are the API app's routes, and its error codes are the code's."""
    tokens = "1400000001=tok_example_42,1400000002=schemathesis-token"
    app = create_app(
        make_settings(tmp_path, **GATEWAY_ENV, RELAY_CALLBACK_TOKENS=tokens), publisher=RecordingPublisher()
    )
    served = {
        (resource.canonical, route.method.lower())
        for resource in app[API].router.resources()
        for route in resource
        if route.method != "HEAD"
    }
    assert served == {(path, method) for path, item in recall_spec["paths"].items() for method in item}
    codes = recall_spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]["enum"]
    assert [o for o in RECALL_OUTCOMES if o not in ("ok", "replayed")] == codes


@pytest.mark.timeout(300)
def test_schemathesis_finds_no_server_error_in_the_recall_api(tmp_path: Path) -> None:
    """Generated recall requests, with Tencent simulated, get only documented answers and never a 500."""
    sim = TencentSim({"1400000002": SIM_KEY})
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sim_url = asyncio.run_coroutine_threadsafe(sim.start(), loop).result(10)
    port, api_port = _free_port(), _free_port()
    env = {
        **GATEWAY_ENV,
        "RELAY_PORT": str(port),
        "RELAY_API_PORT": str(api_port),
        "RELAY_HOST": "127.0.0.1",
        "RELAY_SDKAPPIDS": "1400000002",
        "RELAY_CALLBACK_TOKENS": "1400000002=schemathesis-token",
        "RELAY_TENCENT_API_URL": sim_url,
        "RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",  # no broker: audit events are spooled
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "RELAY_SHUTDOWN_DELAY": "0",
        "RELAY_LOG_LEVEL": "error",
    }
    try:
        _schemathesis(RECALL_DOC, tmp_path, env, api_port, "--header", "Authorization: Bearer schemathesis-api-token")
    finally:
        asyncio.run_coroutine_threadsafe(sim.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    assert sim.requests, "no generated request reached Tencent: the test exercised only refusals"
