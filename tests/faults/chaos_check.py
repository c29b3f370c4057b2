"""The chaos run's checker (issue 22): pure, over what the run recorded and what the queues held.

Vocabulary from RabbitMQ's Jepsen checker (tests.faults.harness): a callback answered 200 whose event
is not in the consumer queue is *lost*; a second copy is a *duplicate* (allowed up to the publishes the
relays counted in doubt plus the events a restarted relay found in its spool); an event for a callback
never posted is *unexpected*. The rest are the deployment's promises: only documented non-200 answers,
a refused or cut connection only while that relay was down, one relay answering 200 in ≥ 90 % of
seconds, an audit trail for every recall the gateway answered 200, and empty spools at the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

# Documented answers other than 200 (docs/http.md, docs/recall-gateway.md).
CALLBACK_REFUSALS: Final = {503: {"spool_full", "spool_unavailable", "overloaded"}}
GATEWAY_REFUSALS: Final = {
    409: {"request_in_progress", "recall_pending"},
    429: {"rate_limited"},
    502: {"tencent_unreachable"},
    503: {"store_unavailable", "store_full", "spool_full", "spool_unavailable", "tencent_busy"},
    504: {"tencent_timeout"},
}
SECONDS_WITH_200: Final = 0.90


@dataclass(slots=True)
class Request:
    """One request the load sent (kind ``recall``, ``send`` or ``gateway``) or a callback the Tencent
    simulator sent for a gateway recall (``tencent``, relay -1), and its answer. Times are run-relative."""

    kind: str
    relay: int
    start: float
    end: float = 0.0
    status: int | None = None
    code: str | None = None
    error: str | None = None
    event_ids: list[str] = field(default_factory=list)
    request_id: str | None = None
    results: list[dict[str, Any]] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


@dataclass
class Verdict:
    counts: dict[str, Any]
    violations: list[str]

    @property
    def passed(self) -> bool:
        return not self.violations


def _documented(request: Request) -> bool:
    table = GATEWAY_REFUSALS if request.kind == "gateway" else CALLBACK_REFUSALS
    return request.code in table.get(request.status or 0, set())


def _during(start: float, end: float, windows: Iterable[tuple[float, float]]) -> bool:
    return any(start <= w_end and w_start <= end for w_start, w_end in windows)


def check(
    requests: list[Request],
    delivered: Mapping[str, int],
    audit: list[dict[str, Any]],
    *,
    relay_down: Mapping[int, list[tuple[float, float]]],
    in_doubt: int,
    spool_found: int,
    spool_left: Mapping[str, int],
    duration: float,
) -> Verdict:
    """Every check of issue 22 over one run; a violation is one line naming what broke and an example."""
    violations: list[str] = []
    posted = [r for r in requests if r.kind in ("recall", "tencent")]
    acked_ids = {e for r in posted if r.status == 200 for e in r.event_ids}
    sent_ids = {e for r in posted for e in r.event_ids}
    lost = sorted(acked_ids - delivered.keys())
    dup = sum(n - 1 for n in delivered.values() if n > 1)
    unexpected = sorted(delivered.keys() - sent_ids)
    if lost:
        violations.append(f"lost {len(lost)} events answered 200, e.g. {lost[:3]}")
    if dup > in_doubt + spool_found:
        violations.append(f"{dup} duplicates > {in_doubt} in doubt + {spool_found} found in spools")
    if unexpected:
        violations.append(f"{len(unexpected)} unexpected events, e.g. {unexpected[:3]}")

    undocumented = [r for r in requests if r.status not in (None, 200) and not _documented(r)]
    for (kind, status, code), n in sorted(Counter((r.kind, r.status, r.code) for r in undocumented).items()):
        violations.append(f"{n} undocumented {status} {code!r} answers to {kind} requests")
    unanswered = [r for r in requests if r.status is None and r.relay >= 0]
    outside = [r for r in unanswered if not _during(r.start, r.end, relay_down.get(r.relay, []))]
    if outside:
        first = outside[0]
        violations.append(
            f"{len(outside)} requests unanswered while their relay was up, e.g. {first.kind} to r{first.relay} "
            f"at {first.start:.1f}-{first.end:.1f} s: {first.error}"
        )

    seconds = max(1, int(duration))
    with_200 = {int(r.start) for r in requests if r.kind == "recall" and r.status == 200}
    share = len(with_200 & set(range(seconds))) / seconds
    if share < SECONDS_WITH_200:
        violations.append(f"a relay answered 200 in {share:.1%} of seconds (< {SECONDS_WITH_200:.0%})")

    requested = {
        (e.get("requestID"), e.get("revokedEventID")) for e in audit if e.get("type") == "message.recall_requested"
    }
    gateway_ok = [r for r in requests if r.kind == "gateway" and r.status == 200]
    missing = [
        (r.request_id, res.get("eventID"))
        for r in gateway_ok
        for res in r.results
        if (r.request_id, res.get("eventID")) not in requested
    ]
    if missing:
        violations.append(
            f"{len(missing)} messages of gateway requests answered 200 without recall_requested, e.g. {missing[:2]}"
        )
    for name, events in sorted(spool_left.items()):
        if events:
            violations.append(f"spool of {name} holds {events} events at the end")

    by_kind = Counter(r.kind for r in requests)
    counts: dict[str, Any] = {
        "recall callbacks": by_kind["recall"],
        "after-send callbacks": by_kind["send"],
        "gateway requests": by_kind["gateway"],
        "Tencent callbacks (gateway recalls)": by_kind["tencent"],
        "answered 200": sum(1 for r in requests if r.status == 200),
        "documented refusals": sum(1 for r in requests if r.status not in (None, 200) and _documented(r)),
        "undocumented answers": len(undocumented),
        "unanswered (refused, cut)": len(unanswered),
        "unanswered while the relay was up": len(outside),
        "events acked": len(acked_ids),
        "events delivered": len(delivered),
        "lost": len(lost),
        "duplicates": dup,
        "in doubt (relay metrics)": in_doubt,
        "found in spools at restart": spool_found,
        "unexpected": len(unexpected),
        "seconds with a 200": f"{share:.1%}",
        "gateway 200 / recall_requested found": f"{len(gateway_ok)} / {len(gateway_ok) - len({m[0] for m in missing})}",
        "refusal codes": dict(Counter(f"{r.status} {r.code}" for r in requests if r.status not in (None, 200))),
        "unanswered errors": dict(Counter(str(r.error) for r in unanswered)),
    }
    return Verdict(counts, violations)
