"""Synapse tier: a real Matrix homeserver, started once per session, pushing to relays the tests start.

Skipped locally when Synapse is not installed (``scripts/ensure-synapse.sh`` installs it); a failure
in CI (``RELAY_REQUIRE_TOOLS=1``). Needs the broker tier's RabbitMQ, and its Redis for one test.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay.app import PUBLISHER, create_app, make_runner
from relay.publisher import AmqpPublisher
from relay.settings import Settings
from tests.broker.conftest import amqp, amqp_url, names  # noqa: F401 - fixtures of this tier too
from tests.synapse.homeserver import SYNAPSE_PYTHON, Homeserver, Matrix, User, free_port, wait_for


@pytest.fixture(scope="session")
def homeserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Homeserver]:
    """One Synapse for the session, registered with an application service at a fixed local port
    (the :class:`Link` each test opens there forwards to that test's relay)."""
    if not SYNAPSE_PYTHON.exists():
        message = f"Synapse is not installed at {SYNAPSE_PYTHON} (scripts/ensure-synapse.sh)"
        if os.environ.get("RELAY_REQUIRE_TOOLS") == "1":
            pytest.fail(message + " and RELAY_REQUIRE_TOOLS=1", pytrace=False)
        pytest.skip(message)
    server = Homeserver(
        tmp_path_factory.mktemp("synapse"),
        link_port=free_port(),
        hs_token="hs-" + uuid.uuid4().hex,
        as_token="as-" + uuid.uuid4().hex,
    )
    server.configure()
    server.start()
    yield server
    server.stop()


class Link:
    """The network between the homeserver and the relay: listens where the registration points and
    forwards to the relay of the moment. ``lose_answers`` makes it replace that many of the relay's
    200s to redaction-carrying transactions by a 502, as a failing load balancer would."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.target: int | None = None
        self.lose_answers = 0
        self.lost: list[str] = []
        self.seen: list[tuple[str, int]] = []  # (path, status answered)
        self.bodies: list[tuple[str, bytes]] = []  # (path and query, body) of every request forwarded
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if self.target is None or self._session is None:
            return web.Response(status=502)
        self.bodies.append((request.path_qs, body))
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            async with self._session.request(
                request.method, f"http://127.0.0.1:{self.target}{request.path_qs}", data=body, headers=headers
            ) as upstream:
                reply = await upstream.read()
                status = upstream.status
        except aiohttp.ClientError:
            return web.Response(status=502)
        if status == 200 and self.lose_answers and b'"m.room.redaction"' in body:
            self.lose_answers -= 1
            self.lost.append(request.path)
            status, reply = 502, b""
        self.seen.append((request.path, status))
        return web.Response(status=status, body=reply, content_type="application/json")


class Relay:
    """One relay process's app, served the way ``relay serve`` serves it, on its own port."""

    def __init__(self, runner: web.AppRunner, port: int, registry: CollectorRegistry) -> None:
        self.runner = runner
        self.port = port
        self.registry = registry

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    async def stop(self) -> None:
        await self.runner.cleanup()


class Stack:
    """What a Synapse test works with: the homeserver's client, the link, relays, the queue."""

    def __init__(
        self,
        homeserver: Homeserver,
        matrix: Matrix,
        link: Link,
        channel: aio_pika.abc.AbstractChannel,
        broker_names: dict[str, str],
        broker_url: str,
        spool_dir: Path,
    ) -> None:
        self.homeserver = homeserver
        self.matrix = matrix
        self.link = link
        self.channel = channel
        self.names = broker_names
        self.amqp_url = broker_url
        self.spool_dir = spool_dir
        self.relay: Relay | None = None
        self.messages: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def start_relay(self, *, ping: bool = True, **env: str) -> Relay:
        """A relay for the test's exchange and queue, with RELAY_* *env* on top; the link then
        forwards to it and, with *ping*, the homeserver is asked to ping it (Synapse then sends at
        once what it held back while no relay answered, instead of at its next backoff)."""
        settings = Settings.from_env(
            {
                "RELAY_MATRIX_HS_TOKEN": self.homeserver.hs_token,
                "RELAY_AMQP_URL": self.amqp_url,
                "RELAY_EXCHANGE": self.names["exchange"],
                "RELAY_QUEUES": self.names["queue"],
                "RELAY_SPOOL_DIR": str(self.spool_dir),
                "RELAY_PUBLISH_TIMEOUT": "3",
                "RELAY_SHUTDOWN_DELAY": "0",
                **env,
            }
        )
        registry = CollectorRegistry()
        app = create_app(settings, registry=registry)
        runner = make_runner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        publisher = app[PUBLISHER]
        assert isinstance(publisher, AmqpPublisher)
        await wait_for(publisher.connected.is_set, 10, "the relay's broker connection")
        self.relay = Relay(runner, int(runner.addresses[0][1]), registry)
        self.link.target = self.relay.port
        if ping:
            await self.matrix.ping()
        return self.relay

    async def stop_relay(self) -> None:
        if self.relay is not None:
            self.link.target = None
            await self.relay.stop()
            self.relay = None

    async def events(self, room_id: str, count: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Read the queue until *count* events of *room_id* have arrived; every message read is
        kept in ``messages``, so a duplicate that arrives later is still seen."""
        return await self._read(room_id, lambda found: len(found) >= count, timeout, f"{count} events of {room_id}")

    async def settle(self, user: User, room_id: str, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Every event of *room_id*, once the homeserver has delivered all it had: one more message
        is sent and redacted, and its event awaited (the homeserver sends transactions in order,
        and the relay publishes them in order). The sentinel's own event is left out."""
        sentinel = await self.matrix.send(user, room_id, "sentinel")
        await self.matrix.redact(user, room_id, sentinel)
        found = await self._read(
            room_id, lambda found: any(e["msgID"] == sentinel for e in found), timeout, "the sentinel redaction"
        )
        return [e for e in found if e["msgID"] != sentinel]

    async def _read(
        self, room_id: str, done: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str
    ) -> list[dict[str, Any]]:
        queue = await self.channel.get_queue(self.names["queue"])

        def of_room() -> list[dict[str, Any]]:
            bodies = [orjson.loads(m.body) for m in self.messages]
            return [b for b in bodies if b["conversation"]["groupID"] == room_id]

        async def enough() -> bool:
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                self.messages.append(message)
            return done(of_room())

        await wait_for(enough, timeout, what)
        return of_room()


@pytest.fixture
async def stack(
    homeserver: Homeserver,
    amqp: aio_pika.abc.AbstractChannel,  # noqa: F811 - the broker tier's fixture
    amqp_url: str,  # noqa: F811
    names: dict[str, str],  # noqa: F811
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    link = Link(homeserver.link_port)
    await link.start()
    async with aiohttp.ClientSession() as session:
        stack = Stack(homeserver, Matrix(homeserver, session), link, amqp, names, amqp_url, tmp_path / "spool")
        try:
            yield stack
        finally:
            await stack.stop_relay()
            await link.stop()
