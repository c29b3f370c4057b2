"""Publishing to RabbitMQ with publisher confirms: the only module that knows aio-pika.

Why the care: the IM backend never retries, so "published" must mean *the broker confirmed it*.
* Confirms on, ``mandatory`` on, returns raise: for an unroutable message RabbitMQ sends
  ``basic.return`` and then ``basic.ack``, so an ack alone does not mean "queued".
* Every publish has a deadline: a hung broker may never confirm, and aiormq notices a frozen
  peer only after several heartbeats, surfacing it as ``CancelledError`` out of ``publish()``.
* One connection of our own, supervised here (not ``connect_robust``): we need to know exactly
  when the channel is usable for readiness, and we never want a publish parked on a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Protocol

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection
from yarl import URL

from relay.errors import PublishFailed
from relay.events import APP_ID, EVENT_TYPE, Envelope
from relay.metrics import Metrics

log = structlog.get_logger()

BINDING_KEY = f"{EVENT_TYPE}.#"
# Hung-broker detection takes ~3-4 heartbeats; 5 s keeps it near the publish timeout.
DEFAULT_HEARTBEAT = 5
_CONNECT_TIMEOUT = 10.0


class Publisher(Protocol):
    """The seam between dispatch and a broker: the AMQP publisher and test fakes satisfy it."""

    @property
    def ready(self) -> bool:
        """True while a publish can be attempted (connected, channel open, not blocked)."""

    async def publish(self, envelope: Envelope) -> None:
        """Return once the broker confirmed *envelope*; raise :class:`PublishFailed` otherwise."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def with_default_heartbeat(url: str) -> str:
    """Add ``heartbeat=5`` to the AMQP URL unless the operator chose one."""
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=DEFAULT_HEARTBEAT))


class AmqpPublisher:
    """Confirmed, persistent, mandatory publishes to one topic exchange over a supervised connection."""

    def __init__(
        self,
        url: str,
        exchange: str,
        queues: tuple[str, ...],
        publish_timeout: float,
        metrics: Metrics,
        *,
        connection_name: str = "revoke-relay",
        reconnect_max: float = 5.0,
    ) -> None:
        self._url = with_default_heartbeat(url)
        self._exchange_name = exchange
        self._queues = queues
        self._timeout = publish_timeout
        self._metrics = metrics
        self._name = connection_name
        self._reconnect_max = reconnect_max
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._last_confirm = 0.0  # monotonic time of the last confirm, or of the connection
        self._recycle: asyncio.Event | None = None
        self.connected = asyncio.Event()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start connecting in the background; the relay serves (and reports not-ready) meanwhile."""
        self._supervisor = asyncio.create_task(self._supervise(), name="amqp-supervisor")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._drop("closing")

    @property
    def ready(self) -> bool:
        channel = self._channel
        return self._exchange is not None and channel is not None and not channel.is_closed and not self.blocked

    @property
    def blocked(self) -> bool:
        """True while RabbitMQ has sent ``connection.blocked`` (memory or disk alarm).

        aiormq tracks it only in a private event; reading it here keeps the hack in one place.
        """
        connection = self._connection
        if connection is None or connection.transport is None:
            return False
        unblocked = getattr(connection.transport.connection, "_Connection__connection_unblocked", None)
        return isinstance(unblocked, asyncio.Event) and not unblocked.is_set()

    async def _supervise(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                await self._connect()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to connect means: retry later
                await self._drop("connect_failed")
                attempt += 1
                delay = min(self._reconnect_max, 0.2 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)  # noqa: S311
                log.warning("relay.broker_connect_failed", error=repr(exc)[:300], retry_in=round(delay, 2))
                await asyncio.sleep(delay)
                continue
            attempt = 0
            await self._watch()

    async def _connect(self) -> None:
        connection = await aio_pika.connect(
            self._url, timeout=_CONNECT_TIMEOUT, client_properties={"connection_name": self._name}
        )
        self._connection = connection  # type: ignore[assignment]
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        self._channel = channel
        exchange = await channel.declare_exchange(self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
        for name in self._queues:
            # Quorum queues: replicated, always durable; the recommended type for data safety.
            queue = await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})
            await queue.bind(exchange, BINDING_KEY)
        self._exchange = exchange
        self._last_confirm = time.monotonic()
        self._metrics.broker_connected.set(1)
        self._metrics.broker_connects.inc()
        self.connected.set()
        log.info("relay.broker_connected", exchange=self._exchange_name, queues=list(self._queues))

    async def _watch(self) -> None:
        """Wait until the connection or channel closes, tracking the blocked state meanwhile."""
        assert self._connection is not None
        assert self._channel is not None
        lost = asyncio.Event()
        self._recycle = lost
        self._connection.close_callbacks.add(lambda *_: lost.set())
        self._channel.close_callbacks.add(lambda *_: lost.set())
        was_blocked = False
        while not lost.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await lost.wait()
            blocked = self.blocked
            if blocked != was_blocked:
                was_blocked = blocked
                self._metrics.broker_blocked.set(int(blocked))
                log.warning("relay.broker_blocked" if blocked else "relay.broker_unblocked")
        await self._drop("connection_lost")

    async def _drop(self, why: str) -> None:
        was_up = self._exchange is not None
        connection = self._connection
        self._exchange = None
        self._channel = None
        self._connection = None
        self.connected.clear()
        self._metrics.broker_connected.set(0)
        self._metrics.broker_blocked.set(0)
        if was_up and why == "closing":
            log.info("relay.broker_closed")
        elif was_up:
            log.warning("relay.broker_disconnected", why=why)
        if connection is not None and not connection.is_closed:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(2):
                    await connection.close()

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        exchange = self._exchange
        if exchange is None or self._channel is None or self._channel.is_closed:
            raise self._failed("disconnected", "no open channel")
        if self.blocked:
            # Publishing now would sit in the socket buffer until the alarm clears; fail fast.
            raise self._failed("blocked", "broker resource alarm")
        message = aio_pika.Message(
            envelope.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type="application/json",
            message_id=envelope.event_id,
            timestamp=envelope.timestamp,
            type=EVENT_TYPE,
            app_id=APP_ID,
            headers=envelope.headers(),  # type: ignore[arg-type]
        )
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._timeout):
                await exchange.publish(message, envelope.routing_key, mandatory=True)
        except TimeoutError:
            self._maybe_recycle()
            raise self._failed("timeout", f"no confirm within {self._timeout}s", in_doubt=True) from None
        except aiormq.exceptions.PublishError as exc:  # basic.return: no queue is bound for the key
            raise self._failed("returned", str(exc)[:200]) from exc
        except aiormq.exceptions.DeliveryError as exc:  # basic.nack
            raise self._failed("nacked", str(exc)[:200]) from exc
        except aiormq.exceptions.ChannelInvalidStateError as exc:  # closed before we could send
            raise self._failed("disconnected", str(exc)[:200]) from exc
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise self._failed("disconnected", repr(exc)[:200], in_doubt=True) from exc
        except asyncio.CancelledError:
            # aiormq cancels pending confirms when it declares the connection dead; that is a
            # broker failure, unless *we* are being cancelled (shutdown), which must propagate.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise self._failed("disconnected", "connection lost before confirm", in_doubt=True) from None
        self._last_confirm = time.monotonic()
        self._metrics.confirm_seconds.observe(time.perf_counter() - started)
        self._metrics.publishes.labels("confirmed").inc()

    def _maybe_recycle(self) -> None:
        """A connection that stays open but has confirmed nothing for two publish timeouts is not
        trusted any more (frozen or half-dead broker, stuck channel): drop it and reconnect, rather
        than wait the several heartbeats aiormq needs to notice."""
        if self._recycle is not None and time.monotonic() - self._last_confirm > 2 * self._timeout:
            if not self._recycle.is_set():
                log.warning(
                    "relay.broker_unresponsive", seconds_without_confirm=round(time.monotonic() - self._last_confirm, 1)
                )
            self._recycle.set()

    def _failed(self, reason: str, detail: str, *, in_doubt: bool = False) -> PublishFailed:
        self._metrics.publish_failures.labels(reason).inc()
        self._metrics.publishes.labels(reason).inc()
        if in_doubt:
            self._metrics.publish_in_doubt.inc()
        return PublishFailed(reason, detail, in_doubt=in_doubt)
