"""Every Prometheus metric of the relay, in one place (documented in docs/metrics.md).

``relay_`` prefix, counters end in ``_total``, durations in seconds, labels bounded (never IDs).
The registry is passed in so each test gets a fresh one.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from relay.callback import KNOWN_COMMANDS
from relay.errors import Reject

# Fine resolution at the low end: a confirmed publish on a healthy broker takes ~1-20 ms, and the
# IM backend gives up after 2 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)

OUTCOMES = ("accepted", "partial", "ignored", "rejected", "unavailable")
PUBLISH_REASONS = ("disconnected", "blocked", "timeout", "returned", "nacked", "error")
CONVERSATION_TYPES = ("c2c", "group", "official_account")
# Fields that may be reported as anomalies (see normalize); anything else is "other".
ANOMALY_FIELDS = ("EventTime", "Reason", "RecallReason", "TopicId", "Type", "Operator_Account", "MsgId")


class Metrics:
    """The relay's collectors, registered on *registry*."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.callbacks = Counter(
            "relay_callbacks_total",
            "Callbacks received, by command (known commands or 'other') and outcome.",
            ["command", "outcome"],
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
        self.broker_connects = Counter(
            "relay_broker_connects_total",
            "Successful connections (first and re-connections) to RabbitMQ.",
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

    def anomaly(self, field: str) -> None:
        self.anomalies.labels(field if field in ANOMALY_FIELDS else "other").inc()
