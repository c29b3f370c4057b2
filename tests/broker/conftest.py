"""Broker tier: a real RabbitMQ. Skipped locally when none answers; a failure in CI (RELAY_REQUIRE_BROKER=1)."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest

from tests.helpers import AMQP_URL, answers


@pytest.fixture(scope="session")
def amqp_url() -> str:
    if not answers(AMQP_URL, 5672):
        message = f"no RabbitMQ answers at {urlsplit(AMQP_URL).netloc.rpartition('@')[2]}"
        if os.environ.get("RELAY_REQUIRE_BROKER") == "1":
            pytest.fail(message + " and RELAY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip(message)
    return AMQP_URL


@pytest.fixture
def names(request: pytest.FixtureRequest) -> dict[str, str]:
    """Unique exchange and queue names for this test."""
    tag = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', request.node.name)[:40]}.{uuid.uuid4().hex[:8]}"
    return {"exchange": f"test.x.{tag}", "queue": f"test.q.{tag}", "queue2": f"test.q2.{tag}"}


@pytest.fixture
async def amqp(
    amqp_url: str, request: pytest.FixtureRequest, names: dict[str, str]
) -> AsyncIterator[aio_pika.abc.AbstractChannel]:
    """A channel for the test's own reads; deletes the test's queues and exchange afterwards."""
    connection = await aio_pika.connect(amqp_url, client_properties={"connection_name": f"test:{request.node.name}"})
    channel = await connection.channel()
    yield channel
    cleanup = await connection.channel()
    for queue in (names["queue"], names["queue2"]):
        await cleanup.queue_delete(queue)
    await cleanup.exchange_delete(names["exchange"])
    await connection.close()
