"""What a new user hits in the first hour (issue 23): ports that overlap or are taken, settings
errors shown where they matter, check-config's output and probes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli import main
from relay.errors import ConfigError
from relay.settings import Settings
from relay.workers import EXIT_CANNOT_LISTEN
from tests.faults.node import free_port
from tests.helpers import AMQP_URL, APP

GATEWAY = {
    "RELAY_SDKAPPIDS": APP,
    "RELAY_CALLBACK_TOKENS": f"{APP}=callback-token-1",
    "RELAY_API_TOKENS": "svc=tok-api-0123456789abcdef",
    "RELAY_TENCENT_SECRET_KEYS": f"{APP}=secret-key",
}


def relay(env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m relay`` with only *env* (and PATH) set, to its end; JSON logs, as in production."""
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_api_port_may_not_be_the_callback_port() -> None:
    """RELAY_API_PORT = RELAY_PORT is refused at start, naming both settings."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({**GATEWAY, "RELAY_PORT": "8090", "RELAY_API_PORT": "8090"})
    assert "RELAY_API_PORT: 8090 is also RELAY_PORT" in str(caught.value)


def test_overlapping_ports_with_two_workers_never_start(tmp_path: Path) -> None:
    """Under --workers 2 both listeners would share the port (SO_REUSEPORT) and callbacks would get
    the API's 404s: the relay exits 1 with the settings error before binding anything."""
    port = str(free_port())
    done = relay(
        {**GATEWAY, "RELAY_PORT": port, "RELAY_API_PORT": port, "RELAY_SPOOL_DIR": str(tmp_path)},
        "serve",
        "--workers",
        "2",
    )
    assert 1 == done.returncode
    assert f"RELAY_API_PORT: {port} is also RELAY_PORT" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_line_naming_the_setting(tmp_path: Path, workers: str) -> None:
    """Another program holds the callback port: one line naming RELAY_PORT and the port, no traceback,
    and (with workers) no restart loop: the supervisor stops with the same exit code."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = relay(
            {
                "RELAY_SDKAPPIDS": APP,
                "RELAY_HOST": "127.0.0.1",
                "RELAY_PORT": str(port),
                "RELAY_SPOOL_DIR": str(tmp_path),
                "RELAY_AMQP_URL": AMQP_URL,
            },
            "serve",
            "--workers",
            workers,
        )
    assert EXIT_CANNOT_LISTEN == done.returncode
    assert f"relay: cannot listen on 127.0.0.1:{port} (RELAY_PORT): Address already in use" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout


def test_relay_recall_shows_the_settings_error_behind_missing_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    """With the gateway's variables set but the settings invalid (no accepted app), `relay recall`
    says what is wrong with them instead of asking for --token and --app."""
    env = {"RELAY_API_TOKENS": "svc=tok-api-0123456789abcdef", "RELAY_TENCENT_SECRET_KEYS": f"{APP}=k"}
    assert 1 == main(["recall", "--group", "@TGS#1", "--seq", "1", "--reason", "r", "--moderator", "m"], env)
    err = capsys.readouterr().err
    assert "the relay's settings are invalid" in err
    assert "RELAY_TENCENT_SECRET_KEYS" in err


def test_check_config_prints_one_setting_per_line_with_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    """Readable output, secrets as ***, and a warning when the gateway's audit events have no queue."""
    assert 0 == main(["check-config"], GATEWAY)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.split() == ["port", "8080"] for line in lines)
    assert any(line.split() == ["api_tokens", "svc=***"] for line in lines)
    assert "tok-api-0123456789abcdef" not in out
    assert "secret-key" not in out
    assert "warning: the recall gateway is on but RELAY_AUDIT_QUEUES is empty" in out


def test_a_port_out_of_range_in_a_url_says_so() -> None:
    """Not "not a valid URL (ValueError)": what is wrong, without the URL's password."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_SDKAPPIDS": APP, "RELAY_AMQP_URL": "amqp://u:hush@127.0.0.1:99999/"})
    assert "RELAY_AMQP_URL: the port must be a number from 1 to 65535" in str(caught.value)
    assert "hush" not in str(caught.value)


@pytest.mark.broker
def test_check_config_probe_says_what_answered(capsys: pytest.CaptureFixture[str], redis_url: str) -> None:
    """--probe: the broker and Redis answer (with their versions); an unreachable Redis fails with exit 2."""
    env = {"RELAY_SDKAPPIDS": APP, "RELAY_AMQP_URL": AMQP_URL, "RELAY_REDIS_URL": redis_url}
    assert 0 == main(["check-config", "--probe"], env)
    out = capsys.readouterr().out
    assert "ok   RELAY_AMQP_URL" in out
    assert "RabbitMQ " in out
    assert "ok   RELAY_REDIS_URL" in out
    assert 2 == main(["check-config", "--probe"], {**env, "RELAY_REDIS_URL": f"redis://127.0.0.1:{free_port()}"})
    assert "FAIL RELAY_REDIS_URL" in capsys.readouterr().out
