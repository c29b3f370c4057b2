"""The correlation store against a private Redis with an ACL user and one with TLS (mutual, with
redis-py's own option names as URL query options): what works, what is refused, and that no secret
is printed."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from relay.metrics import Metrics
from relay.store import StoreError
from relay.store.redis import RedisStore
from relay.store.topology import Topology
from tests.faults import redis_nodes
from tests.faults.certs import SERVER_NAME, TlsFiles, make_tls_files
from tests.helpers import make_settings

pytestmark = [pytest.mark.fault, pytest.mark.timeout(60)]
Servers = tuple[redis_nodes.Server, redis_nodes.Server, TlsFiles]
PASSWORD = "acl-s3cret-7b1f"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    """An ACL server (BASE+30: user relay, default user off) and a TLS-only server (BASE+31)."""
    if not redis_nodes.available():
        if os.environ.get("RELAY_REQUIRE_BROKER") == "1":
            pytest.fail("redis-server is not installed and RELAY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip("redis-server is not installed")
    tls = make_tls_files(tmp_path / "tls")
    nodes = redis_nodes.RedisSet()
    base = redis_nodes.BASE_PORT + 30
    acl_rules = ["--user", "default", "off", "--user", "relay", "on", f">{PASSWORD}", "~revoke-relay:*", "+@all"]
    acl = nodes.add(base, [*redis_nodes._common(base, nodes.root / str(base)), *acl_rules])
    tls_port = base + 1
    tls_args = [
        *redis_nodes._common(0, nodes.root / str(tls_port)),
        "--tls-port", str(tls_port), "--tls-cert-file", str(tls.server.cert), "--tls-key-file", str(tls.server.key),
        "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "yes",
    ]  # fmt: skip
    secure = nodes.add(tls_port, tls_args)
    try:
        acl.start()
        secure.start()
        yield acl, secure, tls
    finally:
        nodes.stop()


def store_for(env: dict[str, str], tmp_path: Path) -> tuple[RedisStore, Metrics]:
    settings = make_settings(tmp_path, **env)
    options = settings.redis_options
    assert options is not None
    metrics = Metrics(CollectorRegistry())
    return RedisStore(Topology(options, metrics), 60, metrics), metrics


async def test_acl_user_from_the_settings_reads_and_writes(servers: Servers, tmp_path: Path) -> None:
    """RELAY_REDIS_USERNAME / _PASSWORD log in as the ACL user; the password is never shown."""
    acl, _, _ = servers
    env = {
        "RELAY_REDIS_URL": f"redis://127.0.0.1:{acl.port}",
        "RELAY_REDIS_USERNAME": "relay",
        "RELAY_REDIS_PASSWORD": PASSWORD,
    }
    store, _ = store_for(env, tmp_path)
    await store.start()
    try:
        await store.put([("request:{t/1}", b"v")], 60)
        assert [b"v"] == await store.get(["request:{t/1}"])
    finally:
        await store.close()
    assert PASSWORD not in repr(make_settings(tmp_path, **env))


async def test_a_wrong_password_is_a_store_error_not_a_crash(servers: Servers, tmp_path: Path) -> None:
    """A refused login starts the relay anyway; each operation fails as StoreError, counted as auth."""
    acl, _, _ = servers
    env = {
        "RELAY_REDIS_URL": f"redis://127.0.0.1:{acl.port}",
        "RELAY_REDIS_USERNAME": "relay",
        "RELAY_REDIS_PASSWORD": "not-the-password",
    }
    store, metrics = store_for(env, tmp_path)
    await store.start()
    try:
        with pytest.raises(StoreError):
            await store.get(["request:{t/1}"])
    finally:
        await store.close()
    assert 1 <= (metrics.registry.get_sample_value("relay_correlation_store_failures_total", {"kind": "auth"}) or 0)


async def test_mutual_tls_with_url_options(servers: Servers, tmp_path: Path) -> None:
    """rediss:// with ssl_ca_certs, ssl_certfile and ssl_keyfile as query options reaches the TLS-only server."""
    _, secure, tls = servers
    query = f"ssl_ca_certs={tls.ca}&ssl_certfile={tls.client.cert}&ssl_keyfile={tls.client.key}"
    store, _ = store_for({"RELAY_REDIS_URL": f"rediss://{SERVER_NAME}:{secure.port}?{query}"}, tmp_path)
    await store.start()
    try:
        await store.put([("request:{t/2}", b"tls")], 60)
        assert [b"tls"] == await store.get(["request:{t/2}"])
    finally:
        await store.close()


async def test_tls_without_a_client_certificate_is_refused(servers: Servers, tmp_path: Path) -> None:
    """The server asks for a client certificate: without one, every operation is a StoreError."""
    _, secure, tls = servers
    store, _ = store_for({"RELAY_REDIS_URL": f"rediss://{SERVER_NAME}:{secure.port}?ssl_ca_certs={tls.ca}"}, tmp_path)
    await store.start()
    try:
        with pytest.raises(StoreError):
            await store.get(["request:{t/2}"])
    finally:
        await store.close()
