"""TLS and client certificates against a private RabbitMQ node with a TLS listener and certificates
made here: the relay's publisher and every aio-pika client (relay tail, the consumer example) take the
same URL; a wrong CA, a wrong host name or an expired certificate fails with an error naming the cause,
and the publisher keeps retrying."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import io
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay import broker
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from relay.settings import Settings
from relay.tail import tail
from tests.faults.certs import CLIENT_USER, Pair, TlsFiles, make_tls_files
from tests.faults.node import PrivateRabbit, free_port
from tests.helpers import envelopes

pytestmark = [pytest.mark.fault, pytest.mark.timeout(120)]

EXAMPLE = Path(__file__).parents[2] / "examples" / "consumer.py"


@dataclass
class TlsNode:
    node: PrivateRabbit
    files: TlsFiles
    port: int
    active: Pair  # the paths the listener's certificate and key are read from

    def url(
        self,
        *,
        host: str = "localhost",
        cafile: Path | None = None,
        client: Pair | None = None,
        external: bool = True,
        user: str = "",
    ) -> str:
        options = [f"cafile={cafile or self.files.ca}"]
        if client is not None:
            options += [f"certfile={client.cert}", f"keyfile={client.key}"]
        if external:
            options.append("auth=external")
        return f"amqps://{user}{host}:{self.port}/?{'&'.join(options)}"

    def serve_certificate(self, pair: Pair) -> None:
        """Swap the listener's certificate: new files, then clear Erlang's PEM cache (RabbitMQ's
        documented way to rotate certificates without a restart)."""
        shutil.copyfile(pair.cert, self.active.cert)
        shutil.copyfile(pair.key, self.active.key)
        self.node.ctl("eval", "ssl:clear_pem_cache().")


@pytest.fixture(scope="module")
def tls_node(rabbitmq_installed: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsNode]:
    """One node for the module (starting one takes 10-20 s): TLS listener that asks for a client
    certificate (optional, so PLAIN over TLS works too), EXTERNAL login mapped from the certificate's CN."""
    root = tmp_path_factory.mktemp("tls-rabbit")
    files = make_tls_files(root / "certs")
    active = Pair(root / "certs" / "active-server.pem", root / "certs" / "active-server.key")
    shutil.copyfile(files.server.cert, active.cert)
    shutil.copyfile(files.server.key, active.key)
    port = free_port()
    conf = (
        f"listeners.ssl.default = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {files.ca}\n"
        f"ssl_options.certfile = {active.cert}\n"
        f"ssl_options.keyfile = {active.key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = false\n"
        "auth_mechanisms.1 = PLAIN\n"
        "auth_mechanisms.2 = AMQPLAIN\n"
        "auth_mechanisms.3 = EXTERNAL\n"
        "ssl_cert_login_from = common_name\n"
    )
    name = f"relaytls{uuid.uuid4().hex[:6]}"
    node = PrivateRabbit(root / "rabbit", name, conf=conf, plugins=("rabbitmq_auth_mechanism_ssl",))
    node.start()
    try:
        # The certificate's CN is the user; it needs no password (EXTERNAL never sends one).
        node.ctl("add_user", CLIENT_USER, uuid.uuid4().hex)
        node.ctl("clear_password", CLIENT_USER)
        node.ctl("set_permissions", "-p", "/", CLIENT_USER, ".*", ".*", ".*")
        yield TlsNode(node, files, port, active)
    finally:
        node.stop()


@pytest.fixture
def names(request: pytest.FixtureRequest) -> dict[str, str]:
    tag = f"{request.node.name[:30]}.{uuid.uuid4().hex[:8]}"
    return {"exchange": f"tls.x.{tag}", "queue": f"tls.q.{tag}"}


@contextlib.asynccontextmanager
async def running_publisher(
    url: str, exchange: str, queues: tuple[str, ...], name: str
) -> AsyncIterator[AmqpPublisher]:
    publisher = AmqpPublisher(url, exchange, queues, 5.0, Metrics(CollectorRegistry()), connection_name=name)
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.close()


def connection_of(node: PrivateRabbit, name: str) -> dict[str, str]:
    """What the broker says about the client connection named *name*: user, login mechanism, TLS."""
    rows = node.ctl("list_connections", "client_properties", "user", "auth_mechanism", "ssl", "ssl_protocol")
    for line in rows.splitlines():
        if f'{{"connection_name","{name}"}}' in line:
            _, user, mechanism, tls, protocol = line.rsplit("\t", 4)
            return {"user": user, "auth_mechanism": mechanism, "ssl": tls, "ssl_protocol": protocol}
    raise AssertionError(f"no connection named {name!r} in {rows!r}")


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("revoke_relay_example_consumer_tls", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_publisher_logs_in_with_its_client_certificate(tls_node: TlsNode, names: dict[str, str]) -> None:
    """auth=external over TLS: the broker sees the certificate's CN as the user, EXTERNAL as the
    mechanism, and the event published is read back by `relay tail` from the very same URL."""
    url = tls_node.url(client=tls_node.files.client)
    name = f"test:{names['queue']}"
    async with running_publisher(url, names["exchange"], (names["queue"],), name) as publisher:
        await asyncio.wait_for(publisher.connected.wait(), 15)
        assert f"localhost:{tls_node.port}" == publisher.endpoint
        seen = await asyncio.to_thread(connection_of, tls_node.node, name)
        assert {"user": CLIENT_USER, "auth_mechanism": "EXTERNAL", "ssl": "true"} == {
            k: seen[k] for k in ("user", "auth_mechanism", "ssl")
        }
        out, err = io.StringIO(), io.StringIO()
        ready = asyncio.Event()
        settings = Settings(amqp_url=url, exchange=names["exchange"])
        tailing = asyncio.create_task(
            tail(settings, out, err=err, ready=ready, count=1, give_up_after=20, as_json=True)
        )
        await asyncio.wait_for(ready.wait(), 15)
        envelope = envelopes(1)[0]
        await publisher.publish(envelope)
        assert 0 == await tailing, err.getvalue()
    assert envelope.event_id in out.getvalue()
    assert f"on localhost:{tls_node.port}" in err.getvalue()


async def test_consumer_example_takes_the_same_tls_url(
    tls_node: TlsNode, names: dict[str, str], postgres_url: str
) -> None:
    """examples/consumer.py (on the consumer kit) connects with the relay's TLS URL and certificate login
    and takes down what the relay's publisher sends, once."""
    import asyncpg

    example = load_example()
    url = tls_node.url(client=tls_node.files.client)
    topology = example.Topology(
        exchange=names["exchange"],
        queue=names["queue"],
        dead_letter_exchange=f"{names['exchange']}.dlx",
        dead_letter_queue=f"{names['queue']}.dlq",
    )
    await example.prepare(url, postgres_url, topology)
    consumer = example.build(url, postgres_url, topology, inbox=names["queue"])
    consuming = asyncio.create_task(consumer.run())
    envelope = envelopes(1)[0]
    try:
        async with running_publisher(url, names["exchange"], (), f"test:{names['queue']}") as publisher:
            await asyncio.wait_for(publisher.connected.wait(), 15)
            await publisher.publish(envelope)  # the queue is bound by prepare(): routable at once
        async with asyncio.timeout(15):
            while consumer.stats.handled < 1:
                await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await asyncio.wait_for(consuming, 10)
        db = await asyncpg.connect(postgres_url)
        try:
            rows = await db.fetch("SELECT event_id FROM example_takedowns WHERE event_id = $1", envelope.event_id)
            await db.execute("DELETE FROM example_takedowns WHERE event_id = $1", envelope.event_id)
            await db.execute("DELETE FROM relay_inbox WHERE consumer = $1", names["queue"])
        finally:
            await db.close()
    assert [envelope.event_id] == [row["event_id"] for row in rows]


async def test_password_login_over_tls_checks_the_broker_certificate(tls_node: TlsNode, names: dict[str, str]) -> None:
    """PLAIN login inside TLS with only cafile (no client certificate) connects and publishes."""
    url = tls_node.url(external=False, user="guest:guest@")
    async with running_publisher(url, names["exchange"], (names["queue"],), f"test:{names['queue']}") as publisher:
        await asyncio.wait_for(publisher.connected.wait(), 15)
        await publisher.publish(envelopes(1)[0])
        seen = await asyncio.to_thread(connection_of, tls_node.node, f"test:{names['queue']}")
    assert ("guest", "PLAIN", "true") == (seen["user"], seen["auth_mechanism"], seen["ssl"])


BAD = [
    pytest.param(
        {"cafile": "other_ca"},
        "TLS: the broker's certificate failed verification: self-signed certificate in certificate chain"
        " (is cafile the CA that signed the broker's certificate?)",
        id="wrong-ca",
    ),
    pytest.param(
        {"host": "127.0.0.1"},
        "TLS: the broker's certificate failed verification: IP address mismatch, certificate is not valid for"
        " '127.0.0.1'. (the URL's host must be an address in the broker's certificate)",
        id="wrong-hostname",
    ),
    pytest.param(
        {"serve": "server_expired"},
        "TLS: the broker's certificate failed verification: certificate has expired",
        id="expired-broker-certificate",
    ),
    pytest.param(
        {"client": "client_expired"},
        "TLS: the broker sent alert 'certificate expired' (it refused the client certificate)",
        id="expired-client-certificate",
    ),
    pytest.param(
        {"client": "client_unknown_ca"},
        "TLS: the broker sent alert 'unknown ca' (it refused the client certificate)",
        id="client-certificate-from-another-ca",
    ),
]


LOST_ALERT = (
    "connection reset by the broker before the AMQP handshake; with a client certificate this is how a refused"
    " certificate shows when its TLS alert is lost: check certfile (expired? issued by the CA the broker trusts?)"
)


@contextlib.contextmanager
def bad_setup(tls_node: TlsNode, fault: dict[str, str]) -> Iterator[str]:
    """The URL for *fault*, with the broker serving the faulty certificate meanwhile if that is the fault."""
    files = tls_node.files
    url = tls_node.url(
        host=fault.get("host", "localhost"),
        cafile=getattr(files, fault["cafile"]) if "cafile" in fault else None,
        client=getattr(files, fault.get("client", "client")),
    )
    if "serve" in fault:
        tls_node.serve_certificate(getattr(files, fault["serve"]))
    try:
        yield url
    finally:
        if "serve" in fault:
            tls_node.serve_certificate(files.server)


@pytest.mark.parametrize(("fault", "cause"), BAD)
async def test_publisher_names_the_tls_failure_and_keeps_retrying(
    tls_node: TlsNode, names: dict[str, str], fault: dict[str, str], cause: str
) -> None:
    """Each bad certificate setup is logged (relay.broker_connect_failed) with its cause, again and
    again: the publisher never gives up and never reports ready."""
    with bad_setup(tls_node, fault) as url, capture_logs() as logs:
        async with running_publisher(url, names["exchange"], (), f"test:{names['queue']}") as publisher:
            async with asyncio.timeout(30):
                while True:
                    errors = [e["error"] for e in logs if e["event"] == "relay.broker_connect_failed"]
                    if len(errors) >= 3 and any(error.startswith(cause) for error in errors):
                        break
                    await asyncio.sleep(0.05)
            assert not publisher.ready
            assert publisher.endpoint is None
    failures = [e for e in logs if e["event"] == "relay.broker_connect_failed"]
    # A refused client certificate may show as a reset instead of its alert (see relay.endpoints.describe).
    assert {e["error"].split(" [")[0] for e in failures} <= {cause, LOST_ALERT}
    assert {f"{fault.get('host', 'localhost')}:{tls_node.port}"} == {e["endpoint"] for e in failures}
    assert not any(e["event"] == "relay.broker_connected" for e in logs)


@pytest.mark.parametrize(("fault", "cause"), BAD)
async def test_aio_pika_clients_name_the_same_tls_failure(tls_node: TlsNode, fault: dict[str, str], cause: str) -> None:
    """relay.broker.connect (relay tail, the consumer example, the command queue) fails with the same cause."""
    where = f"{fault.get('host', 'localhost')}:{tls_node.port}"
    messages: set[str] = set()
    with bad_setup(tls_node, fault) as url:
        for _ in range(5):  # until the cause shows: a refused client certificate may look like a reset
            with pytest.raises(broker.NoEndpointAnswered) as raised:
                await broker.connect(url, timeout=10)
            messages.add(str(raised.value).split(" [")[0])
            if f"no endpoint answered: {where}: {cause}" in messages:
                break
    assert f"no endpoint answered: {where}: {cause}" in messages
    assert messages <= {f"no endpoint answered: {where}: {cause}", f"no endpoint answered: {where}: {LOST_ALERT}"}
