"""Settings: defaults, validation messages that name the variable, and secret redaction."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.errors import ConfigError
from relay.settings import Settings


def test_defaults_match_the_readme() -> None:
    """With only an app configured, every other setting takes its documented default."""
    s = Settings.from_env({"RELAY_SDKAPPIDS": "1400000001"})
    assert (
        "amqp://guest:guest@127.0.0.1:5672/",
        "im.events",
        (),
        "0.0.0.0",  # noqa: S104
        8080,
        60,
        65536,
        5.0,
        "info",
        "json",
        Path("spool"),
    ) == (
        s.amqp_url,
        s.exchange,
        s.queues,
        s.host,
        s.port,
        s.signature_max_age,
        s.max_body_bytes,
        s.publish_timeout,
        s.log_level,
        s.log_format,
        s.spool_dir,
    )


def test_tokens_parse_with_rotation() -> None:
    """Several SDKAPPID=TOKEN pairs for one app are all kept; an app with a token is accepted."""
    s = Settings.from_env({"RELAY_CALLBACK_TOKENS": "1400000001=old, 1400000001=new,1400000009=x"})
    assert {"1400000001": ("old", "new"), "1400000009": ("x",)} == dict(s.callback_tokens)
    assert frozenset({"1400000001", "1400000009"}) == s.accepted_apps


def test_queues_are_split_and_trimmed() -> None:
    """RELAY_QUEUES is a comma-separated list."""
    s = Settings.from_env({"RELAY_SDKAPPIDS": "1", "RELAY_QUEUES": " moderation.revocations , audit.revocations,"})
    assert ("moderation.revocations", "audit.revocations") == s.queues


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({}, "RELAY_SDKAPPIDS", id="no-app"),
        pytest.param({"RELAY_SDKAPPIDS": "1", "RELAY_PORT": "http"}, "RELAY_PORT", id="port-text"),
        pytest.param({"RELAY_SDKAPPIDS": "1", "RELAY_PORT": "70000"}, "RELAY_PORT", id="port-range"),
        pytest.param({"RELAY_SDKAPPIDS": "1", "RELAY_PUBLISH_TIMEOUT": "nan"}, "RELAY_PUBLISH_TIMEOUT", id="nan"),
        pytest.param({"RELAY_SDKAPPIDS": "x1"}, "RELAY_SDKAPPIDS", id="app-not-digits"),
        pytest.param({"RELAY_CALLBACK_TOKENS": "1400000001"}, "RELAY_CALLBACK_TOKENS", id="pair-without-token"),
        pytest.param({"RELAY_SDKAPPIDS": "1", "RELAY_AMQP_URL": "http://x"}, "RELAY_AMQP_URL", id="bad-scheme"),
        pytest.param({"RELAY_SDKAPPIDS": "1", "RELAY_LOG_FORMAT": "xml"}, "RELAY_LOG_FORMAT", id="log-format"),
        pytest.param({"RELAY_SDKAPPIDS": "1", "RELAY_QUEUES": "a,a"}, "RELAY_QUEUES", id="dup-queue"),
        pytest.param({"RELAY_SDKAPPIDS": "1", "RELAY_EXCHANGE": "amq.topic"}, "RELAY_EXCHANGE", id="reserved"),
    ],
)
def test_invalid_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    """Each bad value is reported with the name of its variable."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env(env)
    assert any(p.startswith(variable) for p in info.value.problems), info.value.problems


def test_all_problems_are_reported_at_once() -> None:
    """check-config shows every bad variable in one run, not one per attempt."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RELAY_SDKAPPIDS": "1", "RELAY_PORT": "x", "RELAY_LOG_LEVEL": "loud"})
    assert 2 == len(info.value.problems)


def test_repr_hides_password_and_tokens() -> None:
    """Neither the AMQP password nor a callback token appears in the settings repr."""
    s = Settings.from_env(
        {
            "RELAY_AMQP_URL": "amqp://relay:s3cr3t-pw@broker:5672/vh",
            "RELAY_CALLBACK_TOKENS": "1400000001=t0ps3cret",
        }
    )
    text = repr(s)
    assert "s3cr3t-pw" not in text and "t0ps3cret" not in text
    assert "amqp://relay:***@broker:5672/vh" in text


def test_several_amqp_urls_become_endpoints_and_the_repr_hides_every_password() -> None:
    """RELAY_AMQP_URL lists the nodes of a cluster; each password is masked in the printed settings."""
    s = Settings.from_env(
        {
            "RELAY_SDKAPPIDS": "1",
            "RELAY_AMQP_URL": "amqps://relay:s3cr3t@rabbit-0:5671/?cafile=/ca.pem,"
            "amqps://relay:s3cr3t@rabbit-1:5671/?cafile=/ca.pem",
        }
    )
    assert ["rabbit-0:5671", "rabbit-1:5671"] == [e.display for e in s.amqp_endpoints]
    assert "s3cr3t" not in repr(s)
    assert "amqps://relay:***@rabbit-0:5671/?cafile=/ca.pem,amqps://relay:***@rabbit-1:5671/?cafile=/ca.pem" in repr(s)


def test_a_bad_amqp_url_is_named_without_its_password() -> None:
    """A TLS option on an amqp:// URL is refused at start, with the endpoint named and no password."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RELAY_SDKAPPIDS": "1", "RELAY_AMQP_URL": "amqp://relay:s3cr3t@rabbit-0/?certfile=/c.pem"})
    assert ["RELAY_AMQP_URL: rabbit-0:5672: TLS options (certfile) need an amqps:// URL"] == info.value.problems


def test_bad_token_pair_error_does_not_echo_the_token() -> None:
    """A malformed token pair is reported without printing the secret part."""
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"RELAY_CALLBACK_TOKENS": "notanapp=supersecret"})
    assert "supersecret" not in str(info.value)


GATEWAY = {
    "RELAY_SDKAPPIDS": "1400000001",
    "RELAY_CALLBACK_TOKENS": "1400000001=callback-token-value",
    "RELAY_API_TOKENS": (
        "moderation=tok-aaaaaaaaaaaaaaaa, moderation=tok-bbbbbbbbbbbbbbbb, audit-svc=tok-cccccccccccccccc"
    ),
    "RELAY_TENCENT_SECRET_KEYS": "1400000001=s3cr3t-key-value",
}


def test_the_gateway_is_off_by_default_and_on_with_tokens_or_a_command_queue(tmp_path: Path) -> None:
    """No token and no command queue: no gateway; either one turns it on."""
    assert not Settings.from_env({"RELAY_SDKAPPIDS": "1400000001"}).gateway
    assert Settings.from_env(GATEWAY).gateway
    keys = tmp_path / "keys.toml"
    keys.write_text('[[key]]\nname = "bus"\nsha256 = "' + "0" * 64 + '"\napps = ["*"]\namqp_user = "bus"\n')
    queue_only = {"RELAY_SDKAPPIDS": "1400000001", "RELAY_COMMAND_QUEUE": "relay.commands"}
    assert Settings.from_env({**queue_only, "RELAY_API_KEYS_FILE": str(keys)}).gateway


def test_a_command_queue_needs_a_key_naming_its_amqp_user() -> None:
    """Without a key that claims a RabbitMQ user every command would be refused: a settings error."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_SDKAPPIDS": "1400000001", "RELAY_COMMAND_QUEUE": "relay.commands"})
    assert "RELAY_COMMAND_QUEUE: needs RELAY_API_KEYS_FILE" in str(caught.value)


def test_gateway_settings_parse_with_their_defaults() -> None:
    """Several tokens per caller (rotation); the Tencent settings default as documented."""
    s = Settings.from_env(GATEWAY)
    assert {
        "moderation": ("tok-aaaaaaaaaaaaaaaa", "tok-bbbbbbbbbbbbbbbb"),
        "audit-svc": ("tok-cccccccccccccccc",),
    } == s.api_tokens
    assert {"1400000001": "s3cr3t-key-value"} == s.tencent_secret_keys
    expected = (8081, "https://console.tim.qq.com", "administrator", 150.0, 5.0, 86400, None)
    assert expected == (
        s.api_port,
        s.tencent_api_url,
        s.tencent_admin,
        s.tencent_rate,
        s.tencent_timeout,
        s.recall_ttl,
        s.command_queue,
    )


def test_gateway_secrets_never_appear_in_the_repr() -> None:
    """API tokens and secret keys are shown as *** only."""
    shown = repr(Settings.from_env(GATEWAY))
    assert "tok-aaaa" not in shown
    assert "s3cr3t" not in shown
    assert "'moderation': '***'" in shown


@pytest.mark.parametrize(
    ("env", "named"),
    [
        pytest.param({"RELAY_API_TOKENS": "moderation=short"}, "RELAY_API_TOKENS", id="short-token"),
        pytest.param({"RELAY_API_TOKENS": "bad name=tok-aaaaaaaaaaaaaaaa"}, "RELAY_API_TOKENS", id="bad-name"),
        pytest.param(
            {"RELAY_API_TOKENS": "a=tok-aaaaaaaaaaaaaaaa,b=tok-aaaaaaaaaaaaaaaa"}, "share a token", id="shared-token"
        ),
        pytest.param({"RELAY_TENCENT_SECRET_KEYS": "1400000009=k"}, "not in RELAY_SDKAPPIDS", id="key-for-unknown-app"),
        pytest.param(
            {"RELAY_TENCENT_SECRET_KEYS": "1400000001=k"},
            "1400000001 have a secret key but no callback token",
            id="unsigned",
        ),
        pytest.param({"RELAY_TENCENT_SECRET_KEYS": "app=k"}, "RELAY_TENCENT_SECRET_KEYS", id="key-app-not-digits"),
        pytest.param({"RELAY_TENCENT_API_URL": "ftp://console.tim.qq.com"}, "RELAY_TENCENT_API_URL", id="url-scheme"),
        pytest.param({"RELAY_TENCENT_API_URL": "https://x/v4/openim"}, "RELAY_TENCENT_API_URL", id="url-with-path"),
        pytest.param({"RELAY_TENCENT_RATE": "500"}, "RELAY_TENCENT_RATE", id="rate-over-tencent-limit"),
        pytest.param({"RELAY_COMMAND_QUEUE": "amq.x"}, "RELAY_COMMAND_QUEUE", id="reserved-queue"),
        pytest.param({"RELAY_AUDIT_QUEUES": "q1", "RELAY_QUEUES": "q1"}, "RELAY_AUDIT_QUEUES", id="queue-in-both"),
    ],
)
def test_bad_gateway_settings_are_named(env: dict[str, str], named: str) -> None:
    """Each bad gateway setting fails validation with a message naming it, never the secret."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_SDKAPPIDS": "1400000001", **env})
    assert named in str(caught.value)
    assert "tok-aaaa" not in str(caught.value)


def test_the_history_stream_is_off_by_default_with_documented_retention() -> None:
    """No RELAY_AUDIT_STREAM: no stream; its retention defaults to 90D and 20 GB."""
    s = Settings.from_env({"RELAY_SDKAPPIDS": "1400000001"})
    assert (None, "90D", 20_000_000_000) == (s.audit_stream, s.audit_stream_max_age, s.audit_stream_max_bytes)
    s = Settings.from_env(
        {
            "RELAY_SDKAPPIDS": "1400000001",
            "RELAY_AUDIT_STREAM": "relay.history",
            "RELAY_AUDIT_STREAM_MAX_AGE": "12h",
            "RELAY_AUDIT_STREAM_MAX_BYTES": "5000000",
        }
    )
    assert ("relay.history", "12h", 5_000_000) == (s.audit_stream, s.audit_stream_max_age, s.audit_stream_max_bytes)


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"RELAY_AUDIT_STREAM_MAX_AGE": "90 days"}, id="age-words"),
        pytest.param({"RELAY_AUDIT_STREAM_MAX_AGE": "0D"}, id="age-zero"),
        pytest.param({"RELAY_AUDIT_STREAM_MAX_BYTES": "lots"}, id="bytes-not-a-number"),
        pytest.param({"RELAY_AUDIT_STREAM": "amq.history"}, id="reserved-name"),
        pytest.param({"RELAY_AUDIT_STREAM": "q1", "RELAY_QUEUES": "q1"}, id="stream-is-a-queue"),
    ],
)
def test_bad_history_settings_are_named(env: dict[str, str]) -> None:
    """Each bad history setting is refused naming its variable."""
    with pytest.raises(ConfigError) as caught:
        Settings.from_env({"RELAY_SDKAPPIDS": "1400000001", **env})
    assert next(iter(env)) in str(caught.value.problems)


def test_a_history_stream_takes_the_gateways_audit_events() -> None:
    """The gateway without an audit queue warns, unless RELAY_AUDIT_STREAM binds message.# instead."""
    assert "gateway_without_audit_queue" in Settings.from_env(GATEWAY).warnings
    with_stream = Settings.from_env({**GATEWAY, "RELAY_AUDIT_STREAM": "relay.history"})
    assert "gateway_without_audit_queue" not in with_stream.warnings
