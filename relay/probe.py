"""``relay check-config --probe``: try every endpoint the settings name, and say what answered.

Each probe has its own deadline and never raises: a result says what answered (and its version
where the server tells it) or why nothing did. Nothing is declared, published or written.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass, replace

import aio_pika
import aiohttp
import orjson
from prometheus_client import CollectorRegistry

from relay import broker
from relay.metrics import Metrics
from relay.settings import Settings, redact_url
from relay.store.topology import RedisOptions, Topology

TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Result:
    name: str  # the setting probed
    target: str  # what was tried, without secrets
    ok: bool
    detail: str
    required: bool  # the relay cannot do its configured job without it

    def line(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "warn")
        return f"{mark} {self.name} {self.target}: {self.detail}"


async def probe(settings: Settings) -> list[Result]:
    """Every probe the settings call for, run concurrently."""
    probes: list[Awaitable[Result]] = [_amqp(settings, e.display, e.url) for e in settings.amqp_endpoints]
    if settings.redis_options is not None:
        probes.append(_redis(settings.redis_options))
    if settings.gateway:
        probes.append(_https("RELAY_TENCENT_API_URL", settings.tencent_api_url, expect_json=False))
    if settings.api_jwks_url:
        probes.append(_https("RELAY_API_JWKS_URL", settings.api_jwks_url, expect_json=True))
    # aio-pika and aiormq log a refused connection on their own: the result says it, once.
    quiet = [logging.getLogger(name) for name in ("aio_pika", "aiormq")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        results = list(await asyncio.gather(*probes))
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
    # One broker node that answers is enough (the relay moves to the next when one is gone).
    if any(r.ok for r in results if r.name == "RELAY_AMQP_URL"):
        results = [replace(r, required=False) if r.name == "RELAY_AMQP_URL" else r for r in results]
    return results


def failed(results: list[Result]) -> bool:
    """Whether a required part did not answer."""
    return any(r.required and not r.ok for r in results)


async def _amqp(settings: Settings, display: str, url: str) -> Result:
    try:
        async with asyncio.timeout(TIMEOUT):
            connection = await broker.connect(url, name="revoke-relay check-config", timeout=TIMEOUT)
            try:
                server = connection.transport.connection.server_properties if connection.transport else {}
                version = _text(server.get("version")) if isinstance(server, dict) else None
                channel = await connection.channel()
                # Passive: only whether the exchange is there; a missing one is declared at start.
                try:
                    await channel.declare_exchange(settings.exchange, passive=True)
                    exchange = f"exchange {settings.exchange} exists"
                except aio_pika.exceptions.ChannelClosed:
                    exchange = f"exchange {settings.exchange} not declared yet (the relay declares it at start)"
            finally:
                await connection.close()
    except Exception as exc:  # noqa: BLE001 - a probe reports, never raises
        return Result("RELAY_AMQP_URL", display, False, _why(exc), True)
    return Result("RELAY_AMQP_URL", display, True, f"RabbitMQ {version or '?'} answered; {exchange}", True)


async def _redis(options: RedisOptions) -> Result:
    shown = ",".join(redact_url(u) for u in options.urls)
    topology = Topology(options, Metrics(CollectorRegistry()))
    try:
        async with asyncio.timeout(TIMEOUT * 2):
            await topology.check()  # also refuses a server that contradicts RELAY_REDIS_MODE
    except Exception as exc:  # noqa: BLE001 - a probe reports, never raises
        return Result("RELAY_REDIS_URL", shown, False, _why(exc), True)
    finally:
        await topology.close()
    status = topology.status()
    return Result(
        "RELAY_REDIS_URL", shown, True, f"Redis ({options.mode}, {status['primaries']} primaries) answered", True
    )


async def _https(name: str, url: str, *, expect_json: bool) -> Result:
    """An HTTP answer of any status means the host is reachable (Tencent's REST domain answers its root
    with an error page; only a signed call could say more, and that would need a real request)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT)) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            body = await response.content.read(1 << 20)
            status = response.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Result(name, redact_url(url), False, _why(exc), True)
    if expect_json:
        try:
            keys = orjson.loads(body).get("keys")
        except (orjson.JSONDecodeError, AttributeError):
            keys = None
        if status != 200 or not isinstance(keys, list):
            return Result(name, redact_url(url), False, f"HTTP {status}, not a JWK set", True)
        return Result(name, redact_url(url), True, f"HTTP 200, a JWK set of {len(keys)} keys", True)
    return Result(name, redact_url(url), True, f"answered HTTP {status}", True)


def _text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value if isinstance(value, str) else None


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:g} s"
    text = str(exc) or type(exc).__name__
    return text[:200]
