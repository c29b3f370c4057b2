"""Publishing to RabbitMQ with publisher confirms, over relay.amqp's connection.

Why the care: the IM backend never retries, so "published" must mean *the broker confirmed it*.
* Confirms on, ``mandatory`` on: for an unroutable message RabbitMQ sends ``basic.return`` and then
  ``basic.ack``, so an ack alone does not mean "queued"; a returned publish counts as failed.
* Every publish has a deadline: a hung broker may never confirm, and heartbeats notice a frozen
  peer only after two intervals.
* One connection of our own, supervised here: we know exactly when the channel is usable for
  readiness, and a publish never waits for a reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any, Protocol

import structlog
from pamqp import commands
from yarl import URL

from relay import amqp
from relay.errors import PublishFailed
from relay.events import APP_ID, CLOUDEVENTS_HEADERS, EVENT_TYPE, Envelope
from relay.metrics import Metrics
from relay.settings import Settings

log = structlog.get_logger()

BINDING_KEY = f"{EVENT_TYPE}.#"
# Audit queues (RELAY_AUDIT_QUEUES) take every event kind: revocations and the recall gateway's
# message.recall_requested / message.recall_failed (docs/recall-gateway.md).
AUDIT_BINDING_KEY = "message.#"
# Hung-broker detection takes two heartbeats; 5 s keeps it near the publish timeout.
DEFAULT_HEARTBEAT = 5
_CONNECT_TIMEOUT = 10.0
_TEMPLATES: dict[str, amqp.PropertiesTemplate] = {}


def _properties(event_type: str) -> amqp.PropertiesTemplate:
    """The encoded-once AMQP properties of one event type (a handful of types exist)."""
    template = _TEMPLATES.get(event_type)
    if template is None:
        template = _TEMPLATES[event_type] = amqp.PropertiesTemplate(
            content_type="application/json",
            delivery_mode=2,  # persistent
            type=event_type,
            app_id=APP_ID,
            header_keys=CLOUDEVENTS_HEADERS,
        )
    return template


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
    """Add ``heartbeat=5`` to the AMQP URL unless the operator chose one (for aio-pika clients)."""
    parsed = URL(url)
    if "heartbeat" in parsed.query:
        return url
    return str(parsed.update_query(heartbeat=DEFAULT_HEARTBEAT))


def heartbeat_of(url: str) -> int:
    """The ``heartbeat`` query parameter of the AMQP URL (seconds), or 5."""
    value = URL(url).query.get("heartbeat")
    return int(value) if value is not None and value.isdigit() else DEFAULT_HEARTBEAT


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
        audit_queues: tuple[str, ...] = (),
    ) -> None:
        self._url = url
        self._heartbeat = heartbeat_of(url)
        self._exchange = exchange
        self._bindings = tuple((q, BINDING_KEY) for q in queues) + tuple((q, AUDIT_BINDING_KEY) for q in audit_queues)
        self._timeout = publish_timeout
        self._metrics = metrics
        self._name = connection_name
        self._reconnect_max = reconnect_max
        self._connection: amqp.Connection | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._closing = False
        self._last_confirm = 0.0  # monotonic time of the last confirm, or of the connection
        self._recycle = asyncio.Event()
        self._bind_only: set[str] = set()  # queues that exist with other arguments: bind, never re-declare
        self.connected = asyncio.Event()

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics, *, connection_name: str = "revoke-relay"
    ) -> AmqpPublisher:
        return cls(
            settings.amqp_url,
            settings.exchange,
            settings.queues,
            settings.publish_timeout,
            metrics,
            connection_name=connection_name,
            audit_queues=settings.audit_queues,
        )

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
        connection = self._connection
        return connection is not None and not connection.closed.done() and not connection.blocked

    @property
    def blocked(self) -> bool:
        """True while RabbitMQ has sent ``connection.blocked`` (memory or disk alarm)."""
        return self._connection is not None and self._connection.blocked

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
        connection = await amqp.connect(
            self._url, heartbeat_s=self._heartbeat, name=self._name, timeout=_CONNECT_TIMEOUT
        )
        self._connection = connection
        connection.publish_timeout = self._timeout
        await connection.call(
            commands.Exchange.Declare(exchange=self._exchange, exchange_type="topic", durable=True),
            commands.Exchange.DeclareOk,
        )
        for name, binding_key in self._bindings:
            if name not in self._bind_only:
                await self._declare_queue(connection, name)
            await connection.call(
                commands.Queue.Bind(queue=name, exchange=self._exchange, routing_key=binding_key),
                commands.Queue.BindOk,
            )
        self._last_confirm = time.monotonic()
        self._recycle.clear()
        self._metrics.broker_connected.set(1)
        self._metrics.broker_connects.inc()
        self.connected.set()
        log.info("relay.broker_connected", exchange=self._exchange, queues=[q for q, _ in self._bindings])

    async def _declare_queue(self, connection: amqp.Connection, name: str) -> None:
        """Declare a quorum queue (replicated, always durable: the recommended type for data safety).

        If a consumer already declared it with other arguments (dead-lettering, delivery limit, …)
        the broker refuses with 406 and closes the channel. That queue is then only bound from the
        next connection on: the relay must not be kept from publishing by a queue it does not own.
        """
        try:
            await connection.call(
                commands.Queue.Declare(queue=name, durable=True, arguments={"x-queue-type": "quorum"}),
                commands.Queue.DeclareOk,
            )
        except amqp.AmqpError as exc:
            if exc.code == 406:  # PRECONDITION_FAILED: exists with different arguments
                self._bind_only.add(name)
                log.warning("relay.queue_exists_with_other_arguments", queue=name, detail=str(exc)[:300])
            raise

    async def _watch(self) -> None:
        """Wait until the connection closes or must be recycled, tracking the blocked state meanwhile."""
        connection = self._connection
        assert connection is not None
        was_blocked = False
        recycle = asyncio.ensure_future(self._recycle.wait())
        either: set[asyncio.Future[Any]] = {connection.closed, recycle}
        while not connection.closed.done() and not self._recycle.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.25):
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if connection.blocked != was_blocked:
                was_blocked = connection.blocked
                self._metrics.broker_blocked.set(int(was_blocked))
                log.warning("relay.broker_blocked" if was_blocked else "relay.broker_unblocked")
        recycle.cancel()
        await self._drop("connection_lost")

    async def _drop(self, why: str) -> None:
        connection = self._connection
        was_up = self.connected.is_set()
        self._connection = None
        self.connected.clear()
        self._metrics.broker_connected.set(0)
        self._metrics.broker_blocked.set(0)
        if was_up and why == "closing":
            log.info("relay.broker_closed")
        elif was_up:
            log.warning("relay.broker_disconnected", why=why)
        if connection is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await connection.close(timeout=2.0)

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, envelope: Envelope) -> None:
        connection = self._connection
        if connection is None or connection.closed.done():
            raise self._failed("disconnected", "no open channel")
        if connection.blocked:
            # Publishing now would sit in the socket buffer until the alarm clears; fail fast.
            raise self._failed("blocked", "broker resource alarm")
        properties = _properties(envelope.type).encode(envelope.event_id, envelope.timestamp, envelope.header_values())
        started = time.perf_counter()
        try:
            await connection.publish(self._exchange, envelope.routing_key, envelope.body, properties, envelope.event_id)
        except amqp.ConfirmTimeout:
            self._maybe_recycle()
            raise self._failed("timeout", f"no confirm within {self._timeout}s", in_doubt=True) from None
        except amqp.Returned as exc:  # basic.return: no queue is bound for the key
            raise self._failed("returned", str(exc)) from exc
        except amqp.Nacked as exc:
            raise self._failed("nacked", str(exc)) from exc
        except amqp.AmqpError as exc:
            raise self._failed("disconnected", str(exc)[:200], in_doubt=exc.in_doubt) from exc
        except asyncio.CancelledError:
            # Our own cancellation (shutdown) must propagate; nothing else cancels this future.
            raise
        self._last_confirm = time.monotonic()
        self._metrics.confirm_seconds.observe(time.perf_counter() - started)
        self._metrics.child(self._metrics.publishes, "confirmed").inc()

    def _maybe_recycle(self) -> None:
        """A connection that stays open but has confirmed nothing for two publish timeouts is not
        trusted any more (frozen or half-dead broker, stuck channel): drop it and reconnect, rather
        than wait for heartbeats to notice."""
        if time.monotonic() - self._last_confirm > 2 * self._timeout and not self._recycle.is_set():
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
