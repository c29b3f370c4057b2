"""The aiohttp application: routes, health endpoints and the lifecycle of each resource.

Each resource lives in its own ``cleanup_ctx`` entry, so teardown runs only for what started,
in reverse order. ``create_app`` takes its collaborators as arguments: tests pass a recording
publisher and a fresh metrics registry.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from relay.access import SourcePolicy
from relay.dispatch import Dispatcher
from relay.drainer import Drainer
from relay.enricher import Enricher
from relay.errors import ConfigError
from relay.fastpath import RelayRunner
from relay.gateway.api import ApiRunner, create_api_app
from relay.gateway.commands import CommandConsumer
from relay.gateway.keys import Keyring, check_keys, legacy_keys, load_keys
from relay.gateway.moderators import Verifier, load_jwks_file
from relay.gateway.service import RecallService
from relay.gateway.tencent_api import TencentApi
from relay.matrix import ingress as matrix_ingress
from relay.metrics import Metrics
from relay.publisher import AmqpPublisher, Publisher
from relay.runtime import GcPauses, LoopLag, SliceLog
from relay.settings import Settings
from relay.spool import Spool
from relay.store import CorrelationStore
from relay.store.memory import MemoryStore
from relay.store.redis import RedisStore
from relay.store.topology import Topology
from relay.tencent.auth import Authenticator
from relay.tencent.ingress import CallbackHandler
from relay.workers import merged_metrics, peer_readiness

CALLBACK_PATH = "/tencent-im/callback"
# A recall being carried out when SIGTERM comes may wait on Tencent's retries; bounded so the whole
# shutdown fits Kubernetes' grace period (docs/deploy.md).
API_SHUTDOWN_TIMEOUT = 15.0
log = structlog.get_logger()


@dataclass(slots=True)
class Lifecycle:
    """Process state the health endpoints report; ``draining`` flips at the first SIGTERM."""

    draining: bool = False


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
RUNTIME = web.AppKey("runtime", tuple[LoopLag, GcPauses])
PUBLISHER = web.AppKey("publisher", Publisher)
SPOOL = web.AppKey("spool", Spool)
DRAINER = web.AppKey("drainer", Drainer)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
ENRICHER = web.AppKey("enricher", Enricher)
CALLBACK = web.AppKey("callback", CallbackHandler)
WORKER = web.AppKey("worker", tuple)  # (index, count) under relay serve --workers, else ()
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
TENCENT = web.AppKey("tencent_api", TencentApi)
GATEWAY = web.AppKey("recall_service", RecallService)
API = web.AppKey("api_app", web.Application)  # the recall API, served on its own port
COMMANDS = web.AppKey("command_consumer", CommandConsumer)
KEYRING = web.AppKey("keyring", Keyring)
VERIFIER = web.AppKey("moderator_verifier", Verifier)
MATRIX = web.AppKey("matrix", matrix_ingress.TransactionHandler)


def create_app(
    settings: Settings,
    *,
    publisher: Publisher | None = None,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    worker: tuple[int, int] | None = None,
) -> web.Application:
    metrics = Metrics(registry if registry is not None else CollectorRegistry())
    if publisher is None:
        publisher = AmqpPublisher.from_settings(settings, metrics)
    spool = Spool(settings.spool_dir, settings.spool_max_bytes, clock=clock)
    store = correlation_store(settings, metrics)
    enricher = Enricher(
        store,
        metrics,
        budget=settings.enrichment_timeout,
        evidence=settings.evidence,
        sends=settings.enrichment,
        recalls=settings.gateway,
        admin=settings.tencent_admin,
    )
    dispatcher = Dispatcher(publisher, spool, metrics)
    auth = Authenticator(settings.accepted_apps, settings.callback_tokens, settings.signature_max_age, clock)
    handler = CallbackHandler(
        auth,
        dispatcher,
        metrics,
        enricher=enricher,
        evidence=settings.evidence,
        evidence_max_bytes=settings.evidence_max_bytes,
        max_body_bytes=settings.max_body_bytes,
        body_timeout=settings.body_timeout,
        max_in_flight=settings.max_in_flight,
        sources=SourcePolicy(settings.allowed_cidrs, settings.trusted_proxies),
        clock=clock,
    )

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[unexpected_errors])
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[PUBLISHER] = publisher
    app[SPOOL] = spool
    app[DRAINER] = Drainer(spool, publisher, metrics)
    app[DISPATCHER] = dispatcher
    app[ENRICHER] = enricher
    app[CALLBACK] = handler
    app[LIFECYCLE] = Lifecycle()
    app[WORKER] = worker or ()
    app.router.add_post(CALLBACK_PATH, handler.handle)
    metrics.requests_in_flight.set_function(lambda: handler.in_flight)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    # Set up in this order, torn down in reverse: the drainer's final flush needs the spool and
    # the publisher, the spool must be closed before the broker connection goes.
    app.cleanup_ctx.extend((_runtime_ctx, _publisher_ctx, _spool_ctx, _drainer_ctx, _correlation_ctx))
    if settings.gateway and store is not None:
        _add_gateway(app, settings, store, dispatcher, metrics, clock)
    # Matrix application service (docs/matrix.md): routes on the callback port, only while
    # RELAY_MATRIX_HS_TOKEN is set. aiohttp serves them (the fast path knows only Tencent's route).
    if settings.matrix_hs_token:
        matrix = matrix_ingress.from_settings(settings, dispatcher, enricher, metrics, clock)
        matrix.add_routes(app.router)
        app[MATRIX] = matrix
        app.cleanup_ctx.append(_matrix_ctx)
    return app


async def _matrix_ctx(app: web.Application) -> AsyncIterator[None]:
    txns = app[MATRIX].txns
    await txns.start()
    log.info("relay.matrix_enabled", transaction_log=txns.name)
    yield
    await txns.close()


def correlation_store(settings: Settings, metrics: Metrics) -> CorrelationStore | None:
    """Redis when configured (shared by replicas), else the embedded store; None when neither
    enrichment nor the recall gateway needs one."""
    if not settings.enrichment and not settings.gateway:
        return None
    # The gateway resolves a msgID through the send records: index them by msgID then.
    index = settings.gateway and settings.enrichment
    options = settings.redis_options
    if options is not None:
        return RedisStore(Topology(options, metrics), settings.correlation_ttl, metrics, index_msg_ids=index)
    # Gateway records (leases, answers, joins) have a bound of their own: sends never evict them.
    return MemoryStore(settings.correlation_ttl, settings.correlation_max_entries, metrics, index_msg_ids=index)


def _add_gateway(
    app: web.Application,
    settings: Settings,
    store: CorrelationStore,
    dispatcher: Dispatcher,
    metrics: Metrics,
    clock: Callable[[], float],
) -> None:
    """The recall gateway: the Tencent REST client, the service, its HTTP API (served on
    ``RELAY_API_PORT`` by ``relay serve``) and the command-queue consumer."""
    tencent = TencentApi(
        settings.tencent_api_url,
        settings.tencent_admin,
        settings.tencent_secret_keys,
        metrics,
        rate=settings.tencent_rate,
        timeout=settings.tencent_timeout,
        clock=clock,
    )
    verifier = moderator_verifier(settings)
    service = RecallService(
        tencent,
        store,
        dispatcher,
        metrics,
        record_ttl=settings.recall_ttl,
        join_ttl=settings.recall_join_ttl,
        spool_share=settings.spool_gateway_share,
        verifier=verifier,
        clock=clock,
    )
    keyring = Keyring(settings.all_api_keys)
    app[TENCENT] = tencent
    app[GATEWAY] = service
    app[KEYRING] = keyring
    if settings.api:
        app[API] = create_api_app(service, keyring, metrics, body_timeout=settings.body_timeout)
    app.cleanup_ctx.append(_tencent_ctx)
    if verifier is not None:
        app[VERIFIER] = verifier
        app.cleanup_ctx.append(_verifier_ctx)
    if settings.command_queue is not None:
        app[COMMANDS] = CommandConsumer(
            settings.amqp_url,
            settings.command_queue,
            service,
            metrics,
            keyring,
            reply_prefix=settings.command_reply_prefix,
        )
        app.cleanup_ctx.append(_commands_ctx)


def moderator_verifier(settings: Settings) -> Verifier | None:
    """The moderator-token checker, when a JWKS is configured (its file was validated with the settings)."""
    if settings.api_jwt_issuer is None or settings.api_jwt_audience is None:
        return None
    keys = load_jwks_file(settings.api_jwks_file) if settings.api_jwks_file is not None else None
    return Verifier(
        settings.api_jwt_issuer, settings.api_jwt_audience, settings.api_jwt_claim, keys=keys, url=settings.api_jwks_url
    )


def reload_credentials(app: web.Application) -> bool:
    """SIGHUP: read ``RELAY_API_KEYS_FILE`` (and ``RELAY_API_JWKS_FILE``) again and put them in force.
    A file that no longer validates changes nothing (logged): the keys in force stay."""
    settings = app[SETTINGS]
    if KEYRING not in app:
        return False
    try:
        scoped = load_keys(settings.api_keys_file) if settings.api_keys_file is not None else ()
        problems = check_keys((*scoped, *legacy_keys(settings.api_tokens)), settings.tencent_secret_keys)
        if problems:
            raise ConfigError(problems)
        jwks = load_jwks_file(settings.api_jwks_file) if settings.api_jwks_file is not None else None
    except ConfigError as exc:
        log.error("relay.credentials_reload_failed", problems=exc.problems)
        return False
    app[KEYRING].replace((*scoped, *legacy_keys(settings.api_tokens)))
    if jwks is not None and VERIFIER in app:
        app[VERIFIER].replace_keys(jwks)
    log.info("relay.credentials_reloaded", keys=app[KEYRING].names, jwks_keys=None if jwks is None else len(jwks))
    return True


def api_runner(app: web.Application) -> ApiRunner:
    """The recall API's HTTP server: the callback port's header and body deadlines, a cap on open
    connections, bodies read as sent (no decompression)."""
    settings = app[SETTINGS]
    return ApiRunner(
        app[API],
        max_connections=settings.api_max_connections,
        metrics=app[METRICS],
        access_log=None,
        handle_signals=False,
        shutdown_timeout=API_SHUTDOWN_TIMEOUT,
        keepalive_timeout=settings.keepalive_timeout,
        lingering_time=2.0,
        auto_decompress=False,
    )


async def _verifier_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[VERIFIER].start()
    yield
    await app[VERIFIER].close()


async def _tencent_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[TENCENT].start()
    yield
    await app[TENCENT].close()


async def _commands_ctx(app: web.Application) -> AsyncIterator[None]:
    # Started last, stopped first: no new command is taken once shutdown begins, and the ones
    # being carried out still have the publisher, the spool and the store.
    await app[COMMANDS].start()
    yield
    await app[COMMANDS].close()


async def _correlation_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[ENRICHER].store
    if store is not None:
        await store.start()
        log.info("relay.correlation_store", store=store.name, evidence=app[SETTINGS].evidence)
    yield
    if store is not None:
        await store.close()


def local_app(relay_app: web.Application) -> web.Application:
    """What a worker tells its peers (served on a unix socket): its own, unmerged metrics and
    readiness, so any worker can answer for the whole pod."""
    metrics = relay_app[METRICS]

    async def own_metrics(_: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(metrics.registry))
        response.content_type = "text/plain"
        return response

    async def own_readiness(_: web.Request) -> web.Response:
        ready, body = readiness(relay_app)
        return _json(body, 200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", own_metrics)
    app.router.add_get("/readyz", own_readiness)
    return app


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The HTTP server of production, used by ``relay serve`` and the tests: callbacks on the fast
    path (:mod:`relay.fastpath`) unless ``RELAY_HTTP_FAST_PATH=off``, everything else on aiohttp."""
    settings = app[SETTINGS]
    options: dict[str, Any] = {
        "access_log": None,
        "handle_signals": False,
        "shutdown_timeout": settings.publish_timeout + 2,
        # A connection whose next request has not fully arrived within this time is closed: the
        # idle keep-alive limit, and the header-read timeout that stops slowloris clients.
        "keepalive_timeout": settings.keepalive_timeout,
        # After refusing a body (413, 408) the rest is read and discarded before closing; bound
        # that, so a slow sender cannot hold the socket for aiohttp's default 10 s.
        "lingering_time": 2.0,
        # Bodies are read as sent: the callback handler refuses any Content-Encoding but identity
        # (415), so nothing is ever inflated (no decompression bombs, no decoder errors mid-read).
        "auto_decompress": False,
        **kwargs,
    }
    if settings.fast_path:
        return RelayRunner(app, app[CALLBACK], CALLBACK_PATH, wait=app[METRICS].request_wait_seconds, **options)
    return web.AppRunner(app, **options)


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    """The process's own waits, watched for as long as the app runs (relay/runtime.py)."""
    metrics = app[METRICS]
    lag, gc_pauses = LoopLag(metrics.loop_lag_seconds), GcPauses(metrics.gc_pause_seconds)
    app[RUNTIME] = (lag, gc_pauses)
    lag.start()
    gc_pauses.start()
    slices, path = None, app[SETTINGS].slice_log
    if path is not None:
        worker = app[WORKER][0] if app[WORKER] else 0
        slices = SliceLog(path, metrics, lag, gc_pauses, worker)
        slices.start()
    yield
    if slices is not None:
        slices.stop()
    gc_pauses.stop()
    lag.stop()


async def _publisher_ctx(app: web.Application) -> AsyncIterator[None]:
    publisher = app[PUBLISHER]
    await publisher.start()
    yield
    await publisher.close()


async def _spool_ctx(app: web.Application) -> AsyncIterator[None]:
    spool = app[SPOOL]
    await spool.open()
    app[METRICS].watch_spool(spool)
    yield
    await spool.close()


async def _drainer_ctx(app: web.Application) -> AsyncIterator[None]:
    drainer = app[DRAINER]
    await drainer.start()
    yield
    await drainer.stop(app[SETTINGS].drain_timeout)


@web.middleware
async def unexpected_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """An exception a route did not expect becomes a logged, counted JSON 500 instead of aiohttp's
    text page. The callback route never gets here: it turns every exception into a 4xx itself."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        log.exception("relay.internal_error", route=route, method=request.method)
        request.app[METRICS].internal_errors.labels(route).inc()
        return _json({"error": "internal_error"}, 500)


def _json(body: dict[str, object], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def healthz(_: web.Request) -> web.Response:
    """Liveness: the event loop answers. Never depends on the broker (restarting would not help)."""
    return _json({"status": "ok"})


def readiness(app: web.Application) -> tuple[bool, dict[str, object]]:
    """This process's readiness and the body that reports it."""
    draining = app[LIFECYCLE].draining
    spool = app[SPOOL]
    ready = app[DISPATCHER].ready and not draining
    return ready, {
        "status": "ready" if ready else "not_ready",
        "broker": app[PUBLISHER].ready,
        "endpoint": app[PUBLISHER].endpoint,
        "spool": {
            "available": spool.available,
            "has_room": spool.has_room,
            "events": spool.events,
            "bytes": spool.bytes,
            "oldest_age_seconds": round(spool.oldest_age(), 3),
        },
        "draining": draining,
        # The command queue and the Redis store are reported, never decide: callbacks need neither.
        **({"commands": app[COMMANDS].status} if COMMANDS in app else {}),
        **({"store": store.topology.status()} if isinstance(store := app[ENRICHER].store, RedisStore) else {}),
    }


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 only while a callback would be made safe right now (broker or spool).

    Under ``--workers N`` the kernel may hand the next callback to any worker, so the pod is ready
    only while every running worker is: each peer is asked over its unix socket. A peer whose
    socket is gone is restarting and receives no connections, so it does not count; one that
    does not answer within a second does (its listening socket still takes connections)."""
    app = request.app
    ready, body = readiness(app)
    worker = app[WORKER]
    if worker and worker[1] > 1:
        peers = await peer_readiness(worker[0], worker[1], app[SETTINGS].port)
        states = {str(worker[0]): body["status"], **{str(i): state for i, state in peers.items()}}
        body["workers"] = dict(sorted(states.items()))
        ready = ready and all(state in ("ready", "absent") for state in peers.values())
        body["status"] = "ready" if ready else "not_ready"
    return _json(body, 200 if ready else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    worker = request.app[WORKER]
    if worker and worker[1] > 1:
        body = await merged_metrics(body, worker[0], worker[1], request.app[SETTINGS].port)
    response = web.Response(body=body)
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    response.charset = "utf-8"
    return response
