"""End to end against a real RabbitMQ: signed POSTs in, events read back from bound queues."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aio_pika
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from relay.app import PUBLISHER, SPOOL, create_app
from relay.publisher import AmqpPublisher
from relay.tencent.callback import C2C_RECALL, GROUP_RECALL, OFFICIAL_ACCOUNT_RECALL
from relay.tencent.samples import callback_query, sample_body
from tests.helpers import APP, TOKEN, make_settings, validate_event
from tests.proxy import TcpProxy

pytestmark = pytest.mark.broker
ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


async def start_relay(
    aiohttp_client: ClientFactory,
    url: str,
    names: dict[str, str],
    spool_dir: Path,
    *,
    queues: str | None = None,
    registry: CollectorRegistry | None = None,
    wait: bool = True,
    **env: str,
) -> TestClient:  # type: ignore[type-arg]
    settings = make_settings(
        spool_dir,
        RELAY_AMQP_URL=url,
        RELAY_EXCHANGE=names["exchange"],
        RELAY_QUEUES=names["queue"] if queues is None else queues,
        RELAY_PUBLISH_TIMEOUT="3",
        **env,
    )
    client = await aiohttp_client(create_app(settings, registry=registry or CollectorRegistry()))
    if wait:
        publisher = cast(AmqpPublisher, client.app[PUBLISHER])  # type: ignore[index]
        await asyncio.wait_for(publisher.connected.wait(), 10)
    return client


def target(command: str, token: str | None = TOKEN, **kw: Any) -> str:
    return f"/tencent-im/callback?{callback_query(command, APP, token, **kw)}"


async def read_messages(
    channel: aio_pika.abc.AbstractChannel, queue_name: str, count: int, timeout: float = 5.0
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    queue = await channel.get_queue(queue_name)
    messages: list[aio_pika.abc.AbstractIncomingMessage] = []
    async with asyncio.timeout(timeout):
        while len(messages) < count:
            message = await queue.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            else:
                messages.append(message)
    return messages


async def queue_depth(channel: aio_pika.abc.AbstractChannel, queue_name: str) -> int:
    declared = await channel.declare_queue(queue_name, passive=True)
    return declared.declaration_result.message_count or 0


VARIANTS = [
    pytest.param(C2C_RECALL, sample_body("c2c"), 1, "c2c", id="c2c-intl"),
    pytest.param(C2C_RECALL, {**sample_body("c2c"), "UnreadMsgNum": None}, 1, "c2c", id="c2c-cn"),
    pytest.param(GROUP_RECALL, sample_body("group", items=3), 3, "group", id="group-3-items"),
    pytest.param(
        GROUP_RECALL, {**sample_body("group"), "TopicId": "@TGS#_@TGS#cX@TOPIC#_t"}, 1, "group", id="group-topic"
    ),
    pytest.param(
        GROUP_RECALL,
        {**sample_body("group"), "MsgSeqList": [{"MsgSeq": 77}], "EventTime": None},
        1,
        "group",
        id="group-old-intl",
    ),
    pytest.param(
        OFFICIAL_ACCOUNT_RECALL, sample_body("official_account", items=2), 2, "official_account", id="official-account"
    ),
]


@pytest.mark.parametrize(("command", "body", "count", "ctype"), VARIANTS)
async def test_variant_is_delivered_with_every_property(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    command: str,
    body: dict[str, Any],
    count: int,
    ctype: str,
) -> None:
    """Each recall variant yields its events in the bound queue, with body, routing key, properties and CE headers."""
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path)
    response = await client.post(target(command), data=orjson.dumps(body))
    assert 200 == response.status
    messages = await read_messages(amqp, names["queue"], count)
    assert 0 == await queue_depth(amqp, names["queue"])  # exactly `count`, no more
    for message in messages:
        event = orjson.loads(message.body)
        validate_event(event)
        assert f"message.revoked.{ctype}" == message.routing_key
        assert names["exchange"] == message.exchange
        assert (2, "application/json", event["eventID"], "message.revoked", "revoke-relay") == (
            message.delivery_mode.value,
            message.content_type,
            message.message_id,
            message.type,
            message.app_id,
        )
        received = datetime.fromisoformat(event["receivedAt"].replace("Z", "+00:00"))
        assert message.timestamp == received.replace(microsecond=0, tzinfo=UTC)
        assert {
            "cloudEvents_specversion": "1.0",
            "cloudEvents_id": event["eventID"],
            "cloudEvents_source": f"tencent-im/{APP}",
            "cloudEvents_type": "im.message.revoked",
            "cloudEvents_subject": event["msgID"],
            "cloudEvents_time": event["eventTime"],
        } == {k: v for k, v in message.headers.items() if not k.startswith("x-")}  # quorum adds x-delivery-count
        assert command == event["callbackCommand"]
        assert ctype == event["conversation"]["type"]


async def test_every_configured_queue_receives_every_event(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """RELAY_QUEUES declares quorum queues, each bound with message.revoked.#; each gets a copy."""
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path, queues=f"{names['queue']},{names['queue2']}")
    assert 200 == (await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))).status
    first = await read_messages(amqp, names["queue"], 1)
    second = await read_messages(amqp, names["queue2"], 1)
    assert first[0].message_id == second[0].message_id
    # The queue is a quorum queue: re-declaring it as classic is refused by the broker.
    with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed):
        await amqp.declare_queue(names["queue"], durable=True, arguments={"x-queue-type": "classic"})


@pytest.mark.parametrize(
    ("make_target", "status"),
    [
        pytest.param(lambda: target(C2C_RECALL, token=None), 401, id="unsigned"),
        pytest.param(lambda: target(C2C_RECALL, request_time=1), 401, id="stale"),
        pytest.param(lambda: f"/tencent-im/callback?{callback_query(C2C_RECALL, '1999', None)}", 403, id="unknown-app"),
    ],
)
async def test_refused_callbacks_publish_nothing(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
    make_target: Callable[[], str],
    status: int,
) -> None:
    """Unsigned, stale or foreign callbacks get 401/403 and leave the queue empty."""
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path)
    assert status == (await client.post(make_target(), data=orjson.dumps(sample_body("c2c")))).status
    # A valid callback afterwards proves the path works and that it is the only message.
    assert 200 == (await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))).status
    await read_messages(amqp, names["queue"], 1)
    assert 0 == await queue_depth(amqp, names["queue"])


async def test_same_callback_twice_keeps_the_event_id(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """A redelivered callback is published again with the same message_id, so consumers can dedupe."""
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path)
    body = orjson.dumps(sample_body("c2c"))
    for _ in range(2):
        assert 200 == (await client.post(target(C2C_RECALL), data=body)).status
    first, second = await read_messages(amqp, names["queue"], 2)
    assert first.message_id == second.message_id


async def test_unroutable_event_is_spooled_then_delivered_once_bound(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """With no queue bound RabbitMQ returns the message: it is spooled (never counted as published), then
    delivered by the drainer once a queue is bound."""
    registry = CollectorRegistry()
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path, queues="", registry=registry)
    body = sample_body("c2c")
    response = await client.post(target(C2C_RECALL), data=orjson.dumps(body))
    assert 200 == response.status
    assert registry.get_sample_value("relay_publish_failures_total", {"reason": "returned"}) >= 1
    assert 0 == registry.get_sample_value("relay_events_published_total", {"conversation_type": "c2c"})
    assert client.app[SPOOL].events == 1  # type: ignore[index]
    assert 200 == (await client.get("/readyz")).status  # the channel survives a return

    queue = await amqp.declare_queue(names["queue"], durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(names["exchange"], "message.revoked.#")
    (message,) = await read_messages(amqp, names["queue"], 1, timeout=15)
    assert body["MsgKey"] == orjson.loads(message.body)["msgKey"]
    async with asyncio.timeout(5):
        while client.app[SPOOL].events:  # type: ignore[index]
            await asyncio.sleep(0.05)


async def test_no_broker_at_start_spools_and_stays_ready(
    aiohttp_client: ClientFactory, names: dict[str, str], tmp_path: Path
) -> None:
    """With nothing at the AMQP URL the relay starts, stays ready through the spool, and answers 200."""
    proxy = TcpProxy("127.0.0.1", 1)  # only to reserve a free port that nothing listens on
    await proxy.start()
    port = proxy.port
    await proxy.stop()
    client = await start_relay(aiohttp_client, f"amqp://guest:guest@127.0.0.1:{port}/", names, tmp_path, wait=False)
    ready = await client.get("/readyz")
    assert (200, False) == (ready.status, (await ready.json())["broker"])
    response = await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))
    assert 200 == response.status
    assert 1 == client.app[SPOOL].events  # type: ignore[index]


async def test_not_ready_until_the_exchange_and_queues_are_declared(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    names: dict[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a new connection still declares its exchange and queues, the relay does not publish on it
    (a callback is spooled) and /readyz says broker false; once declared, it names the endpoint."""
    declaring, go_on = asyncio.Event(), asyncio.Event()
    declare = AmqpPublisher._declare

    async def held(self: AmqpPublisher, *args: Any, **kwargs: Any) -> None:
        declaring.set()
        await go_on.wait()
        await declare(self, *args, **kwargs)

    monkeypatch.setattr(AmqpPublisher, "_declare", held)
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path, wait=False)
    await asyncio.wait_for(declaring.wait(), 10)
    ready = await (await client.get("/readyz")).json()
    assert (False, None) == (ready["broker"], ready["endpoint"])
    response = await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))
    assert (200, 1) == (response.status, client.app[SPOOL].events)  # type: ignore[index]
    go_on.set()
    publisher = cast(AmqpPublisher, client.app[PUBLISHER])  # type: ignore[index]
    await asyncio.wait_for(publisher.connected.wait(), 10)
    ready = await (await client.get("/readyz")).json()
    assert (True, amqp_url.split("@")[1].rstrip("/")) == (ready["broker"], ready["endpoint"])


async def test_broker_loss_spools_and_recovery_drains_in_order(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """Cut the link to a real broker: callbacks still get 200 (spooled); after recovery every event is
    delivered, in the order the callbacks were answered."""
    from urllib.parse import urlsplit

    parts = urlsplit(amqp_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5672)
    await proxy.start()
    try:
        url = f"amqp://{parts.username}:{parts.password}@127.0.0.1:{proxy.port}{parts.path or '/'}"
        client = await start_relay(aiohttp_client, url, names, tmp_path)
        publisher = cast(AmqpPublisher, client.app[PUBLISHER])  # type: ignore[index]
        bodies = [sample_body("c2c") for _ in range(6)]
        assert 200 == (await client.post(target(C2C_RECALL), data=orjson.dumps(bodies[0]))).status

        await proxy.stop()
        async with asyncio.timeout(5):
            while publisher.ready:
                await asyncio.sleep(0.02)
        for body in bodies[1:5]:
            assert 200 == (await client.post(target(C2C_RECALL), data=orjson.dumps(body))).status
        assert 4 == client.app[SPOOL].events  # type: ignore[index]

        await proxy.start(proxy.port)
        await asyncio.wait_for(publisher.connected.wait(), 10)
        assert 200 == (await client.post(target(C2C_RECALL), data=orjson.dumps(bodies[5]))).status
        messages = await read_messages(amqp, names["queue"], 6, timeout=15)
        assert [b["MsgKey"] for b in bodies] == [orjson.loads(m.body)["msgKey"] for m in messages]
    finally:
        await proxy.stop()


async def test_spool_drain_command_forwards_everything(
    amqp_url: str, amqp: aio_pika.abc.AbstractChannel, names: dict[str, str], tmp_path: Path
) -> None:
    """`relay spool drain` forwards what a stopped relay left behind, then exits 0 with the spool empty."""
    from relay.cli import drain_spool
    from relay.spool import Spool
    from tests.helpers import envelopes

    items = envelopes(4)
    spool = Spool(tmp_path, 16 * 1024 * 1024)
    await spool.open()
    await spool.put(items)
    await spool.close()
    settings = make_settings(
        tmp_path, RELAY_AMQP_URL=amqp_url, RELAY_EXCHANGE=names["exchange"], RELAY_QUEUES=names["queue"]
    )
    assert 0 == await drain_spool(settings, tmp_path, 15)
    messages = await read_messages(amqp, names["queue"], 4)
    assert [e.event_id for e in items] == [m.message_id for m in messages]


async def test_queue_declared_by_a_consumer_with_other_arguments_is_bound_not_fought(
    aiohttp_client: ClientFactory,
    amqp_url: str,
    amqp: aio_pika.abc.AbstractChannel,
    names: dict[str, str],
    tmp_path: Path,
) -> None:
    """A RELAY_QUEUES queue that a consumer declared with dead-lettering does not stop the relay: it is
    bound and receives events (a re-declare with other arguments would be refused with 406)."""
    await amqp.declare_queue(
        names["queue"],
        durable=True,
        arguments={"x-queue-type": "quorum", "x-delivery-limit": 5, "x-dead-letter-exchange": "dlx"},
    )
    client = await start_relay(aiohttp_client, amqp_url, names, tmp_path)
    assert 200 == (await client.post(target(C2C_RECALL), data=orjson.dumps(sample_body("c2c")))).status
    (message,) = await read_messages(amqp, names["queue"], 1)
    assert "message.revoked.c2c" == message.routing_key
