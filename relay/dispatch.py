"""Dispatch: make every event of a callback safe before the callback is answered 200.

Safe means confirmed by RabbitMQ, or committed to the local spool (fsync'd) for the drainer to
forward. The hot path is "publish and await the confirm"; the spool takes over when the broker is
down, blocked, slow, or returns the message as unroutable. While the spool holds anything, new
events queue behind it, so a new event never overtakes an older one (see the README, Ordering).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

from relay.errors import PublishFailed, SpoolError, SpoolFull
from relay.events import Envelope
from relay.metrics import Metrics
from relay.publisher import Publisher
from relay.spool import Spool


@dataclass(frozen=True, slots=True)
class Dispatched:
    """How the events of one callback were made safe."""

    published: int
    spooled: int
    publish_failure: PublishFailed | None = None  # why they were spooled, when they were


class Dispatcher:
    def __init__(self, publisher: Publisher, spool: Spool, metrics: Metrics) -> None:
        self.publisher = publisher
        self.spool = spool
        self._metrics = metrics

    @property
    def ready(self) -> bool:
        """Events can be made safe right now: the broker is publishable, or the spool has room."""
        return self.publisher.ready or self.spool.has_room

    async def dispatch(self, envelopes: Sequence[Envelope], *, share: float | None = None) -> Dispatched:
        """Return once every envelope is confirmed or spooled; raise SpoolFull/SpoolError if neither.

        *share*: events made on request may be spooled only within this share of the spool (the
        recall gateway's), so they never take the room a callback needs."""
        pending: Sequence[Envelope] = envelopes
        failure: PublishFailed | None = None
        direct = not self.spool.backlog and self.publisher.ready
        if direct:
            pending, failure = await self.publish(envelopes)
            if not pending:
                return Dispatched(len(envelopes), 0)
        elif not self.publisher.ready:
            failure = PublishFailed("disconnected", "broker not ready")
        try:
            await self._spool(pending, share)
        except SpoolError:
            if direct or not self.publisher.ready:
                raise
            # The spool cannot take them but the broker can: publishing ahead of the backlog
            # breaks ordering, refusing loses the events for good (the IM backend never retries).
            pending, _ = await self.publish(pending)
            if pending:
                raise
            return Dispatched(len(envelopes), 0)
        return Dispatched(len(envelopes) - len(pending), len(pending), failure)

    async def publish(self, envelopes: Sequence[Envelope]) -> tuple[list[Envelope], PublishFailed | None]:
        """Publish concurrently (one confirm round trip); return the envelopes not confirmed and why."""
        if len(envelopes) == 1:
            results: list[BaseException | None] = []
            try:
                await self.publisher.publish(envelopes[0])
                results.append(None)
            except PublishFailed as exc:
                results.append(exc)
        else:
            results = await asyncio.gather(*(self.publisher.publish(e) for e in envelopes), return_exceptions=True)
        failed: list[Envelope] = []
        first: PublishFailed | None = None
        for envelope, result in zip(envelopes, results, strict=True):
            if result is None:
                self._metrics.child(self._metrics.events_published, envelope.conversation_type).inc()
                continue
            failed.append(envelope)
            if first is None:
                first = result if isinstance(result, PublishFailed) else PublishFailed("error", repr(result)[:200])
        return failed, first

    async def _spool(self, envelopes: Sequence[Envelope], share: float | None = None) -> None:
        started = time.perf_counter()
        try:
            await self.spool.put(envelopes, share=share)
        except SpoolFull:
            self._metrics.spool_write_failures.labels("full").inc()
            raise
        except SpoolError:
            self._metrics.spool_write_failures.labels("unavailable").inc()
            raise
        self._metrics.spool_write_seconds.observe(time.perf_counter() - started)
        self._metrics.events_spooled.inc(len(envelopes))
