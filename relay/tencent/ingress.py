"""The callback endpoint: query → auth → body → normalize → dispatch → one reply.

The order is deliberate: the cheap checks that need no body (app allow-list, signature) run
before a byte of the body is read, and the body is read with a size cap and a deadline.
Replies use Tencent's envelope; ``ErrorInfo`` carries the stable error code and nothing else.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import orjson
import structlog
from aiohttp import web

from relay.access import SourcePolicy
from relay.bodies import BodyError, read_body
from relay.dispatch import Dispatcher
from relay.enricher import Enricher
from relay.errors import STATUS, Reject, Rejection, SpoolError, SpoolFull
from relay.fastpath import BodyReader, Reply
from relay.metrics import Metrics
from relay.tencent.auth import Authenticator
from relay.tencent.callback import KNOWN_COMMANDS, RECALL_COMMANDS, CallbackQuery, command_label
from relay.tencent.normalize import normalize, parse_object, resolve_command
from relay.tencent.sends import SEND_COMMANDS, parse_send

log = structlog.get_logger()

OK_BODY = orjson.dumps({"ActionStatus": "OK", "ErrorCode": 0, "ErrorInfo": ""})
# After refusing these the rest of the request is not worth reading: the connection is closed.
_CLOSING = frozenset({Reject.BODY_TOO_LARGE, Reject.BODY_TIMEOUT, Reject.INCOMPLETE_BODY, Reject.UNPROCESSABLE})


OK = Reply(200, OK_BODY)
FAIL = {
    code: Reply(
        STATUS[code],
        orjson.dumps({"ActionStatus": "FAIL", "ErrorCode": 1, "ErrorInfo": code.value}),
        retry_after=STATUS[code] == 503,
        close=code in _CLOSING,
    )
    for code in Reject
}


class CallbackHandler:
    """``POST /tencent-im/callback``."""

    def __init__(
        self,
        auth: Authenticator,
        dispatcher: Dispatcher,
        metrics: Metrics,
        *,
        max_body_bytes: int,
        body_timeout: float = 10.0,
        max_in_flight: int = 1000,
        sources: SourcePolicy | None = None,
        enricher: Enricher | None = None,
        evidence: bool = False,
        evidence_max_bytes: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self.dispatcher = dispatcher
        self.metrics = metrics
        metrics.prime_callbacks(KNOWN_COMMANDS)
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_in_flight = max_in_flight
        self.sources = sources or SourcePolicy((), ())
        self.enricher = enricher or Enricher(None, metrics, budget=0.05, evidence=False)
        self.evidence = evidence
        self.evidence_max_bytes = evidence_max_bytes
        self.clock = clock
        self.in_flight = 0
        self._shed = 0
        self._shed_logged_at = 0.0

    async def handle(self, request: web.Request) -> web.Response:
        """The aiohttp route; :mod:`relay.fastpath` calls :meth:`process` directly."""
        self.metrics.callbacks_via_aiohttp.inc()
        try:
            # X-Forwarded-For matters only to an active source allow-list: not looked up otherwise.
            forwarded = request.headers.getall("X-Forwarded-For", ()) if self.sources.active else ()
            query = request.query.items()
        except Exception as exc:  # noqa: BLE001 - process() never raises; this covers reading the request
            return self._failed(exc, request.remote, None).response()
        reply = await self.process(query, request.remote, forwarded, lambda: self._read_body(request))
        return reply.response()

    async def process(
        self,
        query_items: Iterable[tuple[str, str]],
        peer: str | None,
        forwarded_for: Iterable[str],
        read_body: BodyReader,
    ) -> Reply:
        """One callback, whichever HTTP server received it. ``read_body`` is awaited only once
        the checks that need no body have passed; it enforces the size cap and the deadline."""
        started = time.perf_counter()
        if self.in_flight >= self.max_in_flight:
            return self._overloaded(started)
        self.in_flight += 1
        command: str | None = None
        outcome = "rejected"
        try:
            if self.sources.active and not self.sources.allows(peer, forwarded_for):
                raise Rejection(Reject.FORBIDDEN_SOURCE, "source address not in RELAY_ALLOWED_CIDRS")
            reply, command, outcome = await self._process(query_items, peer, read_body)
        except Rejection as rejection:
            reply = self._reject(rejection, peer, command)
            outcome = "unavailable" if rejection.status == 503 else "rejected"
        except Exception as exc:  # noqa: BLE001 - never a 500: anything else is a 4xx with a stable code
            reply = self._failed(exc, peer, command)
        finally:
            self.in_flight -= 1
        self.metrics.child(self.metrics.callbacks, command_label(command), outcome).inc()
        self.metrics.child(self.metrics.request_seconds, outcome).observe(time.perf_counter() - started)
        return reply

    def _overloaded(self, started: float) -> Reply:
        """Shed load fast: nothing is read or parsed. One summary log line per second, not one per
        refused request, so logging does not add to the overload it reports."""
        self._shed += 1
        self.metrics.rejections.labels(Reject.OVERLOADED.value).inc()
        self.metrics.callbacks.labels("other", "unavailable").inc()
        now = time.monotonic()
        if now - self._shed_logged_at >= 1.0:
            log.warning("relay.overloaded", shed=self._shed, in_flight=self.in_flight, limit=self.max_in_flight)
            self._shed = 0
            self._shed_logged_at = now
        self.metrics.request_seconds.labels("unavailable").observe(time.perf_counter() - started)
        return FAIL[Reject.OVERLOADED]

    async def _process(
        self, query_items: Iterable[tuple[str, str]], peer: str | None, read_body: BodyReader
    ) -> tuple[Reply, str | None, str]:
        query = CallbackQuery.parse(query_items)
        command = query.command
        if command is not None and ".CallbackBefore" in command:
            # Before-event callbacks gate message delivery; the relay never blocks them.
            return OK, command, "ignored"
        try:
            self.auth.check(query)
            if command is not None and command not in RECALL_COMMANDS and not self._records(command):
                return self._ignored(command), command, "ignored"
            body = await read_body()
            received_at_ms = int(self.clock() * 1000)
            if command is None:
                command = resolve_command(query, parse_object(body))
                if command not in RECALL_COMMANDS and not self._records(command):
                    return self._ignored(command), command, "ignored"
            if command in SEND_COMMANDS:
                # Recorded for later enrichment and answered OK: the store write happens in the
                # background and never fails a send callback; it delays one (at most 1 s) only
                # while the Redis writer is 20,000 records behind.
                records = parse_send(body, query, evidence=self.evidence, evidence_max_bytes=self.evidence_max_bytes)
                await self.enricher.record(records)
                return OK, command, "accepted"
            result = normalize(body, query, received_at_ms, enrichment=self.enricher.unmatched)
        except Rejection as rejection:
            return self._reject(rejection, peer, command), command, "rejected"

        for field in result.anomalies:
            self.metrics.anomaly(field)
        if result.anomalies:
            log.warning("relay.payload_anomaly", command=command, fields=list(result.anomalies))

        events = await self.enricher.enrich(result.events)
        envelopes = [event.envelope() for event in events]
        event_ids = [e.event_id for e in envelopes]
        spooled = 0
        if envelopes:
            try:
                dispatched = await self.dispatcher.dispatch(envelopes)
            except SpoolError as exc:
                # Neither confirmed nor durable: the only honest answer is 503.
                code = Reject.SPOOL_FULL if isinstance(exc, SpoolFull) else Reject.SPOOL_UNAVAILABLE
                log.error(
                    "relay.events_refused", command=command, code=code.value, error=str(exc)[:300], event_ids=event_ids
                )
                return self._reject(Rejection(code), peer, command), command, "unavailable"
            spooled = dispatched.spooled
            failure = dispatched.publish_failure
            if failure is not None:
                # With the broker known to be down every callback is spooled: its state is logged
                # once (relay.broker_disconnected) and counted; a line per callback would flood the
                # logs for the length of the outage. Failures against a live broker stay warnings.
                emit = log.debug if failure.reason == "disconnected" else log.warning
                emit(
                    "relay.publish_failed",
                    command=command,
                    reason=failure.reason,
                    in_doubt=failure.in_doubt,
                    detail=failure.detail,
                    spooled=spooled,
                    event_ids=event_ids,
                )

        if result.rejected_items:
            # The valid items are already safe; the reply still says the callback was not clean.
            first = result.rejected_items[0]
            for item in result.rejected_items:
                self.metrics.rejections.labels(item.code.value).inc()
            log.warning(
                "relay.callback_partially_rejected",
                command=command,
                event_ids=event_ids,
                rejected=[{"index": i.index, "code": i.code.value, "detail": i.detail} for i in result.rejected_items],
            )
            return FAIL[first.code], command, "partial"

        # debug: one line per callback is too costly at full rate; metrics count them, relay tail shows them.
        log.debug("relay.callback_accepted", command=command, event_ids=event_ids, spooled=spooled)
        return OK, command, "accepted"

    def _records(self, command: str) -> bool:
        return command in SEND_COMMANDS and self.enricher.sends

    def _ignored(self, command: str) -> Reply:
        log.debug("relay.callback_ignored", command=command)
        return OK

    def _reject(self, rejection: Rejection, peer: str | None, command: str | None) -> Reply:
        self.metrics.rejections.labels(rejection.code.value).inc()
        log.warning(
            "relay.callback_rejected",
            code=rejection.code.value,
            status=rejection.status,
            detail=rejection.detail,
            command=command_label(command),
            peer=peer,
        )
        return FAIL[rejection.code]

    def _failed(self, exc: Exception, peer: str | None, command: str | None) -> Reply:
        """An exception no code names (a bug, or input nobody foresaw): 400 ``unprocessable`` and
        the connection closed, logged with its traceback and counted like any refusal."""
        self.metrics.rejections.labels(Reject.UNPROCESSABLE.value).inc()
        self.metrics.internal_errors.labels("callback").inc()
        log.error(
            "relay.callback_rejected",
            code=Reject.UNPROCESSABLE.value,
            status=STATUS[Reject.UNPROCESSABLE],
            detail=repr(exc)[:300],
            command=command_label(command),
            peer=peer,
            exc_info=exc,
        )
        return FAIL[Reject.UNPROCESSABLE]

    async def _read_body(self, request: web.Request) -> bytes:
        """The aiohttp route's body reader (the fast path has its own, for the requests it takes)."""
        try:
            return await read_body(request, self.max_body_bytes, self.body_timeout)
        except BodyError as exc:
            raise Rejection(Reject(exc.problem.value), exc.detail) from exc
