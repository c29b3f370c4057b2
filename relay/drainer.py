"""The drainer: forwards spooled events to RabbitMQ, oldest first, deleting each only after its confirm.

A batch is published in spool order on one channel without waiting between messages (RabbitMQ
keeps per-channel publish order into a queue), then the confirmed ones are deleted in one
transaction. A message whose confirm is lost stays spooled and is published again later with the
same message_id: at-least-once, never at-most-once. Confirmed messages whose delete failed (a full
disk) are not published again: only their delete is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import structlog

from relay.metrics import Metrics
from relay.publisher import Publisher
from relay.spool import Spool, SpooledEvent

log = structlog.get_logger()


class Drainer:
    def __init__(
        self,
        spool: Spool,
        publisher: Publisher,
        metrics: Metrics,
        *,
        batch_size: int = 256,
        backoff_max: float = 5.0,
    ) -> None:
        self.spool = spool
        self.publisher = publisher
        self._metrics = metrics
        self.batch_size = batch_size
        self.backoff_max = backoff_max
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._drained_in_run = 0
        self._confirmed: list[SpooledEvent] = []  # confirmed by RabbitMQ, not yet deleted from the spool

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="spool-drainer")

    async def stop(self, flush_timeout: float) -> None:
        """Let the drainer empty the spool for up to *flush_timeout* seconds, then stop it."""
        if self._task is None:
            return
        self._stopping.set()
        try:
            async with asyncio.timeout(flush_timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        log.info("relay.drainer_stopped", left_in_spool=self.spool.events)

    async def drain_once(self) -> tuple[int, int]:
        """Publish the oldest batch; delete what was confirmed. Return (drained, failed)."""
        retried = await self._forget_confirmed()
        batch = await self.spool.oldest(self.batch_size)
        if not batch:
            return retried, 0
        results = await asyncio.gather(*(self.publisher.publish(e.envelope) for e in batch), return_exceptions=True)
        self._confirmed = [event for event, result in zip(batch, results, strict=True) if result is None]
        failures = [result for result in results if result is not None]
        confirmed = await self._forget_confirmed()
        if failures:
            log.warning(
                "relay.drain_failed",
                failed=len(failures),
                confirmed=confirmed,
                reason=getattr(failures[0], "reason", repr(failures[0])[:200]),
            )
        return retried + confirmed, len(failures)

    async def _forget_confirmed(self) -> int:
        """Delete the events RabbitMQ confirmed; how many. While the delete fails (SQLite cannot write
        to a full disk) they stay remembered here and the next round retries the delete alone: reading
        them from the spool again would publish them again, duplicates no in-doubt count reports."""
        confirmed = self._confirmed
        if not confirmed:
            return 0
        await self.spool.delete(confirmed)
        self._confirmed = []
        self._metrics.events_drained.inc(len(confirmed))
        for event in confirmed:
            self._metrics.child(self._metrics.events_published, event.envelope.conversation_type).inc()
        return len(confirmed)

    async def _run(self) -> None:
        backoff = 0.0
        while True:
            if self.spool.events == 0:
                if self._drained_in_run:
                    log.info("relay.spool_drained", events=self._drained_in_run)
                    self._drained_in_run = 0
                if self._stopping.is_set():
                    return
                # No await between the check above and this clear: a put that commits later sets it again.
                self.spool.nonempty.clear()
                await self._wait(self.spool.nonempty)
                continue
            if not self.publisher.ready:
                if self._stopping.is_set():
                    return  # no broker to flush to: what is spooled stays for the next start
                await self._wait(None, 0.2)
                continue
            connections = self.publisher.connections
            try:
                drained, failed = await self.drain_once()
            except Exception as exc:  # noqa: BLE001 - a spool read/delete error must not kill the drainer
                log.error("relay.drain_error", error=repr(exc)[:300])
                drained, failed = 0, 1
            self._drained_in_run += drained
            if failed:
                backoff = min(self.backoff_max, max(0.1, backoff * 2))
                if self._stopping.is_set() and not drained:
                    return
                await self._backoff(backoff * random.uniform(0.5, 1.0), connections)  # noqa: S311 - jitter
                if self.publisher.connections != connections:
                    backoff = 0.0
            else:
                backoff = 0.0

    async def _backoff(self, seconds: float, connections: int) -> None:
        """Sleep *seconds*, or less if the publisher opens a new connection meanwhile (e.g. it failed
        over to another node): the spool is what new callbacks wait behind, so retry through it at once."""
        deadline = asyncio.get_running_loop().time() + seconds
        while self.publisher.connections == connections and not self._stopping.is_set():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            await self._wait(None, min(left, 0.05))

    async def _wait(self, event: asyncio.Event | None, seconds: float | None = None) -> None:
        """Sleep until *event* is set, the drainer is asked to stop, or *seconds* pass."""
        waiters = [asyncio.ensure_future(self._stopping.wait())]
        if event is not None:
            waiters.append(asyncio.ensure_future(event.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
