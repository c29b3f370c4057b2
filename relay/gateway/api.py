"""``POST /v1/recalls``: the recall gateway's HTTP API, on its own port (``RELAY_API_PORT``).

The callback port may face the internet (Tencent calls it); this one should not: it asks Tencent to
delete messages. Callers authenticate with ``Authorization: Bearer <token>``; the token's key
(``RELAY_API_KEYS_FILE`` or ``RELAY_API_TOKENS``) is recorded as ``requestedBy`` and limits what
the caller may do. Every answer is JSON, every error has a stable code (docs/recall-gateway.md),
and nothing a caller sends can produce a 500. The listener has the callback port's header and
body deadlines and a cap on open connections, so idle or slow clients cannot use up the file
descriptors the process shares with the callback port.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from relay.bodies import BodyError, BodyProblem, read_body
from relay.gateway.keys import ApiKey, Keyring
from relay.gateway.request import InvalidRequest, parse_request
from relay.gateway.service import Answer, RecallService, error
from relay.metrics import Metrics

log = structlog.get_logger()

MAX_BODY_BYTES = 256 * 1024  # 100 messages with 256-character IDs and a 1,000-character reason fit
RECALLS_PATH = "/v1/recalls"
_BODY_ERRORS = {
    BodyProblem.UNSUPPORTED_ENCODING: (415, "unsupported_encoding", "send the body without Content-Encoding"),
    BodyProblem.TOO_LARGE: (413, "body_too_large", f"the body is larger than {MAX_BODY_BYTES} bytes"),
    BodyProblem.TIMEOUT: (408, "body_timeout", "the body did not arrive in time"),
    BodyProblem.INCOMPLETE: (400, "invalid_body", "the body was cut off"),
}


def create_api_app(
    service: RecallService, keyring: Keyring, metrics: Metrics, *, body_timeout: float = 10.0
) -> web.Application:
    """The API application (served on ``RELAY_API_PORT`` by :func:`api_runner`)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors(metrics)])
    app.router.add_post(RECALLS_PATH, _RecallsRoute(service, keyring, metrics, body_timeout).handle)
    return app


def bearer(authorization: str | None) -> bytes | None:
    """The token of an ``Authorization: Bearer`` header, or None. aiohttp decodes header bytes that
    are not UTF-8 to lone surrogates; such a header holds no token this relay could have issued."""
    if authorization is None:
        return None
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    try:
        return given.strip().encode()
    except UnicodeEncodeError:
        return None


class _RecallsRoute:
    def __init__(self, service: RecallService, keyring: Keyring, metrics: Metrics, body_timeout: float) -> None:
        self.service = service
        self.keyring = keyring
        self.metrics = metrics
        self.body_timeout = body_timeout

    async def handle(self, request: web.Request) -> web.Response:
        token = bearer(request.headers.get("Authorization"))
        key = None if token is None else self.keyring.identify(token)
        if key is None:
            return self._refuse(
                request, error(401, "unauthorized", "a valid Authorization: Bearer <token> is required"), None
            )
        bucket = self.keyring.bucket(key)
        wait = 0.0 if bucket is None else bucket.try_acquire()
        if wait > 0:
            answer = error(429, "rate_limited", f"more than {key.rate:g} requests per second", retry_after=wait)
            return self._refuse(request, answer, key)
        try:
            body = await read_body(request, MAX_BODY_BYTES, self.body_timeout)
        except BodyError as exc:
            status, code, message = _BODY_ERRORS[exc.problem]
            return self._refuse(request, error(status, code, message), key)
        try:
            command = parse_request(body, new_id=lambda: str(uuid.uuid4()))
        except InvalidRequest as exc:
            message = (
                "the body is not a JSON object" if exc.code == "invalid_json" else "the request has invalid fields"
            )
            return self._refuse(request, error(400, exc.code, message, fields=exc.errors), key)
        answer = await self.service.submit(command, key, "api")
        if answer.status >= 400:
            log.warning(
                "relay.recall_rejected",
                code=answer.code,
                status=answer.status,
                request_id=command.request_id,
                requested_by=key.name,
            )
        return respond(answer)

    def _refuse(self, request: web.Request, answer: Answer, key: ApiKey | None) -> web.Response:
        """A request refused before it reached the service: counted and logged here."""
        self.metrics.recall_requests.labels("api", answer.code).inc()
        log.warning(
            "relay.recall_rejected",
            code=answer.code,
            status=answer.status,
            requested_by=None if key is None else key.name,
            peer=request.remote,
            fields=answer.body["error"].get("fields") if isinstance(answer.body["error"], dict) else None,
        )
        response = respond(answer)
        if answer.status in (408, 413, 415):
            response.force_close()  # the rest of the body is not wanted
        return response


def respond(answer: Answer) -> web.Response:
    response = web.Response(body=orjson.dumps(answer.body), status=answer.status, content_type="application/json")
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if answer.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, math.ceil(answer.retry_after)))
    if answer.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="revoke-relay"'
    return response


def _errors(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """aiohttp's own refusals (404, 405, 413) as JSON with stable codes; an unexpected exception is
    logged and answered as a JSON 500 (a bug, never the caller's input)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            metrics.recall_requests.labels("api", "body_too_large").inc()
            log.warning("relay.recall_rejected", code="body_too_large", status=413, peer=request.remote)
            return respond(error(413, "body_too_large", f"the body is larger than {MAX_BODY_BYTES} bytes"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "bad_request")
            return respond(error(exc.status, code, exc.reason))
        except Exception:
            log.exception("relay.internal_error", path=request.path)
            return respond(error(500, "internal_error", "an internal error; see the relay's log"))

    return middleware


class CappedServer:
    """The protocol factory the API's site listens with: aiohttp's server, but a connection past
    *limit* open ones is closed as soon as it is accepted (counted, logged at most once a second).
    Duck-types ``web.Server`` for the runner (``pre_shutdown``, ``shutdown``), as the fast path does."""

    def __init__(self, server: web.Server, limit: int, metrics: Metrics) -> None:
        self.server = server
        self.limit = limit
        self.metrics = metrics
        self._logged = 0.0

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.server.connections) >= self.limit:
            self.metrics.api_connections_refused.inc()
            now = asyncio.get_running_loop().time()
            if now - self._logged >= 1.0:
                self._logged = now
                log.warning("relay.api_connections_capped", limit=self.limit)
            return _Refused()
        return self.server()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class ApiRunner(web.AppRunner):
    """``web.AppRunner`` whose sites listen with :class:`CappedServer`."""

    def __init__(self, app: web.Application, *, max_connections: int, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return CappedServer(server, self._max_connections, self._metrics)  # type: ignore[return-value]
