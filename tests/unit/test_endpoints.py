"""RELAY_AMQP_URL parsing: one URL or a list, aio-pika's TLS options read as aiormq reads them, and a
clear error (never with the password) for what aiormq would silently ignore."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiormq
import pytest

from relay.endpoints import EndpointError, describe, parse_endpoint, parse_endpoints, redact

SAME_AS_AIORMQ = [
    "amqp://guest:guest@127.0.0.1:5672/",
    "amqp://broker",
    "amqp://relay:p%40ss%2Cword@broker/%2F",
    "amqp://relay:pw@broker:5673/tenant-a",
    "amqp://relay:pw@broker/a%2Fb",
    "amqps://broker/?cafile=/ca.pem",
    "amqps://broker:5676/vh?cafile=/ca.pem&certfile=/c.pem&keyfile=/k.pem&auth=external",
    "amqps://relay:pw@broker/?capath=/etc/ssl/certs&no_verify_ssl=1",
    "amqps://relay:pw@broker/?cadata=QUJD&heartbeat=10",
    "amqp://relay:pw@[::1]:5672/",
]


@pytest.mark.parametrize("url", SAME_AS_AIORMQ)
async def test_endpoint_reads_the_url_as_aiormq_does(url: str) -> None:
    """Host, port, vhost, login and TLS files agree with aiormq's own reading of the URL, so the
    publishing client and aio-pika clients connect to the same place the same way."""
    endpoint = parse_endpoint(url)
    theirs = aiormq.Connection(url)
    assert (theirs.url.host, theirs.url.port, theirs.vhost) == (endpoint.host, endpoint.port, endpoint.vhost)
    assert (theirs.url.user or "guest", theirs.url.password or "guest") == (endpoint.user, endpoint.password)
    assert theirs.ssl_certs == endpoint.ssl_certs()
    assert (theirs.url.scheme == "amqps") == endpoint.tls
    assert theirs.url.query.get("auth", "plain").lower() == endpoint.auth


@pytest.mark.parametrize(
    ("url", "display"),
    [
        pytest.param("amqp://u:secret@broker/", "broker:5672", id="amqp-default-port"),
        pytest.param("amqps://u:secret@broker/", "broker:5671", id="amqps-default-port"),
        pytest.param("amqps://u:secret@10.0.0.7:5999/vh?cafile=/ca.pem", "10.0.0.7:5999", id="explicit"),
        pytest.param("amqp://u:secret@[fd00::7]:5672/", "[fd00::7]:5672", id="ipv6"),
    ],
)
def test_display_is_host_and_port_only(url: str, display: str) -> None:
    """What logs and /readyz show: host:port, never the user, password, vhost or options."""
    assert display == parse_endpoint(url).display


def test_a_list_keeps_its_order_and_spaces_do_not_matter() -> None:
    """Comma-separated URLs become endpoints in the order given (the order they are tried)."""
    endpoints = parse_endpoints(" amqp://u:p@a:5672/ , amqp://u:p@b:5673/,amqp://u:p@c/ ")
    assert ["a:5672", "b:5673", "c:5672"] == [e.display for e in endpoints]


def test_tls_defaults_verify_the_chain_and_the_host_name() -> None:
    """amqps:// without no_verify_ssl checks the certificate chain and the host name; no_verify_ssl=1 turns both off."""
    assert parse_endpoint("amqps://broker/").verify
    assert not parse_endpoint("amqps://broker/?no_verify_ssl=1").verify


async def test_tls_context_checks_host_names_unless_told_not_to(tmp_path: Path) -> None:
    """The TLS context (built by aiormq, as for aio-pika) requires a valid certificate for the host by default."""
    strict = await parse_endpoint("amqps://broker/").ssl_context()
    loose = await parse_endpoint("amqps://broker/?no_verify_ssl=1").ssl_context()
    assert strict is not None and loose is not None
    assert (True, ssl.CERT_REQUIRED) == (strict.check_hostname, strict.verify_mode)
    assert (False, ssl.CERT_NONE) == (loose.check_hostname, loose.verify_mode)
    assert await parse_endpoint("amqp://broker/").ssl_context() is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param("http://u:secret@broker/", "must start with amqp:// or amqps://", id="scheme"),
        pytest.param("amqp://u:secret@/vh", "no host", id="no-host"),
        pytest.param("amqp://u:secret@broker:99999/", "the port must be a number from 1 to 65535", id="bad-port"),
        pytest.param("amqp://u:secret@broker/?cafile=/c", "TLS options (cafile) need an amqps://", id="tls-on-amqp"),
        pytest.param("amqps://u:secret@broker/?cafle=/ca.pem", "unknown option cafle", id="typo"),
        pytest.param("amqps://u:secret@broker/?cafile=/a&cafile=/b", "option cafile given twice", id="repeated"),
        pytest.param("amqps://u:secret@broker/?no_verify_ssl=false", "no_verify_ssl must be 0 or 1", id="verify"),
        pytest.param("amqps://u:secret@broker/?keyfile=/k.pem", "keyfile without certfile", id="key-only"),
        pytest.param("amqps://u:secret@broker/?auth=scram", "auth must be plain or external", id="auth"),
        pytest.param("amqps://broker/?auth=external", "give certfile", id="external-no-cert"),
        pytest.param("amqp://broker/?auth=external&certfile=/c", "need an amqps:// URL", id="external-amqp"),
        pytest.param("amqps://u:secret@broker/?cadata=%%%", "cadata must be base64", id="cadata"),
        pytest.param("amqp://u:secret@broker/?heartbeat=5s", "heartbeat must be whole seconds", id="heartbeat"),
        pytest.param("amqp://u:secret@a/,,amqp://u:secret@b/", "an empty URL", id="empty-item"),
        pytest.param("  ", "no URL given", id="nothing"),
        pytest.param("amqp://u:secret@a/,amqp://u:other@b/", "URL 2 (b:5672) differs from the first", id="password"),
        pytest.param("amqp://u:secret@a/x,amqp://u:secret@b/y", "differs from the first", id="vhost"),
        pytest.param("amqp://u:secret@a/,amqps://u:secret@b/", "differs from the first", id="scheme-mix"),
        pytest.param("amqp://u:secret@a/?heartbeat=5,amqp://u:secret@b/", "differs from the first", id="options"),
        pytest.param("amqp://u:secret@a/,amqp://u:secret@a:5672/", "listed twice", id="twice"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_error_without_the_password(raw: str, message: str) -> None:
    """Every mistake aiormq would ignore or trip over is named; the password never appears."""
    with pytest.raises(EndpointError) as raised:
        parse_endpoints(raw)
    assert message in str(raised.value)
    assert "secret" not in str(raised.value) and "other" not in str(raised.value)


def test_redact_masks_every_password_of_a_list() -> None:
    """redact() is safe for reprs and error messages, for lists and for unparseable text."""
    assert "amqp://u:***@a/,amqps://v:***@b:5671/?cafile=/x,amqp://c/" == redact(
        "amqp://u:p1@a/,amqps://v:p2@b:5671/?cafile=/x,amqp://c/"
    )
    assert "***" not in redact("amqp://broker/")


def test_endpoint_repr_has_no_password() -> None:
    """An endpoint printed by accident (a log field, a traceback) shows no password and no URL."""
    endpoint = parse_endpoint("amqp://relay:hunter2@broker/")
    assert "hunter2" not in repr(endpoint)
    assert "amqp://relay:***@broker/" == endpoint.redacted


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(ConnectionRefusedError(111, "refused"), "connection refused", id="refused"),
        pytest.param(TimeoutError(), "timed out", id="timeout"),
        pytest.param(ConnectionResetError(104, "reset"), "connection reset by the broker", id="reset"),
        pytest.param(RuntimeError("odd"), "RuntimeError: odd", id="other"),
    ],
)
def test_describe_names_plain_connection_failures(exc: BaseException, expected: str) -> None:
    """Connection failures without TLS in them read as short phrases."""
    assert expected == describe(exc)


def test_describe_finds_the_tls_alert_behind_a_wrapping_error() -> None:
    """A TLS alert wrapped by a client's own error is still what the description names."""
    alert = ssl.SSLError(1, "[SSL: SSLV3_ALERT_CERTIFICATE_EXPIRED] sslv3 alert certificate expired")
    alert.reason = "SSLV3_ALERT_CERTIFICATE_EXPIRED"  # type: ignore[misc]
    wrapper = RuntimeError("connection lost")
    wrapper.__cause__ = alert
    assert (
        "TLS: the broker sent alert 'certificate expired' (it refused the client certificate)"
        " [SSLV3_ALERT_CERTIFICATE_EXPIRED]"
    ) == describe(wrapper)


def test_a_reset_with_a_client_certificate_points_at_the_certificate() -> None:
    """A reset before the handshake, with certfile set, says it may be a refused certificate."""
    endpoint = parse_endpoint("amqps://broker/?certfile=/c.pem&auth=external")
    assert "check certfile" in describe(ConnectionResetError(104, "reset"), endpoint)
