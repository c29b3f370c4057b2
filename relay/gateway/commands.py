"""The command queue: services on the bus send the recall request body as an AMQP message.

Consumed with aio-pika (a library, not a third hand-written protocol layer). The queue
(``RELAY_COMMAND_QUEUE``) is a durable quorum queue whose rejected messages dead-letter to
``<queue>.dead`` (a fanout exchange and a quorum queue of that name), after at most
``DELIVERY_LIMIT`` deliveries (so a message that keeps failing does not circle for ever).

A message is acked only once its request record and its answer are safe (the service returned
200: ledger written, audit events confirmed or spooled). After a crash RabbitMQ redelivers it;
its ``requestID`` (or, absent one, its ``message_id``, or a hash of its body) makes that harmless.
If the message has ``reply_to``, the answer is published there with its ``correlation_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random

import aio_pika
import orjson
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from relay import broker
from relay.gateway.request import InvalidRequest, parse_request
from relay.gateway.service import Answer, RecallService, error
from relay.metrics import Metrics

log = structlog.get_logger()

REQUESTED_BY = "amqp"
DELIVERY_LIMIT = 10
PREFETCH = 8
_RETRY_DELAY = (1.0, 5.0)  # seconds before a failed attempt (Tencent or broker down) is requeued
_WAIT_STEP = 0.5  # polling a requestID another consumer is carrying out


class CommandConsumer:
    def __init__(self, url: str, queue: str, service: RecallService, metrics: Metrics) -> None:
        self.url = url
        self.queue = queue
        self.dead = f"{queue}.dead"
        self.service = service
        self.metrics = metrics
        self.connection: AbstractRobustConnection | None = None
        self.channel: AbstractChannel | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connecting: asyncio.Task[None] | None = None
        self.consuming = asyncio.Event()

    async def start(self) -> None:
        """Connect in the background: the relay serves (and publishes) while the broker is away."""
        self._connecting = asyncio.create_task(self._connect(), name="command-consumer")

    async def _connect(self) -> None:
        delay = 0.5
        while True:
            try:
                # Same endpoint list and TLS options as the publisher: the first node that
                # answers, and the next one when it goes away.
                self.connection = await broker.connect(self.url, robust=True, name="revoke-relay commands")
                break
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                log.warning("relay.command_queue_connect_failed", error=repr(exc)[:300], retry_in=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=PREFETCH)
        dead = await channel.declare_exchange(self.dead, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(self.dead, durable=True, arguments={"x-queue-type": "quorum"})
        await dead_queue.bind(dead)
        queue = await channel.declare_queue(
            self.queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": self.dead,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
        )
        self.channel = channel
        await queue.consume(self._on_message)
        self.consuming.set()
        log.info("relay.command_queue_consuming", queue=self.queue)

    async def close(self) -> None:
        """Stop taking messages; let those being carried out finish (a few seconds), then close.
        Unacked messages go back to the queue when the channel closes."""
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._connecting
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self.connection is not None:
            with contextlib.suppress(Exception):
                await self.connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        fallback = message.message_id or "amqp-" + hashlib.sha256(message.body).hexdigest()[:32]
        try:
            command = parse_request(message.body, new_id=lambda: fallback)
        except InvalidRequest as exc:
            answer = error(400, exc.code, "the command is not a valid recall request", fields=exc.errors)
            self.metrics.recall_requests.labels("amqp", answer.code).inc()
            log.warning("relay.command_rejected", code=exc.code, message_id=message.message_id, detail=str(exc)[:300])
            await self._reply(message, answer)
            await message.reject(requeue=False)  # dead-lettered: it will never become valid
            return
        while True:
            answer = await self.service.submit(command, REQUESTED_BY, take_over=bool(message.redelivered))
            if answer.code != "request_in_progress":
                break
            await asyncio.sleep(_WAIT_STEP)  # another delivery of the same request is being carried out
        if answer.status >= 500:
            # Tencent, the store, or the broker and spool are down: try again later, from the queue.
            await asyncio.sleep(random.uniform(*_RETRY_DELAY))  # noqa: S311 - jitter
            log.warning("relay.command_requeued", code=answer.code, request_id=command.request_id)
            await message.nack(requeue=True)
            return
        await self._reply(message, answer)
        if answer.status == 200:
            await message.ack()
        else:
            log.warning("relay.command_rejected", code=answer.code, request_id=command.request_id)
            await message.reject(requeue=False)

    async def _reply(self, message: AbstractIncomingMessage, answer: Answer) -> None:
        if not message.reply_to or self.channel is None:
            return
        body = {"status": answer.status, **answer.body}
        try:
            await self.channel.default_exchange.publish(
                aio_pika.Message(
                    orjson.dumps(body), content_type="application/json", correlation_id=message.correlation_id
                ),
                routing_key=message.reply_to,
            )
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            log.warning("relay.command_reply_failed", reply_to=message.reply_to, error=repr(exc)[:300])
