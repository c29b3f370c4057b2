"""Reading the history stream over AMQP 0-9-1 with aio-pika, as RabbitMQ 3.10 allows it.

Measured on RabbitMQ 3.10.8 (docs/history.md): a consumer prefetch is required; messages may only be
acked (``basic.nack``/``basic.reject`` close the channel before 3.13), and an ack deletes nothing: it is
credit to read further. ``x-stream-offset`` takes ``first``, ``last`` (the last *chunk*), an offset or
a timestamp in seconds; reading from a timestamp starts at the chunk holding it, so the caller still
filters on the event's own time. A stream's ``queue.declare-ok`` always counts 0 messages, so where
the stream ends is learned by reading its last chunk first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, HeadersType

from relay import broker
from relay.endpoints import Endpoint, redact

PREFETCH = 1000
ACK_EVERY = 200  # acks go out with multiple=True: one frame per ACK_EVERY messages
# No delivery for this long: the stream has nothing more (for an empty stream, or a window after its end).
IDLE = 1.5
# Once the last chunk started arriving, this long without another of its messages: it is all here.
_LAST_CHUNK_SETTLE = 0.3
_LAST_CHUNK_MAX = 1.0


class HistoryError(Exception):
    """A history command cannot go on (no broker, no stream); the message says why, for the operator."""


@dataclass(frozen=True, slots=True)
class Record:
    """One entry of the stream: its offset, the body as published, and what a replay republishes."""

    offset: int
    body: bytes
    event: dict[str, object] | None  # the JSON body, or None when it is not a JSON object
    routing_key: str
    message_id: str | None
    headers: HeadersType  # as published (the broker's x-stream-offset removed)
    content_type: str | None
    type: str | None
    app_id: str | None
    timestamp: datetime | None

    @property
    def cloudevents_time(self) -> str | None:
        value = self.headers.get("cloudEvents_time")
        return value if isinstance(value, str) else None


def _record(message: AbstractIncomingMessage) -> Record:
    headers = dict(message.headers or {})
    offset = headers.pop("x-stream-offset", -1)
    try:
        event = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        event = None
    return Record(
        offset=offset if isinstance(offset, int) else -1,
        body=message.body,
        event=event if isinstance(event, dict) else None,
        routing_key=message.routing_key or "",
        message_id=message.message_id,
        headers=headers,
        content_type=message.content_type,
        type=message.type,
        app_id=message.app_id,
        timestamp=message.timestamp,
    )


async def connect(endpoints: Sequence[Endpoint], url: str, name: str) -> aio_pika.abc.AbstractConnection:
    """A connection to the first broker node that answers, or :class:`HistoryError` saying why none did."""
    try:
        return await broker.connect(endpoints, name=name, timeout=10)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        raise HistoryError(f"cannot connect to {redact(url)}: {exc}") from exc


class _Deliveries:
    """A stream consumer feeding an asyncio queue; prefetch bounds what is unacked (and so buffered)."""

    def __init__(self) -> None:
        self.items: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def put(self, message: AbstractIncomingMessage) -> None:
        self.items.put_nowait(message)

    async def next(self, timeout: float) -> AbstractIncomingMessage | None:
        try:
            async with asyncio.timeout(timeout):
                return await self.items.get()
        except TimeoutError:
            return None


async def _consume(channel: AbstractChannel, stream: str, offset: str | datetime) -> _Deliveries:
    await channel.set_qos(prefetch_count=PREFETCH)  # required on a stream (global=False: per consumer)
    queue = await channel.get_queue(stream, ensure=False)
    deliveries = _Deliveries()
    try:
        await queue.consume(deliveries.put, arguments={"x-stream-offset": offset})
    except aio_pika.exceptions.ChannelPreconditionFailed as exc:
        if "x-stream-offset" in str(exc):  # a quorum queue refuses the argument (measured on 3.10.8)
            raise _not_a_stream(stream) from exc
        raise
    return deliveries


def _not_a_stream(stream: str) -> HistoryError:
    return HistoryError(f"queue {stream!r} is not a stream; is RELAY_AUDIT_STREAM right?")


async def end_offset(connection: aio_pika.abc.AbstractConnection, stream: str, idle: float = IDLE) -> int | None:
    """The offset of the stream's last message now, or None when it holds none: read its last chunk."""
    channel = await connection.channel()
    try:
        deliveries = await _consume(channel, stream, "last")
        last: int | None = None
        wait, loop = idle, asyncio.get_running_loop()
        deadline: float | None = None
        while (message := await deliveries.next(wait)) is not None:
            offset = (message.headers or {}).get("x-stream-offset")
            if not isinstance(offset, int):
                # A classic or quorum queue ignores x-stream-offset: close without acking, so the
                # message goes back to it untouched (marked redelivered), and refuse.
                raise _not_a_stream(stream)
            last = offset if last is None else max(last, offset)
            await message.ack()
            # The chunk arrives in one burst; under steady traffic newer chunks follow, so stop soon.
            deadline = deadline or loop.time() + _LAST_CHUNK_MAX
            wait = min(_LAST_CHUNK_SETTLE, deadline - loop.time())
            if wait <= 0:
                break
        return last
    finally:
        with contextlib.suppress(Exception):
            await channel.close()


async def read(
    endpoints: Sequence[Endpoint],
    url: str,
    stream: str,
    since: datetime | None,
    *,
    name: str = "revoke-relay history",
    idle: float = IDLE,
) -> AsyncIterator[Record]:
    """Every entry from *since* (None: the first) to the stream's end as it was when this started,
    oldest first. Raises :class:`HistoryError` for a missing broker, a missing stream or a queue that
    is not a stream."""
    connection = await connect(endpoints, url, name)
    try:
        channel = await connection.channel()
        try:
            await channel.declare_queue(stream, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            if "down or inaccessible" in str(exc):
                raise HistoryError(f"stream {stream!r} is down on the broker (docs/history.md, known limits)") from exc
            raise HistoryError(
                f"stream {stream!r} does not exist; the relay declares it at start when RELAY_AUDIT_STREAM is set"
            ) from exc
        end = await end_offset(connection, stream, idle)
        if end is None:
            return
        # A timestamp is sent as an AMQP timestamp (seconds) by aio-pika's codec for a datetime.
        deliveries = await _consume(channel, stream, since if since is not None else "first")
        unacked = 0
        while (message := await deliveries.next(idle)) is not None:
            record = _record(message)
            if record.offset < 0:
                raise _not_a_stream(stream)
            unacked += 1
            if unacked >= ACK_EVERY:
                await message.ack(multiple=True)
                unacked = 0
            if record.offset > end:
                return
            yield record
            if record.offset >= end:
                return
    except aio_pika.exceptions.AMQPError as exc:
        raise HistoryError(f"the broker closed the stream's channel: {exc}") from exc
    finally:
        # Closing without a nack: unacked deliveries of a stream are simply forgotten (a nack would
        # be refused on 3.10 anyway). A consumer robust connection is not needed for a bounded read.
        with contextlib.suppress(Exception):
            await connection.close()
