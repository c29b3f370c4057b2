"""`relay tail` against a real RabbitMQ: it prints what the relay publishes, filters by key, and stops cleanly."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay.events import Envelope
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from relay.settings import Settings
from relay.tail import tail
from tests.helpers import envelopes

pytestmark = pytest.mark.broker


@pytest.fixture
async def publisher(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], request: pytest.FixtureRequest
) -> AsyncIterator[AmqpPublisher]:
    """The relay's own publisher, connected: it declares the exchange and a catch-all queue (so every key routes)."""
    publisher = AmqpPublisher(
        amqp_url,
        names["exchange"],
        (names["queue"],),
        5.0,
        Metrics(CollectorRegistry()),
        connection_name=f"test:{request.node.name}",
    )
    await publisher.start()
    await asyncio.wait_for(publisher.connected.wait(), 10)
    yield publisher
    await publisher.close()


class Tail:
    """`tail()` running as a task with captured output, ready once its queue is bound."""

    def __init__(self, amqp_url: str, exchange: str, **options: Any) -> None:
        self.out, self.err = io.StringIO(), io.StringIO()
        self.ready, self.stop = asyncio.Event(), asyncio.Event()
        settings = Settings(amqp_url=amqp_url, exchange=exchange)
        self.task = asyncio.create_task(
            tail(settings, self.out, err=self.err, ready=self.ready, stop=self.stop, **options)
        )

    async def started(self) -> Tail:
        waiter = asyncio.create_task(self.ready.wait())
        await asyncio.wait({waiter, self.task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        assert self.ready.is_set(), self.err.getvalue()
        return self

    async def result(self) -> int:
        return await asyncio.wait_for(self.task, 10)

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


async def publish(publisher: AmqpPublisher, items: list[Envelope]) -> None:
    for item in items:
        await publisher.publish(item)


async def test_json_lines_carry_each_event_with_routing_key_and_message_id(
    amqp_url: str, names: dict[str, str], publisher: AmqpPublisher
) -> None:
    """With --json --count N, tail prints the N published events in order, each with its routing key and
    message_id, then exits 0."""
    items = envelopes(2, "c2c") + envelopes(1, "group") + envelopes(1, "official_account")
    tailing = await Tail(amqp_url, names["exchange"], as_json=True, count=len(items)).started()
    await publish(publisher, items)
    assert 0 == await tailing.result()
    printed = [orjson.loads(line) for line in tailing.lines()]
    assert [(e.event_id, e.routing_key, e.event_id) for e in items] == [
        (p["event"]["eventID"], p["routingKey"], p["messageID"]) for p in printed
    ]
    assert [orjson.loads(e.body) for e in items] == [p["event"] for p in printed]


async def test_key_option_filters_out_other_conversation_types(
    amqp_url: str, names: dict[str, str], publisher: AmqpPublisher
) -> None:
    """--key message.revoked.group prints group events only, even when c2c events are published first."""
    c2c, group = envelopes(2, "c2c"), envelopes(2, "group")
    tailing = await Tail(amqp_url, names["exchange"], as_json=True, count=2, key="message.revoked.group").started()
    await publish(publisher, [c2c[0], group[0], c2c[1], group[1]])
    assert 0 == await tailing.result()
    printed = [orjson.loads(line) for line in tailing.lines()]
    assert [(e.event_id, "message.revoked.group") for e in group] == [
        (p["messageID"], p["routingKey"]) for p in printed
    ]


async def test_default_output_is_one_aligned_line_per_event(
    amqp_url: str, names: dict[str, str], publisher: AmqpPublisher
) -> None:
    """Without --json each event is one aligned line: event time, conversation type, eventID, operator, sender,
    msgID."""
    items = envelopes(1, "c2c") + envelopes(1, "official_account")
    tailing = await Tail(amqp_url, names["exchange"], count=2).started()
    await publish(publisher, items)
    assert 0 == await tailing.result()
    expected = []
    for item in items:
        event = orjson.loads(item.body)
        operator = f"by={event['operator']['role']}/{event['operator']['userID'] or '-'}"
        sender = f"from={event['sender'] or '-'}"
        ctype = event["conversation"]["type"]
        expected.append([event["eventTime"], ctype, event["eventID"], operator, sender, f"msg={event['msgID']}"])
    lines = tailing.lines()
    assert expected == [line.split() for line in lines]
    for column in ("by=", "from=", "msg="):  # the conversation types and operators differ in width
        assert 1 == len({line.index(column) for line in lines})


async def test_private_queue_is_gone_after_tail_exits(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], publisher: AmqpPublisher
) -> None:
    """The server-named queue is exclusive and auto-deleted: once tail stops, the broker no longer has it."""
    tailing = await Tail(amqp_url, names["exchange"]).started()
    match = re.search(r"queue '([^']+)'", tailing.err.getvalue())
    assert match is not None
    assert match.group(1).startswith("amq.gen-")
    tailing.stop.set()
    assert 0 == await tailing.result()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):  # closes this channel; cleanup uses another
        await amqp.declare_queue(match.group(1), passive=True)


async def test_missing_exchange_fails_clearly_without_declaring_it(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str]
) -> None:
    """When the exchange does not exist tail exits 1 naming it, and does not create it."""
    tailing = Tail(amqp_url, names["exchange"], count=1)
    assert 1 == await tailing.result()
    assert f"exchange {names['exchange']!r} does not exist" in tailing.err.getvalue()
    with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
        await amqp.get_exchange(names["exchange"], ensure=True)


async def test_timeout_before_count_exits_1(amqp_url: str, names: dict[str, str], publisher: AmqpPublisher) -> None:
    """--count 1 --timeout 0.5 with nothing published exits 1 and says why."""
    tailing = Tail(amqp_url, names["exchange"], count=1, give_up_after=0.5)
    assert 1 == await tailing.result()
    assert "fewer than 1 events within 0.5 s" in tailing.err.getvalue()


async def test_cli_prints_live_and_exits_0_on_sigterm(
    amqp_url: str, names: dict[str, str], publisher: AmqpPublisher
) -> None:
    """`relay tail --json` as a process prints a published event at once and exits 0 on SIGTERM."""
    env = {**os.environ, "RELAY_AMQP_URL": amqp_url, "RELAY_EXCHANGE": names["exchange"]}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "tail",
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        ready = await asyncio.wait_for(process.stderr.readline(), 15)
        assert b"relay tail: queue" in ready
        (item,) = envelopes(1, "group")
        await publisher.publish(item)
        line = await asyncio.wait_for(process.stdout.readline(), 10)
        assert item.event_id == orjson.loads(line)["messageID"]
        process.send_signal(signal.SIGTERM)
        assert 0 == await asyncio.wait_for(process.wait(), 10)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
