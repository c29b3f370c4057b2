"""The history stream on a private RabbitMQ node: a stream that comes back `down` after a crash soon
after its declaration (measured on 3.10.8) must not stop the relay's delivery to its queues."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from tests.faults import node as node_module
from tests.faults.node import PrivateRabbit
from tests.helpers import envelopes

pytestmark = [pytest.mark.fault, pytest.mark.timeout(240)]


@pytest.fixture
def private_node(tmp_path: Path) -> Iterator[PrivateRabbit]:
    if not node_module.available():
        if os.environ.get("RELAY_REQUIRE_BROKER") == "1":
            pytest.fail("rabbitmq-server is not installed and RELAY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip("rabbitmq-server is not installed")
    node = PrivateRabbit(tmp_path / "node", name=f"relayhist{os.getpid()}")
    node.start()
    yield node
    node.stop()


async def test_a_stream_down_after_a_crash_does_not_stop_delivery(private_node: PrivateRabbit) -> None:
    """The node is killed right after the relay declared its stream: the stream comes back `down` and its
    declaration fails (404); the relay logs relay.history_stream_down, leaves it out and goes on
    delivering to its quorum queue with confirms."""
    # The quorum queue settles first: only the stream is declared just before the crash.
    connection = await aio_pika.connect(private_node.url)
    async with connection:
        await (await connection.channel()).declare_queue(
            "moderation", durable=True, arguments={"x-queue-type": "quorum"}
        )
    await asyncio.sleep(5)
    publisher = AmqpPublisher(
        private_node.url, "im.events", ("moderation",), 5.0, Metrics(CollectorRegistry()),
        audit_stream="relay.history", stream_arguments={"x-max-age": "1D", "x-max-length-bytes": 10_000_000},
        reconnect_max=0.5,
    )  # fmt: skip
    with capture_logs() as logs:
        await publisher.start()
        try:
            await asyncio.wait_for(publisher.connected.wait(), 30)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(private_node.kill)
            await asyncio.to_thread(private_node.start)
            states = dict(
                line.split("\t") for line in private_node.ctl("list_queues", "name", "state").splitlines()[1:]
            )
            assert "down" == states["relay.history"]  # what 3.10.8 does; the rest of the test is the relay's answer
            async with asyncio.timeout(60):
                while publisher.endpoint is None:
                    await asyncio.sleep(0.1)
            (event,) = envelopes(1)
            await publisher.publish(event)
        finally:
            await publisher.close()
    assert any(e["event"] == "relay.history_stream_down" and e["stream"] == "relay.history" for e in logs)
    connection = await aio_pika.connect(private_node.url)
    async with connection:
        queue = await (await connection.channel()).get_queue("moderation")
        delivered = await queue.get(no_ack=True, timeout=5)
    assert event.event_id == delivered.message_id
