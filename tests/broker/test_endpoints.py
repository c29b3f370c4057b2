"""Several endpoints in RELAY_AMQP_URL against a real RabbitMQ: two TCP proxies in front of it stand
for two nodes, so "a node dies" is a proxy that stops. The first endpoint that answers is used; when
it goes away the publisher and robust aio-pika connections move to the next one at once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import orjson
import pytest
from aiohttp.test_utils import TestClient
from structlog.testing import capture_logs

from relay import broker
from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import sample_body
from tests.broker.test_publish import read_messages, start_relay, target
from tests.proxy import TcpProxy

pytestmark = pytest.mark.broker
ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


def url_for(amqp_url: str, port: int) -> str:
    """*amqp_url* with its host and port replaced by 127.0.0.1:*port* (credentials and vhost kept)."""
    parts = urlsplit(amqp_url)
    credentials = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{credentials}@127.0.0.1:{port}").geturl()


async def closed_port() -> int:
    proxy = TcpProxy("127.0.0.1", 1)  # only to reserve a free port that nothing listens on
    await proxy.start()
    port = proxy.port
    await proxy.stop()
    return port


@pytest.fixture
async def nodes(amqp_url: str) -> AsyncIterator[list[TcpProxy]]:
    """Two 'nodes': proxies to the same broker, each stoppable on its own."""
    parts = urlsplit(amqp_url)
    proxies = [TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672) for _ in range(2)]
    for proxy in proxies:
        await proxy.start()
    yield proxies
    for proxy in proxies:
        await proxy.stop()


async def metric(client: TestClient, name: str) -> float:  # type: ignore[type-arg]
    text = await (await client.get("/metrics")).text()
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} "))


async def test_relay_publishes_through_the_first_endpoint_that_answers(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """A dead first endpoint is skipped without a pause: the relay connects to the second, says which in
    /readyz, and publishes there; the dead one is logged with its cause."""
    dead = await closed_port()
    live = urlsplit(amqp_url)
    with capture_logs() as logs:
        client = await start_relay(aiohttp_client, f"{url_for(amqp_url, dead)},{amqp_url}", names, tmp_path)
    readiness = await (await client.get("/readyz")).json()
    assert f"{live.hostname}:{live.port or 5672}" == readiness["endpoint"]
    response = await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))
    assert 200 == response.status
    assert 1 == len(await read_messages(amqp, names["queue"], 1))
    failed = [e for e in logs if e["event"] == "relay.broker_connect_failed"]
    assert [(f"127.0.0.1:{dead}", "connection refused", 0.0)] == [
        (e["endpoint"], e["error"], e["retry_in"]) for e in failed
    ]
    assert 0 == await metric(client, "relay_broker_failovers_total")  # the first connection is no failover


async def test_publisher_moves_to_the_next_endpoint_when_its_node_goes(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    nodes: list[TcpProxy],
) -> None:
    """The node in use disappears: the next connection goes to the other endpoint, the failover is counted
    and logged, /readyz names the new node, and callbacks are confirmed there."""
    urls = ",".join(url_for(amqp_url, proxy.port) for proxy in nodes)
    with capture_logs() as logs:
        client = await start_relay(aiohttp_client, urls, names, tmp_path)
        assert f"127.0.0.1:{nodes[0].port}" == (await (await client.get("/readyz")).json())["endpoint"]
        await nodes[0].stop()
        async with asyncio.timeout(10):
            while (await (await client.get("/readyz")).json())["endpoint"] != f"127.0.0.1:{nodes[1].port}":
                await asyncio.sleep(0.02)
        response = await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))
    assert 200 == response.status
    assert 1 == len(await read_messages(amqp, names["queue"], 1))
    assert 1 == await metric(client, "relay_broker_failovers_total")
    failover = [e for e in logs if e["event"] == "relay.broker_failover"]
    assert [(f"127.0.0.1:{nodes[1].port}", f"127.0.0.1:{nodes[0].port}")] == [
        (e["endpoint"], e["previous"]) for e in failover
    ]
    # No failed attempt at the lost node in between: it is not waited for.
    assert not [e for e in logs if e["event"] == "relay.broker_connect_failed"]
    confirming = [e for e in logs if e["event"] == "relay.broker_confirming"]
    assert f"127.0.0.1:{nodes[1].port}" == confirming[-1]["endpoint"]


async def test_bindings_are_restored_after_a_failover_without_holding_up_publishing(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    nodes: list[TcpProxy],
) -> None:
    """After a reconnection the relay re-binds its queues on a separate channel: a binding lost meanwhile
    comes back, and callbacks are routed to the queue again."""
    urls = ",".join(url_for(amqp_url, proxy.port) for proxy in nodes)
    with capture_logs() as logs:
        client = await start_relay(aiohttp_client, urls, names, tmp_path)
        queue = await amqp.get_queue(names["queue"])
        await queue.unbind(names["exchange"], "message.revoked.#")
        await nodes[0].stop()
        async with asyncio.timeout(10):
            while not any(e["event"] == "relay.rebound" for e in logs):
                await asyncio.sleep(0.02)
    response = await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))
    assert 200 == response.status
    assert 1 == len(await read_messages(amqp, names["queue"], 1))
    assert [[names["queue"]]] == [e["queues"] for e in logs if e["event"] == "relay.rebound"]


@pytest.mark.parametrize("robust", [False, True], ids=["plain", "robust"])
async def test_aio_pika_connect_skips_a_dead_endpoint(amqp_url: str, robust: bool) -> None:
    """relay.broker.connect (tail, consumers) opens the first endpoint that answers and says which."""
    dead = await closed_port()
    connection = await broker.connect(f"{url_for(amqp_url, dead)},{amqp_url}", robust=robust, name="test:skip")
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        assert queue.name
        live = urlsplit(amqp_url)
        assert f"{live.hostname}:{live.port or 5672}" == connection.endpoint
    finally:
        await connection.close()


async def test_aio_pika_connect_names_every_endpoint_when_none_answers() -> None:
    """With no node up, the error lists each endpoint and why it failed."""
    ports = [await closed_port(), await closed_port()]
    urls = ",".join(f"amqp://guest:guest@127.0.0.1:{port}/" for port in ports)
    with pytest.raises(broker.NoEndpointAnswered) as raised:
        await broker.connect(urls, timeout=5)
    assert (
        f"no endpoint answered: 127.0.0.1:{ports[0]}: connection refused; 127.0.0.1:{ports[1]}: connection refused"
    ) == str(raised.value.args[0])


async def test_robust_consumer_moves_to_the_next_endpoint_and_keeps_consuming(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], nodes: list[TcpProxy]
) -> None:
    """A robust connection whose node goes away reconnects through the next endpoint (not the lost one)
    and its consumer, re-declared by aio-pika, receives what is published afterwards."""
    queue_name = names["queue"]
    await amqp.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})
    urls = ",".join(url_for(amqp_url, proxy.port) for proxy in nodes)
    connection = await broker.connect(urls, robust=True, name="test:robust-failover", reconnect_interval=0.2)
    received: asyncio.Queue[bytes] = asyncio.Queue()
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, durable=True, arguments={"x-queue-type": "quorum"})

        async def on_message(message: Any) -> None:
            async with message.process():
                await received.put(message.body)

        await queue.consume(on_message)
        assert f"127.0.0.1:{nodes[0].port}" == connection.endpoint
        await amqp.default_exchange.publish(aio_pika.Message(b"before"), routing_key=queue_name)
        assert b"before" == await asyncio.wait_for(received.get(), 10)
        await nodes[0].stop()
        async with asyncio.timeout(15):
            while connection.endpoint != f"127.0.0.1:{nodes[1].port}" or not connection.connected.is_set():
                await asyncio.sleep(0.05)
        seen: list[bytes] = []
        async with asyncio.timeout(15):
            # Publish until the re-declared consumer is back (restoring it takes a moment after the
            # reconnect). "before" may come again: its ack may have been lost with the first link.
            while b"after" not in seen:
                await amqp.default_exchange.publish(aio_pika.Message(b"after"), routing_key=queue_name)
                await asyncio.sleep(0.2)
                while not received.empty():
                    seen.append(received.get_nowait())
        assert set(seen) <= {b"before", b"after"}
    finally:
        await connection.close()
