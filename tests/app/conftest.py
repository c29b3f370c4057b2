"""The production HTTP server on a real port, for tests that need raw sockets or its timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from relay.app import create_app, make_runner
from relay.fastpath import FastPathServer
from tests.helpers import NOW, RecordingPublisher, make_settings


class Served:
    """One running relay: its port, runner, recording publisher and metrics registry."""

    def __init__(
        self, port: int, runner: web.AppRunner, publisher: RecordingPublisher, registry: CollectorRegistry
    ) -> None:
        self.port = port
        self.registry = registry
        self.runner = runner
        self.publisher = publisher
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def via_aiohttp(self) -> float:
        return self.registry.get_sample_value("relay_http_callbacks_via_aiohttp_total") or 0.0

    @property
    def front(self) -> FastPathServer:
        return cast(FastPathServer, self.runner.server)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(writer)  # closed by the fixture
        return reader, writer


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Served]]]:
    """Start relays the way ``relay serve`` does (make_runner, a TCP site), with RELAY_* overrides."""
    servers: list[Served] = []

    async def start(**env: str) -> Served:
        publisher = RecordingPublisher()
        registry = CollectorRegistry()
        app = create_app(
            make_settings(tmp_path / str(len(servers)), **env),
            publisher=publisher,
            registry=registry,
            clock=lambda: NOW,
        )
        runner = make_runner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        servers.append(Served(int(runner.addresses[0][1]), runner, publisher, registry))
        return servers[-1]

    yield start
    for served in servers:
        for writer in served.writers:
            writer.close()
    for served in servers:
        await served.runner.cleanup()
