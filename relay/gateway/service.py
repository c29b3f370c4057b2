"""Carrying out a recall request: idempotency, the join records, audit events, Tencent's REST calls.

The order matters (docs/recall-gateway.md):
1. claim the requestID (a lease in the correlation store), so a retry or a concurrent duplicate
   never calls Tencent twice;
2. write one recall record per message **before** calling Tencent: Tencent's recall callback can
   arrive before its HTTP answer, and the callback is joined to this record;
3. make ``message.recall_requested`` safe (confirmed or spooled) — no audit trail, no recall;
4. call Tencent (C2C one message per call, concurrently; group and official account in batches
   of 10), publish ``message.recall_failed`` for what it refused or could not be reached for;
5. keep the answer under the requestID, so the same request again gets it without a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import quote

import orjson
import structlog

from relay.correlation import CorrelationStore, StoreError, encode_request_record, msg_id_key, recall_key
from relay.dispatch import Dispatcher
from relay.errors import SpoolError, SpoolFull
from relay.events import Envelope, RecallRequest
from relay.gateway.audit import FAILED, REQUESTED, AuditKind, audit_envelope, revoked_event_id
from relay.gateway.outcomes import NO_CODE, Outcome, cut_reason
from relay.gateway.request import FieldError, RecallCommand, Target
from relay.gateway.tencent_api import TencentUnreachable
from relay.metrics import Metrics

log = structlog.get_logger()

BATCH = 10  # Tencent's limit per group / official-account recall call
LEASE_SECONDS = 120.0  # a claimed requestID not answered by then may be carried out again
_FAILED_STATUSES = frozenset({"not_found", "rejected", "failed"})


class Recaller(Protocol):
    """Tencent's three recall APIs (relay.gateway.tencent_api.TencentApi, or a test double)."""

    def has_key(self, app: str) -> bool: ...

    async def recall_c2c(self, app: str, sender: str, receiver: str, msg_key: str) -> Outcome: ...

    async def recall_group(
        self, app: str, group_id: str, topic_id: str | None, seqs: Sequence[int], reason: str
    ) -> list[Outcome]: ...

    async def recall_official_account(
        self, app: str, account: str, msg_keys: Sequence[str], reason: str
    ) -> list[Outcome]: ...


@dataclass(frozen=True, slots=True)
class Answer:
    """The gateway's answer to one request, whichever way it came in (HTTP or the command queue)."""

    status: int
    body: dict[str, object]
    replayed: bool = False  # the stored answer to an earlier identical request
    retry_after: bool = False

    @property
    def code(self) -> str:
        """``ok`` or the error code: the metric label and the command consumer's decision."""
        error = self.body.get("error")
        return str(error["code"]) if isinstance(error, dict) else "ok"


def error(
    status: int,
    code: str,
    message: str,
    *,
    fields: Sequence[FieldError] = (),
    extra: Mapping[str, object] | None = None,
) -> Answer:
    """An error answer: ``{"error": {"code", "message", "fields"?}, …extra}``."""
    detail: dict[str, object] = {"code": code, "message": message}
    if fields:
        detail["fields"] = [f.to_dict() for f in fields]
    return Answer(status, {"error": detail, **(extra or {})}, retry_after=status in (409, 503))


@dataclass(slots=True)
class _Result:
    target: Target
    outcome: Outcome | None = None
    unreachable: TencentUnreachable | None = field(default=None)


class RecallService:
    """One instance per process; shared by the HTTP API and the command consumer."""

    def __init__(
        self,
        recaller: Recaller,
        store: CorrelationStore,
        dispatcher: Dispatcher,
        metrics: Metrics,
        *,
        record_ttl: float,
        clock: Callable[[], float] = time.time,
        lease: float = LEASE_SECONDS,
    ) -> None:
        self.recaller = recaller
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.record_ttl = record_ttl
        self.clock = clock
        self.lease = lease

    async def submit(self, command: RecallCommand, requested_by: str, *, take_over: bool = False) -> Answer:
        """Carry out *command* for the caller *requested_by*; never raises for a bad request.

        *take_over*: a redelivered command message. RabbitMQ redelivers only once the consumer
        that had it is gone, so a lease still held on its requestID is that dead consumer's."""
        started = time.perf_counter()
        try:
            answer = await self._submit(command, requested_by, take_over)
        except StoreError as exc:
            log.error("relay.recall_store_unavailable", request_id=command.request_id, error=str(exc)[:300])
            answer = error(503, "store_unavailable", "the correlation store cannot be reached; retry later")
        via = "amqp" if requested_by == "amqp" else "api"
        self.metrics.recall_requests.labels(via, "replayed" if answer.replayed else answer.code).inc()
        self.metrics.recall_request_seconds.observe(time.perf_counter() - started)
        return answer

    async def _submit(self, command: RecallCommand, requested_by: str, take_over: bool) -> Answer:
        if not self.recaller.has_key(command.sdk_app_id):
            return error(403, "app_not_configured", "no secret key for this sdkAppID (RELAY_TENCENT_SECRET_KEYS)")
        command, problems = await self._resolve(command)
        if problems:
            return error(400, "invalid_request", "some messages cannot be recalled", fields=problems)
        ledger = "request:" + quote(requested_by, safe="") + "/" + quote(command.request_id, safe="")
        earlier = await self._claim(ledger, command, take_over)
        if earlier is not None:
            return earlier
        try:
            answer = await self._carry_out(command, requested_by)
        except BaseException:
            await self._release(ledger)
            raise
        if answer.status == 200:
            record = orjson.dumps({"state": "done", "fp": command.fingerprint, "body": answer.body})
            try:
                await self.store.put([(ledger, record)], self.record_ttl)
            except StoreError as exc:
                # Tencent has done the work; a retry would call it again, which it answers
                # idempotently (already recalled / not found). Worth a log line, not a failure.
                log.error("relay.recall_answer_not_kept", request_id=command.request_id, error=str(exc)[:300])
        else:
            await self._release(ledger)
        return answer

    async def _claim(self, ledger: str, command: RecallCommand, take_over: bool) -> Answer | None:
        """Take the lease on the requestID; or the answer a retry of it gets."""
        pending = orjson.dumps({"state": "pending", "fp": command.fingerprint})
        for _ in range(3):  # the lease may expire between the claim and the read: claim again
            if await self.store.claim(ledger, pending, self.lease):
                return None
            raw = (await self.store.get([ledger]))[0]
            if raw is None:
                continue
            earlier = orjson.loads(raw)
            if earlier.get("fp") != command.fingerprint:
                return error(409, "request_id_conflict", "this requestID was used for a different request")
            if earlier.get("state") == "done":
                log.info("relay.recall_replayed", request_id=command.request_id)
                return Answer(200, earlier["body"], replayed=True)
            if take_over:
                log.warning("relay.recall_taken_over", request_id=command.request_id)
                await self.store.put([(ledger, pending)], self.lease)
                return None
            return error(409, "request_in_progress", "this requestID is being carried out; retry shortly")
        return error(409, "request_in_progress", "this requestID is being carried out; retry shortly")

    async def _release(self, ledger: str) -> None:
        with contextlib.suppress(StoreError):  # the lease expires by itself
            await self.store.delete(ledger)

    async def _resolve(self, command: RecallCommand) -> tuple[RecallCommand, list[FieldError]]:
        """Turn messages given by client msgID into server keys, through the send records' index."""
        wanted = [t for t in command.messages if not t.resolved]
        if not wanted:
            return command, []
        keys = [msg_id_key(command.sdk_app_id, t.client_msg_id or "") for t in wanted]
        found = dict(zip(keys, await self.store.get(keys), strict=True))
        problems: list[FieldError] = []
        targets: list[Target] = []
        for index, target in enumerate(command.messages):
            if target.resolved:
                targets.append(target)
                continue
            path = f"messages[{index}].msgID"
            raw = found[msg_id_key(command.sdk_app_id, target.client_msg_id or "")]
            if raw is None:
                problems.append(FieldError(path, "not_found", "no send record for this msgID (expired or never seen)"))
                continue
            locator = orjson.loads(raw)
            if not command.conversation.matches(locator.get("conversation", {})):
                problems.append(FieldError(path, "mismatch", "this msgID belongs to another conversation"))
                continue
            message = locator.get("message", {})
            targets.append(replace(target, msg_key=message.get("msgKey"), msg_seq=message.get("msgSeq")))
        return replace(command, messages=tuple(targets)), problems

    async def _carry_out(self, command: RecallCommand, requested_by: str) -> Answer:
        now_ms = int(self.clock() * 1000)
        request = RecallRequest(command.request_id, requested_by, now_ms)
        c = command.conversation
        record = encode_request_record(request, command.reason, command.moderator)
        await self.store.put([(self._join_key(command, t), record) for t in command.messages], self.record_ttl)
        tencent_reason = None if c.type == "c2c" else cut_reason(command.reason)

        def audit(
            kind: AuditKind, target: Target, status: str | None = None, code: int | None = None, info: str | None = None
        ) -> Envelope:
            return audit_envelope(
                kind,
                command,
                target,
                requested_by=requested_by,
                requested_at_ms=now_ms,
                at_ms=int(self.clock() * 1000),
                tencent_reason=tencent_reason,
                status=status,
                tencent_code=code,
                tencent_info=info,
            )

        try:
            await self.dispatcher.dispatch([audit(REQUESTED, t) for t in command.messages])
        except SpoolError as exc:
            refusal = "spool_full" if isinstance(exc, SpoolFull) else "spool_unavailable"
            log.error("relay.recall_refused", request_id=command.request_id, code=refusal, error=str(exc)[:300])
            return error(503, refusal, "the audit event cannot be made safe (broker down and spool unusable)")

        results = await self._call_tencent(command, tencent_reason or "")
        failed: list[Envelope] = []
        for result in results:
            status, code, info = self._status(result)
            self.metrics.recall_messages.labels(status).inc()
            if status in _FAILED_STATUSES:
                failed.append(audit(FAILED, result.target, status, code, info))
        if failed:
            try:
                await self.dispatcher.dispatch(failed)
            except SpoolError as exc:
                log.error("relay.recall_failed_event_lost", request_id=command.request_id, error=str(exc)[:300])
        body: dict[str, object] = {
            "requestID": command.request_id,
            "results": [self._result(command, r) for r in results],
        }
        unreachable = [r.unreachable for r in results if r.unreachable is not None]
        if len(unreachable) == len(results):
            kinds = {u.kind for u in unreachable}
            log.warning("relay.tencent_unreachable", request_id=command.request_id, detail=str(unreachable[0])[:300])
            if kinds == {"busy"}:
                # Nothing was sent: the relay's own rate limit had more queued than it may wait for.
                return error(503, "tencent_busy", "too many recalls queued for Tencent's rate limit", extra=body)
            if kinds == {"timeout"}:
                return error(504, "tencent_timeout", "Tencent's REST API did not answer", extra=body)
            return error(502, "tencent_unreachable", "Tencent's REST API cannot be reached", extra=body)
        log.info(
            "relay.recall_requested",
            request_id=command.request_id,
            requested_by=requested_by,
            messages=len(results),
            failed=len(failed),
        )
        return Answer(200, body)

    @staticmethod
    def _join_key(command: RecallCommand, target: Target) -> str:
        c = command.conversation
        if c.type == "c2c":
            return recall_key(command.sdk_app_id, "c2c", (c.sender or "", c.receiver or "", target.msg_key or ""))
        if c.type == "group":
            return recall_key(command.sdk_app_id, "group", (c.group_id or "", c.topic_id or "", str(target.msg_seq)))
        return recall_key(command.sdk_app_id, "official_account", (c.official_account or "", target.msg_key or ""))

    async def _call_tencent(self, command: RecallCommand, reason: str) -> list[_Result]:
        """Every message's outcome, in request order."""
        c = command.conversation
        app = command.sdk_app_id
        targets = command.messages
        if c.type == "c2c":

            async def one(target: Target) -> _Result:
                try:
                    outcome = await self.recaller.recall_c2c(
                        app, c.sender or "", c.receiver or "", target.msg_key or ""
                    )
                except TencentUnreachable as exc:
                    return _Result(target, unreachable=exc)
                return _Result(target, outcome)

            return list(await asyncio.gather(*(one(t) for t in targets)))

        async def batch(chunk: Sequence[Target]) -> list[_Result]:
            try:
                if c.type == "group":
                    seqs = [t.msg_seq for t in chunk if t.msg_seq is not None]
                    outcomes = await self.recaller.recall_group(app, c.group_id or "", c.topic_id, seqs, reason)
                else:
                    keys = [t.msg_key for t in chunk if t.msg_key is not None]
                    outcomes = await self.recaller.recall_official_account(app, c.official_account or "", keys, reason)
            except TencentUnreachable as exc:
                return [_Result(t, unreachable=exc) for t in chunk]
            return [_Result(t, o) for t, o in zip(chunk, outcomes, strict=True)]

        chunks = [targets[i : i + BATCH] for i in range(0, len(targets), BATCH)]
        return [r for rs in await asyncio.gather(*(batch(chunk) for chunk in chunks)) for r in rs]

    @staticmethod
    def _status(result: _Result) -> tuple[str, int, str]:
        if result.outcome is not None:
            return result.outcome.status, result.outcome.tencent_code, result.outcome.info
        return "failed", NO_CODE, str(result.unreachable)[:300]

    def _result(self, command: RecallCommand, result: _Result) -> dict[str, object]:
        status, code, _ = self._status(result)
        name, value = result.target.given
        return {name: value, "status": status, "tencentCode": code, "eventID": revoked_event_id(command, result.target)}
