"""relay.consumer against a real RabbitMQ and a real PostgreSQL: one effect per eventID through
duplicates, redeliveries and a crash between commit and ack; poison dead-lettered; a stream reader
resuming after its stored offset; a clean stop (docs/consuming.md)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import orjson
import pytest

from relay.consumer import Consumer, ConsumerError, Event, PostgresInbox
from relay.events import Envelope
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import sample_body
from tests.helpers import APP
from tests.proxy import TcpProxy

pytestmark = [pytest.mark.broker, pytest.mark.postgres]
ROOT = Path(__file__).parents[2]


def events(n: int) -> list[Envelope]:
    body = orjson.dumps(sample_body("group", items=n))
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return [e.envelope() for e in normalize(body, CallbackQuery(sdk_app_id=APP), now_ms).events]


@dataclass
class Kit:
    """This test's broker, database, inbox name and effect table (event_id, no unique key: a second
    effect would show)."""

    amqp: aio_pika.abc.AbstractChannel
    confirming: aio_pika.abc.AbstractChannel
    amqp_url: str
    postgres_url: str
    names: dict[str, str]
    db: asyncpg.Connection
    inbox: str
    table: str

    def consumer(self, handler: Any, **options: Any) -> Consumer:
        if "stream" not in options:
            options.setdefault("queue", self.names["queue"])
        return Consumer(self.amqp_url, handler=handler, inbox=PostgresInbox(self.postgres_url, self.inbox), **options)

    async def effects(self) -> list[str]:
        return [row["event_id"] for row in await self.db.fetch(f"SELECT event_id FROM {self.table} ORDER BY event_id")]

    async def declare(self, kind: str = "quorum", **arguments: Any) -> str:
        """Declare the test's queue (a quorum queue or a stream) with *arguments*; return its name."""
        await self.amqp.declare_queue(self.names["queue"], durable=True, arguments={"x-queue-type": kind, **arguments})
        return self.names["queue"]

    async def send(self, items: list[Envelope]) -> None:
        """Publish the relay's event bodies straight to the test's queue (default exchange), confirmed."""
        for item in items:
            message = aio_pika.Message(
                item.body, message_id=item.event_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await self.confirming.default_exchange.publish(message, self.names["queue"])

    async def depth(self) -> int:
        declared = await self.amqp.declare_queue(self.names["queue"], passive=True)
        return declared.declaration_result.message_count or 0


@pytest.fixture
async def kit(
    amqp: aio_pika.abc.AbstractChannel, amqp_url: str, postgres_url: str, names: dict[str, str]
) -> AsyncIterator[Kit]:
    """The test's Kit; its effect table and inbox rows are removed afterwards."""
    connection = await aio_pika.connect(amqp_url)
    db = await asyncpg.connect(postgres_url)
    table = f"effects_{uuid.uuid4().hex[:12]}"
    await db.execute(f"CREATE TABLE {table} (event_id text NOT NULL)")
    kit = Kit(
        amqp,
        await connection.channel(publisher_confirms=True),
        amqp_url,
        postgres_url,
        names,
        db,
        f"test-{names['queue']}",
        table,
    )
    yield kit
    await db.execute(f"DROP TABLE {table}")
    for statement in (
        "DELETE FROM relay_inbox WHERE consumer = $1",
        "DELETE FROM relay_inbox_offsets WHERE consumer = $1",
    ):
        await db.execute(statement, kit.inbox)
    await db.close()
    await connection.close()


def recorder(table: str, seen: list[str], *, fail: set[str] | None = None, fail_once: set[str] | None = None) -> Any:
    """A handler writing the effect row; raises for *fail* always and for *fail_once* the first time."""

    async def handle(event: Event, tx: Any) -> None:
        seen.append(event.event_id)
        await tx.execute(f"INSERT INTO {table} (event_id) VALUES ($1)", event.event_id)
        if fail and event.event_id in fail:
            raise RuntimeError("downstream refused it")
        if fail_once and event.event_id in fail_once:
            fail_once.discard(event.event_id)
            raise RuntimeError("a transient failure")

    return handle


async def run_until(consumer: Consumer, done: Any, timeout: float = 15) -> None:
    """Run *consumer* until ``done()`` holds, then stop it and wait for it."""
    task = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(timeout):
            while not done():
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await asyncio.wait_for(task, 10)


async def test_duplicates_and_a_redelivery_give_one_effect_each(kit: Kit) -> None:
    """A, B, A again, and B failing once: each eventID has exactly one effect row, everything is acked."""
    await kit.declare()
    a, b = events(2)
    await kit.send([a, b, a])
    consumer = kit.consumer(recorder(kit.table, [], fail_once={b.event_id}))
    await run_until(consumer, lambda: consumer.stats.handled + consumer.stats.duplicates >= 3)
    assert sorted([a.event_id, b.event_id]) == await kit.effects()
    assert (2, 1, 1) == (consumer.stats.handled, consumer.stats.duplicates, consumer.stats.failures)
    assert 0 == await kit.depth()


async def test_a_consumer_killed_between_commit_and_ack_applies_the_event_once(kit: Kit) -> None:
    """A process SIGKILLed right after the inbox commit: the broker redelivers, the next consumer acks it
    as a duplicate without calling the handler, and there is one effect."""
    queue = await kit.declare()
    (event,) = events(1)
    await kit.send([event])
    crash = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.consumer_crash", kit.amqp_url, queue, kit.postgres_url, kit.inbox, kit.table,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    out, _ = await asyncio.wait_for(crash.communicate(), 30)
    assert -9 == crash.returncode
    assert f"committed {event.event_id}" in out.decode()
    assert [event.event_id] == await kit.effects()
    seen: list[str] = []
    consumer = kit.consumer(recorder(kit.table, seen))
    await run_until(consumer, lambda: consumer.stats.duplicates >= 1)
    assert [] == seen
    assert [event.event_id] == await kit.effects()
    assert 0 == await kit.depth()


async def test_a_poison_event_is_dead_lettered_after_max_attempts(kit: Kit) -> None:
    """A handler that always fails for one event: tried max_attempts times (counted by the quorum queue's
    x-delivery-count), rolled back each time, then rejected to the DLX; the healthy event is applied once."""
    dlx = f"{kit.names['exchange']}.dlx"
    exchange = await kit.amqp.declare_exchange(dlx, aio_pika.ExchangeType.FANOUT, durable=True)
    dlq = await kit.amqp.declare_queue(kit.names["queue2"], durable=True, arguments={"x-queue-type": "quorum"})
    await dlq.bind(exchange)
    await kit.declare(**{"x-dead-letter-exchange": dlx})
    poison, healthy = events(2)
    await kit.send([poison, healthy])
    seen: list[str] = []
    consumer = kit.consumer(recorder(kit.table, seen, fail={poison.event_id}), max_attempts=3)
    try:
        await run_until(consumer, lambda: consumer.stats.dead_lettered >= 1 and consumer.stats.handled >= 1)
        assert 3 == seen.count(poison.event_id)
        assert [healthy.event_id] == await kit.effects()
        dead = await dlq.get(no_ack=True, timeout=5)
        assert (poison.event_id, "rejected") == (dead.message_id, dead.headers["x-first-death-reason"])
        assert 0 == await kit.depth()
    finally:
        await kit.amqp.exchange_delete(dlx)


async def test_a_stream_consumer_restarted_midway_resumes_after_its_offset(kit: Kit) -> None:
    """Ten events in a stream: a first run applies four and stops; a second run with the same inbox
    applies exactly the other six, in order, never the first four again."""
    stream = await kit.declare("stream")
    items = events(10)
    await kit.send(items)
    first: list[str] = []
    record = recorder(kit.table, first)

    async def stop_at_four(event: Event, tx: Any) -> None:
        await record(event, tx)
        if len(first) == 4:
            await consumer.stop()

    consumer = kit.consumer(stop_at_four, stream=stream)
    await run_until(consumer, lambda: len(first) >= 4)
    assert [e.event_id for e in items[:4]] == first
    second: list[str] = []
    again = kit.consumer(recorder(kit.table, second), stream=stream)
    await run_until(again, lambda: len(second) >= 6)
    await asyncio.sleep(0.3)  # nothing more arrives
    assert [e.event_id for e in items[4:]] == second
    assert 0 == again.stats.duplicates  # resumed after the offset: the inbox never saw the first four again
    assert sorted(e.event_id for e in items) == await kit.effects()


async def test_a_stream_event_that_keeps_failing_stops_the_consumer_naming_it(kit: Kit) -> None:
    """On a stream nothing is nacked: after max_attempts the consumer stops with an error naming the event,
    and a fixed consumer resumes at that event (the one before it stays applied once)."""
    stream = await kit.declare("stream")
    good, bad = events(2)
    await kit.send([good, bad])
    failing = kit.consumer(
        recorder(kit.table, [], fail={bad.event_id}), stream=stream, max_attempts=2, retry_delay=0.01
    )
    with pytest.raises(ConsumerError, match=f"event {bad.event_id} .*failed 2 times"):
        await asyncio.wait_for(failing.run(), 15)
    assert [good.event_id] == await kit.effects()
    fixed: list[str] = []
    again = kit.consumer(recorder(kit.table, fixed), stream=stream)
    await run_until(again, lambda: len(fixed) >= 1)
    assert [bad.event_id] == fixed
    assert sorted([good.event_id, bad.event_id]) == await kit.effects()


async def test_stop_finishes_the_message_in_hand(kit: Kit) -> None:
    """stop() while the handler runs: the handler completes, commits and the message is acked."""
    await kit.declare()
    (event,) = events(1)
    await kit.send([event])
    entered = asyncio.Event()

    async def slow(event: Event, tx: Any) -> None:
        entered.set()
        await asyncio.sleep(0.5)
        await tx.execute(f"INSERT INTO {kit.table} (event_id) VALUES ($1)", event.event_id)

    consumer = kit.consumer(slow)
    task = asyncio.create_task(consumer.run())
    await asyncio.wait_for(entered.wait(), 10)
    await consumer.stop()
    await asyncio.wait_for(task, 10)
    assert [event.event_id] == await kit.effects()
    assert 0 == await kit.depth()


async def test_a_missing_queue_is_an_error_naming_it(kit: Kit) -> None:
    """Consuming a queue that does not exist stops with ConsumerError naming it (no endless reconnect)."""
    consumer = kit.consumer(recorder(kit.table, []), queue=kit.names["queue2"])
    with pytest.raises(ConsumerError, match=f"queue {kit.names['queue2']!r} does not exist"):
        await asyncio.wait_for(consumer.run(), 10)


async def test_a_stream_consumer_reconnects_and_resumes_after_its_offset(kit: Kit) -> None:
    """The link to the broker is cut after three events: the consumer reconnects by itself and goes on
    from its stored offset (not from its first x-stream-offset, as a restored robust consumer would)."""
    stream = await kit.declare("stream")
    parts = urlsplit(kit.amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    url = parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}").geturl()
    items = events(6)
    await kit.send(items[:3])
    seen: list[str] = []
    consumer = kit.consumer(recorder(kit.table, seen), stream=stream, reconnect_interval=0.2)
    consumer.url = url
    task = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(15):
            while len(seen) < 3:
                await asyncio.sleep(0.05)
            await proxy.stop()
            await proxy.start(proxy.port)
            await kit.send(items[3:])
            while len(seen) < 6:
                await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
        await asyncio.wait_for(task, 10)
        await proxy.stop()
    assert [e.event_id for e in items] == seen
    assert consumer.stats.reconnects >= 1
    assert 0 == consumer.stats.duplicates


async def test_a_newer_event_version_is_handled_and_counted(kit: Kit) -> None:
    """A version-9 revocation with an unknown field: handled by the fields the kit knows, and counted."""
    await kit.declare()
    body = orjson.dumps({"version": 9, "eventID": "v9-event", "type": "message.revoked", "msgID": "m9", "new": 1})
    await kit.confirming.default_exchange.publish(aio_pika.Message(body, message_id="v9-event"), kit.names["queue"])
    seen: list[str] = []
    consumer = kit.consumer(recorder(kit.table, seen))
    await run_until(consumer, lambda: consumer.stats.handled >= 1)
    assert (["v9-event"], 1) == (seen, consumer.stats.newer_versions)


SIGTERM_RUNNER = """
import asyncio, sys
from relay.consumer import Consumer, PostgresInbox

async def handle(event, tx):
    pass

inbox = PostgresInbox(sys.argv[3], sys.argv[4])
asyncio.run(Consumer(sys.argv[1], queue=sys.argv[2], handler=handle, inbox=inbox).run())
"""


async def test_sigterm_stops_the_consumer_cleanly(kit: Kit) -> None:
    """A consumer process given SIGTERM logs its stop with its counts and exits 0."""
    queue = await kit.declare()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SIGTERM_RUNNER, kit.amqp_url, queue, kit.postgres_url, kit.inbox,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert process.stdout is not None
    started = await asyncio.wait_for(process.stdout.readline(), 20)
    assert b"relay.consumer_started" in started
    process.send_signal(signal.SIGTERM)
    rest = await asyncio.wait_for(process.stdout.read(), 20)
    assert 0 == await process.wait()
    assert b"relay.consumer_stopped" in rest
