"""One recall call's progress through its attempts: which messages are settled, which to ask again,
and why. Pure: the client feeds it each attempt's answer (or the lack of one) and retries what it says.

The rules (tencent-im-rest-recall.md §1-2, §5): a top-level FAIL settles every message the request
carried; a top-level OK settles each message by its own RetCode; transient codes (internal errors,
Tencent timeouts, rate limits) are asked again; a 7000x answer is worth one retry with a new UserSig;
anything else is final. A call Tencent never answered has no outcomes: the client raises instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from relay.gateway.outcomes import NO_CODE, Answer, Outcome, action, describe, retry_reason, status_of

Key = int | str  # a group MsgSeq, or a C2C / official-account MsgKey
USERSIG = "usersig"  # the retry reason that asks the client for a new UserSig


@dataclass(frozen=True, slots=True)
class NoAnswer:
    """A request that got no Tencent answer: why (``kind``, ``detail``), the retry reason label, and
    whether another try may help."""

    kind: Literal["unreachable", "timeout"]
    detail: str
    reason: str
    retryable: bool


class Progress:
    """The state of one call over *keys* (in the order asked); *item_field* names the RecallRetList
    key (``None`` for C2C, whose top-level answer is the message's)."""

    def __init__(self, keys: Sequence[Key], item_field: Literal["MsgSeq", "MsgKey"] | None) -> None:
        self.keys = list(keys)
        self.item_field = item_field
        self.pending = list(keys)  # what the next request carries
        self.final: dict[Key, Outcome] = {}
        self.last: dict[Key, tuple[int, str]] = {}  # the last transient answer of a pending message
        self.answered = False  # Tencent answered at least one request
        self.unanswered = False  # some request went unanswered: it may have recalled what it carried
        self.no_answer: NoAnswer | None = None  # the last request's, if it went unanswered
        self.regenerated = False

    def lost(self, failure: NoAnswer) -> str | None:
        """Record a request without an answer; return the retry reason, or ``None`` to stop."""
        self.no_answer, self.unanswered = failure, True
        return failure.reason if failure.retryable else None

    def read(self, answer: Answer) -> str | None:
        """Record Tencent's answer; return the retry reason for what is still pending, or ``None``."""
        self.answered, self.no_answer = True, None
        code = answer.code
        if code != 0:
            kind = action(code)
            if kind == "regenerate" and not self.regenerated:
                self.regenerated = True
                self._remember(code, answer.info)
                return USERSIG
            if kind == "retry":
                self._remember(code, answer.info)
                return retry_reason(code)
            # Final (a 7000x after the new UserSig included): a top-level FAIL applies to every message.
            self._settle_all(Outcome(status_of(code), code, describe(code, answer.info)))
            return None
        if self.item_field is None:
            self._settle_all(Outcome("recalled", 0, describe(0, answer.info)))
            return None
        items = answer.items or {}
        still: list[Key] = []
        for key in self.pending:  # an OK at the top hides per-message failures: read each RetCode
            ret = items.get(key)
            if ret is None:
                self.final[key] = Outcome("failed", NO_CODE, "Tencent's answer has no RetCode for this message")
            elif action(ret) == "retry":
                self.last[key] = (ret, describe(ret))
                still.append(key)
            else:
                self.final[key] = Outcome(status_of(ret), ret, describe(ret))
        self.pending = still
        return retry_reason(self.last[still[0]][0]) if still else None

    def outcomes(self, sent: int) -> list[Outcome]:
        """Every message's outcome in the order asked; still pending after *sent* requests is failed
        with its last transient code. Only for a call Tencent answered at least once."""
        if not self.answered:
            raise RuntimeError("Tencent never answered this call: there are no outcomes")
        then = f"; then {self.no_answer.detail}" if self.no_answer is not None else ""
        for key in self.pending:
            code, info = self.last.get(key, (NO_CODE, ""))
            self.final[key] = Outcome("failed", code, f"{describe(code, info)} (after {sent} requests){then}")
        self.pending = []
        return [self._note(self.final[key]) for key in self.keys]

    def _remember(self, code: int, info: str) -> None:
        self.last.update((key, (code, info)) for key in self.pending)

    def _settle_all(self, outcome: Outcome) -> None:
        self.final.update((key, outcome) for key in self.pending)
        self.pending = []

    def _note(self, outcome: Outcome) -> Outcome:
        # A group seq recalled by a request whose answer was lost is "not found" on the retry
        # (Tencent probably answers 10030 for an already recalled seq): say so; the callback will tell.
        if self.unanswered and outcome.status == "not_found":
            note = f"{outcome.info}; an unanswered earlier request may have recalled it"
            return Outcome(outcome.status, outcome.tencent_code, note)
        return outcome
