"""Dispatch: make every event of a callback safe before the callback is answered 200.

Safe means confirmed by RabbitMQ. The events of one callback are published concurrently (one
round trip of confirms, not one per event); if any is not confirmed the whole callback fails.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from relay.errors import PublishFailed
from relay.events import Envelope
from relay.metrics import Metrics
from relay.publisher import Publisher


class Dispatcher:
    def __init__(self, publisher: Publisher, metrics: Metrics) -> None:
        self.publisher = publisher
        self._metrics = metrics

    @property
    def ready(self) -> bool:
        return self.publisher.ready

    async def dispatch(self, envelopes: Sequence[Envelope]) -> None:
        """Return once every envelope is confirmed; raise the first :class:`PublishFailed` otherwise."""
        if len(envelopes) == 1:
            await self.publisher.publish(envelopes[0])
            self._metrics.events_published.labels(envelopes[0].conversation_type).inc()
            return
        results = await asyncio.gather(*(self.publisher.publish(e) for e in envelopes), return_exceptions=True)
        failure: BaseException | None = None
        for envelope, result in zip(envelopes, results, strict=True):
            if result is None:
                self._metrics.events_published.labels(envelope.conversation_type).inc()
            elif failure is None:
                failure = result
        if failure is not None:
            if isinstance(failure, PublishFailed):
                raise failure
            raise PublishFailed("error", repr(failure)[:200]) from failure
