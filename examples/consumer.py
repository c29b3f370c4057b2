"""A consumer of revoke-relay's ``message.revoked`` events on the consumer kit (docs/consuming.md).

* its own quorum queue, bound to the relay's exchange, with a dead-letter exchange and a delivery limit
  (declared here: the kit consumes a queue its service owns);
* each event applied once: ``PostgresInbox`` records the eventID in the same transaction as the side
  effect, and the ack goes out after the commit;
* an event that keeps failing goes to the dead-letter queue after ``max_attempts``.

Run it next to ``make run``:  ``.venv/bin/python examples/consumer.py``  (RELAY_AMQP_URL, RELAY_EXCHANGE,
CONSUMER_POSTGRES_URL; the kit needs ``pip install 'revoke-relay[consumer]'``). RELAY_AMQP_URL takes the
forms the relay takes: several comma-separated URLs (the nodes of a cluster), ``amqps://`` with
``cafile``/``certfile``/``keyfile``, ``auth=external`` for a certificate login.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel

from relay import broker
from relay.consumer import Consumer, Event, PostgresInbox

TABLE = """CREATE TABLE IF NOT EXISTS example_takedowns (
    msg_id   text PRIMARY KEY,
    event_id text NOT NULL,
    operator text,
    reason   text
)"""


@dataclass(frozen=True)
class Topology:
    """Names and limits of what this consumer declares. Give every consuming service its own queue."""

    exchange: str = "im.events"  # RELAY_EXCHANGE
    queue: str = "example.revocations"
    binding_key: str = "message.revoked.#"
    dead_letter_exchange: str = "example.revocations.dlx"
    dead_letter_queue: str = "example.revocations.dlq"
    # The broker's own backstop (returns allowed before the DLQ); the kit rejects after max_attempts first.
    delivery_limit: int = 10


async def declare(channel: AbstractChannel, topology: Topology) -> None:
    """Declare the dead-letter exchange and queue, then the consumer's queue, bound to the relay's exchange."""
    # Fanout: a dead-lettered message keeps its routing key (message.revoked.*), whatever it is.
    dlx = await channel.declare_exchange(topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await channel.declare_queue(topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"})
    await dlq.bind(dlx)
    # The relay declares the same exchange the same way; declaring it here lets this start first.
    exchange = await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    queue = await channel.declare_queue(
        topology.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",  # replicated, and counts deliveries in x-delivery-count (max_attempts)
            "x-delivery-limit": topology.delivery_limit,
            "x-dead-letter-exchange": topology.dead_letter_exchange,
            # RabbitMQ ≥ 3.10: the queue keeps a dead-lettered message until the DLQ confirms it.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # required by at-least-once
        },
    )
    await queue.bind(exchange, topology.binding_key)


async def handle(event: Event, tx: Any) -> None:
    """The side effect, in the inbox's transaction: it commits with the eventID or not at all."""
    await tx.execute(
        "INSERT INTO example_takedowns (msg_id, event_id, operator, reason) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (msg_id) DO NOTHING",
        event.msg_id,
        event.event_id,
        event.operator.user_id,
        event.reason,
    )
    print(f"{event.received_at} {event.msg_id} recalled by {event.operator.role}/{event.operator.user_id}")


async def prepare(amqp_url: str, postgres_url: str, topology: Topology) -> None:
    """Declare the queues and the example's table (the inbox creates its own)."""
    connection = await broker.connect(amqp_url, name="revoke-relay example consumer (setup)")
    async with connection:
        await declare(await connection.channel(), topology)
    import asyncpg

    db = await asyncpg.connect(postgres_url)
    try:
        await db.execute(TABLE)
    finally:
        await db.close()


def build(
    amqp_url: str, postgres_url: str, topology: Topology, *, max_attempts: int = 5, inbox: str = "example-consumer"
) -> Consumer:
    return Consumer(
        amqp_url,
        queue=topology.queue,
        handler=handle,
        inbox=PostgresInbox(postgres_url, name=inbox),
        max_attempts=max_attempts,
        name="revoke-relay example consumer",
    )


async def main() -> None:
    topology = Topology(exchange=os.environ.get("RELAY_EXCHANGE", "im.events"))
    amqp_url = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    postgres_url = os.environ.get("CONSUMER_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    await prepare(amqp_url, postgres_url, topology)
    await build(amqp_url, postgres_url, topology).run()  # until SIGTERM/SIGINT: finishes the message in hand


if __name__ == "__main__":
    asyncio.run(main())
