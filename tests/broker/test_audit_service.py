"""examples/audit_service.py against a real RabbitMQ stream and PostgreSQL: every event of the history
becomes one row, a restart resumes without writing any twice, and its query answers by group and operator."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay.events import Envelope
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import sample_body
from tests.helpers import APP, load_example

pytestmark = [pytest.mark.broker, pytest.mark.postgres]


audit = load_example("audit_service.py")


def group_recall(group: str, operator: str) -> Envelope:
    body = sample_body("group")
    body["GroupId"] = group
    body["Operator_Account"] = operator
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    return normalize(orjson.dumps(body), CallbackQuery(sdk_app_id=APP), now_ms).events[0].envelope()


@pytest.fixture
async def setup(
    amqp: aio_pika.abc.AbstractChannel, amqp_url: str, postgres_url: str, names: dict[str, str]
) -> AsyncIterator[tuple[AmqpPublisher, str, str]]:
    """The relay's publisher with this test's stream, and a table name; all removed afterwards."""
    stream = names["queue"]
    table = f"audit_{uuid.uuid4().hex[:12]}"
    publisher = AmqpPublisher(
        amqp_url, names["exchange"], (), 5.0, Metrics(CollectorRegistry()), audit_stream=stream,
        stream_arguments={"x-max-age": "1D", "x-max-length-bytes": 10_000_000},
    )  # fmt: skip
    await publisher.start()
    await asyncio.wait_for(publisher.connected.wait(), 10)
    yield publisher, stream, table
    await publisher.close()
    db = await asyncpg.connect(postgres_url)
    await db.execute(f"DROP TABLE IF EXISTS {table}")
    for inbox_table in ("relay_inbox", "relay_inbox_offsets"):
        await db.execute(f"DELETE FROM {inbox_table} WHERE consumer = $1", table)
    await db.close()


async def follow(service: Any, count: int) -> None:
    """Run the service until *count* more events were written, then stop it."""
    task = asyncio.create_task(service.run())
    try:
        async with asyncio.timeout(15):
            while service.consumer.stats.handled < count:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
    finally:
        await service.consumer.stop()
        await asyncio.wait_for(task, 10)


async def test_the_audit_service_answers_who_recalled_in_a_group(
    amqp_url: str, postgres_url: str, setup: tuple[AmqpPublisher, str, str]
) -> None:
    """Three recalls in @TGS#audit (two by alice) and one elsewhere: the query by group returns the three,
    by operator alice's two; a restart resumes after the stored offset and writes only the new event."""
    publisher, stream, table = setup
    group = f"@TGS#{uuid.uuid4().hex[:8]}"
    ours = [group_recall(group, "alice"), group_recall(group, "bob"), group_recall(group, "alice")]
    for item in [*ours, group_recall("@TGS#elsewhere", "alice")]:
        await publisher.publish(item)
    service = audit.AuditService(amqp_url, stream, postgres_url, table=table, name=table)
    await follow(service, 4)
    rows = await audit.query(postgres_url, table=table, group=group)
    assert sorted(e.event_id for e in ours) == sorted(r["event_id"] for r in rows)
    by_alice = await audit.query(postgres_url, table=table, group=group, operator="alice")
    assert sorted([ours[0].event_id, ours[2].event_id]) == sorted(r["event_id"] for r in by_alice)
    later = await audit.query(postgres_url, table=table, since=datetime.now(UTC) + timedelta(minutes=1))
    assert [] == later
    shown = audit.line(by_alice[0])
    assert f"group={group}" in shown
    assert "/alice" in shown
    await publisher.publish(group_recall(group, "carol"))
    again = audit.AuditService(amqp_url, stream, postgres_url, table=table, name=table)
    await follow(again, 1)
    assert 0 == again.consumer.stats.duplicates
    assert 4 == len(await audit.query(postgres_url, table=table, group=group))
