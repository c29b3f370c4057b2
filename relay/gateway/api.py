"""``POST /v1/recalls``: the recall gateway's HTTP API, on its own port (``RELAY_API_PORT``).

The callback port may face the internet (Tencent calls it); this one should not: it asks Tencent to
delete messages. Callers authenticate with ``Authorization: Bearer <token>``; the token's NAME in
``RELAY_API_TOKENS`` is recorded as ``requestedBy``. Every answer is JSON, every error has a stable
code (docs/recall-gateway.md), and nothing a caller sends can produce a 500.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable, Mapping

import orjson
import structlog
from aiohttp import web

from relay.gateway.request import InvalidRequest, parse_request
from relay.gateway.service import Answer, RecallService, error
from relay.metrics import Metrics

log = structlog.get_logger()

MAX_BODY_BYTES = 256 * 1024  # 100 messages with 256-character IDs and a 1,000-character reason fit
RECALLS_PATH = "/v1/recalls"


def create_api_app(service: RecallService, tokens: Mapping[str, tuple[str, ...]], metrics: Metrics) -> web.Application:
    """The API application (served by its own runner on ``RELAY_API_PORT``)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_errors(metrics)])
    callers = Callers(tokens)
    app.router.add_post(RECALLS_PATH, _RecallsRoute(service, callers, metrics).handle)
    return app


class Callers:
    """Bearer tokens → caller name, compared in constant time against every token."""

    def __init__(self, tokens: Mapping[str, tuple[str, ...]]) -> None:
        self._tokens = [(name, token.encode()) for name, ts in tokens.items() for token in ts]

    def identify(self, authorization: str | None) -> str | None:
        if authorization is None:
            return None
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        presented = given.strip().encode()
        found: str | None = None
        for name, token in self._tokens:  # no early exit: the time taken names no token
            if hmac.compare_digest(token, presented):
                found = name
        return found


class _RecallsRoute:
    def __init__(self, service: RecallService, callers: Callers, metrics: Metrics) -> None:
        self.service = service
        self.callers = callers
        self.metrics = metrics

    async def handle(self, request: web.Request) -> web.Response:
        caller = self.callers.identify(request.headers.get("Authorization"))
        if caller is None:
            return self._refuse(
                request, error(401, "unauthorized", "a valid Authorization: Bearer <token> is required"), None
            )
        try:
            body = await request.read()
        except (web.RequestPayloadError, ConnectionError) as exc:
            # A body that fails to decompress (Content-Encoding) or is cut off.
            return self._refuse(request, error(400, "invalid_body", f"the body cannot be read: {exc}"[:200]), caller)
        try:
            command = parse_request(body, new_id=lambda: str(uuid.uuid4()))
        except InvalidRequest as exc:
            message = (
                "the body is not a JSON object" if exc.code == "invalid_json" else "the request has invalid fields"
            )
            return self._refuse(request, error(400, exc.code, message, fields=exc.errors), caller)
        answer = await self.service.submit(command, caller)
        if answer.status >= 400:
            log.warning(
                "relay.recall_rejected",
                code=answer.code,
                status=answer.status,
                request_id=command.request_id,
                requested_by=caller,
            )
        return respond(answer)

    def _refuse(self, request: web.Request, answer: Answer, caller: str | None) -> web.Response:
        """A request refused before it reached the service: counted and logged here."""
        self.metrics.recall_requests.labels("api", answer.code).inc()
        log.warning(
            "relay.recall_rejected",
            code=answer.code,
            status=answer.status,
            requested_by=caller,
            peer=request.remote,
            fields=answer.body["error"].get("fields") if isinstance(answer.body["error"], dict) else None,
        )
        response = respond(answer)
        if answer.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="revoke-relay"'
        return response


def respond(answer: Answer) -> web.Response:
    response = web.Response(body=orjson.dumps(answer.body), status=answer.status, content_type="application/json")
    if answer.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    if answer.retry_after:
        response.headers["Retry-After"] = "1"
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
