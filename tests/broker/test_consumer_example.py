"""examples/consumer.py against a real RabbitMQ and PostgreSQL: its topology, one takedown per eventID
through the kit's inbox, malformed messages dead-lettered."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from tests.helpers import envelopes, load_example

pytestmark = [pytest.mark.broker, pytest.mark.postgres]


example = load_example("consumer.py")


@pytest.fixture
async def topology(
    amqp: aio_pika.abc.AbstractChannel, amqp_url: str, postgres_url: str, names: dict[str, str]
) -> AsyncIterator[Any]:
    """The example's topology under this test's unique names, prepared; its DLX, inbox rows and takedown
    rows are deleted afterwards (the `amqp` fixture deletes the exchange and both queues)."""
    declared = example.Topology(
        exchange=names["exchange"],
        queue=names["queue"],
        dead_letter_exchange=f"{names['exchange']}.dlx",
        dead_letter_queue=names["queue2"],
    )
    await example.prepare(amqp_url, postgres_url, declared)
    yield declared
    await amqp.exchange_delete(declared.dead_letter_exchange)
    db = await asyncpg.connect(postgres_url)
    await db.execute("DELETE FROM relay_inbox WHERE consumer = $1", names["queue"])
    await db.execute("DELETE FROM example_takedowns WHERE event_id = ANY($1::text[])", list(published))
    await db.close()


published: set[str] = set()


async def test_each_event_is_taken_down_once_and_junk_is_dead_lettered(
    amqp: aio_pika.abc.AbstractChannel, amqp_url: str, postgres_url: str, names: dict[str, str], topology: Any
) -> None:
    """The relay publishes A, B and A again, plus a body that is not an event: A and B have one takedown row
    each, the copy is acked as a duplicate, the junk lands in the DLQ, and the queue ends empty."""
    publisher = AmqpPublisher(amqp_url, topology.exchange, (), 5.0, Metrics(CollectorRegistry()))
    await publisher.start()
    await asyncio.wait_for(publisher.connected.wait(), 10)
    first, second = envelopes(1, "c2c") + envelopes(1, "group")
    published.update((first.event_id, second.event_id))
    try:
        for item in (first, second, first):
            await publisher.publish(item)
    finally:
        await publisher.close()
    await (await amqp.get_exchange(topology.exchange)).publish(
        aio_pika.Message(b"not json", message_id="junk"), "message.revoked.c2c"
    )
    consumer = example.build(amqp_url, postgres_url, topology, inbox=names["queue"])
    task = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(15):
            while consumer.stats.handled + consumer.stats.duplicates + consumer.stats.malformed < 4:
                await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await asyncio.wait_for(task, 10)
    assert (2, 1, 1) == (consumer.stats.handled, consumer.stats.duplicates, consumer.stats.malformed)
    db = await asyncpg.connect(postgres_url)
    rows = await db.fetch(
        "SELECT event_id FROM example_takedowns WHERE event_id = ANY($1::text[]) ORDER BY event_id",
        [first.event_id, second.event_id],
    )
    await db.close()
    assert sorted([first.event_id, second.event_id]) == [r["event_id"] for r in rows]
    dlq = await amqp.get_queue(topology.dead_letter_queue)
    dead = await dlq.get(no_ack=True, timeout=5)
    assert ("junk", "rejected") == (dead.message_id, dead.headers["x-first-death-reason"])
    queue = await amqp.declare_queue(topology.queue, passive=True)
    assert 0 == queue.declaration_result.message_count
