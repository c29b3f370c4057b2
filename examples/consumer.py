"""A minimal consumer of revoke-relay's ``message.revoked`` events (read docs/consuming.md first).

* its own quorum queue, bound to the relay's exchange, with a dead-letter exchange and a delivery limit;
* a manual ack, sent only once the side effect is done;
* deduplication on ``eventID``, because delivery is at least once.

Run it next to ``make run``:  ``.venv/bin/python examples/consumer.py``  (AMQP_URL, RELAY_EXCHANGE).
AMQP_URL takes the forms of ``RELAY_AMQP_URL``: several comma-separated URLs (the nodes of a cluster),
``amqps://`` with ``cafile``/``certfile``/``keyfile``, ``auth=external`` for a certificate login.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from relay import broker

Handler = Callable[[dict[str, Any]], Awaitable[None]]


class SeenEventIDs:
    """The eventIDs already processed, most recent last, at most *capacity* of them.

    Enough for an example and for duplicates that arrive close together. In production, record the
    eventID **in the same transaction as the side effect** (a table keyed by eventID:
    ``INSERT … ON CONFLICT DO NOTHING``, and skip the work when nothing was inserted), or, when the
    side effect is not in a database, in a shared store with an expiry (Redis ``SET eventID 1 NX EX …``).
    An in-memory set forgets everything on restart, which is exactly when redeliveries happen.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def add(self, event_id: str) -> None:
        self._ids[event_id] = None
        self._ids.move_to_end(event_id)
        if len(self._ids) > self._capacity:
            self._ids.popitem(last=False)


@dataclass(frozen=True)
class Topology:
    """Names and limits of what this consumer declares. Give every consuming service its own queue."""

    exchange: str = "im.events"  # RELAY_EXCHANGE
    queue: str = "example.revocations"
    binding_key: str = "message.revoked.#"
    dead_letter_exchange: str = "example.revocations.dlx"
    dead_letter_queue: str = "example.revocations.dlq"
    delivery_limit: int = 5  # returns allowed: at most delivery_limit + 1 deliveries, then the DLQ


@dataclass
class Stats:
    processed: int = 0  # handled and acked
    duplicates: int = 0  # eventID seen before: acked without handling
    failures: int = 0  # handler raised: rejected with requeue, to be retried
    malformed: int = 0  # not an event: rejected to the dead-letter queue at once

    @property
    def settled(self) -> int:
        return self.processed + self.duplicates + self.failures + self.malformed


async def declare(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
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
            "x-queue-type": "quorum",  # replicated, and counts deliveries (needed for the limit)
            "x-delivery-limit": topology.delivery_limit,
            "x-dead-letter-exchange": topology.dead_letter_exchange,
            # RabbitMQ ≥ 3.10: the queue keeps a dead-lettered message until the DLQ confirms it.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",  # required by at-least-once
        },
    )
    await queue.bind(exchange, topology.binding_key)
    return queue


async def settle(message: AbstractIncomingMessage, handle: Handler, seen: SeenEventIDs, stats: Stats) -> None:
    """Handle one delivery and ack or reject it: the ack goes out only after *handle* succeeded."""
    try:
        event = json.loads(message.body)
        event_id = event["eventID"]
    except (ValueError, TypeError, KeyError):
        stats.malformed += 1
        await message.reject(requeue=False)  # retrying cannot fix it: straight to the dead-letter queue
        return
    if event_id in seen:
        stats.duplicates += 1
        await message.ack()  # already done once: acknowledge, do nothing
        return
    try:
        await handle(event)
    except Exception:  # noqa: BLE001 - any failure of the side effect means: try again later
        stats.failures += 1
        # reject, not nack: RabbitMQ ≥ 4.3 counts only reject (and a lost consumer) toward the
        # delivery limit; older versions count both. Past the limit the message is dead-lettered.
        await message.reject(requeue=True)
        return
    seen.add(event_id)
    await message.ack()
    stats.processed += 1


async def consume(
    url: str,
    handle: Handler,
    topology: Topology,
    *,
    seen: SeenEventIDs | None = None,
    stats: Stats | None = None,
    prefetch: int = 50,
    stop_after: int | None = None,
    connection_name: str = "revoke-relay example consumer",
) -> Stats:
    """Consume until cancelled (or until *stop_after* deliveries are settled); return the counts."""
    seen = SeenEventIDs() if seen is None else seen
    stats = Stats() if stats is None else stats
    # Robust: reconnects by itself, to the next node of the list when its node is gone, and declares
    # the queue and consumer again there. With a single URL, aio_pika.connect_robust(url) does the same.
    connection = await broker.connect(url, robust=True, name=connection_name)
    async with connection:
        channel = await connection.channel()
        # Prefetch bounds the unacked messages in flight. Quorum queues deliver best with a window
        # well above 1: prefetch 1 makes every message wait for the previous ack's round trip.
        await channel.set_qos(prefetch_count=prefetch)
        queue = await declare(channel, topology)
        async with queue.iterator() as messages:
            async for message in messages:
                await settle(message, handle, seen, stats)
                if stop_after is not None and stats.settled >= stop_after:
                    break
    return stats


async def main() -> None:
    async def handle(event: dict[str, Any]) -> None:
        # The side effect: hide the message in your archive, notify moderators, write the audit log…
        operator = event["operator"]
        print(f"{event['eventTime']} {event['msgID']} recalled by {operator['role']}/{operator['userID']}")

    topology = Topology(exchange=os.environ.get("RELAY_EXCHANGE", "im.events"))
    url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    task = asyncio.create_task(consume(url, handle, topology))
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    asyncio.run(main())
