"""``relay tail``: print the events crossing the exchange, live, through a private server-named queue.

For operators and scripts; never part of the delivery path. The queue is exclusive and auto-delete,
so it disappears with the connection and never holds events that a real consumer should get.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import TextIO

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage

from relay import broker
from relay.endpoints import redact
from relay.events import EVENT_TYPE
from relay.settings import Settings

DEFAULT_KEY = f"{EVENT_TYPE}.#"
CONNECTION_NAME = "revoke-relay tail"


def _clean(value: object) -> str:
    """A field as one printable token: ``-`` for null, control characters (terminal escapes) replaced."""
    text = "-" if value is None else str(value)
    return "".join(c if c.isprintable() else "?" for c in text) or "-"


def _reason(value: object, limit: int = 120) -> str:
    """`` reason="…"`` (cut to *limit* characters), or nothing when there is none."""
    if not isinstance(value, str) or not value:
        return ""
    text = _clean(value).replace('"', "'")
    return f' reason="{text[:limit]}{"…" if len(text) > limit else ""}"'


def _object(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def render(message: AbstractIncomingMessage, *, as_json: bool) -> str:
    """One output line for a delivery: see :func:`render_event`."""
    return render_event(message.body, message.routing_key, message.message_id, as_json=as_json)


def render_event(body: bytes, routing_key: str | None, message_id: str | None, *, as_json: bool) -> str:
    """One output line: the event with its routing key and message_id (JSON), or an aligned summary:
    event time, conversation type, eventID, operator role/userID, sender, msgID; for the recall
    gateway's audit events the request's time and moderator, then the event type, requestID and
    (for a failure) status and Tencent's code; then, for either, the requestID of a joined
    revocation and the reason."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        event = None
    if as_json:
        line = {"routingKey": routing_key, "messageID": message_id, "event": event}
        if not isinstance(event, dict):
            line["raw"] = body.decode("utf-8", "replace")
        return orjson.dumps(line).decode()
    if not isinstance(event, dict):
        return f"{_clean(routing_key)}  {_clean(message_id)}  (not a JSON event)"
    operator, conversation = _object(event.get("operator")), _object(event.get("conversation"))
    at, sender, extra = event.get("eventTime"), event.get("sender"), ""
    if event.get("type", EVENT_TYPE) != EVENT_TYPE:
        # An audit event of the recall gateway: requested by a moderator; a failure says why.
        operator = {"role": "moderator", "userID": _object(event.get("moderator")).get("userID")}
        at, sender = event.get("requestedAt"), conversation.get("sender")
        parts = [_clean(event.get("type")), f"request={_clean(event.get('requestID'))}"]
        if event.get("status") is not None:
            parts += [f"status={_clean(event.get('status'))}", f"tencentCode={_clean(event.get('tencentCode'))}"]
        extra = f"  [{' '.join(parts)}]{_reason(event.get('reason'))}"
    else:
        # A revocation: the reason (a recall-gateway request's, or a Matrix redaction's) and its requestID.
        request = _object(event.get("recallRequest")).get("requestID")
        extra = (f"  [request={_clean(request)}]" if request is not None else "") + _reason(event.get("reason"))
    by = f"{_clean(operator.get('role'))}/{_clean(operator.get('userID'))}"
    # Fixed-width columns first and the msgID (any length) last, so the columns line up.
    return (
        f"{_clean(at):<24}  {_clean(conversation.get('type')):<16}  "
        f"{_clean(event.get('eventID')):<36}  by={by:<28}  from={_clean(sender):<16}  "
        f"msg={_clean(event.get('msgID'))}{extra}"
    )


async def _run(
    settings: Settings,
    out: TextIO,
    err: TextIO,
    key: str,
    as_json: bool,
    count: int | None,
    ready: asyncio.Event | None,
) -> int:
    try:
        connection = await broker.connect(settings.amqp_endpoints, name=CONNECTION_NAME, timeout=10)
    except (OSError, TimeoutError, aio_pika.exceptions.AMQPError) as exc:
        print(f"relay tail: cannot connect to {redact(settings.amqp_url)}: {exc}", file=err)
        return 1
    try:
        channel = await connection.channel()
        try:
            # Passive: a tail that declared the exchange could create it with other properties than
            # the relay's, and then the relay's own declaration would fail.
            exchange = await channel.get_exchange(settings.exchange, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            print(
                f"relay tail: exchange {settings.exchange!r} does not exist; the relay declares it when it starts"
                " (is RELAY_EXCHANGE right?)",
                file=err,
            )
            return 1
        await channel.set_qos(prefetch_count=100)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)  # server-named
        await queue.bind(exchange, key)
        print(
            f"relay tail: queue {queue.name!r} bound to {settings.exchange!r} with {key!r} on {connection.endpoint}"
            " (Ctrl-C stops)",
            file=err,
        )
        if ready is not None:
            ready.set()
        seen = 0
        async with queue.iterator() as messages:
            async for message in messages:
                out.write(render(message, as_json=as_json) + "\n")
                out.flush()
                await message.ack()  # our private queue: the ack only frees the broker's memory
                seen += 1
                if count is not None and seen >= count:
                    return 0
        print("relay tail: the broker closed the channel", file=err)
        return 1
    except BrokenPipeError:  # `relay tail | head -n 3`
        return 0
    except (ConnectionError, aio_pika.exceptions.AMQPError) as exc:
        print(f"relay tail: {exc!r}", file=err)
        return 1
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def tail(
    settings: Settings,
    out: TextIO,
    *,
    key: str = DEFAULT_KEY,
    as_json: bool = False,
    count: int | None = None,
    give_up_after: float | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    err: TextIO | None = None,
) -> int:
    """Print the events bound with *key* until *count* were printed, *give_up_after* seconds passed or *stop* is set
    (by default: on SIGINT/SIGTERM). *ready* is set once the queue is bound. Returns the exit status:
    0, or 1 when the broker or the exchange is missing or time ran out before *count* events."""
    err = sys.stderr if err is None else err
    if count is not None and count < 1:
        print("relay tail: --count must be at least 1", file=err)
        return 2
    handle_signals = stop is None
    stop = asyncio.Event() if stop is None else stop
    loop = asyncio.get_running_loop()
    if handle_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
    work = asyncio.create_task(_run(settings, out, err, key, as_json, count, ready), name="relay-tail")
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({work, stopper}, timeout=give_up_after, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, stopper):
            if not task.done():
                task.cancel()  # the work task closes its connection on the way out
        await asyncio.gather(work, stopper, return_exceptions=True)
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
    if work in done:
        return work.result()
    if not done and count is not None:
        print(f"relay tail: fewer than {count} events within {give_up_after:g} s", file=err)
        return 1
    return 0
