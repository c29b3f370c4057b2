"""Recall events enriched from send records and joined to recall-gateway requests, within a budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace

from relay.events import Enrichment, RevokeEvent
from relay.joins import _is_rest, apply_request, recall_key_of
from relay.metrics import Metrics
from relay.store.base import CorrelationStore, SendRecord, correlation_key

_BREAKER_SECONDS = 1.0
# Failures in a row before the store is skipped for _BREAKER_SECONDS. Lookups that were already
# waiting when a failure was seen fail with it and count once: one slow answer or a pause of the
# relay itself costs the lookups in flight, not a second of recalls; a dead store opens the breaker
# after three budgets.
_BREAKER_AFTER = 3


class Enricher:
    """Applies send records and recall-gateway requests to recall events; never raises, never
    waits past its budget. *sends*: send records are kept (``RELAY_ENRICHMENT``); *recalls*: the
    recall gateway is on, so recall callbacks the gateway caused are joined to their requests.
    *admin*: the App admin the gateway calls Tencent as (``RELAY_TENCENT_ADMIN``): a REST recall
    that names another operator was not the gateway's."""

    def __init__(
        self,
        store: CorrelationStore | None,
        metrics: Metrics,
        *,
        budget: float,
        evidence: bool,
        sends: bool = True,
        recalls: bool = False,
        admin: str = "administrator",
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._budget = budget
        self._evidence = evidence
        self.sends = sends and store is not None
        self._recalls = recalls and store is not None
        self._admin = admin
        self._open_until = 0.0  # circuit breaker: skip lookups briefly after failures in a row
        self._failures = 0  # failures in a row (kept past an open breaker: one more reopens it)
        self._failed_at = float("-inf")  # when the last failure was seen

    async def record(self, records: Sequence[SendRecord]) -> None:
        if self.store is not None and self.sends and records:
            await self.store.submit(records)

    @property
    def unmatched(self) -> Enrichment:
        """What an event says when no send record is found for it: ``normalize`` marks events so
        from the start, and most events then need no copy here."""
        return "miss" if self.sends else "disabled"

    async def enrich(self, events: Sequence[RevokeEvent]) -> list[RevokeEvent]:
        if not events:
            return []
        store = self.store
        if store is None or not (self.sends or self._recalls):
            return self._mark(events, "disabled")
        joins = [recall_key_of(e, self._admin) for e in events] if self._recalls else []
        wanted = [k for k in joins if k is not None]
        if not self.sends and not wanted:
            self._count_unmatched(events, joins)
            return self._mark(events, "disabled")
        started = time.monotonic()
        if started < self._open_until:
            self._count_joins(wanted, "error")
            return self._mark(events, "error") if self.sends else list(events)
        # A provider other than Tencent computes its own store key (Matrix: room and event ID);
        # Tencent's events carry none and use the eventID's name, as their send records do.
        keys = [
            e.correlation_key or correlation_key(e.sdk_app_id or "", e.conversation.type, e.server_key) for e in events
        ]
        try:
            if store.local:
                found, requests = await self._lookups(store, keys, wanted)  # in-process: nothing to wait for
            else:
                async with asyncio.timeout(self._budget):
                    found, requests = await self._lookups(store, keys, wanted)
        except Exception:  # noqa: BLE001 - timeout or store failure: publish unenriched
            if started >= self._failed_at:  # not one that was waiting when the last failure was seen
                self._failures += 1
            self._failed_at = time.monotonic()
            if self._failures >= _BREAKER_AFTER:
                self._open_until = time.monotonic() + _BREAKER_SECONDS
            self._count_joins(wanted, "error")
            return self._mark(events, "error") if self.sends else list(events)
        self._failures = 0
        enriched = self._apply_sends(events, keys, found) if self.sends else self._mark(events, "disabled")
        if self._recalls:
            by_key = dict(zip(wanted, requests, strict=True))
            enriched = [
                self._join(event, by_key.get(key) if key else None) for event, key in zip(enriched, joins, strict=True)
            ]
        return enriched

    async def _lookups(
        self, store: CorrelationStore, keys: list[str], joins: list[str]
    ) -> tuple[list[bytes | None], list[bytes | None]]:
        """Send records and recall requests, in parallel when both are wanted."""
        if not joins:
            return await store.lookup(keys) if self.sends else [], []
        if not self.sends:
            return [], await self._requests(store, joins)
        found, requests = await asyncio.gather(store.lookup(keys), self._requests(store, joins))
        return found, requests

    @staticmethod
    async def _requests(store: CorrelationStore, joins: list[str]) -> list[bytes | None]:
        """Take each join record (it is used once: a later recall of the same message is not this
        request's) and read the attribution it points to: two round trips, only for REST recalls."""
        pointers = await store.take(joins)
        wanted = sorted({p.decode() for p in pointers if p is not None})
        if not wanted:
            return [None] * len(joins)
        records = dict(zip(wanted, await store.get(wanted), strict=True))
        return [None if p is None else records.get(p.decode()) for p in pointers]

    def _apply_sends(
        self, events: Sequence[RevokeEvent], keys: list[str], found: list[bytes | None]
    ) -> list[RevokeEvent]:
        enriched: list[RevokeEvent] = []
        for event, key, raw in zip(events, keys, found, strict=True):
            if raw is None:
                enriched.append(self._mark([event], "miss")[0])
                continue
            try:
                record = SendRecord.decode(key, raw)
            except ValueError:
                enriched.append(self._mark([event], "error")[0])
                continue
            self._metrics.child(self._metrics.correlation_lookups, "hit").inc()
            enriched.append(apply(event, record, evidence=self._evidence))
        return enriched

    def _join(self, event: RevokeEvent, raw: bytes | None) -> RevokeEvent:
        if raw is not None:
            try:
                joined = apply_request(event, raw)
            except ValueError:
                self._metrics.child(self._metrics.recall_joins, "error").inc()
                return event
            self._metrics.child(self._metrics.recall_joins, "joined").inc()
            return joined
        if _is_rest(event):
            # Recalled over REST, but not through this gateway (another tool or admin, or the record
            # expired or was used).
            self._metrics.child(self._metrics.recall_joins, "unmatched").inc()
        return event

    def _count_unmatched(self, events: Sequence[RevokeEvent], joins: Sequence[str | None]) -> None:
        if self._recalls:
            rest = sum(1 for e, k in zip(events, joins, strict=True) if k is None and _is_rest(e))
            if rest:
                self._metrics.child(self._metrics.recall_joins, "unmatched").inc(rest)

    def _count_joins(self, wanted: Sequence[str], result: str) -> None:
        if wanted:
            self._metrics.child(self._metrics.recall_joins, result).inc(len(wanted))

    def _mark(self, events: Sequence[RevokeEvent], result: Enrichment) -> list[RevokeEvent]:
        self._metrics.child(self._metrics.correlation_lookups, result).inc(len(events))
        return [e if e.enrichment == result else replace(e, enrichment=result) for e in events]


def apply(event: RevokeEvent, record: SendRecord, *, evidence: bool) -> RevokeEvent:
    """The event with what its send record adds. eventID never changes (it names the server key)."""
    client_msg_id = event.client_msg_id or record.client_msg_id
    sender = event.sender or record.sender
    operator = event.operator
    if event.conversation.type == "group" and operator.role == "unknown" and sender and operator.user_id:
        # A client recall in a group is the sender's own, or an owner/admin removing someone else's.
        operator = replace(operator, role="sender" if operator.user_id == sender else "group_admin")
    return replace(
        event,
        client_msg_id=client_msg_id,
        msg_id=client_msg_id or event.msg_id,
        sender=sender,
        operator=operator,
        sent_at_ms=record.sent_at_ms,
        evidence=record.evidence if evidence else None,
        enrichment="hit",
    )
