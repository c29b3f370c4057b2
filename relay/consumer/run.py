"""The :class:`Consumer`: reads a queue or the history stream, applies each event once through an
:class:`~relay.consumer.inbox.Inbox`, and acks only after the inbox's transaction committed.

Protocol facts it relies on (docs/consuming.md): a quorum queue counts deliveries in
``x-delivery-count``, so a message that keeps failing is rejected without requeue after
``max_attempts`` and goes to the queue's dead-letter exchange. A stream (RabbitMQ 3.10) may only be
acked: a nack or reject closes the channel, so a stream event that keeps failing stops the consumer,
naming it. The connection is our own (not aio-pika's robust one): a robust connection would restore
a stream consumer at its first ``x-stream-offset``, while ours resumes after the inbox's stored offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage

from relay import broker
from relay.consumer.event import Event, EventError
from relay.consumer.inbox import Inbox

log = structlog.get_logger()

Handler = Callable[[Event, Any], Awaitable[None]]  # (event, tx): tx is the inbox's open transaction


class ConsumerError(Exception):
    """The consumer cannot go on: the queue is missing, or a stream event failed ``max_attempts`` times."""


@dataclass
class Stats:
    handled: int = 0  # the handler ran and its transaction committed
    duplicates: int = 0  # eventID applied before: acked without calling the handler
    failures: int = 0  # the handler raised (each attempt)
    dead_lettered: int = 0  # rejected without requeue: to the queue's dead-letter exchange
    malformed: int = 0  # not an event this kit reads (also dead-lettered on a queue)
    newer_versions: int = 0  # a version above the kit's: parsed by the fields it knows
    reconnects: int = 0


class Consumer:
    """Consume *queue* (an existing queue) or *stream* (from *start*, or after the stored offset)."""

    def __init__(
        self,
        url: str,
        *,
        handler: Handler,
        inbox: Inbox,
        queue: str | None = None,
        stream: str | None = None,
        start: str | datetime = "first",
        max_attempts: int = 5,
        prefetch: int = 20,
        name: str = "revoke-relay consumer",
        reconnect_interval: float = 2.0,
        retry_delay: float = 0.5,
    ) -> None:
        if (queue is None) == (stream is None):
            raise ValueError("give exactly one of queue= and stream=")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.url, self.handler, self.inbox = url, handler, inbox
        self.queue, self.stream, self.start = queue, stream, start
        self.max_attempts, self.prefetch, self.name = max_attempts, prefetch, name
        self.reconnect_interval, self.retry_delay = reconnect_interval, retry_delay
        self.stats = Stats()
        self._stopping = asyncio.Event()
        self._attempts: dict[str, int] = {}  # eventID -> failed attempts, for queues that do not count

    async def stop(self) -> None:
        """Stop after the message in hand (handled and acked, or left unacked for redelivery)."""
        self._stopping.set()

    async def run(self) -> None:
        """Consume until :meth:`stop`, SIGTERM/SIGINT or cancellation; reconnects by itself.
        Raises :class:`ConsumerError` when it cannot go on."""
        loop = asyncio.get_running_loop()
        signals: list[signal.Signals] = []
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(signum, self._stopping.set)
                signals.append(signum)
        await self.inbox.start()
        try:
            while not self._stopping.is_set():
                try:
                    await self._session()
                except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
                    if self._stopping.is_set():
                        break
                    self.stats.reconnects += 1
                    log.warning("relay.consumer_reconnecting", error=repr(exc)[:300], retry_in=self.reconnect_interval)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.reconnect_interval):
                            await self._stopping.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            await self.inbox.close()
        log.info("relay.consumer_stopped", **vars(self.stats))

    async def _session(self) -> None:
        connection = await broker.connect(self.url, name=self.name)
        lost = asyncio.Event()
        connection.close_callbacks.add(lambda *_: lost.set())
        try:
            channel = await connection.channel()
            channel.close_callbacks.add(lambda *_: lost.set())
            await channel.set_qos(prefetch_count=self.prefetch)  # required on a stream; bounds work in flight
            source = self.queue if self.queue is not None else self.stream
            assert source is not None
            try:
                queue = await channel.declare_queue(source, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity as exc:
                raise ConsumerError(f"queue {source!r} does not exist (declare it before consuming)") from exc
            arguments: dict[str, Any] = {}
            last: int | None = None
            if self.stream is not None:
                last = await self.inbox.last_offset(self.stream)
                arguments["x-stream-offset"] = last + 1 if last is not None else self.start
            deliveries: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

            async def put(message: AbstractIncomingMessage) -> None:
                deliveries.put_nowait(message)

            await queue.consume(put, arguments=arguments)
            log.info("relay.consumer_started", source=source, resume_after=last)
            while not self._stopping.is_set() and not lost.is_set():
                message = await self._next(deliveries, lost)
                if message is not None:
                    await self._settle(message, last)
            if lost.is_set() and not self._stopping.is_set():
                raise aio_pika.exceptions.AMQPConnectionError("the connection or channel closed")
        finally:
            with contextlib.suppress(Exception):
                await connection.close()

    async def _next(
        self, deliveries: asyncio.Queue[AbstractIncomingMessage], lost: asyncio.Event
    ) -> AbstractIncomingMessage | None:
        getter = asyncio.ensure_future(deliveries.get())
        waiters = {getter, asyncio.ensure_future(self._stopping.wait()), asyncio.ensure_future(lost.wait())}
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return getter.result() if getter.done() and not getter.cancelled() else None

    async def _settle(self, message: AbstractIncomingMessage, resumed_after: int | None) -> None:
        header = (message.headers or {}).get("x-stream-offset") if self.stream is not None else None
        offset = header if isinstance(header, int) else None
        if offset is not None and resumed_after is not None and offset <= resumed_after:
            await message.ack()  # before the resume point (a chunk starts earlier): applied already
            return
        try:
            event = Event.parse(message.body)
        except EventError as exc:
            self.stats.malformed += 1
            if self.stream is not None:
                raise ConsumerError(f"stream {self.stream!r} offset {offset}: {exc}") from exc
            log.warning("relay.consumer_malformed", message_id=message.message_id, error=str(exc))
            await message.reject(requeue=False)  # retrying cannot fix it: to the dead-letter exchange
            return
        if event.newer:
            self.stats.newer_versions += 1
        if self.stream is not None:
            await self._apply_stream(message, event, offset)
        else:
            await self._apply_queue(message, event)

    async def _apply(self, event: Event, offset: int | None) -> bool:
        async def handle(tx: Any) -> None:
            await self.handler(event, tx)

        return await self.inbox.apply(event.event_id, handle, stream=self.stream, offset=offset)

    async def _apply_queue(self, message: AbstractIncomingMessage, event: Event) -> None:
        try:
            fresh = await self._apply(event, None)
        except Exception as exc:  # noqa: BLE001 - the handler's failure: rolled back, retried or dead-lettered
            self.stats.failures += 1
            counted = (message.headers or {}).get("x-delivery-count")  # quorum queues: earlier deliveries
            seen = self._attempts[event.event_id] = self._attempts.get(event.event_id, 0) + 1
            attempt = max(seen, counted + 1 if isinstance(counted, int) else 1)
            if attempt >= self.max_attempts:
                self.stats.dead_lettered += 1
                self._attempts.pop(event.event_id, None)
                log.error("relay.consumer_dead_lettered", event_id=event.event_id, attempts=attempt, error=repr(exc))
                await message.reject(requeue=False)
            else:
                log.warning("relay.consumer_retry", event_id=event.event_id, attempt=attempt, error=repr(exc))
                await message.reject(requeue=True)
            return
        self._attempts.pop(event.event_id, None)
        self._count(fresh)
        await message.ack()  # after the commit: a crash before this line redelivers, and the inbox skips it

    async def _apply_stream(self, message: AbstractIncomingMessage, event: Event, offset: int | None) -> None:
        for attempt in range(1, self.max_attempts + 1):
            try:
                fresh = await self._apply(event, offset)
            except Exception as exc:
                self.stats.failures += 1
                log.warning("relay.consumer_retry", event_id=event.event_id, attempt=attempt, error=repr(exc))
                if attempt == self.max_attempts:
                    # Never nack on a stream (it closes the channel on 3.10, and skipping would lose
                    # the event silently): stop, naming it. A restart resumes at this event.
                    raise ConsumerError(
                        f"event {event.event_id} (stream {self.stream!r} offset {offset}) failed"
                        f" {self.max_attempts} times: {exc!r}"
                    ) from exc
                await asyncio.sleep(self.retry_delay * attempt)
                continue
            self._count(fresh)
            await message.ack()  # credit to read on; the stream keeps the entry either way
            return

    def _count(self, fresh: bool) -> None:
        if fresh:
            self.stats.handled += 1
        else:
            self.stats.duplicates += 1
