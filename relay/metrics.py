"""Every Prometheus metric of the relay, in one place (documented in docs/metrics.md).

``relay_`` prefix, counters end in ``_total``, durations in seconds, labels bounded (never IDs).
The registry is passed in so each test gets a fresh one.
"""

from __future__ import annotations

from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.callback import KNOWN_COMMANDS
from relay.errors import Reject

# Fine resolution at the low end: a confirmed publish on a healthy broker takes ~1-20 ms, and the
# IM backend gives up after 2 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)

OUTCOMES = ("accepted", "partial", "ignored", "rejected", "unavailable")
PUBLISH_REASONS = ("disconnected", "blocked", "timeout", "returned", "nacked", "error")
PUBLISH_OUTCOMES = ("confirmed", *PUBLISH_REASONS)
SPOOL_WRITE_FAILURES = ("full", "unavailable")
LOOKUP_RESULTS = ("hit", "miss", "error", "disabled")
STORE_OPS = ("get", "put")
CONVERSATION_TYPES = ("c2c", "group", "official_account")
# Fields that may be reported as anomalies (see normalize); anything else is "other".
ANOMALY_FIELDS = ("EventTime", "Reason", "RecallReason", "TopicId", "Type", "Operator_Account", "MsgId")


class SpoolGauges(Protocol):
    max_bytes: int
    available: bool

    @property
    def events(self) -> int: ...

    @property
    def bytes(self) -> int: ...

    def oldest_age(self) -> float: ...


class Metrics:
    """The relay's collectors, registered on *registry*."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.callbacks = Counter(
            "relay_callbacks_total",
            "Callbacks received, by command (known commands or 'other') and outcome.",
            ["command", "outcome"],
            registry=registry,
        )
        self.callbacks_via_aiohttp = Counter(
            "relay_http_callbacks_via_aiohttp_total",
            "Callback requests answered by aiohttp rather than the HTTP fast path (unusual request"
            " shape, or RELAY_HTTP_FAST_PATH=off).",
            registry=registry,
        )
        self.rejections = Counter(
            "relay_callback_rejections_total",
            "Callbacks (or items of one) refused, by stable error code.",
            ["reason"],
            registry=registry,
        )
        self.anomalies = Counter(
            "relay_payload_anomalies_total",
            "Optional callback fields ignored because of a wrong type or absurd value.",
            ["field"],
            registry=registry,
        )
        self.events_published = Counter(
            "relay_events_published_total",
            "Events confirmed by RabbitMQ, by conversation type.",
            ["conversation_type"],
            registry=registry,
        )
        self.publish_failures = Counter(
            "relay_publish_failures_total",
            "Publishes not confirmed, by reason.",
            ["reason"],
            registry=registry,
        )
        self.publish_in_doubt = Counter(
            "relay_publish_in_doubt_total",
            "Publishes that failed after the frame may have reached the broker (possible duplicates).",
            registry=registry,
        )
        self.confirm_seconds = Histogram(
            "relay_publish_confirm_seconds",
            "Time from publish to broker confirm.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.request_seconds = Histogram(
            "relay_request_seconds",
            "Time to answer a callback, by outcome.",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            "relay_requests_in_flight",
            "Callbacks being handled now; past RELAY_MAX_IN_FLIGHT new ones get 503 overloaded.",
            registry=registry,
        )
        self.broker_connected = Gauge(
            "relay_broker_connected",
            "1 while a publishing connection and channel to RabbitMQ are open.",
            registry=registry,
        )
        self.broker_blocked = Gauge(
            "relay_broker_blocked",
            "1 while RabbitMQ blocks the publishing connection (resource alarm).",
            registry=registry,
        )
        self.publishes = Counter(
            "relay_publishes_total",
            "Publish attempts (direct and from the spool) by outcome: confirmed or the failure reason.",
            ["outcome"],
            registry=registry,
        )
        self.events_spooled = Counter(
            "relay_events_spooled_total",
            "Events written durably to the local spool instead of being confirmed directly.",
            registry=registry,
        )
        self.events_drained = Counter(
            "relay_events_drained_total",
            "Spooled events forwarded to RabbitMQ, confirmed, and removed from the spool.",
            registry=registry,
        )
        self.spool_write_seconds = Histogram(
            "relay_spool_write_seconds",
            "Time for a durable (fsync'd) spool write, batched writes included.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.spool_write_failures = Counter(
            "relay_spool_write_failures_total",
            "Spool writes refused: full (RELAY_SPOOL_MAX_BYTES or disk) or unavailable (I/O, permissions).",
            ["reason"],
            registry=registry,
        )
        self.spool_events = Gauge("relay_spool_events", "Events waiting in the spool.", registry=registry)
        self.spool_bytes = Gauge("relay_spool_bytes", "Bytes charged to the spool.", registry=registry)
        self.spool_capacity_bytes = Gauge("relay_spool_capacity_bytes", "RELAY_SPOOL_MAX_BYTES.", registry=registry)
        self.spool_oldest_age = Gauge(
            "relay_spool_oldest_age_seconds", "Age of the oldest spooled event (0 when empty).", registry=registry
        )
        self.spool_available = Gauge(
            "relay_spool_available", "1 while the spool accepts writes (open, writable).", registry=registry
        )
        self.correlation_lookups = Counter(
            "relay_correlation_lookups_total",
            "Recall events by enrichment result: hit, miss, error (store down or slow), disabled.",
            ["result"],
            registry=registry,
        )
        self.correlation_store_seconds = Histogram(
            "relay_correlation_store_seconds",
            "Correlation store round trips: get (one per recall callback), put (one per batch of sends).",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.correlation_store_errors = Counter(
            "relay_correlation_store_errors_total",
            "Correlation store operations that failed.",
            ["op"],
            registry=registry,
        )
        self.correlation_writes = Counter(
            "relay_correlation_writes_total",
            "Send records written to the correlation store.",
            registry=registry,
        )
        self.correlation_dropped = Counter(
            "relay_correlation_dropped_total",
            "Send records not stored (queue full or write failed); their recalls will not be enriched.",
            registry=registry,
        )
        self.correlation_memory_entries = Gauge(
            "relay_correlation_memory_entries",
            "Send records held by the embedded (in-memory) store; 0 with Redis.",
            registry=registry,
        )
        self.broker_connects = Counter(
            "relay_broker_connects_total",
            "Successful connections (first and re-connections) to RabbitMQ.",
            registry=registry,
        )
        self.broker_failovers = Counter(
            "relay_broker_failovers_total",
            "Connections opened to another RabbitMQ endpoint than the one used before (RELAY_AMQP_URL lists"
            " several nodes).",
            registry=registry,
        )
        self._prime()

    def _prime(self) -> None:
        """Create every bounded label combination at zero so rates and alerts see the series at once."""
        for command in (*sorted(KNOWN_COMMANDS), "other"):
            for outcome in OUTCOMES:
                self.callbacks.labels(command, outcome)
        for code in Reject:
            self.rejections.labels(code.value)
        for field in (*ANOMALY_FIELDS, "other"):
            self.anomalies.labels(field)
        for ctype in CONVERSATION_TYPES:
            self.events_published.labels(ctype)
        for reason in PUBLISH_REASONS:
            self.publish_failures.labels(reason)
        for outcome in OUTCOMES:
            self.request_seconds.labels(outcome)
        for outcome in PUBLISH_OUTCOMES:
            self.publishes.labels(outcome)
        for reason in SPOOL_WRITE_FAILURES:
            self.spool_write_failures.labels(reason)
        for result in LOOKUP_RESULTS:
            self.correlation_lookups.labels(result)
        for op in STORE_OPS:
            self.correlation_store_seconds.labels(op)
            self.correlation_store_errors.labels(op)

    def watch_spool(self, spool: SpoolGauges) -> None:
        """Read the spool's state at scrape time (no bookkeeping on the hot path)."""
        self.spool_events.set_function(lambda: spool.events)
        self.spool_bytes.set_function(lambda: spool.bytes)
        self.spool_capacity_bytes.set(spool.max_bytes)
        self.spool_oldest_age.set_function(spool.oldest_age)
        self.spool_available.set_function(lambda: int(spool.available))

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the hot path pays a dict lookup instead of prometheus_client's
        validation and lock (~0.1 µs against ~1.4 µs). Labels are bounded, so the cache is too."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def anomaly(self, field: str) -> None:
        self.anomalies.labels(field if field in ANOMALY_FIELDS else "other").inc()
