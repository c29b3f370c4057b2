"""The recall API's own listener over real sockets (issue 19, cases 7 and 8): header and body
deadlines, a cap on open connections, credentials that are not UTF-8."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from relay.app import API, api_runner, create_app
from relay.settings import Settings
from tests.app.test_gateway_api import API_TOKEN, SECRET, request
from tests.helpers import APP, TOKEN, RecordingPublisher, make_settings


class Listener:
    def __init__(self, port: int, registry: CollectorRegistry) -> None:
        self.port = port
        self.registry = registry

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[Listener]:
    registry = CollectorRegistry()
    settings = make_settings(
        tmp_path,
        RELAY_API_TOKENS=f"moderation-svc={API_TOKEN}",
        RELAY_TENCENT_SECRET_KEYS=f"{APP}={SECRET}",
        RELAY_KEEPALIVE_TIMEOUT="1",
        RELAY_BODY_TIMEOUT="1",
        RELAY_API_MAX_CONNECTIONS="2",
    )
    app = create_app(settings, publisher=RecordingPublisher(), registry=registry)
    relay = web.AppRunner(app)
    await relay.setup()  # runs the shared resources' setup (store, spool, publisher)
    api = api_runner(app)
    await api.setup()
    site = web.TCPSite(api, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    assert app[API] is api.app
    yield Listener(port, registry)
    await api.cleanup()
    await relay.cleanup()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection, which must happen in *seconds*."""
    return await asyncio.wait_for(reader.read(), seconds)


def test_the_api_listens_on_loopback_unless_told_otherwise() -> None:
    """RELAY_API_HOST defaults to 127.0.0.1 (the callback port keeps RELAY_HOST)."""
    settings = Settings.from_env({"RELAY_SDKAPPIDS": APP})
    assert ("127.0.0.1", "0.0.0.0") == (settings.api_host, settings.host)  # noqa: S104


async def test_7_slow_headers_are_cut_at_the_keepalive_deadline(listener: Listener) -> None:
    """A client sending its head one byte every 0.2 s, authenticated or not, is closed after
    RELAY_KEEPALIVE_TIMEOUT (1 s here), not held for ever."""
    reader, writer = await listener.connect()
    head = f"POST /v1/recalls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\nX-Slow: ".encode()
    started = time.monotonic()

    async def drip() -> None:
        for byte in head + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    dripping = asyncio.create_task(drip())
    try:
        await closed_within(reader, 5)
    finally:
        dripping.cancel()
        writer.close()
    assert time.monotonic() - started < 3


async def test_7_a_slow_body_is_408_at_the_body_deadline(listener: Listener) -> None:
    """An authenticated request whose body stalls gets 408 body_timeout after RELAY_BODY_TIMEOUT."""
    reader, writer = await listener.connect()
    writer.write(
        f"POST /v1/recalls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_TOKEN}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode()
    )
    await writer.drain()
    started = time.monotonic()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    answered_after = time.monotonic() - started
    reply = await closed_within(reader, 5)  # then closed (after at most 2 s of lingering)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 408")
    assert b'"body_timeout"' in reply
    assert answered_after < 2


async def test_7_connections_past_the_cap_are_closed_at_once(listener: Listener) -> None:
    """With RELAY_API_MAX_CONNECTIONS=2 and two idle connections open, a third is closed unanswered
    and counted; once one closes, a new connection is served."""
    idle = [await listener.connect() for _ in range(2)]
    await asyncio.sleep(0.1)
    reader, writer = await listener.connect()
    assert b"" == await closed_within(reader, 2)
    writer.close()
    assert 1 == listener.registry.get_sample_value("relay_api_connections_refused_total")
    idle[0][1].close()
    await asyncio.sleep(0.2)
    reader, writer = await listener.connect()
    writer.write(b"POST /v1/recalls HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert (await closed_within(reader, 5)).startswith(b"HTTP/1.1 401")
    writer.close()
    idle[1][1].close()


async def test_8_credentials_that_are_not_utf8_are_401_not_500(listener: Listener) -> None:
    """An Authorization header with bytes that are not UTF-8 is an unknown token: 401, no traceback."""
    reader, writer = await listener.connect()
    body = orjson.dumps(request())
    with capture_logs() as logs:
        writer.write(
            b"POST /v1/recalls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80token\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        reply = await closed_within(reader, 5)
    writer.close()
    assert reply.startswith(b"HTTP/1.1 401")
    assert b'"unauthorized"' in reply
    assert [] == [e for e in logs if e["log_level"] == "error"]


async def test_8_the_callback_token_is_not_an_api_token(listener: Listener) -> None:
    """A callback token (what Tencent holds) opens nothing on the API port."""
    reader, writer = await listener.connect()
    writer.write(
        f"POST /v1/recalls HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 2\r\n"
        "Connection: close\r\n\r\n{}".encode()
    )
    assert (await closed_within(reader, 5)).startswith(b"HTTP/1.1 401")
    writer.close()
