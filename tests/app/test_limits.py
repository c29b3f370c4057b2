"""Limits against hostile or broken clients: overload shedding, source allow-list, slow clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry

from relay.app import create_app
from relay.tencent.callback import C2C_RECALL
from relay.tencent.samples import callback_query, sample_body
from tests.app.conftest import Served
from tests.helpers import APP, NOW, OTHER_APP, TOKEN, RecordingPublisher, make_settings

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


async def relay(
    aiohttp_client: ClientFactory, tmp_path: Path, publisher: RecordingPublisher | None = None, **env: str
) -> TestClient:  # type: ignore[type-arg]
    app = create_app(
        make_settings(tmp_path, **env),
        publisher=publisher or RecordingPublisher(),
        registry=CollectorRegistry(),
        clock=lambda: NOW,
    )
    return await aiohttp_client(app)


def url(app: str = APP, token: str | None = TOKEN) -> str:
    return f"/tencent-im/callback?{callback_query(C2C_RECALL, app, token, request_time=int(NOW))}"


async def test_overload_is_shed_fast_with_retry_after(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    """Past RELAY_MAX_IN_FLIGHT a callback gets 503 overloaded at once; the ones in flight still succeed."""
    publisher = RecordingPublisher()
    publisher.delay = 0.5
    client = await relay(aiohttp_client, tmp_path, publisher, RELAY_MAX_IN_FLIGHT="2")
    body = orjson.dumps(sample_body("c2c"))
    slow = [asyncio.create_task(client.post(url(), data=body)) for _ in range(2)]
    await asyncio.sleep(0.1)
    started = time.monotonic()
    shed = await client.post(url(), data=body)
    elapsed = time.monotonic() - started
    assert (503, "overloaded", "1") == (shed.status, (await shed.json())["ErrorInfo"], shed.headers["Retry-After"])
    assert elapsed < 0.4  # answered without waiting for the slow ones
    assert [200, 200] == [r.status for r in await asyncio.gather(*slow)]


async def test_overload_counts_and_recovers(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    """Shed callbacks are counted as overloaded; once the in-flight ones finish, callbacks are accepted again."""
    publisher = RecordingPublisher()
    publisher.delay = 0.3
    registry = CollectorRegistry()
    app = create_app(
        make_settings(tmp_path, RELAY_MAX_IN_FLIGHT="1"), publisher=publisher, registry=registry, clock=lambda: NOW
    )
    client = await aiohttp_client(app)
    body = orjson.dumps(sample_body("c2c"))
    first = asyncio.create_task(client.post(url(), data=body))
    await asyncio.sleep(0.1)
    assert 503 == (await client.post(url(), data=body)).status
    assert 200 == (await first).status
    assert 200 == (await client.post(url(), data=orjson.dumps(sample_body("c2c")))).status
    assert 1 == registry.get_sample_value("relay_callback_rejections_total", {"reason": "overloaded"})


async def test_source_outside_allow_list_is_403(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    """With RELAY_ALLOWED_CIDRS set, a caller outside it gets 403 forbidden_source before any other check."""
    client = await relay(aiohttp_client, tmp_path, RELAY_ALLOWED_CIDRS="203.0.113.0/24")
    response = await client.post(url(token=None), data=b"{}")
    assert (403, "forbidden_source") == (response.status, (await response.json())["ErrorInfo"])


async def test_forwarded_for_counts_only_behind_a_trusted_proxy(aiohttp_client: ClientFactory, tmp_path: Path) -> None:
    """X-Forwarded-For from a trusted proxy (here: the test client's 127.0.0.1) decides; otherwise it is ignored."""
    body = orjson.dumps(sample_body("c2c"))
    trusted = await relay(
        aiohttp_client, tmp_path / "a", RELAY_ALLOWED_CIDRS="203.0.113.0/24", RELAY_TRUSTED_PROXIES="127.0.0.1"
    )
    ok = await trusted.post(url(), data=body, headers={"X-Forwarded-For": "203.0.113.7"})
    assert 200 == ok.status
    untrusted = await relay(aiohttp_client, tmp_path / "b", RELAY_ALLOWED_CIDRS="203.0.113.0/24")
    refused = await untrusted.post(url(), data=body, headers={"X-Forwarded-For": "203.0.113.7"})
    assert 403 == refused.status


async def test_slow_headers_are_cut_off(serve: Callable[..., Awaitable[Served]]) -> None:
    """A client that never finishes its headers (slowloris) is disconnected after the keep-alive timeout."""
    port = (await serve(RELAY_KEEPALIVE_TIMEOUT="0.5")).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /tencent-im/callback HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()
    started = time.monotonic()
    async with asyncio.timeout(5):
        assert b"" == await reader.read()  # the server closed the connection
    assert time.monotonic() - started < 3
    writer.close()
    await writer.wait_closed()


async def test_slow_body_gets_408_and_is_cut_off(serve: Callable[..., Awaitable[Served]]) -> None:
    """A body that stops arriving is answered 408 body_timeout after RELAY_BODY_TIMEOUT; the socket is
    closed soon after (bounded lingering), not held open by the sender."""
    port = (await serve(RELAY_BODY_TIMEOUT="0.5")).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {url(OTHER_APP, None)} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    writer.write(head.encode() + b'{"CallbackCommand":')
    await writer.drain()
    started = time.monotonic()
    async with asyncio.timeout(6):
        reply = await reader.read()
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"body_timeout" in reply
    assert time.monotonic() - started < 4
    writer.close()
    await writer.wait_closed()


async def test_idle_keepalive_connection_is_closed(serve: Callable[..., Awaitable[Served]]) -> None:
    """After a response, a connection that sends nothing more is closed after the keep-alive timeout."""
    port = (await serve(RELAY_KEEPALIVE_TIMEOUT="0.5")).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(5):
        data = await reader.read()  # the response, then EOF when the server closes the idle connection
    assert data.startswith(b"HTTP/1.1 200")
    writer.close()
    await writer.wait_closed()
