"""A consumer process that dies (SIGKILL) right after its inbox committed the first event, before the
ack: tests/broker/test_consumer_kit.py runs it, then checks the redelivery has no second effect.

    python -m tests.consumer_crash AMQP_URL QUEUE POSTGRES_URL INBOX_NAME EFFECT_TABLE
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from relay.consumer import Consumer, Event, PostgresInbox


class DyingInbox(PostgresInbox):
    """Commits like the real inbox, then kills the process before the consumer can ack."""

    async def apply(
        self,
        event_id: str,
        handle: Callable[[Any], Awaitable[None]],
        *,
        stream: str | None = None,
        offset: int | None = None,
    ) -> bool:
        fresh = await super().apply(event_id, handle, stream=stream, offset=offset)
        print(f"committed {event_id}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        return fresh


async def main(amqp_url: str, queue: str, postgres_url: str, name: str, table: str) -> None:
    async def handle(event: Event, tx: Any) -> None:
        await tx.execute(f"INSERT INTO {table} (event_id) VALUES ($1)", event.event_id)

    await Consumer(amqp_url, queue=queue, handler=handle, inbox=DyingInbox(postgres_url, name)).run()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:6]))
