from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay.app import CALLBACK, make_runner
from tests.helpers import answers

ClientFactory = Callable[..., Awaitable[TestClient]]  # type: ignore[type-arg]


@pytest.fixture(autouse=True)
def _plain_structlog() -> None:
    """Each test starts from structlog's defaults so ``capture_logs`` sees every event."""
    structlog.reset_defaults()


REDIS_URL = os.environ.get("RELAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def _required(url: str, default_port: int, what: str) -> str:
    """*url* when something answers there; else skip locally, fail in CI (RELAY_REQUIRE_BROKER=1)."""
    parts = urlsplit(url)
    where = f"{parts.hostname}:{parts.port or default_port}"
    if not answers(url, default_port):
        if os.environ.get("RELAY_REQUIRE_BROKER") == "1":
            pytest.fail(f"no {what} at {where} and RELAY_REQUIRE_BROKER=1", pytrace=False)
        pytest.skip(f"no {what} at {where}")
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis (the shared correlation store). Skipped locally without one, a failure in CI."""
    return _required(REDIS_URL, 6379, "Redis")


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis, closed after the test."""
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


POSTGRES_URL = os.environ.get("RELAY_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A real PostgreSQL (the consumer kit's inbox). Skipped locally without one, a failure in CI."""
    return _required(POSTGRES_URL, 5432, "PostgreSQL")


def pytest_report_header() -> str:
    return f"broker required: {os.environ.get('RELAY_REQUIRE_BROKER', '0')}"


class RelayTestServer(TestServer):
    """aiohttp's TestServer with the relay's production runner (fast path included)."""

    async def _make_runner(self, **kwargs: Any) -> web.AppRunner:
        return make_runner(self.app, **kwargs)


@pytest.fixture
def aiohttp_client(aiohttp_client: ClientFactory) -> ClientFactory:
    """pytest-aiohttp's factory, except that a relay app is served the way ``relay serve`` serves
    it (:func:`relay.app.make_runner`), so every app test goes through the production HTTP front
    end: the callback fast path, and aiohttp for everything else."""

    async def client(app_or_server: Any, **kwargs: Any) -> TestClient:  # type: ignore[type-arg]
        if isinstance(app_or_server, web.Application) and CALLBACK in app_or_server:
            app_or_server = RelayTestServer(app_or_server)
        return await aiohttp_client(app_or_server, **kwargs)

    return client
