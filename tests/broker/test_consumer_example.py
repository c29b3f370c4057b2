"""examples/consumer.py against a real RabbitMQ: dedupe on eventID, ack after the side effect, dead-letter poison."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from relay.events import Envelope
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from tests.helpers import envelopes

pytestmark = pytest.mark.broker

EXAMPLE = Path(__file__).parents[2] / "examples" / "consumer.py"


def load_example() -> ModuleType:
    """Import examples/consumer.py as a module (examples/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("revoke_relay_example_consumer", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


example = load_example()


@pytest.fixture
async def topology(amqp: aio_pika.abc.AbstractChannel, names: dict[str, str]) -> AsyncIterator[Any]:
    """The example's topology under this test's unique names, declared; the extra DLX is deleted afterwards
    (the `amqp` fixture deletes the exchange and both queues)."""
    declared = example.Topology(
        exchange=names["exchange"],
        queue=names["queue"],
        dead_letter_exchange=f"{names['exchange']}.dlx",
        dead_letter_queue=names["queue2"],
        delivery_limit=2,
    )
    await example.declare(amqp, declared)
    yield declared
    await amqp.exchange_delete(declared.dead_letter_exchange)


@pytest.fixture
async def publisher(amqp_url: str, topology: Any, request: pytest.FixtureRequest) -> AsyncIterator[AmqpPublisher]:
    """The relay's own publisher, so the example consumes exactly what the relay sends."""
    publisher = AmqpPublisher(
        amqp_url, topology.exchange, (), 5.0, Metrics(CollectorRegistry()), connection_name=f"test:{request.node.name}"
    )
    await publisher.start()
    await asyncio.wait_for(publisher.connected.wait(), 10)
    yield publisher
    await publisher.close()


async def publish(publisher: AmqpPublisher, items: list[Envelope]) -> None:
    for item in items:
        await publisher.publish(item)


async def queue_depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def wait_for_depth(channel: aio_pika.abc.AbstractChannel, queue: str, depth: int, timeout: float = 10) -> None:
    async with asyncio.timeout(timeout):
        while await queue_depth(channel, queue) != depth:
            await asyncio.sleep(0.05)


async def test_duplicate_event_id_is_acked_without_reprocessing(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], topology: Any, publisher: AmqpPublisher
) -> None:
    """Two events and a redelivered copy of the first: each eventID is handled exactly once, and all three
    deliveries are acked (nothing left in the queue or the DLQ)."""
    first, second = envelopes(1, "c2c") + envelopes(1, "group")
    await publish(publisher, [first, second, first])
    handled: list[str] = []

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event["eventID"])

    stats = await asyncio.wait_for(
        example.consume(amqp_url, handle, topology, stop_after=3, connection_name=f"test:{names['queue']}"), 10
    )
    assert [first.event_id, second.event_id] == handled
    assert (2, 1, 0, 0) == (stats.processed, stats.duplicates, stats.failures, stats.malformed)
    await wait_for_depth(amqp, topology.queue, 0)
    assert 0 == await queue_depth(amqp, topology.dead_letter_queue)


async def test_event_that_keeps_failing_is_dead_lettered_after_the_delivery_limit(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], topology: Any, publisher: AmqpPublisher
) -> None:
    """A handler that always fails for one event: it is tried delivery_limit + 1 times, then RabbitMQ moves it to
    the DLQ (reason delivery_limit), while the healthy event beside it is processed once."""
    poison, healthy = envelopes(1, "c2c") + envelopes(1, "c2c")
    await publish(publisher, [poison, healthy])
    attempts: list[str] = []

    async def handle(event: dict[str, Any]) -> None:
        attempts.append(event["eventID"])
        if event["eventID"] == poison.event_id:
            raise RuntimeError("downstream refused it")

    deliveries = 1 + topology.delivery_limit + 1
    stats = await asyncio.wait_for(
        example.consume(amqp_url, handle, topology, stop_after=deliveries, connection_name=f"test:{names['queue']}"),
        10,
    )
    assert topology.delivery_limit + 1 == attempts.count(poison.event_id)
    assert 1 == attempts.count(healthy.event_id)
    assert (1, topology.delivery_limit + 1) == (stats.processed, stats.failures)
    await wait_for_depth(amqp, topology.dead_letter_queue, 1)
    dlq = await amqp.get_queue(topology.dead_letter_queue)
    dead = await dlq.get(no_ack=True)
    assert (poison.event_id, "delivery_limit") == (dead.message_id, dead.headers["x-first-death-reason"])
    assert 0 == await queue_depth(amqp, topology.queue)


async def test_malformed_message_goes_to_the_dead_letter_queue_at_once(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], topology: Any
) -> None:
    """A body that is not an event is rejected without requeue: one delivery, then the DLQ (reason rejected)."""
    exchange = await amqp.get_exchange(topology.exchange)
    await exchange.publish(aio_pika.Message(b"not json", message_id="junk"), "message.revoked.c2c")
    handled: list[dict[str, Any]] = []

    async def handle(event: dict[str, Any]) -> None:
        handled.append(event)

    stats = await asyncio.wait_for(
        example.consume(amqp_url, handle, topology, stop_after=1, connection_name=f"test:{names['queue']}"), 10
    )
    assert ([], 1) == (handled, stats.malformed)
    await wait_for_depth(amqp, topology.dead_letter_queue, 1)
    dead = await (await amqp.get_queue(topology.dead_letter_queue)).get(no_ack=True)
    assert ("junk", "rejected") == (dead.message_id, dead.headers["x-first-death-reason"])


def test_seen_event_ids_forget_the_oldest_beyond_capacity() -> None:
    """The example's dedupe store is bounded: past its capacity it forgets the least recently added eventID."""
    seen = example.SeenEventIDs(capacity=2)
    for event_id in ("a", "b", "c"):
        seen.add(event_id)
    assert (False, True, True) == ("a" in seen, "b" in seen, "c" in seen)
