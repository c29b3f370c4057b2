"""The publishing AMQP client, byte for byte: frames it writes, and how it settles confirms."""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any, ClassVar

import pytest
from pamqp import body, commands, frame, header

from relay import amqp
from relay.endpoints import parse_endpoint

HEADERS = {"cloudEvents_id": "e-1", "cloudEvents_subject": "主题/1"}


def props(message_id: str = "e-1") -> bytes:
    return amqp.encode_properties(
        content_type="application/json",
        headers=HEADERS,
        delivery_mode=2,
        message_id=message_id,
        timestamp=1767225600,
        type="message.revoked",
        app_id="revoke-relay",
    )


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.aborted = False

    def write(self, data: Any) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


def frames(data: bytes) -> list[Any]:
    out = []
    while data:
        consumed, _, value = frame.unmarshal(data)
        out.append(value)
        data = data[consumed:]
    return out


@pytest.fixture
async def conn() -> tuple[amqp.Connection, FakeTransport]:
    connection = amqp.Connection(asyncio.get_running_loop())
    transport = FakeTransport()
    connection.connection_made(transport)
    return connection, transport


def feed(connection: amqp.Connection, *values: Any) -> None:
    connection.data_received(b"".join(frame.marshal(v, amqp.CHANNEL) for v in values))


async def test_properties_decode_identically_with_pamqp() -> None:
    """Hand-encoded properties are what pamqp decodes into the same values (and UTF-8 headers survive)."""
    payload = b"\x00\x3c\x00\x00" + (3).to_bytes(8, "big") + props()
    raw = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    (decoded,) = frames(raw)
    p = decoded.properties
    assert ("application/json", HEADERS, 2, "e-1", "message.revoked", "revoke-relay", 3) == (
        p.content_type,
        p.headers,
        p.delivery_mode,
        p.message_id,
        p.message_type,
        p.app_id,
        decoded.body_size,
    )
    assert 1767225600 == int(p.timestamp.timestamp())


async def test_publishes_of_one_iteration_leave_in_one_write(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """Three publishes in one loop iteration are written together as publish/header/body triples."""
    connection, transport = conn
    for i in range(3):
        connection.publish("im.events", "message.revoked.c2c", b"{}", props(f"e-{i}"), f"e-{i}")
    assert b"" == bytes(transport.written)  # nothing written yet: flushed at the end of the iteration
    await asyncio.sleep(0)
    written = frames(bytes(transport.written))
    assert [commands.Basic.Publish, header.ContentHeader, body.ContentBody] * 3 == [type(f) for f in written]
    publish = written[0]
    assert ("im.events", "message.revoked.c2c", True) == (publish.exchange, publish.routing_key, publish.mandatory)


async def test_large_body_is_split_by_frame_max(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """A body larger than frame_max goes out in several body frames that add up to it."""
    connection, transport = conn
    connection.frame_max = 4096
    payload = bytes(range(256)) * 40  # 10,240 bytes
    connection.publish("x", "k", payload, props(), "e-1")
    await asyncio.sleep(0)
    parts = [f for f in frames(bytes(transport.written)) if isinstance(f, body.ContentBody)]
    assert (3, payload) == (len(parts), b"".join(p.value for p in parts))


async def test_multiple_ack_settles_everything_up_to_the_tag(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """basic.ack(multiple) for tag 2 confirms publishes 1 and 2 and leaves 3 pending."""
    connection, _ = conn
    futures = [connection.publish("x", "k", b"{}", props(f"e-{i}"), f"e-{i}") for i in range(3)]
    feed(connection, commands.Basic.Ack(delivery_tag=2, multiple=True))
    assert [True, True, False] == [f.done() for f in futures]
    feed(connection, commands.Basic.Ack(delivery_tag=3))
    assert [None, None, None] == [f.result() for f in futures]
    assert 0 == connection.in_flight


async def test_nack_fails_only_its_publish(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """basic.nack fails the publish it names with Nacked; others stay pending."""
    connection, _ = conn
    first, second = (connection.publish("x", "k", b"{}", props(f"e-{i}"), f"e-{i}") for i in range(2))
    feed(connection, commands.Basic.Nack(delivery_tag=1))
    with pytest.raises(amqp.Nacked):
        first.result()
    assert not second.done()


async def test_returned_message_fails_even_though_it_is_acked(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """A basic.return (matched by message_id) turns the following ack of that publish into Returned."""
    connection, _ = conn
    kept = connection.publish("x", "k", b"{}", props("e-kept"), "e-kept")
    lost = connection.publish("x", "nowhere", b"{}", props("e-lost"), "e-lost")
    feed(
        connection,
        commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="nowhere"),
        header.ContentHeader(body_size=2, properties=commands.Basic.Properties(message_id="e-lost")),
        body.ContentBody(b"{}"),
        commands.Basic.Ack(delivery_tag=2, multiple=True),
    )
    assert kept.result() is None
    with pytest.raises(amqp.Returned):
        lost.result()


async def test_frames_split_across_reads_are_reassembled(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """An ack arriving one byte at a time is still understood."""
    connection, _ = conn
    future = connection.publish("x", "k", b"{}", props(), "e-1")
    for byte in frame.marshal(commands.Basic.Ack(delivery_tag=1), amqp.CHANNEL):
        connection.data_received(bytes((byte,)))
    assert future.result() is None


async def test_deadline_expires_unconfirmed_publishes(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """A publish with no confirm by its deadline fails with ConfirmTimeout (it may still land)."""
    connection, _ = conn
    connection.publish_timeout = 0.0
    future = connection.publish("x", "k", b"{}", props(), "e-1")
    time.sleep(0.001)
    connection._tick()
    with pytest.raises(amqp.ConfirmTimeout):
        future.result()


async def test_connection_loss_fails_pending_as_in_doubt(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """When the connection drops, every unconfirmed publish fails as in doubt, and new ones are refused."""
    connection, _ = conn
    future = connection.publish("x", "k", b"{}", props(), "e-1")
    connection.connection_lost(ConnectionResetError())
    with pytest.raises(amqp.AmqpError) as info:
        future.result()
    assert info.value.in_doubt
    with pytest.raises(amqp.AmqpError):
        connection.publish("x", "k", b"{}", props(), "e-2")


async def test_broker_channel_close_fails_everything(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """A channel.close from the broker (e.g. 404 exchange missing) fails pending publishes and aborts."""
    connection, transport = conn
    future = connection.publish("x", "k", b"{}", props(), "e-1")
    feed(
        connection,
        commands.Channel.Close(reply_code=404, reply_text="NOT_FOUND - no exchange 'x'", class_id=60, method_id=40),
    )
    with pytest.raises(amqp.AmqpError) as info:
        future.result()
    assert (404, True) == (info.value.code, transport.aborted)


async def test_blocked_and_unblocked_are_tracked(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """connection.blocked / unblocked from the broker flip the blocked flag."""
    connection, _ = conn
    connection.data_received(frame.marshal(commands.Connection.Blocked(reason="low on disk"), 0))
    assert connection.blocked
    connection.data_received(frame.marshal(commands.Connection.Unblocked(), 0))
    assert not connection.blocked


async def test_settled_publishes_leave_no_bookkeeping(conn: tuple[amqp.Connection, FakeTransport]) -> None:
    """Acked, nacked, returned and expired publishes all release their per-message state (no leak)."""
    connection, _ = conn
    futures = [connection.publish("x", "k", b"{}", props(f"e-{i}"), f"e-{i}") for i in range(4)]
    feed(
        connection,
        commands.Basic.Ack(delivery_tag=1),
        commands.Basic.Nack(delivery_tag=2),
        commands.Basic.Return(reply_code=312, reply_text="NO_ROUTE", exchange="x", routing_key="k"),
        header.ContentHeader(body_size=2, properties=commands.Basic.Properties(message_id="e-2")),
        body.ContentBody(b"{}"),
        commands.Basic.Ack(delivery_tag=3),
    )
    assert [True, True, True, False] == [f.done() for f in futures]
    assert 2 == connection.tracked  # tag 4 only: its pending entry and its return-matching entry
    feed(connection, commands.Basic.Ack(delivery_tag=4))
    connection.publish_timeout = 0.0
    late = connection.publish("x", "k", b"{}", props("e-late"), "e-late")
    time.sleep(0.001)
    connection._tick()
    for future in [*futures, late]:
        future.exception()  # retrieve
    assert 0 == connection.tracked


class InstantBroker(FakeTransport):
    """A broker that answers each handshake step inside ``write()``: the reply is read before the
    client's coroutine runs again, the order a fast broker and a busy event loop can produce."""

    REPLIES: ClassVar[dict[type, tuple[Any, int]]] = {
        commands.Connection.StartOk: (commands.Connection.Tune(channel_max=0, frame_max=131072, heartbeat=60), 0),
        commands.Connection.Open: (commands.Connection.OpenOk(), 0),
        commands.Channel.Open: (commands.Channel.OpenOk(), amqp.CHANNEL),
        commands.Confirm.Select: (commands.Confirm.SelectOk(), amqp.CHANNEL),
    }

    def __init__(self, connection: amqp.Connection, mechanisms: str = "PLAIN AMQPLAIN") -> None:
        super().__init__()
        self.connection = connection
        self.mechanisms = mechanisms
        self.seen: list[str] = []
        self.start_ok: commands.Connection.StartOk | None = None

    def write(self, data: Any) -> None:
        super().write(data)
        data = bytes(data)
        if data.startswith(b"AMQP"):
            self.seen.append("ProtocolHeader")
            self._reply(commands.Connection.Start(mechanisms=self.mechanisms), 0)
            return
        for value in frames(data):
            self.seen.append(value.name)
            if isinstance(value, commands.Connection.StartOk):
                self.start_ok = value
            if type(value) in self.REPLIES:
                self._reply(*self.REPLIES[type(value)])

    def _reply(self, value: Any, channel: int) -> None:
        self.connection.data_received(frame.marshal(value, channel))


async def test_handshake_finds_replies_that_arrive_before_it_awaits_them() -> None:
    """Regression: the client used to register for Tune in a task that had not run yet when the
    broker's Tune was read; the frame was dropped and RabbitMQ closed the connection after 10 s
    ({handshake_timeout,frame_header}), which showed as a relay that never became broker-ready."""
    connection = amqp.Connection(asyncio.get_running_loop())
    broker = InstantBroker(connection)
    connection.connection_made(broker)
    await connection.handshake(parse_endpoint("amqp://guest:guest@127.0.0.1/"), 5, "test", timeout=2)
    assert broker.seen == [
        "ProtocolHeader",
        "Connection.StartOk",
        "Connection.TuneOk",
        "Connection.Open",
        "Channel.Open",
        "Confirm.Select",
    ]
    assert connection.heartbeat == 5
    connection.abort()


async def test_handshake_logs_in_with_plain_credentials_from_the_url() -> None:
    """PLAIN login sends the URL's user and password (percent-decoded) in the Start-Ok response."""
    connection = amqp.Connection(asyncio.get_running_loop())
    broker = InstantBroker(connection)
    connection.connection_made(broker)
    await connection.handshake(parse_endpoint("amqp://relay:p%40ss%2Cw@127.0.0.1/"), 5, "test", timeout=2)
    assert broker.start_ok is not None
    assert ("PLAIN", "\0relay\0p@ss,w") == (broker.start_ok.mechanism, broker.start_ok.response)
    connection.abort()


async def test_handshake_logs_in_with_the_certificate_under_auth_external() -> None:
    """auth=external sends mechanism EXTERNAL with an empty response: the client certificate is the identity."""
    connection = amqp.Connection(asyncio.get_running_loop())
    broker = InstantBroker(connection, mechanisms="PLAIN AMQPLAIN EXTERNAL")
    connection.connection_made(broker)
    endpoint = parse_endpoint("amqps://broker/?auth=external&certfile=/c.pem&keyfile=/k.pem&cafile=/ca.pem")
    await connection.handshake(endpoint, 5, "test", timeout=2)
    assert broker.start_ok is not None
    assert ("EXTERNAL", "") == (broker.start_ok.mechanism, broker.start_ok.response)
    connection.abort()


async def test_handshake_names_the_missing_plugin_when_external_is_not_offered() -> None:
    """A broker without rabbitmq_auth_mechanism_ssl does not offer EXTERNAL: the error says so, nothing is sent."""
    connection = amqp.Connection(asyncio.get_running_loop())
    broker = InstantBroker(connection)
    connection.connection_made(broker)
    endpoint = parse_endpoint("amqps://broker/?auth=external&certfile=/c.pem")
    with pytest.raises(amqp.AmqpError, match=r"does not offer EXTERNAL login, only PLAIN AMQPLAIN .*mechanism_ssl"):
        await connection.handshake(endpoint, 5, "test", timeout=2)
    assert broker.start_ok is None
    connection.abort()
