"""Carrying out a recall request: scope, the moderator, idempotency, join records, audit events, Tencent.

The order matters (docs/recall-gateway.md):
1. the caller's key must cover the app and the conversation type, and the moderator must be one
   the key may name: asserted by the key, or verified from an ID token;
2. claim the requestID (a lease in the correlation store that outlives the longest call to
   Tencent), so a retry or a concurrent duplicate never calls Tencent twice;
3. write the request's attribution once and one join record per message pointing to it,
   **before** calling Tencent (its callback can arrive before its HTTP answer); a message another
   request is carrying out is refused, so no request can take over another's attribution;
4. make ``message.recall_requested`` safe (confirmed or spooled, within the gateway's share of the
   spool) — no audit trail, no recall;
5. call Tencent (C2C one message per call, concurrently; group and official account in batches
   of 10), publish ``message.recall_failed`` for what it refused or could not be reached for, and
   delete the join record of every message Tencent did not recall now, so no later recall by
   someone else can be attributed to this request;
6. keep the answer under the requestID, so the same request again gets it without a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol
from urllib.parse import quote

import orjson
import structlog

from relay.dispatch import Dispatcher
from relay.errors import SpoolError, SpoolFull
from relay.events import Envelope, RecallRequest
from relay.gateway.audit import FAILED, REQUESTED, AuditKind, audit_envelope, revoked_event_id
from relay.gateway.keys import ApiKey
from relay.gateway.moderators import KeysUnavailable, TokenRefused, Verifier
from relay.gateway.outcomes import NO_CODE, Outcome, cut_reason
from relay.gateway.request import FieldError, Moderator, RecallCommand, Target
from relay.gateway.tencent_api import TencentUnreachable
from relay.joins import Attribution, recall_key
from relay.metrics import Metrics
from relay.store import CorrelationStore, StoreError, StoreFull, msg_id_key

log = structlog.get_logger()

BATCH = 10  # Tencent's limit per group / official-account recall call
# The lease on a requestID outlives the longest call to Tencent by this much: the store writes, the
# audit events (a publish timeout, then the spool) before the call, the failure events after it.
LEASE_MARGIN = 30.0
_FAILED_STATUSES = frozenset({"not_found", "rejected", "failed"})


class Recaller(Protocol):
    """Tencent's three recall APIs (relay.gateway.tencent_api.TencentApi, or a test double)."""

    def has_key(self, app: str) -> bool: ...

    @property
    def longest_call(self) -> float:
        """Seconds one recall call may take at most, its retries and rate-limit waits included."""
        ...

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
    retry_after: float | None = None  # seconds, when trying again later can succeed

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
    retry_after: float | None = None,
) -> Answer:
    """An error answer: ``{"error": {"code", "message", "fields"?}, …extra}``. A 503 may be retried
    after a second unless *retry_after* says otherwise; other codes only with *retry_after*."""
    detail: dict[str, object] = {"code": code, "message": message}
    if fields:
        detail["fields"] = [f.to_dict() for f in fields]
    if retry_after is None and status == 503:
        retry_after = 1.0
    return Answer(status, {"error": detail, **(extra or {})}, retry_after=retry_after)


def in_progress() -> Answer:
    return error(409, "request_in_progress", "this requestID is being carried out; retry shortly", retry_after=1.0)


@dataclass(slots=True)
class _Result:
    target: Target
    outcome: Outcome | None = None
    unreachable: TencentUnreachable | None = field(default=None)


def _pending(raw: bytes | None) -> bool:
    if raw is None:
        return False
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(state, dict) and state.get("state") == "pending"


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
        join_ttl: float = 600.0,
        spool_share: float | None = None,
        verifier: Verifier | None = None,
        clock: Callable[[], float] = time.time,
        lease: float | None = None,
    ) -> None:
        self.recaller = recaller
        self.store = store
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.record_ttl = record_ttl
        self.join_ttl = join_ttl
        self.spool_share = spool_share
        self.verifier = verifier
        self.clock = clock
        self._lease = lease

    @property
    def lease(self) -> float:
        """Seconds a claimed requestID stays claimed: longer than the whole request can take, so it
        never expires under a request still being carried out (a retry would then call Tencent again)."""
        return self._lease if self._lease is not None else self.recaller.longest_call + LEASE_MARGIN

    async def submit(self, command: RecallCommand, caller: ApiKey, via: str) -> Answer:
        """Carry out *command* for *caller* (who came in *via* ``api`` or ``amqp``); never raises
        for a bad request. A redelivered command waits for the lease like any duplicate."""
        started = time.perf_counter()
        try:
            answer = await self._submit(command, caller)
        except StoreFull as exc:
            log.error("relay.recall_store_full", request_id=command.request_id, error=str(exc)[:300])
            answer = error(503, "store_full", "the embedded correlation store is full of unexpired records")
        except StoreError as exc:
            log.error("relay.recall_store_unavailable", request_id=command.request_id, error=str(exc)[:300])
            answer = error(503, "store_unavailable", "the correlation store cannot be reached; retry later")
        self.metrics.recall_requests.labels(via, "replayed" if answer.replayed else answer.code).inc()
        self.metrics.recall_request_seconds.observe(time.perf_counter() - started)
        return answer

    async def _submit(self, command: RecallCommand, caller: ApiKey) -> Answer:
        refusal = self._scope(command, caller)
        if refusal is not None:
            return refusal
        moderator = await self._moderator(command, caller)
        if isinstance(moderator, Answer):
            return moderator
        command, problems = await self._resolve(command)
        if problems:
            return error(400, "invalid_request", "some messages cannot be recalled", fields=problems)
        # A hash tag: the request's lease, answer and attribution share one slot in a Redis Cluster
        # (quote() encodes any brace in the names, so the tag is exactly this).
        name = "{" + quote(caller.name, safe="") + "/" + quote(command.request_id, safe="") + "}"
        fingerprint = hashlib.sha256(orjson.dumps([command.fingerprint, moderator.to_dict()])).hexdigest()
        ledger = "request:" + name
        earlier = await self._claim(ledger, command.request_id, fingerprint)
        if earlier is not None:
            return earlier
        try:
            answer = await self._carry_out(command, caller, moderator, "attribution:" + name)
        except BaseException:
            await self._release(ledger)
            raise
        if answer.status == 200:
            record = orjson.dumps({"state": "done", "fp": fingerprint, "body": answer.body})
            try:
                await self.store.put([(ledger, record)], self.record_ttl)
            except StoreError as exc:
                # Tencent has done the work; a retry would call it again, which it answers
                # idempotently (already recalled / not found). Worth a log line, not a failure.
                log.error("relay.recall_answer_not_kept", request_id=command.request_id, error=str(exc)[:300])
        else:
            await self._release(ledger)
        return answer

    def _scope(self, command: RecallCommand, caller: ApiKey) -> Answer | None:
        """403 for an app or conversation type outside the key. An app the relay has no secret key
        for gets the same answer as one the key does not cover: the answer lists no apps."""
        if not caller.allows_app(command.sdk_app_id) or not self.recaller.has_key(command.sdk_app_id):
            return error(403, "app_not_allowed", "this key may not recall messages of this sdkAppID")
        if command.conversation.type not in caller.conversations:
            return error(
                403, "conversation_not_allowed", f"this key may not recall in {command.conversation.type} conversations"
            )
        return None

    async def _moderator(self, command: RecallCommand, caller: ApiKey) -> Moderator | Answer:
        """Who the moderator is, and who vouches for it: the ID token's issuer, or the caller's key."""
        if command.moderator_token is not None:
            if self.verifier is None:
                return error(
                    400,
                    "invalid_request",
                    "moderator tokens are not verified here",
                    fields=[FieldError("moderator.token", "unsupported", "RELAY_API_JWKS_FILE or _URL is unset")],
                )
            try:
                claimed = await self.verifier.verify(command.moderator_token)
            except TokenRefused as exc:
                log.warning("relay.moderator_token_refused", requested_by=caller.name, detail=str(exc)[:200])
                return error(401, "moderator_token_invalid", "the moderator token is invalid or expired")
            except KeysUnavailable:
                return error(503, "moderator_keys_unavailable", "the token issuer's keys are not available yet")
            if command.moderator is not None and command.moderator != claimed:
                mismatch = FieldError("moderator.userID", "mismatch", "userID differs from the token's moderator")
                return error(400, "invalid_request", "the moderator is named twice, differently", fields=[mismatch])
            moderator = Moderator(claimed, verified_by=self.verifier.issuer)
        elif caller.require_verified_moderator:
            return error(401, "moderator_token_required", "this key's requests must carry moderator.token")
        else:
            assert command.moderator is not None  # the parser requires a userID or a token
            moderator = Moderator(command.moderator, asserted_by=caller.name)
        if not caller.allows_moderator(moderator.user_id):
            return error(403, "moderator_not_allowed", "this key may not name this moderator")
        return moderator

    async def _claim(self, ledger: str, request_id: str, fingerprint: str) -> Answer | None:
        """Take the lease on the requestID; or the answer a retry of it gets."""
        pending = orjson.dumps({"state": "pending", "fp": fingerprint})
        for _ in range(3):  # the lease may expire between the claim and the read: claim again
            if await self.store.claim(ledger, pending, self.lease):
                return None
            raw = (await self.store.get([ledger]))[0]
            if raw is None:
                continue
            earlier = orjson.loads(raw)
            if earlier.get("fp") != fingerprint:
                return error(409, "request_id_conflict", "this requestID was used for a different request")
            if earlier.get("state") == "done":
                log.info("relay.recall_replayed", request_id=request_id)
                return Answer(200, earlier["body"], replayed=True)
            return in_progress()
        return in_progress()

    async def _release(self, ledger: str) -> None:
        with contextlib.suppress(StoreError):  # the lease expires by itself
            await self.store.delete(ledger)

    async def _resolve(self, command: RecallCommand) -> tuple[RecallCommand, list[FieldError]]:
        """Turn messages given by client msgID into server keys, through the send records' index."""
        wanted = [t for t in command.messages if not t.resolved]
        if not wanted:
            return command, []
        keys = [msg_id_key(command.sdk_app_id, t.client_msg_id or "") for t in wanted]
        found = dict(zip(keys, await self.store.locate(keys), strict=True))
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

    async def _carry_out(
        self, command: RecallCommand, caller: ApiKey, moderator: Moderator, attribution: str
    ) -> Answer:
        now_ms = int(self.clock() * 1000)
        request = RecallRequest(command.request_id, caller.name, now_ms)
        pointer = attribution.encode()
        joins = [(self._join_key(command, t), pointer) for t in command.messages]
        record = Attribution(request, command.reason, moderator.user_id, moderator.asserted_by, moderator.verified_by)
        await self.store.put([(attribution, record.encode())], self.join_ttl)
        held = await self.store.reserve(joins, self.join_ttl)
        busy = await self._busy([j for j, h in zip(joins, held, strict=True) if not h])
        if busy:
            await self._unjoin([j for j, h in zip(joins, held, strict=True) if h], command)
            fields = [
                FieldError(f"messages[{i}]", "pending", "another request to recall this message is being carried out")
                for i, (key, _) in enumerate(joins)
                if key in busy
            ]
            message = "a message is being recalled by another request"
            return error(409, "recall_pending", message, fields=fields, retry_after=1.0)
        # A message whose record another, finished, request holds was recalled by it (its callback
        # is still awaited): it is asked for again (Tencent answers "already recalled" or "not
        # found"), but never joined to this request.
        mine = [j if h else None for j, h in zip(joins, held, strict=True)]
        try:
            return await self._call_and_report(command, caller, moderator, mine, now_ms)
        except BaseException:
            await self._unjoin([j for j in mine if j is not None], command)
            raise

    async def _busy(self, taken: Sequence[tuple[str, bytes]]) -> set[str]:
        """The join keys among *taken* whose holding request is still being carried out."""
        if not taken:
            return set()
        pointers = await self.store.get([key for key, _ in taken])
        holders = {
            key: "request:" + p.decode().removeprefix("attribution:")
            for (key, _), p in zip(taken, pointers, strict=True)
            if p is not None
        }
        states = dict(zip(holders.values(), await self.store.get(list(set(holders.values()))), strict=False))
        return {key for key, ledger in holders.items() if _pending(states.get(ledger))}

    async def _unjoin(self, joins: Sequence[tuple[str, bytes]], command: RecallCommand) -> None:
        """Delete this request's join records (never another's): no later recall of these messages
        may be attributed to it. If the store cannot be reached they expire after the join TTL."""
        if not joins:
            return
        try:
            await self.store.delete_if(joins)
        except StoreError as exc:
            log.error("relay.recall_join_not_deleted", request_id=command.request_id, error=str(exc)[:300])

    async def _call_and_report(
        self,
        command: RecallCommand,
        caller: ApiKey,
        moderator: Moderator,
        joins: Sequence[tuple[str, bytes] | None],
        now_ms: int,
    ) -> Answer:
        c = command.conversation
        tencent_reason = None if c.type == "c2c" else cut_reason(command.reason)

        def audit(
            kind: AuditKind, target: Target, status: str | None = None, code: int | None = None, info: str | None = None
        ) -> Envelope:
            return audit_envelope(
                kind,
                command,
                target,
                requested_by=caller.name,
                moderator=moderator,
                requested_at_ms=now_ms,
                at_ms=int(self.clock() * 1000),
                tencent_reason=tencent_reason,
                status=status,
                tencent_code=code,
                tencent_info=info,
            )

        try:
            await self.dispatcher.dispatch([audit(REQUESTED, t) for t in command.messages], share=self.spool_share)
        except SpoolError as exc:
            await self._unjoin([j for j in joins if j is not None], command)
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
        # Only a message Tencent recalled now has a callback coming; any other join record could
        # only ever attribute a later recall made by someone else.
        recalled = {id(r.target) for r in results if self._status(r)[0] == "recalled"}
        stale = [j for t, j in zip(command.messages, joins, strict=True) if j is not None and id(t) not in recalled]
        await self._unjoin(stale, command)
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
            requested_by=caller.name,
            moderator=moderator.user_id,
            verified=moderator.verified_by is not None,
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
