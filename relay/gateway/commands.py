"""The command queue: services on the bus send the recall request body as an AMQP message.

Consumed with aio-pika (a library, not a third hand-written protocol layer). The queue
(``RELAY_COMMAND_QUEUE``) is a durable quorum queue whose rejected messages dead-letter to
``<queue>.dead`` (a fanout exchange and a quorum queue of that name), after at most
``DELIVERY_LIMIT`` deliveries (so a message that keeps failing does not circle for ever).

**Who is calling** comes from the message's ``user_id`` property, which RabbitMQ checks against
the user the publisher logged in as (a user tagged ``impersonator`` could forge it: give none
that tag). A key in ``RELAY_API_KEYS_FILE`` claims that user with ``amqp_user``; its name is the
``requestedBy`` and its scopes apply as on HTTP. A message without ``user_id``, from a user no key
claims, or asking for its answer somewhere other than direct reply-to or a queue under
``RELAY_COMMAND_REPLY_PREFIX`` is dead-lettered with an ``x-relay-refusal`` header, unread.

A message is acked only once its request record and its answer are safe (the service returned
200: ledger written, audit events confirmed or spooled). After a crash RabbitMQ redelivers it;
its ``requestID`` (or, absent one, its ``message_id``, or a hash of its body) makes that harmless:
the redelivery waits for the first run's lease and then gets its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from typing import Any

import aio_pika
import orjson
import structlog
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
)

from relay import broker
from relay.gateway.keys import Keyring
from relay.gateway.request import InvalidRequest, parse_request
from relay.gateway.service import Answer, RecallService, error
from relay.metrics import Metrics

log = structlog.get_logger()

DELIVERY_LIMIT = 10
PREFETCH = 8
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to."  # what the broker turns "amq.rabbitmq.reply-to" into
REFUSAL_HEADER = "x-relay-refusal"
_RETRY_DELAY = (1.0, 5.0)  # seconds before a failed attempt (Tencent or broker down) is requeued
_WAIT_STEP = 0.5  # polling a requestID another consumer is carrying out
_BACKOFF = (0.5, 30.0)  # reconnecting after the queue could not be declared or consumed


class CommandConsumer:
    """Consumes ``RELAY_COMMAND_QUEUE`` for as long as the relay runs: a connection, queue or
    consumer that fails is set up again with backoff, and ``status`` says whether it consumes."""

    def __init__(
        self,
        url: str,
        queue: str,
        service: RecallService,
        metrics: Metrics,
        keyring: Keyring,
        *,
        reply_prefix: str | None = None,
    ) -> None:
        self.url = url
        self.queue = queue
        self.dead = f"{queue}.dead"
        self.service = service
        self.metrics = metrics
        self.keyring = keyring
        self.reply_prefix = reply_prefix
        self.channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._dead_exchange: AbstractExchange | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self.consuming = asyncio.Event()  # set while consuming; cleared when the consumer is down
        self.last_error: str | None = None
        metrics.command_consumer_up.set(0)

    @property
    def status(self) -> dict[str, object]:
        """For ``/readyz``'s body: the command queue does not decide readiness (callbacks do not need it)."""
        return {"queue": self.queue, "consuming": self.consuming.is_set(), "error": self.last_error}

    async def start(self) -> None:
        """Consume in the background: the relay serves (and publishes) while the broker is away."""
        self._runner = asyncio.create_task(self._run(), name="command-consumer")

    async def _run(self) -> None:
        delay = _BACKOFF[0]
        while True:
            connection: AbstractConnection | None = None
            try:
                # Same endpoint list and TLS options as the publisher: the first node that answers.
                connection = await broker.connect(self.url, name="revoke-relay commands")
                closed = asyncio.Event()
                connection.close_callbacks.add(lambda *_, closed=closed: closed.set())
                await self._consume(connection, closed)
                self.last_error = None
                self.consuming.set()
                self.metrics.command_consumer_up.set(1)
                log.info("relay.command_queue_consuming", queue=self.queue)
                delay = _BACKOFF[0]
                await closed.wait()
                self.last_error = "the channel or connection closed"
                log.warning("relay.command_queue_lost", queue=self.queue)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: say why, and try again later
                self.last_error = _describe(exc)
                log.error("relay.command_queue_down", queue=self.queue, error=self.last_error, retry_in=round(delay, 1))
            finally:
                self.consuming.clear()
                self.metrics.command_consumer_up.set(0)
                self.channel = self._queue = self._consumer_tag = None
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await connection.close()
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter
            delay = min(delay * 2, _BACKOFF[1])

    async def _consume(self, connection: AbstractConnection, closed: asyncio.Event) -> None:
        channel = await connection.channel()  # publisher confirms: replies and dead letters are confirmed
        channel.close_callbacks.add(lambda *_: closed.set())
        await channel.set_qos(prefetch_count=PREFETCH)
        self._dead_exchange = await channel.declare_exchange(self.dead, aio_pika.ExchangeType.FANOUT, durable=True)
        dead_queue = await channel.declare_queue(self.dead, durable=True, arguments={"x-queue-type": "quorum"})
        await dead_queue.bind(self._dead_exchange)
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
        self._queue = queue
        self._consumer_tag = await queue.consume(self._on_message)

    async def close(self) -> None:
        """Stop taking messages; let those being carried out finish (a few seconds), then close.
        Unacked messages go back to the queue when the channel closes."""
        if self._queue is not None and self._consumer_tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._consumer_tag)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._handle(message)
        finally:
            if task is not None:
                self._tasks.discard(task)

    def _reply_allowed(self, reply_to: str) -> bool:
        return reply_to.startswith(DIRECT_REPLY_TO) or (
            self.reply_prefix is not None and reply_to.startswith(self.reply_prefix)
        )

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        user = message.user_id
        key = None if user is None else self.keyring.by_amqp_user(user)
        if key is None:
            reason = "no_user_id" if user is None else "unknown_caller"
            await self._refuse(message, reason, "the command names no user_id" if user is None else "no key has it")
            return
        if message.reply_to and not self._reply_allowed(message.reply_to):
            detail = "answers go to amq.rabbitmq.reply-to or to queues under RELAY_COMMAND_REPLY_PREFIX only"
            await self._refuse(message, "reply_to_not_allowed", detail)
            return
        fallback = message.message_id or "amqp-" + hashlib.sha256(message.body).hexdigest()[:32]
        try:
            command = parse_request(message.body, new_id=lambda: fallback)
        except InvalidRequest as exc:
            answer = error(400, exc.code, "the command is not a valid recall request", fields=exc.errors)
            self.metrics.recall_requests.labels("amqp", answer.code).inc()
            log.warning("relay.command_rejected", code=exc.code, message_id=message.message_id, detail=str(exc)[:300])
            await self._reply(message, answer)
            await self._dead_letter(message, exc.code, "not a valid recall request")
            return
        bucket = self.keyring.bucket(key)
        if bucket is not None:
            await bucket.acquire()  # over its rate a caller's commands wait; the queue holds the rest
        while True:
            answer = await self.service.submit(command, key, "amqp")
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
            log.warning(
                "relay.command_rejected", code=answer.code, request_id=command.request_id, requested_by=key.name
            )
            await self._dead_letter(message, answer.code, str(answer.body["error"])[:200])

    async def _refuse(self, message: AbstractIncomingMessage, reason: str, detail: str) -> None:
        """A command from no known caller, or wanting its answer elsewhere: not read, not answered."""
        self.metrics.command_refusals.labels(reason).inc()
        log.warning(
            "relay.command_refused",
            reason=reason,
            user_id=message.user_id,
            message_id=message.message_id,
            reply_to=message.reply_to,
        )
        await self._dead_letter(message, reason, detail)

    async def _dead_letter(self, message: AbstractIncomingMessage, code: str, detail: str) -> None:
        """Move *message* to ``<queue>.dead`` with why (``x-relay-refusal``), then ack it. RabbitMQ's own
        dead-lettering cannot add a header; if this publish fails, the message is requeued instead."""
        headers: dict[str, Any] = dict(message.headers or {})
        headers[REFUSAL_HEADER] = code
        headers["x-relay-refusal-detail"] = detail
        if message.user_id is not None:
            # Not as user_id: RabbitMQ refuses a user_id other than the relay's own user.
            headers["x-relay-user-id"] = message.user_id
        copy = aio_pika.Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        try:
            if self._dead_exchange is None:
                raise aio_pika.exceptions.ChannelInvalidStateError("the dead-letter exchange is not declared yet")
            await self._dead_exchange.publish(copy, routing_key="")
            await message.ack()
        except (aio_pika.exceptions.AMQPError, OSError) as exc:
            log.warning("relay.command_dead_letter_failed", code=code, error=repr(exc)[:300])
            with contextlib.suppress(aio_pika.exceptions.AMQPError, OSError):
                await message.nack(requeue=True)

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


def _describe(exc: BaseException) -> str:
    """Why the consumer is down, for the log and /readyz: the broker's own words where it gave some
    (a queue declared with other arguments is PRECONDITION_FAILED), no URL (it may hold a password)."""
    text = str(exc) or type(exc).__name__
    if "PRECONDITION_FAILED" in text:
        return f"the queue exists with other arguments (it must be a quorum queue): {text[:240]}"
    return f"{type(exc).__name__}: {text[:240]}"
