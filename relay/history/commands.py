"""``relay history``, ``relay replay`` and ``relay export``: read a window of the history stream, print,
republish or export what matches (docs/history.md). Each returns an exit status; errors are one line."""

from __future__ import annotations

import asyncio
import csv
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

import aio_pika

from relay.history.export import CSV_COLUMNS, csv_row
from relay.history.select import Selection, binding_matches
from relay.history.stream import HistoryError, Record, connect, read
from relay.publisher import AUDIT_BINDING_KEY
from relay.settings import Settings
from relay.tail import render_event

REPLAY_HEADER = "x-relay-replay"


@dataclass(frozen=True, slots=True)
class Source:
    """Where the history is: the broker and the stream's name."""

    settings: Settings
    stream: str
    idle: float = 1.5

    async def selected(self, selection: Selection, name: str, skipped: list[int]) -> AsyncIterator[Record]:
        """The records of the stream in *selection*, oldest first; entries that are not JSON events are
        counted in ``skipped[0]``."""
        async for record in read(
            self.settings.amqp_endpoints,
            self.settings.amqp_url,
            self.stream,
            selection.since,
            name=name,
            idle=self.idle,
        ):
            if record.event is None:
                skipped[0] += 1
                continue
            if selection.matches(record.event, record.cloudevents_time):
                yield record


def _note_skipped(command: str, skipped: int, err: TextIO) -> None:
    if skipped:
        print(f"relay {command}: {skipped} entries of the stream were not JSON events (left out)", file=err)


async def history(source: Source, selection: Selection, out: TextIO, err: TextIO, *, as_json: bool) -> int:
    """Print the selected events as ``relay tail`` does; 0 also when none match."""
    skipped = [0]
    try:
        async for record in source.selected(selection, "revoke-relay history", skipped):
            out.write(render_event(record.body, record.routing_key, record.message_id, as_json=as_json) + "\n")
    except HistoryError as exc:
        print(f"relay history: {exc}", file=err)
        return 1
    except BrokenPipeError:  # `relay history … | head`
        return 0
    out.flush()
    _note_skipped("history", skipped[0], err)
    return 0


async def export(source: Source, selection: Selection, out: TextIO, err: TextIO, *, fmt: str) -> int:
    """Write the selected events as JSON lines (the body as published) or CSV (:data:`CSV_COLUMNS`)."""
    skipped, count = [0], 0
    writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(CSV_COLUMNS)
    try:
        async for record in source.selected(selection, "revoke-relay export", skipped):
            assert record.event is not None
            if writer is not None:
                writer.writerow(csv_row(record.event, record.cloudevents_time))
            else:
                out.write(record.body.decode("utf-8", "replace") + "\n")
            count += 1
    except HistoryError as exc:
        print(f"relay export: {exc}", file=err)
        return 1
    out.flush()
    _note_skipped("export", skipped[0], err)
    print(f"relay export: {count} events ({fmt})", file=err)
    return 0


@dataclass(frozen=True, slots=True)
class Target:
    """Where a replay goes: one existing queue (through the default exchange) or a routing key on RELAY_EXCHANGE."""

    queue: str | None = None
    routing_key: str | None = None


def refuse_target(target: Target) -> str | None:
    """Why *target* may not be replayed to, or None: a routing key that the stream's own binding would
    match would append the replay to the history."""
    if target.routing_key is not None and binding_matches(AUDIT_BINDING_KEY, target.routing_key):
        return (
            f"routing key {target.routing_key!r} matches the history stream's binding {AUDIT_BINDING_KEY!r}:"
            " the replay would enter the history again; use --to-queue, or a key your consumer binds outside"
            " message.#"
        )
    return None


def new_replay_id() -> str:
    return f"replay-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


async def replay(
    source: Source,
    selection: Selection,
    target: Target,
    out: TextIO,
    err: TextIO,
    *,
    dry_run: bool = False,
    rate: float | None = None,
    replay_id: str | None = None,
) -> int:
    """Publish each selected eventID once more, confirmed, with its body, message_id and headers plus
    ``x-relay-replay``; print a summary. 1 when the target is refused or missing, or the broker fails."""
    why = refuse_target(target)
    if why is not None:
        print(f"relay replay: {why}", file=err)
        return 2
    selection.unique = True  # a replay publishes each eventID once, whatever the log holds
    rid = replay_id or new_replay_id()
    settings = source.settings
    started = time.monotonic()
    matched = published = 0
    skipped = [0]
    progress = err.isatty()
    connection = None
    try:
        exchange: aio_pika.abc.AbstractExchange | None = None
        if not dry_run:
            connection = await connect(settings.amqp_endpoints, settings.amqp_url, "revoke-relay replay")
            exchange = await _target_exchange(connection, settings, target)
        routing_key = target.queue if target.queue is not None else target.routing_key
        assert routing_key is not None
        pace = 1.0 / rate if rate else 0.0
        next_at = time.monotonic()
        async for record in source.selected(selection, "revoke-relay replay (read)", skipped):
            matched += 1
            if exchange is None:
                continue
            if pace:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                next_at = max(next_at, time.monotonic() - pace) + pace
            try:
                await exchange.publish(_message(record, rid), routing_key, mandatory=True)
            except aio_pika.exceptions.DeliveryError as exc:
                raise HistoryError(f"the broker did not take event {record.message_id}: {exc}") from exc
            published += 1
            if progress and published % 100 == 0:
                err.write(f"\rrelay replay: {published} published")
                err.flush()
    except HistoryError as exc:
        if progress:
            err.write("\n")
        done = f" (published {published} of {matched} matched before it)" if matched else ""
        print(f"relay replay: {exc}{done}", file=err)
        return 1
    finally:
        if connection is not None:
            await connection.close()
    if progress and published >= 100:
        err.write("\n")
    _note_skipped("replay", skipped[0], err)
    where = f"queue {target.queue!r}" if target.queue is not None else f"{settings.exchange!r} with {routing_key!r}"
    verb = "would publish" if dry_run else "published"
    print(
        f"relay replay {rid}: matched {matched}, {verb} {matched if dry_run else published} to {where}"
        f" in {time.monotonic() - started:.2f} s",
        file=out,
    )
    return 0


async def _target_exchange(
    connection: aio_pika.abc.AbstractConnection, settings: Settings, target: Target
) -> aio_pika.abc.AbstractExchange:
    """A confirming channel's exchange for *target*, once the queue or exchange is known to exist."""
    check = await connection.channel()
    if target.queue is not None:
        try:
            await check.declare_queue(target.queue, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise HistoryError(
                f"queue {target.queue!r} does not exist; declare it first (nothing was published)"
            ) from exc
    else:
        try:
            await check.get_exchange(settings.exchange, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            raise HistoryError(f"exchange {settings.exchange!r} does not exist (is RELAY_EXCHANGE right?)") from exc
    await check.close()
    # Confirms and mandatory: a publish counts once the broker confirmed it, and an unroutable one
    # (the queue deleted meanwhile) comes back as basic.return, raised here as DeliveryError.
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    if target.queue is not None:
        return channel.default_exchange
    return await channel.get_exchange(settings.exchange, ensure=False)


def _message(record: Record, replay_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        record.body,
        headers={**record.headers, REPLAY_HEADER: replay_id},
        content_type=record.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=record.message_id,
        type=record.type,
        app_id=record.app_id,
        timestamp=record.timestamp,
    )
