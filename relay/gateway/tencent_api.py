"""The REST client for Tencent's three recall APIs: one UserSig per app, a token bucket per
(app, API), retries with backoff for what is transient, and each message's answer read on its own.

Every call is ``POST {base}/v4/{service}/{command}?sdkappid=&identifier=&usersig=&random=&contenttype=json``
with a JSON body. Tencent answers HTTP 200 unless the network failed; the truth is in
``ActionStatus`` / ``ErrorCode`` and, per message, in ``RecallRetList[].RetCode``.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import aiohttp
import orjson

from relay.errors import RelayError
from relay.gateway.outcomes import Answer, Outcome, check_batch, cut_reason, read_answer
from relay.gateway.progress import USERSIG, Key, NoAnswer, Progress
from relay.gateway.ratelimit import Busy, TokenBucket
from relay.gateway.usersig import UserSigs
from relay.log import get_logger
from relay.metrics import Metrics

UnreachableKind = Literal["unreachable", "timeout", "busy"]

# Tencent allows 200 calls/s per API per app; staying at 150 leaves room for clock and network jitter.
DEFAULT_RATE = 150.0
MAX_PER_CALL = 10  # MsgSeqList / MsgKeyList hold at most 10 entries
REASON_BYTES = 100  # Reason holds at most 100 bytes of UTF-8


@dataclass(frozen=True, slots=True)
class Api:
    """One recall API: its command name (the metric label), its path, and how its items are keyed."""

    name: str
    path: str
    item_field: Literal["MsgSeq", "MsgKey"] | None


C2C = Api("admin_msgwithdraw", "openim/admin_msgwithdraw", None)
GROUP = Api("group_msg_recall", "group_open_http_svc/group_msg_recall", "MsgSeq")
OFFICIAL_ACCOUNT = Api(
    "official_account_msg_recall", "official_account_open_http_svc/official_account_msg_recall", "MsgKey"
)


class TencentUnreachable(RelayError):
    """No answer from Tencent for a whole call: ``unreachable`` (network, HTTP error, not an answer),
    ``timeout`` (the last request timed out), or ``busy`` (nothing sent: the rate-limit queue was
    longer than ``max_wait``). Suggested HTTP mapping: 502, 504, 503."""

    def __init__(self, kind: UnreachableKind, detail: str, *, attempts: int) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind: UnreachableKind = kind
        self.detail = detail
        self.attempts = attempts


def backoff_delay(retry: int, base: float, cap: float, floor: float = 0.0) -> float:
    """Exponential backoff with equal jitter: ``d = clamp(base·2^(retry-1))``, then uniform in [d/2, d]."""
    d = max(floor, min(cap, base * 2 ** (retry - 1)))
    return random.uniform(d / 2, d)  # noqa: S311 - jitter, not a secret


def _describe(exc: BaseException) -> str:
    # Only the connector error's text (host, port, OS error) is useful and free of the URL: other
    # aiohttp errors may quote the request URL, which carries the UserSig.
    if isinstance(exc, aiohttp.ClientConnectorError):
        return str(exc)
    return type(exc).__name__


class TencentApi:
    """Calls the recall APIs for every app with a secret key, as the App admin *admin*.

    A call makes up to *attempts* requests (plus one after a fresh UserSig on a 7000x answer), each
    within *timeout* seconds, waiting ``backoff_delay`` between them (at least *rate_limit_backoff*
    after a rate-limit code). Each request first takes a token from its (app, API) bucket: *rate*
    per second, *burst* at once (default rate/10, so no second sees more than 1.1 × rate); the first
    request of a call gives up with ``busy`` if that wait would exceed *max_wait*.
    """

    def __init__(
        self,
        base_url: str,
        admin: str,
        secret_keys: Mapping[str, str],
        metrics: Metrics,
        *,
        rate: float = DEFAULT_RATE,
        burst: float | None = None,
        timeout: float = 5.0,
        attempts: int = 4,
        backoff: float = 0.25,
        backoff_max: float = 4.0,
        rate_limit_backoff: float = 1.0,
        max_wait: float = 10.0,
        clock: Callable[[], float] = time.time,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if attempts < 1 or timeout <= 0:
            raise ValueError("attempts must be at least 1 and timeout positive")
        self._base = base_url.rstrip("/")
        self._metrics = metrics.tencent
        self._sigs = UserSigs(admin, secret_keys, clock=clock, on_made=lambda r: self._metrics.usersigs.labels(r).inc())
        self._rate = rate
        self._burst = burst if burst is not None else max(1.0, rate / 10)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._timeout_s = timeout
        self._attempts = attempts
        self._backoff = (backoff, backoff_max, rate_limit_backoff)
        self._max_wait = max_wait
        self._session = session
        self._owns_session = session is None
        self._buckets: dict[tuple[str, str], TokenBucket] = {}
        self._log = get_logger()

    def __repr__(self) -> str:
        return f"TencentApi(base_url={self._base!r}, sigs={self._sigs!r}, rate={self._rate})"

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession()

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def has_key(self, app: str) -> bool:
        """Whether *app* has a secret key (without one no UserSig can be made: answer 403)."""
        return self._sigs.has_key(app)

    @property
    def longest_call(self) -> float:
        """Seconds a call may take at most: the first wait for a token, then every request (the
        fresh-UserSig one included) with the longest backoff before it. A retry that would end past
        this is not made, so a caller's lease that outlives it never expires under a call."""
        _, cap, floor = self._backoff
        return self._max_wait + (self._attempts + 1) * (self._timeout_s + max(cap, floor))

    async def recall_c2c(self, app: str, sender: str, receiver: str, msg_key: str) -> Outcome:
        """Recall one C2C message (``admin_msgwithdraw`` takes one per call and no Reason)."""
        self._require(app, sender=sender, receiver=receiver, msg_key=msg_key)
        body: dict[str, object] = {"From_Account": sender, "To_Account": receiver, "MsgKey": msg_key}
        (outcome,) = await self._call(app, C2C, [msg_key], lambda _: body)
        return outcome

    async def recall_group(
        self, app: str, group_id: str, topic_id: str | None, seqs: Sequence[int], reason: str | None
    ) -> list[Outcome]:
        """Recall up to 10 messages of a group (or a community topic); outcomes in the order of *seqs*."""
        self._require(app, group_id=group_id)
        if topic_id is not None:
            self._require(app, topic_id=topic_id)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seqs):
            raise ValueError("every MsgSeq must be a non-negative integer")
        check_batch(seqs, MAX_PER_CALL)
        fixed: dict[str, object] = {"GroupId": group_id}
        if topic_id is not None:
            fixed["TopicId"] = topic_id
        if reason:
            fixed["Reason"] = cut_reason(reason, REASON_BYTES)

        def body(pending: Sequence[Key]) -> dict[str, object]:
            return {**fixed, "MsgSeqList": [{"MsgSeq": s} for s in pending]}

        return await self._call(app, GROUP, list(seqs), body)

    async def recall_official_account(
        self, app: str, account: str, msg_keys: Sequence[str], reason: str | None
    ) -> list[Outcome]:
        """Recall up to 10 messages of an official account; outcomes in the order of *msg_keys*."""
        self._require(app, account=account)
        if not all(isinstance(k, str) and k for k in msg_keys):
            raise ValueError("every MsgKey must be a non-empty string")
        check_batch(msg_keys, MAX_PER_CALL)
        fixed: dict[str, object] = {"Official_Account": account}
        if reason:
            fixed["Reason"] = cut_reason(reason, REASON_BYTES)

        def body(pending: Sequence[Key]) -> dict[str, object]:
            return {**fixed, "MsgKeyList": list(pending)}

        return await self._call(app, OFFICIAL_ACCOUNT, list(msg_keys), body)

    def _require(self, app: str, **fields: str) -> None:
        if not self.has_key(app):
            raise ValueError(f"no secret key for SdkAppID {app!r}")
        for name, value in fields.items():
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string")

    def _bucket(self, app: str, api: Api) -> TokenBucket:
        key = (app, api.name)
        bucket = self._buckets.get(key)
        if bucket is None:  # bounded: apps come from the secret keys, APIs are three
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst)
        return bucket

    async def _request(self, app: str, api: Api, body: Mapping[str, object]) -> Answer | NoAnswer:
        """One POST; a decoded answer, or why there is none (and whether another try may help)."""
        if self._session is None:
            raise RuntimeError("TencentApi.start() was not called")
        params = {
            "sdkappid": app,
            "identifier": self._sigs.admin,
            "usersig": self._sigs.get(app),
            "random": str(secrets.randbelow(2**32)),  # a random uint32; not an idempotency key
            "contenttype": "json",
        }
        started = time.monotonic()
        try:
            async with self._session.post(
                f"{self._base}/v4/{api.path}",
                params=params,
                data=orjson.dumps(body),
                headers={"Content-Type": "application/json"},
                timeout=self._timeout,
                allow_redirects=False,  # a redirect would carry the UserSig elsewhere
            ) as resp:
                status, raw = resp.status, await resp.read()
        except TimeoutError:
            return NoAnswer("timeout", f"no answer within {self._timeout_s:g} s", "timeout", True)
        except (aiohttp.ClientError, OSError) as exc:
            return NoAnswer("unreachable", _describe(exc), "network", True)
        finally:
            self._metrics.request_seconds.labels(api.name).observe(time.monotonic() - started)
        if status != 200:
            # 5xx, 408 and 429 are a busy or broken front end: try again. Any other status is a
            # wrong URL or a proxy refusing us, which another try will not change.
            retryable = status >= 500 or status in (408, 429)
            return NoAnswer("unreachable", f"HTTP {status}", "http_status", retryable)
        try:
            answer = read_answer(orjson.loads(raw), api.item_field)
        except orjson.JSONDecodeError:
            answer = None
        if answer is None:
            return NoAnswer("unreachable", "HTTP 200 without a Tencent answer", "invalid_answer", True)
        return answer

    async def _call(
        self, app: str, api: Api, keys: list[Key], body_for: Callable[[Sequence[Key]], Mapping[str, object]]
    ) -> list[Outcome]:
        m = self._metrics
        progress = Progress(keys, api.item_field)
        tries, sent = self._attempts, 0
        reason: str | None = None
        deadline = time.monotonic() + self.longest_call
        while progress.pending and tries > 0:
            if reason is not None:
                m.retries.labels(api.name, reason).inc()
                if reason != USERSIG:  # a fresh UserSig needs no wait
                    base, cap, floor = self._backoff
                    await asyncio.sleep(backoff_delay(sent, base, cap, floor if reason == "rate_limited" else 0.0))
            # A retry waits for a token only as long as it can still end before the deadline.
            budget = self._max_wait if sent == 0 else deadline - time.monotonic() - self._timeout_s
            try:
                if budget < 0:
                    raise Busy(-budget)
                waited = await self._bucket(app, api).acquire(budget)
            except Busy as exc:
                if sent > 0:
                    self._log.warning("relay.tencent_retry_skipped", api=api.name, sdk_app_id=app, attempts=sent)
                    break  # no room left before the deadline: what is pending is failed, with its last answer
                m.calls.labels(api.name, "busy").inc()
                self._log.warning(
                    "relay.tencent_call_failed", api=api.name, sdk_app_id=app, outcome="busy", wait=round(exc.wait, 3)
                )
                raise TencentUnreachable("busy", f"rate-limit queue: {exc.wait:.1f} s", attempts=0) from None
            m.rate_wait_seconds.labels(api.name).observe(waited)
            tries -= 1
            sent += 1
            result = await self._request(app, api, body_for(progress.pending))
            if isinstance(result, NoAnswer):
                reason = progress.lost(result)
            else:
                reason = progress.read(result)
                if reason == USERSIG:  # 7000x: expired, truncated or mismatched UserSig; one more try
                    self._sigs.invalidate(app)
                    tries += 1
            if reason is None:
                break
        if not progress.answered:  # every request failed on the network, with an HTTP error, or timed out
            failure = progress.no_answer
            assert failure is not None
            m.calls.labels(api.name, failure.kind).inc()
            self._log.warning(
                "relay.tencent_call_failed",
                api=api.name,
                sdk_app_id=app,
                outcome=failure.kind,
                attempts=sent,
                detail=failure.detail,
            )
            raise TencentUnreachable(failure.kind, failure.detail, attempts=sent)
        outcomes = progress.outcomes(sent)
        m.calls.labels(api.name, "answered").inc()
        for outcome in outcomes:
            m.recalls.labels(api.name, outcome.status).inc()
        refused = [o for o in outcomes if o.status in ("rejected", "failed")]
        if refused:
            self._log.warning(
                "relay.tencent_call_failed",
                api=api.name,
                sdk_app_id=app,
                outcome="answered",
                attempts=sent,
                items=len(outcomes),
                refused=len(refused),
                codes=sorted({o.tencent_code for o in refused}),
                info=refused[0].info,
            )
        return outcomes
