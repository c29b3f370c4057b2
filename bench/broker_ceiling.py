"""Measurement B: the broker ceiling. Confirmed, persistent, mandatory publishes of relay-sized
events (body, properties and CloudEvents headers of a real relay event) to a fresh topic exchange
bound to a quorum queue, as fast as a Python client can make the broker confirm them.

Three clients, each keeping a window of publishes in flight and counting confirms:

* ``aio-pika``: the relay's library; *window* concurrent ``exchange.publish`` calls on one channel.
* ``aiormq``: one level down; *window* concurrent ``basic_publish(..., wait=False)`` calls.
* ``raw``: an asyncio protocol speaking AMQP 0-9-1 itself (frames pre-encoded with pamqp),
  pipelining up to *window* unconfirmed publishes and tracking ``basic.ack`` by delivery tag with
  ``multiple`` acks; several messages per socket write. The fastest client we could write.

Run one variant (prints one JSON object); ``bench.run`` runs each in its own process so the
client's CPU is its own::

    python -m bench.broker_ceiling --variant raw --window 1024 --seconds 10 --broker-pid 1234
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import aiormq
import uvloop
from pamqp import commands as spec
from pamqp import frame as pframe
from pamqp.body import ContentBody
from pamqp.header import ContentHeader, ProtocolHeader

from bench import procstat
from bench.services import queue_count
from relay.events import APP_ID, EVENT_TYPE, Envelope
from relay.publisher import BINDING_KEY
from relay.tencent.callback import C2C_RECALL, CallbackQuery
from relay.tencent.normalize import normalize
from relay.tencent.samples import encode, sample_body

VARIANTS = ("aio-pika", "aiormq", "raw")
DEFAULT_URL = "amqp://guest:guest@127.0.0.1:5672/"


def relay_envelopes(count: int, app: str = "1400000001") -> list[Envelope]:
    """*count* distinct envelopes exactly as the relay builds them from C2C recall callbacks."""
    query = CallbackQuery(sdk_app_id=app, command=C2C_RECALL, platform="Android", client_ip="198.51.100.7")
    now_ms = int(time.time() * 1000)
    return [normalize(encode(sample_body("c2c")), query, now_ms).events[0].envelope() for _ in range(count)]


def envelope_sizes() -> dict[str, int]:
    """Body and whole-message (method + header + body frames) sizes of one relay event."""
    envelope = relay_envelopes(1)[0]
    return {"body_bytes": len(envelope.body), "frames_bytes": len(RawMessage.frames(envelope, "x" * 20, 1))}


@dataclass
class Counters:
    published: int = 0
    confirmed: int = 0
    nacked: int = 0
    returned: int = 0
    # Publish-to-confirm seconds, in confirm order (raw client only): the broker's own latency.
    latencies: list[float] = field(default_factory=list)


class Topology:
    """A fresh topic exchange and quorum queue bound like the relay's; deleted afterwards."""

    def __init__(self, url: str) -> None:
        tag = uuid.uuid4().hex[:10]
        self.url = url
        self.exchange = f"bench.bx.{tag}"
        self.queue = f"bench.bq.{tag}"

    async def declare(self) -> None:
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await channel.declare_queue(self.queue, durable=True, arguments={"x-queue-type": "quorum"})
            await queue.bind(exchange, BINDING_KEY)

    async def count_and_delete(self, at_least: int, settle: float = 20.0) -> int:
        """Messages in the queue (polled until it reaches *at_least* and is stable), then delete."""
        connection = await aio_pika.connect(self.url)
        async with connection:
            channel = await connection.channel()
            count = await queue_count(channel, self.queue, at_least, settle)
            await channel.queue_delete(self.queue)
            await channel.exchange_delete(self.exchange)
        return count


def _properties(envelope: Envelope) -> spec.Basic.Properties:
    return spec.Basic.Properties(
        content_type="application/json",
        delivery_mode=2,
        message_id=envelope.event_id,
        timestamp=datetime.datetime.fromtimestamp(envelope.timestamp, tz=datetime.UTC),
        message_type=EVENT_TYPE,
        app_id=APP_ID,
        headers=envelope.headers(),  # type: ignore[arg-type]
    )


# -- the window runner shared by the variants ------------------------------------------------------


async def measure_window(counters: Counters, seconds: float, warmup: float, broker_pid: int | None) -> dict[str, Any]:
    """Wait *warmup*, then count confirms over *seconds*; CPU of this process and the broker."""
    await asyncio.sleep(warmup)
    before = procstat.Snapshot.take()
    c0, t0, p0, l0 = counters.confirmed, time.perf_counter(), time.process_time(), len(counters.latencies)
    await asyncio.sleep(seconds)
    c1, t1, p1 = counters.confirmed, time.perf_counter(), time.process_time()
    latencies = sorted(counters.latencies[l0:])
    after = procstat.Snapshot.take()
    roles = {"broker": [broker_pid] if broker_pid else [], "client": [os.getpid()]}
    window = procstat.cpu_window(before, after, roles)
    confirmed = c1 - c0
    broker_cpu = window.roles["broker"] if broker_pid else None
    return {
        "msgs_per_s": round(confirmed / (t1 - t0), 1),
        "window_confirms": confirmed,
        "client_cpu_us_per_msg": round(1e6 * (p1 - p0) / confirmed, 1) if confirmed else None,
        "broker_cpu_us_per_msg": round(1e6 * broker_cpu / confirmed, 1) if confirmed and broker_cpu else None,
        "confirm_latency_ms": {
            f"p{q}": round(1000 * latencies[min(len(latencies) - 1, int(len(latencies) * q / 100))], 2)
            for q in (50, 90, 99)
        }
        if latencies
        else None,
        "cpu": window.as_dict(os.cpu_count() or 1),
    }


async def run_workers(
    publish_one: Callable[[int], Awaitable[bool]], counters: Counters, window: int, stop: asyncio.Event
) -> None:
    """*window* coroutines, each publishing and awaiting its confirm in a loop until *stop*."""

    async def worker(start: int) -> None:
        i = start
        while not stop.is_set():
            counters.published += 1
            if await publish_one(i):
                counters.confirmed += 1
            i += window

    await asyncio.gather(*(worker(n) for n in range(window)))


async def variant_aio_pika(url: str, topo: Topology, window: int, envelopes: list[Envelope], run: Runner) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(topo.exchange, ensure=False)
        messages = [
            (
                aio_pika.Message(
                    e.body,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    content_type="application/json",
                    message_id=e.event_id,
                    timestamp=e.timestamp,
                    type=EVENT_TYPE,
                    app_id=APP_ID,
                    headers=e.headers(),  # type: ignore[arg-type]
                ),
                e.routing_key,
            )
            for e in envelopes
        ]

        async def publish_one(i: int) -> bool:
            message, routing_key = messages[i % len(messages)]
            try:
                await exchange.publish(message, routing_key, mandatory=True)
            except aiormq.exceptions.PublishError:
                run.counters.returned += 1
                return False
            except aiormq.exceptions.DeliveryError:
                run.counters.nacked += 1
                return False
            return True

        await run.drive(lambda stop: run_workers(publish_one, run.counters, window, stop))


async def variant_aiormq(url: str, topo: Topology, window: int, envelopes: list[Envelope], run: Runner) -> None:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        messages = [(e.body, e.routing_key, _properties(e)) for e in envelopes]

        async def publish_one(i: int) -> bool:
            body, routing_key, properties = messages[i % len(messages)]
            confirmation = await channel.basic_publish(  # type: ignore[call-arg]  # aiormq's abc lacks `wait`
                body, exchange=topo.exchange, routing_key=routing_key, properties=properties, mandatory=True, wait=False
            )
            if isinstance(confirmation, spec.Basic.Ack):
                return True
            run.counters.nacked += 1
            return False

        await run.drive(lambda stop: run_workers(publish_one, run.counters, window, stop))
    finally:
        await connection.close()


# -- the raw AMQP 0-9-1 client -----------------------------------------------------------------------


class RawMessage:
    @staticmethod
    def frames(envelope: Envelope, exchange: str, channel: int) -> bytes:
        body = envelope.body
        return b"".join(
            (
                pframe.marshal(
                    spec.Basic.Publish(exchange=exchange, routing_key=envelope.routing_key, mandatory=True), channel
                ),
                pframe.marshal(ContentHeader(0, len(body), _properties(envelope)), channel),
                pframe.marshal(ContentBody(body), channel),
            )
        )


_ACK = (60 << 16) | 80
_NACK = (60 << 16) | 120
_RETURN = (60 << 16) | 50


class RawAmqp(asyncio.Protocol):
    """Just enough AMQP 0-9-1 for confirmed publishing on channel 1."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.handshaking = True
        self.counters = Counters()
        self.on_confirm: Callable[[], None] = lambda: None
        self.closed = asyncio.get_running_loop().create_future()
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.early: set[int] = set()  # tags confirmed singly ahead of settled_tag
        self.sent_at: list[float] = []  # perf_counter() of each publish, by delivery tag - 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        self.on_confirm()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        offset, end = 0, len(buf)
        confirmed_before = self.counters.confirmed
        while end - offset >= 8:
            size = int.from_bytes(buf[offset + 3 : offset + 7], "big")
            total = size + 8
            if end - offset < total:
                break
            if not self.handshaking and buf[offset] == 1:
                method = int.from_bytes(buf[offset + 7 : offset + 11], "big")
                if method in (_ACK, _NACK):
                    tag = int.from_bytes(buf[offset + 11 : offset + 19], "big")
                    multiple = buf[offset + 19] & 1
                    self._settle(tag, bool(multiple), ok=method == _ACK)
                    offset += total
                    continue
                if method == _RETURN:
                    self.counters.returned += 1
            if self.handshaking:
                _, _, value = pframe.unmarshal(bytes(buf[offset : offset + total]))
                self.frames.put_nowait(value)
            offset += total
        del buf[:offset]
        if self.counters.confirmed != confirmed_before:
            self.on_confirm()

    # Delivery tags start at 1. RabbitMQ may confirm out of order; a `multiple` ack settles every
    # tag up to its own that was not settled before.
    settled_tag = 0

    def _settle(self, tag: int, multiple: bool, *, ok: bool) -> None:
        early = self.early
        now = time.perf_counter()
        latencies, sent_at = self.counters.latencies, self.sent_at
        if multiple:
            count = tag - self.settled_tag
            inside: set[int] = set()
            if early:
                inside = {t for t in early if t <= tag}
                count -= len(inside)
                early -= inside
            latencies += [now - sent_at[t - 1] for t in range(self.settled_tag + 1, tag + 1) if t not in inside]
            self.settled_tag = max(self.settled_tag, tag)
        elif tag == self.settled_tag + 1:
            count = 1
            latencies.append(now - sent_at[tag - 1])
            self.settled_tag = tag
            while self.settled_tag + 1 in early:
                self.settled_tag += 1
                early.discard(self.settled_tag)
        elif tag > self.settled_tag:
            count = 1
            latencies.append(now - sent_at[tag - 1])
            early.add(tag)
        else:
            count = 0
        if ok:
            self.counters.confirmed += count
        else:
            self.counters.nacked += count

    def send(self, *values: Any, channel: int = 0) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(pframe.marshal(v, channel) for v in values))

    async def expect(self, kind: type) -> Any:
        value = await asyncio.wait_for(self.frames.get(), 10)
        if not isinstance(value, kind):
            raise RuntimeError(f"expected {kind.__name__}, got {value!r}")
        return value

    async def open(self, user: str, password: str, vhost: str) -> None:
        assert self.transport is not None
        self.transport.write(ProtocolHeader().marshal())
        await self.expect(spec.Connection.Start)
        self.send(
            spec.Connection.StartOk(
                client_properties={
                    "product": "revoke-relay bench raw client",
                    "connection_name": "bench broker ceiling (raw)",
                    "capabilities": {"publisher_confirms": True},
                },
                mechanism="PLAIN",
                response=f"\0{user}\0{password}",
            )
        )
        tune = await self.expect(spec.Connection.Tune)
        self.send(spec.Connection.TuneOk(channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0))
        self.send(spec.Connection.Open(virtual_host=vhost))
        await self.expect(spec.Connection.OpenOk)
        self.send(spec.Channel.Open(), channel=1)
        await self.expect(spec.Channel.OpenOk)
        self.send(spec.Confirm.Select(), channel=1)
        await self.expect(spec.Confirm.SelectOk)
        self.handshaking = False

    async def close(self) -> None:
        assert self.transport is not None
        self.handshaking = True
        self.send(spec.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0))
        with contextlib.suppress(TimeoutError, RuntimeError):
            await self.expect(spec.Connection.CloseOk)
        self.transport.close()


async def variant_raw(url: str, topo: Topology, window: int, envelopes: list[Envelope], run: Runner) -> None:
    parts = urlsplit(url)
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(RawAmqp, parts.hostname or "127.0.0.1", parts.port or 5672)
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    await proto.open(unquote(parts.username or "guest"), unquote(parts.password or "guest"), vhost)
    proto.counters = run.counters
    encoded = [RawMessage.frames(e, topo.exchange, 1) for e in envelopes]
    wake = asyncio.Event()
    proto.on_confirm = wake.set
    counters = run.counters

    async def pump(stop: asyncio.Event) -> None:
        i = 0
        n = len(encoded)
        assert proto.transport is not None
        while not stop.is_set() and not proto.closed.done():
            wake.clear()  # before reading the counters: a confirm after this point wakes us
            room = window - (counters.published - counters.confirmed - counters.nacked)
            if room > 0:
                proto.transport.write(b"".join([encoded[(i + k) % n] for k in range(room)]))
                proto.sent_at += [time.perf_counter()] * room
                i += room
                counters.published += room
                await proto.can_write.wait()
                continue
            await wake.wait()

    try:
        await run.drive(pump, settle=lambda: counters.published - counters.confirmed - counters.nacked == 0, wake=wake)
    finally:
        await proto.close()


# -- one run -----------------------------------------------------------------------------------------


class Runner:
    """Drives one variant: start publishing, measure a window, stop, wait for outstanding confirms."""

    def __init__(self, seconds: float, warmup: float, broker_pid: int | None) -> None:
        self.seconds = seconds
        self.warmup = warmup
        self.broker_pid = broker_pid
        self.counters = Counters()
        self.result: dict[str, Any] = {}

    async def drive(
        self,
        publisher: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
        settle: Callable[[], bool] | None = None,
        wake: asyncio.Event | None = None,
    ) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(publisher(stop))
        try:
            self.result = await measure_window(self.counters, self.seconds, self.warmup, self.broker_pid)
        finally:
            stop.set()
            if wake is not None:
                wake.set()
            async with asyncio.timeout(60):
                await task
                while settle is not None and not settle():
                    await asyncio.sleep(0.05)


RUNNERS = {"aio-pika": variant_aio_pika, "aiormq": variant_aiormq, "raw": variant_raw}


async def measure(
    variant: str, *, window: int, seconds: float, warmup: float, url: str = DEFAULT_URL, broker_pid: int | None = None
) -> dict[str, Any]:
    """Publish with *variant* for *warmup* + *seconds*; the window's rate, CPU, and a queue check."""
    topo = Topology(url)
    await topo.declare()
    envelopes = relay_envelopes(1024)
    run = Runner(seconds, warmup, broker_pid)
    try:
        await RUNNERS[variant](url, topo, window, envelopes, run)
    finally:
        queued = await topo.count_and_delete(at_least=run.counters.confirmed)
    c = run.counters
    return {
        "variant": variant,
        "window": window,
        **run.result,
        "published": c.published,
        "confirmed": c.confirmed,
        "nacked": c.nacked,
        "returned": c.returned,
        "queued": queued,
        "queue_check": queued >= c.confirmed,
        **envelope_sizes(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--window", type=int, default=1024, help="publishes in flight (unconfirmed)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--url", default=os.environ.get("RELAY_AMQP_URL", DEFAULT_URL))
    parser.add_argument("--broker-pid", type=int, default=None)
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(
            measure(
                args.variant,
                window=args.window,
                seconds=args.seconds,
                warmup=args.warmup,
                url=args.url,
                broker_pid=args.broker_pid,
            )
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
