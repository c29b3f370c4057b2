"""The application-service endpoint: ``PUT /_matrix/app/v1/transactions/{txnId}`` (and the legacy path).

token → body → already answered? → normalize → record messages → enrich redactions → dispatch →
remember the transaction → 200. A 200 means every event of the transaction is safe (confirmed by
RabbitMQ or in the spool), exactly as for Tencent's callbacks; anything else is answered non-200 and
the homeserver retries the same transaction later.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import orjson
import structlog
from aiohttp import web

from relay.bodies import BodyError, read_body
from relay.dispatch import Dispatcher
from relay.enricher import Enricher, apply
from relay.errors import SpoolError, SpoolFull
from relay.events import RevokeEvent
from relay.matrix.auth import HsTokenAuth
from relay.matrix.errors import ANSWERS, MatrixReject, MatrixRejection
from relay.matrix.normalize import Transaction, normalize, parse_transaction
from relay.matrix.transactions import LEGACY_ENTRY, MemoryTransactionLog, RedisTransactionLog, TransactionLog, digest
from relay.metrics import Metrics
from relay.settings import Settings

log = structlog.get_logger()

PREFIX = "/_matrix/app/v1"
TRANSACTION_PATHS = (f"{PREFIX}/transactions/{{txn_id}}", "/transactions/{txn_id}")  # the second: legacy
PING_PATH = f"{PREFIX}/ping"
MAX_TXN_ID_CHARS = 255
_LOGGED_SKIPS = 10


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes
    retry_after: bool = False

    def response(self) -> web.Response:
        headers = {"Retry-After": "1"} if self.retry_after else None
        return web.Response(status=self.status, body=self.body, content_type="application/json", headers=headers)


OK = Answer(200, b"{}")
REFUSED = {
    code: Answer(status, orjson.dumps({"errcode": errcode, "error": code.value}), retry_after=status == 503)
    for code, (status, errcode) in ANSWERS.items()
}


class TransactionHandler:
    """The homeserver's pushes. One instance per app; ``add_routes`` puts it on the callback port."""

    def __init__(
        self,
        auth: HsTokenAuth,
        dispatcher: Dispatcher,
        enricher: Enricher,
        metrics: Metrics,
        txns: TransactionLog,
        *,
        max_body_bytes: int,
        body_timeout: float = 10.0,
        evidence: bool = False,
        evidence_max_bytes: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = auth
        self.dispatcher = dispatcher
        self.enricher = enricher
        self.metrics = metrics
        self.txns = txns
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.evidence = evidence
        self.evidence_max_bytes = evidence_max_bytes
        self.clock = clock
        # A transaction being handled: a repeat of it waits for the first to finish.
        self._running: dict[str, asyncio.Event] = {}
        for code in MatrixReject:
            metrics.matrix_rejections.labels(code.value)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        for path in TRANSACTION_PATHS:
            router.add_put(path, self.handle_transaction)
        router.add_post(PING_PATH, self.handle_ping)

    async def handle_ping(self, request: web.Request) -> web.Response:
        """``POST /_matrix/app/v1/ping``: the homeserver checks that it reaches us (and, on success,
        Synapse retries what it holds for us at once)."""
        try:
            self.auth.check(request.headers.get("Authorization"), request.query.get("access_token"))
        except MatrixRejection as rejection:
            return self._reject(rejection, None, request.remote).response()
        return OK.response()

    async def handle_transaction(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        txn_id = request.match_info["txn_id"]
        try:
            answer, outcome = await self._transaction(request, txn_id)
        except MatrixRejection as rejection:
            answer = self._reject(rejection, txn_id, request.remote)
            outcome = "unavailable" if rejection.status == 503 else "rejected"
        self.metrics.child(self.metrics.matrix_transactions, outcome).inc()
        self.metrics.child(self.metrics.matrix_transaction_seconds, outcome).observe(time.perf_counter() - started)
        return answer.response()

    async def _transaction(self, request: web.Request, txn_id: str) -> tuple[Answer, str]:
        # The token before the body: a caller without it never makes the relay read a byte.
        self.auth.check(request.headers.get("Authorization"), request.query.get("access_token"))
        if len(txn_id) > MAX_TXN_ID_CHARS:
            raise MatrixRejection(MatrixReject.INVALID_TXN_ID, f"txnId longer than {MAX_TXN_ID_CHARS} characters")
        body = await self._read_body(request)
        while (busy := self._running.get(txn_id)) is not None:
            await busy.wait()  # the same transaction is in hand: its outcome decides this one's
        done = self._running[txn_id] = asyncio.Event()
        try:
            events = parse_transaction(body)
            content = digest(events)
            earlier = await self.txns.answered(txn_id)
            if earlier is not None and earlier in (content, LEGACY_ENTRY):
                log.info("relay.matrix_transaction_repeated", txn_id=txn_id)
                return OK, "duplicate"
            if earlier is not None:
                # The same txnId with other events: a homeserver whose transaction counter went back
                # (a restored database) or a bug. Dropping them would lose redactions for good:
                # handle them (their eventIDs are deterministic), and say so.
                self.metrics.matrix_txn_reused.inc()
                log.warning("relay.matrix_txn_reused", txn_id=txn_id, events=len(events))
            return await self._handle(txn_id, events, content)
        finally:
            del self._running[txn_id]
            done.set()

    async def _handle(self, txn_id: str, events: list[object], content: bytes) -> tuple[Answer, str]:
        transaction = normalize(
            events,
            int(self.clock() * 1000),
            evidence=self.evidence,
            evidence_max_bytes=self.evidence_max_bytes,
            enrichment=self.enricher.unmatched,
        )
        self._count(txn_id, transaction)
        await self.enricher.record(transaction.records)
        envelopes = [event.envelope() for event in await self._enrich(transaction)]
        event_ids = [e.event_id for e in envelopes]
        spooled = 0
        if envelopes:
            try:
                dispatched = await self.dispatcher.dispatch(envelopes)
            except SpoolError as exc:
                # Neither confirmed nor durable: refuse, and the homeserver sends it again later.
                code = MatrixReject.SPOOL_FULL if isinstance(exc, SpoolFull) else MatrixReject.SPOOL_UNAVAILABLE
                log.error("relay.matrix_events_refused", txn_id=txn_id, code=code.value, event_ids=event_ids)
                raise MatrixRejection(code, str(exc)[:300]) from exc
            spooled = dispatched.spooled
            failure = dispatched.publish_failure
            if failure is not None:
                # As for Tencent: a known outage is logged once by the publisher, not per request.
                emit = log.debug if failure.reason == "disconnected" else log.warning
                emit(
                    "relay.publish_failed",
                    provider="matrix",
                    txn_id=txn_id,
                    reason=failure.reason,
                    in_doubt=failure.in_doubt,
                    detail=failure.detail,
                    spooled=spooled,
                    event_ids=event_ids,
                )
        await self.txns.remember(txn_id, content)
        log.debug("relay.matrix_transaction_accepted", txn_id=txn_id, event_ids=event_ids, spooled=spooled)
        return OK, "accepted"

    async def _enrich(self, transaction: Transaction) -> Sequence[RevokeEvent]:
        """Enrich the redactions. A message redacted in the very transaction that carries it (the
        homeserver batches while it retries) is matched here: its record may not be in the store
        yet, since store writes are queued."""
        redactions = transaction.redactions
        local = {r.key: r for r in transaction.records}
        if self.enricher.store is None or not any(e.correlation_key in local for e in redactions):
            return await self.enricher.enrich(redactions)
        remote = iter(await self.enricher.enrich([e for e in redactions if e.correlation_key not in local]))
        out: list[RevokeEvent] = []
        hits = 0
        for event in redactions:
            record = local.get(event.correlation_key or "")
            if record is None:
                out.append(next(remote))
            else:
                out.append(apply(event, record, evidence=self.evidence))
                hits += 1
        self.metrics.child(self.metrics.correlation_lookups, "hit").inc(hits)
        return out

    def _count(self, txn_id: str, transaction: Transaction) -> None:
        for kind, count in transaction.kinds.items():
            if count:
                self.metrics.child(self.metrics.matrix_events, kind).inc(count)
        if transaction.skipped:
            self.metrics.child(self.metrics.matrix_events, "invalid").inc(len(transaction.skipped))
            # Acknowledged, not refused: a refusal would make the homeserver resend the same
            # events forever and hold back everything after them.
            log.warning(
                "relay.matrix_events_skipped",
                txn_id=txn_id,
                count=len(transaction.skipped),
                skipped=[
                    {"index": s.index, "code": s.code.value, "detail": s.detail}
                    for s in transaction.skipped[:_LOGGED_SKIPS]
                ],
            )
        for field in transaction.anomalies:
            self.metrics.anomaly(field)
        if transaction.anomalies:
            log.warning("relay.payload_anomaly", provider="matrix", txn_id=txn_id, fields=list(transaction.anomalies))

    def _reject(self, rejection: MatrixRejection, txn_id: str | None, peer: str | None) -> Answer:
        self.metrics.matrix_rejections.labels(rejection.code.value).inc()
        log.warning(
            "relay.matrix_request_rejected",
            code=rejection.code.value,
            status=rejection.status,
            detail=rejection.detail,
            txn_id=None if txn_id is None else txn_id[:MAX_TXN_ID_CHARS],
            peer=peer,
        )
        return REFUSED[rejection.code]

    async def _read_body(self, request: web.Request) -> bytes:
        try:
            return await read_body(request, self.max_body_bytes, self.body_timeout)
        except BodyError as exc:
            raise MatrixRejection(MatrixReject(exc.problem.value), exc.detail) from exc


def from_settings(
    settings: Settings, dispatcher: Dispatcher, enricher: Enricher, metrics: Metrics, clock: Callable[[], float]
) -> TransactionHandler:
    """The endpoint as ``RELAY_MATRIX_*`` describe it; the caller checked that the HS token is set."""
    hs_token = settings.matrix_hs_token or ""
    txns: TransactionLog
    if settings.redis_url:
        # Keyed by a hash of the token: a new registration starts a new numbering of transactions.
        namespace = hashlib.sha256(hs_token.encode()).hexdigest()[:16]
        txns = RedisTransactionLog(settings.redis_url, namespace)
    else:
        txns = MemoryTransactionLog()
    return TransactionHandler(
        HsTokenAuth(hs_token),
        dispatcher,
        enricher,
        metrics,
        txns,
        max_body_bytes=settings.matrix_max_body_bytes,
        body_timeout=settings.body_timeout,
        evidence=settings.evidence,
        evidence_max_bytes=settings.evidence_max_bytes,
        clock=clock,
    )
