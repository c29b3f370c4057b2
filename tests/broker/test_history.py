"""The history stream against a real RabbitMQ: declared with its retention, read by window and filters,
replayed to one queue only, exported (relay history / replay / export, docs/history.md)."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import orjson
import pytest
from prometheus_client import CollectorRegistry

from relay import cli
from relay.events import Envelope
from relay.history import Selection, parse_filter
from relay.history.commands import REPLAY_HEADER, Source, Target, export, history, replay
from relay.history.export import CSV_COLUMNS
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher
from relay.settings import Settings
from relay.tencent.callback import CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import sample_body
from tests.helpers import APP

pytestmark = pytest.mark.broker

RETENTION = {"x-max-age": "7D", "x-max-length-bytes": 50_000_000}


def received(kind: str, at: datetime, n: int = 1) -> list[Envelope]:
    """*n* fresh sample events of *kind* whose receivedAt is *at*."""
    body = orjson.dumps(sample_body(kind, items=n))
    return [e.envelope() for e in normalize(body, CallbackQuery(sdk_app_id=APP), int(at.timestamp() * 1000)).events]


@pytest.fixture
async def stream(amqp: aio_pika.abc.AbstractChannel, names: dict[str, str]) -> AsyncIterator[str]:
    """This test's stream name; the stream is deleted afterwards."""
    name = names["queue"].replace("test.q.", "test.s.")
    yield name
    await amqp.queue_delete(name)


@pytest.fixture
def settings(amqp_url: str, names: dict[str, str], stream: str) -> Settings:
    return Settings.from_env(
        {"RELAY_AMQP_URL": amqp_url, "RELAY_EXCHANGE": names["exchange"], "RELAY_AUDIT_STREAM": stream},
        require_apps=False,
    )


@pytest.fixture
async def publisher(settings: Settings, request: pytest.FixtureRequest) -> AsyncIterator[AmqpPublisher]:
    """The relay's own publisher with the test's stream (its retention: RETENTION)."""
    publisher = AmqpPublisher(
        settings.amqp_endpoints,
        settings.exchange,
        (),
        5.0,
        Metrics(CollectorRegistry()),
        connection_name=f"test:{request.node.name}",
        audit_stream=settings.audit_stream,
        stream_arguments=RETENTION,
    )
    await publisher.start()
    await asyncio.wait_for(publisher.connected.wait(), 10)
    yield publisher
    await publisher.close()


async def publish(publisher: AmqpPublisher, items: list[Envelope], batch: int = 500) -> None:
    for start in range(0, len(items), batch):
        await asyncio.gather(*(publisher.publish(e) for e in items[start : start + batch]))


def source(settings: Settings) -> Source:
    return Source(settings, settings.audit_stream or "", idle=1.0)


async def shown(settings: Settings, selection: Selection) -> list[str]:
    """The eventIDs ``relay history --json`` prints for *selection*."""
    out, err = io.StringIO(), io.StringIO()
    assert 0 == await history(source(settings), selection, out, err, as_json=True), err.getvalue()
    return [orjson.loads(line)["event"]["eventID"] for line in out.getvalue().splitlines()]


async def test_stream_is_declared_with_the_retention_it_was_given(
    amqp: aio_pika.abc.AbstractChannel, amqp_url: str, stream: str, publisher: AmqpPublisher
) -> None:
    """The relay declares a stream: declaring it again with the same arguments succeeds, with another
    x-max-age the broker refuses (PRECONDITION_FAILED), so the arguments are exactly those configured."""
    same = {"x-queue-type": "stream", **RETENTION}
    await amqp.declare_queue(stream, durable=True, arguments=same)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aio_pika.exceptions.ChannelPreconditionFailed, match="x-max-age"):
            await channel.declare_queue(stream, durable=True, arguments={**same, "x-max-age": "8D"})


async def test_history_reads_every_event_kind_the_exchange_routes(
    settings: Settings, publisher: AmqpPublisher, names: dict[str, str]
) -> None:
    """The stream binds message.#: a revocation and an audit-type routing key both land in it, in order."""
    now = datetime.now(UTC)
    revoked = received("c2c", now)[0]
    audit = Envelope(
        event_id="audit-1",
        routing_key="message.recall_requested.c2c",
        body=orjson.dumps({"version": 2, "eventID": "audit-1", "type": "message.recall_requested", "requestID": "r1"}),
        timestamp=int(now.timestamp()),
        source="tencent-im/1",
        subject="m",
        time=now.isoformat().replace("+00:00", "Z"),
        conversation_key="c2c/x",
    )
    await publish(publisher, [revoked, audit])
    assert [revoked.event_id, "audit-1"] == await shown(settings, Selection(since=now - timedelta(minutes=1)))


async def test_each_when_form_selects_on_received_at(settings: Settings, publisher: AmqpPublisher) -> None:
    """first, a duration, an ISO time with --until: the window is [since, until) on receivedAt, not on
    when the entry was appended (all three are appended now)."""
    now = datetime.now(UTC)
    old, middle, recent = (received("c2c", now - timedelta(minutes=m))[0] for m in (180, 90, 10))
    await publish(publisher, [old, middle, recent])
    everything = await shown(settings, Selection(since=None))
    two_hours = await shown(settings, Selection(since=now - timedelta(hours=2)))
    window = await shown(settings, Selection(since=now - timedelta(minutes=91), until=now - timedelta(minutes=30)))
    after = await shown(settings, Selection(since=now + timedelta(minutes=1)))
    assert [old.event_id, middle.event_id, recent.event_id] == everything
    assert [middle.event_id, recent.event_id] == two_hours
    assert [middle.event_id] == window
    assert [] == after


async def test_filters_on_dotted_paths_must_all_match(settings: Settings, publisher: AmqpPublisher) -> None:
    """--filter conversation.type=group --filter sdkAppID=APP keeps only the group events of the app."""
    now = datetime.now(UTC)
    groups, c2c = received("group", now, n=3), received("c2c", now)
    await publish(publisher, [*groups, *c2c])
    selection = Selection(filters=(parse_filter("conversation.type=group"), parse_filter(f"sdkAppID={APP}")))
    assert [e.event_id for e in groups] == await shown(settings, selection)
    none = Selection(filters=(parse_filter("conversation.type=group"), parse_filter("sdkAppID=1")))
    assert [] == await shown(settings, none)


async def test_unique_keeps_the_first_copy_of_each_event_id(settings: Settings, publisher: AmqpPublisher) -> None:
    """The log holds both copies of a duplicate delivery; --unique prints it once."""
    first, second = received("c2c", datetime.now(UTC)) + received("group", datetime.now(UTC))
    await publish(publisher, [first, second, first])
    assert [first.event_id, second.event_id, first.event_id] == await shown(settings, Selection())
    assert [first.event_id, second.event_id] == await shown(settings, Selection(unique=True))


async def test_replay_reaches_only_the_target_queue(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, publisher: AmqpPublisher, names: dict[str, str]
) -> None:
    """A replay to a fresh queue: it gets each eventID once with its body, message_id and headers plus
    x-relay-replay; a queue bound to the exchange sees nothing, and the history does not grow."""
    items = received("group", datetime.now(UTC), n=4)
    await publish(publisher, [*items, items[0]])
    target = await amqp.declare_queue(names["queue"], durable=True, arguments={"x-queue-type": "quorum"})
    bystander = await amqp.declare_queue(names["queue2"], durable=True, arguments={"x-queue-type": "quorum"})
    await bystander.bind(names["exchange"], "#")
    out, err = io.StringIO(), io.StringIO()
    status = await replay(source(settings), Selection(), Target(queue=names["queue"]), out, err, replay_id="replay-t1")
    assert 0 == status, err.getvalue()
    assert "matched 4, published 4" in out.getvalue()
    got = []
    while (message := await target.get(no_ack=True, fail=False)) is not None:
        got.append(message)
    assert [e.event_id for e in items] == [m.message_id for m in got]
    assert [e.body for e in items] == [m.body for m in got]
    assert {"replay-t1"} == {m.headers[REPLAY_HEADER] for m in got}
    assert items[0].event_id == got[0].headers["cloudEvents_id"]
    assert "x-stream-offset" not in got[0].headers
    assert None is await bystander.get(no_ack=True, fail=False)
    assert 5 == len(await shown(settings, Selection()))


async def test_replay_to_a_missing_queue_is_refused_naming_it(
    settings: Settings, publisher: AmqpPublisher, names: dict[str, str]
) -> None:
    """--to-queue of a queue that does not exist: exit 1 and the queue's name, nothing published."""
    await publish(publisher, received("c2c", datetime.now(UTC)))
    out, err = io.StringIO(), io.StringIO()
    assert 1 == await replay(source(settings), Selection(), Target(queue=names["queue2"]), out, err)
    assert f"queue {names['queue2']!r} does not exist" in err.getvalue()


async def test_replay_to_a_key_the_stream_binds_is_refused(settings: Settings) -> None:
    """--routing-key message.revoked.c2c would re-enter the history (message.#): refused before any read."""
    out, err = io.StringIO(), io.StringIO()
    assert 2 == await replay(source(settings), Selection(), Target(routing_key="message.revoked.c2c"), out, err)
    assert "matches the history stream's binding 'message.#'" in err.getvalue()


async def test_replay_by_routing_key_and_dry_run(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, publisher: AmqpPublisher, names: dict[str, str]
) -> None:
    """--dry-run counts and publishes nothing; --routing-key publishes to RELAY_EXCHANGE with that key."""
    items = received("c2c", datetime.now(UTC)) + received("group", datetime.now(UTC))
    await publish(publisher, items)
    queue = await amqp.declare_queue(names["queue"], durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(names["exchange"], "replay.moderation")
    target = Target(routing_key="replay.moderation")
    out, err = io.StringIO(), io.StringIO()
    assert 0 == await replay(source(settings), Selection(), target, out, err, dry_run=True)
    assert "matched 2, would publish 2" in out.getvalue()
    assert None is await queue.get(no_ack=True, fail=False)
    assert 0 == await replay(source(settings), Selection(), target, out, err, rate=50)
    first = await queue.get(no_ack=True)
    assert (items[0].event_id, "replay.moderation") == (first.message_id, first.routing_key)


async def test_replay_rate_paces_the_publishes(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, publisher: AmqpPublisher, names: dict[str, str]
) -> None:
    """--rate 20 with 11 events: the ten gaps between publishes take at least half a second."""
    await publish(publisher, received("group", datetime.now(UTC), n=11))
    await amqp.declare_queue(names["queue"], durable=True, arguments={"x-queue-type": "quorum"})
    out, err = io.StringIO(), io.StringIO()
    started = asyncio.get_running_loop().time()
    assert 0 == await replay(source(settings), Selection(), Target(queue=names["queue"]), out, err, rate=20)
    paced = asyncio.get_running_loop().time() - started
    assert "published 11" in out.getvalue()
    assert paced >= 0.5


@pytest.mark.parametrize("kind", ["quorum", "classic"])
async def test_a_queue_that_is_not_a_stream_is_refused_and_keeps_its_message(
    amqp: aio_pika.abc.AbstractChannel, settings: Settings, names: dict[str, str], kind: str
) -> None:
    """--stream naming a quorum or classic queue: refused ("not a stream"), exit 1, its message still there."""
    queue = await amqp.declare_queue(names["queue2"], durable=True, arguments={"x-queue-type": kind})
    await amqp.default_exchange.publish(aio_pika.Message(b"{}", message_id="keep-me"), names["queue2"])
    out, err = io.StringIO(), io.StringIO()
    not_a_stream = Source(settings, names["queue2"], idle=1.0)
    assert 1 == await history(not_a_stream, Selection(), out, err, as_json=False)
    assert f"queue {names['queue2']!r} is not a stream" in err.getvalue()
    kept = await queue.get(no_ack=True, timeout=5)
    assert "keep-me" == kept.message_id


async def test_export_of_ten_thousand_events_as_csv_and_jsonl(
    settings: Settings, publisher: AmqpPublisher, tmp_path: Path
) -> None:
    """10,000 events export to 10,000 JSON lines (the bodies as published) and a CSV with the documented
    header and one row per event."""
    now = datetime.now(UTC)
    items = [e for _ in range(100) for e in received("group", now, n=100)]
    assert 10_000 == len(items)
    await publish(publisher, items)
    err = io.StringIO()
    jsonl, table = tmp_path / "out.jsonl", tmp_path / "out.csv"
    with jsonl.open("w") as out:
        assert 0 == await export(source(settings), Selection(), out, err, fmt="jsonl"), err.getvalue()
    with table.open("w", newline="") as out:
        assert 0 == await export(source(settings), Selection(), out, err, fmt="csv"), err.getvalue()
    lines = jsonl.read_text().splitlines()
    assert [e.body for e in items] == [line.encode() for line in lines]
    with table.open(newline="") as read_back:
        rows = list(csv.reader(read_back))
    assert list(CSV_COLUMNS) == rows[0]
    assert [e.event_id for e in items] == [row[1] for row in rows[1:]]
    assert ["message.revoked", APP] == rows[1][2:4]
    assert rows[1][4].startswith("group/")


def test_missing_stream_is_one_line_and_exit_1(amqp_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """relay history on a stream that does not exist: a clear message, exit 1, no traceback."""
    env = {"RELAY_AMQP_URL": amqp_url, "RELAY_AUDIT_STREAM": "test.s.never.declared"}
    assert 1 == cli.main(["history", "--since", "1h"], env)
    err = capsys.readouterr().err
    assert "stream 'test.s.never.declared' does not exist" in err
    assert "Traceback" not in err


def test_unreachable_broker_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    """relay export with no broker: a clear message, exit 1, no traceback."""
    env = {"RELAY_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/", "RELAY_AUDIT_STREAM": "s"}
    assert 1 == cli.main(["export", "--since", "first", "--format", "csv"], env)
    err = capsys.readouterr().err
    assert "cannot connect to amqp://guest:***@127.0.0.1:1/" in err
    assert "Traceback" not in err
