"""docs/asyncapi.yaml agrees with what a real RabbitMQ receives from the relay's publisher: exchange, routing
keys, AMQP properties, headers and the mandatory flag — whatever client library the publisher uses."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest
from prometheus_client import CollectorRegistry

from relay.errors import PublishFailed
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from relay.tencent.samples import KINDS
from tests.api_docs import event_message, load_asyncapi, resolve, validator
from tests.helpers import envelopes

pytestmark = pytest.mark.broker

# What aio-pika reports about a delivery rather than about the message as published.
DELIVERY_INFO = {"body_size", "consumer_tag", "delivery_tag", "exchange", "redelivered", "routing_key", "headers"}


async def started(publisher: AmqpPublisher) -> AmqpPublisher:
    await publisher.start()
    await asyncio.wait_for(publisher.connected.wait(), 10)
    return publisher


def amqp_properties(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    """The basic properties the message arrived with, under the AMQP specification's names."""
    properties = {
        name: value
        for name, value in message.info().items()
        if name not in DELIVERY_INFO and value is not None and value != ""
    }
    if properties.get("priority") == 0:
        del properties["priority"]  # absent and 0 read the same; some clients send 0 unasked
    properties["delivery_mode"] = int(message.delivery_mode)
    if message.timestamp is not None:
        properties["timestamp"] = int(message.timestamp.timestamp())
    return properties


async def test_published_messages_match_the_document(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], request: pytest.FixtureRequest
) -> None:
    """One event of each kind, read back from a bound queue: routing key among the channel addresses, exactly the
    documented AMQP properties and headers (with the documented meanings), and the documented exchange type."""
    spec = load_asyncapi()
    msg = event_message(spec)
    publisher = await started(
        AmqpPublisher(
            amqp_url,
            names["exchange"],
            (names["queue"],),
            5.0,
            Metrics(CollectorRegistry()),
            connection_name=f"test:{request.node.name}",
        )
    )
    items = [envelopes(1, kind)[0] for kind in sorted(KINDS)]
    try:
        for item in items:
            await publisher.publish(item)
    finally:
        await publisher.close()

    queue = await amqp.get_queue(names["queue"])
    addresses = {channel["address"] for channel in spec["channels"].values()}
    operation = resolve(spec, spec["operations"]["publishC2c"]["bindings"])["amqp"]
    documented = msg["x-amqp-properties"]
    for item in items:
        async with asyncio.timeout(5):
            message = await queue.get(no_ack=True)
        assert item.event_id == message.message_id  # one publisher channel, one queue: in order
        assert message.routing_key in addresses
        properties = amqp_properties(message)
        assert set(documented["properties"]) == set(properties)
        validator(documented).validate(properties)
        assert (item.event_id, item.timestamp) == (properties["message_id"], properties["timestamp"])
        assert (msg["contentType"], msg["bindings"]["amqp"]["messageType"]) == (message.content_type, message.type)
        assert (operation["deliveryMode"], operation["timestamp"]) == (properties["delivery_mode"], True)
        headers = {k: v for k, v in message.headers.items() if not k.startswith("x-")}  # quorum: x-delivery-count
        assert set(msg["headers"]["properties"]) == set(headers)
        validator(msg["headers"]).validate(headers)

    # Re-declaring with the documented type and flags succeeds only if they equal the relay's declaration.
    exchange = resolve(spec, spec["channels"]["group"]["bindings"])["amqp"]["exchange"]
    await amqp.declare_exchange(
        names["exchange"],
        aio_pika.ExchangeType(exchange["type"]),
        durable=exchange["durable"],
        auto_delete=exchange["autoDelete"],
    )


async def test_documented_mandatory_flag_returns_unroutable_events(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], request: pytest.FixtureRequest
) -> None:
    """The document says publishes are mandatory: with no queue bound, the broker returns the event and the
    publisher reports it as returned rather than published."""
    operation = resolve(load_asyncapi(), load_asyncapi()["operations"]["publishGroup"]["bindings"])["amqp"]
    assert operation["mandatory"]
    publisher = await started(
        AmqpPublisher(
            amqp_url,
            names["exchange"],
            (),
            5.0,
            Metrics(CollectorRegistry()),
            connection_name=f"test:{request.node.name}",
        )
    )
    try:
        with pytest.raises(PublishFailed) as failed:
            await publisher.publish(envelopes(1, "group")[0])
    finally:
        await publisher.close()
    assert "returned" == failed.value.reason
