"""Publishing to RabbitMQ with publisher confirms, over relay.amqp's connection.

Why the care: the IM backend never retries, so "published" must mean *the broker confirmed it*.
* Confirms on, ``mandatory`` on: for an unroutable message RabbitMQ sends ``basic.return`` and then
  ``basic.ack``, so an ack alone does not mean "queued"; a returned publish counts as failed.
* Every publish has a deadline: a hung broker may never confirm, and heartbeats notice a frozen
  peer only after two intervals.
* One connection of our own, supervised here: we know exactly when the channel is usable for
  readiness, and a publish never waits for a reconnect.
* Several endpoints (the nodes of a cluster): when the node in use dies, is cut off or stops
  confirming, the next connection goes to the next node at once. Waiting for the lost node would
  send every callback of the outage to the spool; a quorum queue lives on the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any, Protocol

import structlog
from pamqp import commands
from pamqp.common import FieldTable

from relay import amqp
from relay.endpoints import Endpoint, describe, parse_endpoints
from relay.errors import PublishFailed
from relay.events import APP_ID, CLOUDEVENTS_HEADERS, EVENT_TYPE, Envelope
from relay.metrics import Metrics
from relay.settings import Settings

log = structlog.get_logger()

BINDING_KEY = f"{EVENT_TYPE}.#"
# Audit queues (RELAY_AUDIT_QUEUES) take every event kind: revocations and the recall gateway's
# message.recall_requested / message.recall_failed (docs/recall-gateway.md).
AUDIT_BINDING_KEY = "message.#"
# Handshake and topology declaration on a healthy node take milliseconds; a node that accepts the
# socket but does not answer (frozen, partitioned) must not hold up the move to the next one for long.
_CONNECT_TIMEOUT = 5.0
# A connection that answers every publish with basic.nack for this long is replaced (see _maybe_recycle).
_NACK_RECYCLE_AFTER = 1.0
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


def stream_arguments(settings: Settings) -> dict[str, str | int]:
    """The history stream's retention as declared (RabbitMQ reads them at declaration; a policy can
    change them later). Data goes a whole segment at a time, so retention is approximate."""
    return {"x-max-age": settings.audit_stream_max_age, "x-max-length-bytes": settings.audit_stream_max_bytes}


class Publisher(Protocol):
    """The seam between dispatch and a broker: the AMQP publisher and test fakes satisfy it."""

    @property
    def ready(self) -> bool:
        """True while a publish can be attempted (connected, channel open, not blocked)."""

    async def publish(self, envelope: Envelope) -> None:
        """Return once the broker confirmed *envelope*; raise :class:`PublishFailed` otherwise."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    @property
    def endpoint(self) -> str | None:
        """``host:port`` of the broker node in use, or None while disconnected."""

    @property
    def connections(self) -> int:
        """Connections opened so far: a change means a fresh channel, worth retrying at once."""


class AmqpPublisher:
    """Confirmed, persistent, mandatory publishes to one topic exchange over a supervised connection."""

    def __init__(
        self,
        endpoints: str | tuple[Endpoint, ...],
        exchange: str,
        queues: tuple[str, ...],
        publish_timeout: float,
        metrics: Metrics,
        *,
        connection_name: str = "revoke-relay",
        reconnect_max: float = 5.0,
        audit_queues: tuple[str, ...] = (),
        audit_stream: str | None = None,
        stream_arguments: dict[str, str | int] | None = None,
    ) -> None:
        self._endpoints = parse_endpoints(endpoints) if isinstance(endpoints, str) else endpoints
        self._heartbeat = self._endpoints[0].heartbeat
        self._next = 0  # index of the endpoint the next connection attempt goes to
        self._in_use: Endpoint | None = None
        self._last_used: Endpoint | None = None  # the endpoint of the last connection, kept after it is lost
        self._lost_at: float | None = None  # monotonic time the last connection was lost
        self._first_confirm_pending = False
        self._stalled = False  # a publish timed out on this connection and nothing was confirmed since
        self.connections = 0
        self._nack_recycle_after = _NACK_RECYCLE_AFTER  # doubles with each such recycle, until a confirm
        self._rebinding: asyncio.Task[None] | None = None
        self._exchange = exchange
        self._bindings = tuple((q, BINDING_KEY) for q in queues) + tuple((q, AUDIT_BINDING_KEY) for q in audit_queues)
        # The history (docs/history.md): a stream takes every event kind, like an audit queue.
        self._stream = audit_stream
        self._stream_arguments = stream_arguments or {}
        if audit_stream is not None:
            self._bindings += ((audit_stream, AUDIT_BINDING_KEY),)
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
        self._history_down = False  # the stream's member is down for good (see _declare_queue): left out
        self.connected = asyncio.Event()

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics, *, connection_name: str = "revoke-relay"
    ) -> AmqpPublisher:
        return cls(
            settings.amqp_endpoints,
            settings.exchange,
            settings.queues,
            settings.publish_timeout,
            metrics,
            connection_name=connection_name,
            audit_queues=settings.audit_queues,
            audit_stream=settings.audit_stream,
            stream_arguments=stream_arguments(settings),
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
        """Connected with the exchange and queues declared (there is an endpoint in use), not blocked."""
        return self.endpoint is not None and not self.blocked

    @property
    def endpoint(self) -> str | None:
        connection = self._connection
        if self._in_use is None or connection is None or connection.closed.done():
            return None
        return self._in_use.display  # also while blocked by a resource alarm: still the node in use

    @property
    def blocked(self) -> bool:
        """True while RabbitMQ has sent ``connection.blocked`` (memory or disk alarm)."""
        return self._connection is not None and self._connection.blocked

    async def _supervise(self) -> None:
        attempt = 0  # rounds in a row in which no endpoint could be connected
        failed_in_round = 0
        count = len(self._endpoints)
        while not self._closing:
            endpoint = self._endpoints[self._next]
            try:
                await self._connect(endpoint)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure to connect means: try the next endpoint
                await self._drop("connect_failed")
                self._next = (self._next + 1) % count
                failed_in_round += 1
                # Straight on to the next endpoint; back off only once every endpoint failed in a row.
                delay = 0.0
                if failed_in_round >= count:
                    failed_in_round = 0
                    attempt += 1
                    delay = min(self._reconnect_max, 0.2 * 2 ** min(attempt, 6)) * random.uniform(0.5, 1.0)  # noqa: S311
                log.warning(
                    "relay.broker_connect_failed",
                    endpoint=endpoint.display,
                    error=describe(exc, endpoint),
                    retry_in=round(delay, 2),
                    next_endpoint=self._endpoints[self._next].display,
                )
                if delay:
                    await asyncio.sleep(delay)
                continue
            attempt = failed_in_round = 0
            await self._watch()
            # Do not wait for the node just lost: the next attempt goes to the next endpoint.
            self._next = (self._next + 1) % count

    async def _connect(self, endpoint: Endpoint) -> None:
        connection = await amqp.connect(
            endpoint, heartbeat_s=self._heartbeat, name=self._name, timeout=_CONNECT_TIMEOUT
        )
        self._connection = connection
        connection.publish_timeout = self._timeout
        first = self.connections == 0
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            await self._declare(connection, bind=first)
        if not first:
            self._rebinding = asyncio.create_task(self._rebind(connection), name="amqp-rebind")
        self._last_confirm = time.monotonic()
        self._recycle.clear()
        previous, self._in_use = self._last_used, endpoint
        self._last_used = endpoint
        self._first_confirm_pending = True
        self._stalled = False
        self._metrics.broker_connected.set(1)
        self._metrics.broker_connects.inc()
        self.connections += 1
        self.connected.set()
        log.info(
            "relay.broker_connected",
            endpoint=endpoint.display,
            exchange=self._exchange,
            queues=[q for q, _ in self._bindings],
        )
        if previous is not None and previous != endpoint:
            self._metrics.broker_failovers.inc()
            log.warning(
                "relay.broker_failover",
                endpoint=endpoint.display,
                previous=previous.display,
                seconds_since_lost=round(time.monotonic() - self._lost_at, 3) if self._lost_at else None,
            )

    async def _declare(self, connection: amqp.Connection, *, bind: bool) -> None:
        """Declare the exchange and the queues (cheap when they exist), and the bindings if *bind*."""
        await connection.call(
            commands.Exchange.Declare(exchange=self._exchange, exchange_type="topic", durable=True),
            commands.Exchange.DeclareOk,
        )
        for name, binding_key in self._live_bindings():
            if name not in self._bind_only:
                await self._declare_queue(connection, name)
            if bind:
                await self._bind(connection, name, binding_key, amqp.CHANNEL)

    def _live_bindings(self) -> tuple[tuple[str, str], ...]:
        return tuple((q, k) for q, k in self._bindings if not (self._history_down and q == self._stream))

    async def _bind(
        self, connection: amqp.Connection, queue: str, binding_key: str, channel: int, timeout: float = 10.0
    ) -> None:
        await connection.call(
            commands.Queue.Bind(queue=queue, exchange=self._exchange, routing_key=binding_key),
            commands.Queue.BindOk,
            channel=channel,
            timeout=timeout,
        )

    async def _rebind(self, connection: amqp.Connection) -> None:
        """Re-assert the bindings after a reconnection, on a channel of their own, without holding up
        publishing. Measured on RabbitMQ 3.10: Queue.Bind, even of an existing binding, takes a cluster-wide
        lock and blocks while a member is frozen or cut off but not yet declared down (net_ticktime,
        60 s by default); on the publishing channel it would stall every publish behind it. The
        bindings are durable and normally still there; this recreates them if the cluster lost them."""
        try:
            await connection.call(commands.Channel.Open(), commands.Channel.OpenOk, channel=amqp.TOPOLOGY_CHANNEL)
            for name, binding_key in self._live_bindings():
                await self._bind(connection, name, binding_key, amqp.TOPOLOGY_CHANNEL, timeout=120.0)
        except (amqp.AmqpError, TimeoutError) as exc:
            if not connection.closed.done():
                log.warning("relay.rebind_failed", error=describe(exc), queues=[q for q, _ in self._bindings])
        else:
            log.info("relay.rebound", queues=[q for q, _ in self._bindings])

    async def _declare_queue(self, connection: amqp.Connection, name: str) -> None:
        """Declare a quorum queue (replicated, always durable: the recommended type for data safety),
        or the history stream with its retention.

        If a consumer already declared it with other arguments (dead-lettering, delivery limit, …)
        the broker refuses with 406 and closes the channel. That queue is then only bound from the
        next connection on: the relay must not be kept from publishing by a queue it does not own.
        """
        arguments: FieldTable = {"x-queue-type": "quorum"}
        if name == self._stream:
            arguments = {"x-queue-type": "stream", **self._stream_arguments}
        try:
            await connection.call(
                commands.Queue.Declare(queue=name, durable=True, arguments=arguments),
                commands.Queue.DeclareOk,
            )
        except amqp.AmqpError as exc:
            if exc.code == 404 and name == self._stream:
                # Measured on 3.10.8: a stream whose node crashed within about a second of its declaration
                # comes back `down` for good (a restart does not help, queue.delete says not found), and
                # declaring it fails with 404 "home node ... is down or inaccessible". The history must not
                # stop delivery: from the next connection on it is left out (its durable binding still
                # routes to it, and the broker confirms those publishes). docs/history.md, known limits.
                self._history_down = True
                log.error(
                    "relay.history_stream_down",
                    stream=name,
                    detail=str(exc)[:300],
                    remedy="set RELAY_AUDIT_STREAM to a new name and restart the relay",
                )
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
        await self._drop("unresponsive" if self._recycle.is_set() else "connection_lost")

    async def _drop(self, why: str) -> None:
        if self._rebinding is not None:
            self._rebinding.cancel()  # holds the connection's RPC slot: Close must not wait behind it
            with contextlib.suppress(asyncio.CancelledError):
                await self._rebinding
            self._rebinding = None
        connection = self._connection
        was_up = self.connected.is_set()
        self._connection = None
        if was_up:
            self._lost_at = time.monotonic()
        endpoint, self._in_use = self._in_use, None
        self.connected.clear()
        self._metrics.broker_connected.set(0)
        self._metrics.broker_blocked.set(0)
        if was_up and why == "closing":
            log.info("relay.broker_closed")
        elif was_up:
            reason = connection.closed.result() if connection is not None and connection.closed.done() else None
            log.warning(
                "relay.broker_disconnected",
                why=why,
                endpoint=endpoint.display if endpoint is not None else None,
                error=describe(reason) if reason is not None else None,
            )
        if connection is None:
            return
        if why == "unresponsive":
            # It answers nothing: waiting for its Close-Ok would only delay the move to the next node.
            connection.abort("replaced: unresponsive")
            return
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
            self._stalled = True
            self._maybe_recycle("timeout", 2 * self._timeout)
            raise self._failed("timeout", f"no confirm within {self._timeout}s", in_doubt=True) from None
        except amqp.Returned as exc:  # basic.return: no queue is bound for the key
            raise self._failed("returned", str(exc)) from exc
        except amqp.Nacked as exc:
            if self._first_confirm_pending:
                self._maybe_recycle("nacked", self._nack_recycle_after)
            raise self._failed("nacked", str(exc)) from exc
        except amqp.AmqpError as exc:
            raise self._failed("disconnected", str(exc)[:200], in_doubt=exc.in_doubt) from exc
        except asyncio.CancelledError:
            # Our own cancellation (shutdown) must propagate; nothing else cancels this future.
            raise
        now = time.monotonic()
        if self._first_confirm_pending or self._stalled:
            self._nack_recycle_after = _NACK_RECYCLE_AFTER
            self._confirming_again(connection, now - self._last_confirm)
        self._last_confirm = now
        self._metrics.confirm_seconds.observe(time.perf_counter() - started)
        self._metrics.child(self._metrics.publishes, "confirmed").inc()

    def _confirming_again(self, connection: amqp.Connection, without_confirm: float) -> None:
        """Log the first confirm of a connection (with a lost node behind it: the end of the failover),
        and the first after confirms stalled on a live one (e.g. a quorum queue electing a new leader)."""
        if connection is not self._connection or self._in_use is None:
            return
        if self._first_confirm_pending:
            log.info(
                "relay.broker_confirming",
                endpoint=self._in_use.display,
                seconds_since_lost=round(time.monotonic() - self._lost_at, 3) if self._lost_at else None,
            )
        else:
            log.info(
                "relay.broker_confirms_resumed",
                endpoint=self._in_use.display,
                seconds_without_confirm=round(without_confirm, 3),
            )
        self._first_confirm_pending = self._stalled = False

    def _maybe_recycle(self, reason: str, after: float) -> None:
        """Drop a connection that stays open but has confirmed nothing for *after* seconds, and
        reconnect (to the next endpoint) rather than wait for heartbeats to notice.

        ``timeout``: no confirm for two publish timeouts (frozen or half-dead node, stuck channel).
        ``nacked``: a new connection has answered nothing but nacks for a second. Seen on RabbitMQ
        3.10 when a channel first publishes to a quorum queue while the leader it knows of is down:
        it asks that node to register the publisher, gets nodedown, nacks, and asks the same node
        again on every publish until the node is back. A new channel starts from the new leader,
        elected in under a second. Only connections that never confirmed are replaced, and the wait
        doubles with each replacement until something is confirmed: a queue that refuses publishes
        for good (x-overflow reject-publish, full) must not cause a reconnection every second.
        """
        silent = time.monotonic() - self._last_confirm
        if silent > after and not self._recycle.is_set():
            if reason == "nacked":
                self._nack_recycle_after = min(60.0, 2 * self._nack_recycle_after)
            log.warning(
                "relay.broker_unresponsive",
                reason=reason,
                seconds_without_confirm=round(silent, 1),
                endpoint=self._in_use.display if self._in_use is not None else None,
            )
            self._recycle.set()

    def _failed(self, reason: str, detail: str, *, in_doubt: bool = False) -> PublishFailed:
        self._metrics.publish_failures.labels(reason).inc()
        self._metrics.publishes.labels(reason).inc()
        if in_doubt:
            self._metrics.publish_in_doubt.inc()
        return PublishFailed(reason, detail, in_doubt=in_doubt)
