"""Reading Tencent's REST answers: what each error code means, and the Reason cut to 100 bytes.

Pure code. The HTTP status says little (200 unless the network failed): the truth is in the
body's ``ActionStatus`` / ``ErrorCode`` and, for group and official-account recalls, in each
``RecallRetList[].RetCode`` — a top-level OK does not mean every item was recalled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from relay.gateway.text import cut_graphemes

Status = Literal["recalled", "already_recalled", "not_found", "rejected", "failed"]
STATUSES: tuple[Status, ...] = ("recalled", "already_recalled", "not_found", "rejected", "failed")

# What a code tells the caller to do next. "regenerate": a UserSig problem (7000x), worth exactly
# one retry with a fresh UserSig. "retry": transient on Tencent's side, worth a retry with backoff.
Action = Literal["final", "retry", "regenerate"]

ALREADY_RECALLED = frozenset({20023})  # C2C: already recalled, a success (the recall holds)
NOT_FOUND = frozenset({20022, 10030})  # C2C / group (a recalled group seq probably also gives 10030)
RATE_LIMITED = frozenset({60007, 60011, 60018, 60019})
INTERNAL = frozenset({91000, 10002})  # "internal error, retry"
TENCENT_TIMEOUT = frozenset({60008})  # Tencent's own backend timed out: retry

# The codes Tencent documents for the recall APIs and for REST in general (error-code page
# cloud.tencent.com/document/product/269/1671), for the ``info`` of an answer without ErrorInfo
# (a RetCode inside RecallRetList).
DESCRIPTIONS: Mapping[int, str] = {
    0: "recalled",
    10002: "internal error",
    10004: "invalid parameter",
    10007: "no permission",
    10010: "group or account does not exist",
    10015: "invalid GroupId",
    10030: "message not found",
    10031: "past the recall time limit",
    10032: "message type cannot be recalled",
    10033: "group type does not support recall",
    10041: "the app disallows group recall",
    20022: "message not found",
    20023: "already recalled",
    60002: "invalid HTTP request",
    60003: "invalid JSON",
    60004: "invalid account or UserSig",
    60005: "invalid account or UserSig",
    60006: "invalid SDKAppID",
    60007: "rate limited",
    60008: "Tencent timed out",
    60010: "needs an App admin",
    60011: "rate limited",
    60012: "no SDKAppID in the request",
    60016: "app disabled",
    60018: "rate limited",
    60019: "rate limited",
    60021: "caller IP not in the REST allowlist",
    70001: "UserSig expired",
    70003: "UserSig truncated",
    70009: "UserSig made with the wrong key",
    70013: "UserSig identifier mismatch",
    70014: "UserSig SDKAppID mismatch",
    70016: "no key for this SDKAppID in this region",
    70020: "SDKAppID unknown in this region",
    70050: "UserSig failures rate limited: wait a minute",
    90001: "invalid JSON",
    90003: "unknown To_Account",
    90008: "unknown From_Account",
    90009: "needs an App admin",
    90054: "invalid MsgKey",
    91000: "internal error",
}

# -1 stands in for a code Tencent did not give: an item missing from RecallRetList, an answer
# without an ErrorCode. It classifies as "rejected"/"failed", never as a success.
NO_CODE = -1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What Tencent said about one message: a status, its code (``-1``: none given) and a text."""

    status: Status
    tencent_code: int
    info: str


def is_usersig_code(code: int) -> bool:
    # 70001 expired, 70003 truncated, 70009 wrong key, 70013 identifier mismatch, and their
    # neighbours: the 70xxx range is the UserSig / login family.
    return 70000 <= code < 71000


def action(code: int) -> Action:
    if code in RATE_LIMITED or code in INTERNAL or code in TENCENT_TIMEOUT:
        return "retry"
    if is_usersig_code(code):
        return "regenerate"
    return "final"


def retry_reason(code: int) -> str:
    """The bounded ``reason`` label of a retry caused by Tencent answering *code*."""
    if code in RATE_LIMITED:
        return "rate_limited"
    if code in TENCENT_TIMEOUT:
        return "tencent_timeout"
    if is_usersig_code(code):
        return "usersig"
    return "internal_error"


def status_of(code: int) -> Status:
    """The status of a final code. Auth, permission, parameter and unknown codes are ``rejected``:
    Tencent refused and asking again would not change its mind."""
    if code == 0:
        return "recalled"
    if code in ALREADY_RECALLED:
        return "already_recalled"
    if code in NOT_FOUND:
        return "not_found"
    return "rejected"


def describe(code: int, info: str = "") -> str:
    """*info* when Tencent gave one, otherwise the documented meaning of *code* (or ``""``)."""
    return info or DESCRIPTIONS.get(code, "")


@dataclass(frozen=True, slots=True)
class Answer:
    """One decoded REST answer: the top-level code and text, and the per-item codes (if any)."""

    code: int
    info: str
    items: Mapping[int | str, int] | None  # MsgSeq or MsgKey -> RetCode; None without RecallRetList


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.lstrip("-").isdigit():
        return int(value)  # lenient: a number sent as a string
    return None


def read_answer(doc: object, item_field: Literal["MsgSeq", "MsgKey"] | None) -> Answer | None:
    """Decode a parsed JSON answer; ``None`` if it is not one (not an object, no status at all).

    ``ErrorCode`` is the truth; ``ActionStatus`` only fills in a missing code. A ``FAIL`` with code
    0 is contradictory and read as :data:`NO_CODE`.
    """
    if not isinstance(doc, dict):
        return None
    status, code = doc.get("ActionStatus"), _int(doc.get("ErrorCode"))
    if code is None:
        if status == "OK":
            code = 0
        elif status == "FAIL":
            code = NO_CODE
        else:
            return None
    elif code == 0 and status == "FAIL":
        code = NO_CODE
    info = doc.get("ErrorInfo")
    items: dict[int | str, int] | None = None
    ret_list = doc.get("RecallRetList")
    if item_field is not None and isinstance(ret_list, list):
        items = {}
        for entry in ret_list:
            if not isinstance(entry, dict):
                continue
            key, ret = entry.get(item_field), _int(entry.get("RetCode"))
            if item_field == "MsgSeq":
                key = _int(key)
            if isinstance(key, (int, str)) and ret is not None:
                items[key] = ret
    return Answer(code, info if isinstance(info, str) else "", items)


def cut_reason(reason: str, limit: int = 100) -> str:
    """*reason* cut to at most *limit* UTF-8 **bytes** (Tencent's ``Reason`` holds ≤ 100 bytes: ~33 CJK
    characters), never between a letter and its accent or inside an emoji sequence. The full text
    belongs in the relay's own events."""
    return cut_graphemes(reason, limit)


def check_batch(items: Iterable[object], limit: int = 10) -> None:
    """Raise ``ValueError`` unless *items* holds 1..*limit* distinct keys (Tencent takes ≤ 10 per call,
    and results are matched back by key, so a duplicate would be ambiguous)."""
    seen = list(items)
    if not seen:
        raise ValueError("at least one message per call")
    if len(seen) > limit:
        raise ValueError(f"at most {limit} messages per call, got {len(seen)}")
    if len(set(seen)) != len(seen):
        raise ValueError("a message is listed twice")
