"""Who may call: the SdkAppid allow-list and Tencent's ``Sign = sha256_hex(token + RequestTime)``.

The signature covers only the token and the timestamp, not the body (docs/security.md says what
that does and does not protect). Pure code with an injectable clock, so the window edges are
unit-tested exactly.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable, Mapping

from relay.errors import Reject, Rejection
from relay.tencent.callback import CallbackQuery

_HEX = frozenset("0123456789abcdef")
# Unix seconds fit in 10 digits until 2286; a longer value is malformed, not merely stale.
_MAX_TIME_DIGITS = 12


def sign(token: str, request_time: str) -> str:
    """Tencent's callback signature: lowercase hex SHA-256 of ``token + RequestTime``."""
    return hashlib.sha256((token + request_time).encode()).hexdigest()


class Authenticator:
    """Checks a callback's query against the accepted apps and their tokens."""

    def __init__(
        self,
        accepted_apps: frozenset[str],
        tokens: Mapping[str, tuple[str, ...]],
        max_age: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._apps = accepted_apps
        self._tokens = {app: tuple(t.encode() for t in ts) for app, ts in tokens.items()}
        self._max_age = max_age
        self._clock = clock

    def check(self, query: CallbackQuery) -> None:
        """Return if the callback may proceed; raise :class:`Rejection` with a 400/401/403 code otherwise."""
        app = query.sdk_app_id
        if app is None:
            raise Rejection(Reject.MISSING_PARAMETER, "SdkAppid is missing")
        if app not in self._apps:
            raise Rejection(Reject.APP_NOT_ALLOWED, "SdkAppid is not accepted")
        tokens = self._tokens.get(app)
        if not tokens:
            return  # this app is configured without callback authentication
        if query.sign is None:
            raise Rejection(Reject.MISSING_SIGNATURE, "Sign is missing")
        request_time = query.request_time
        if request_time is None:
            raise Rejection(Reject.INVALID_REQUEST_TIME, "RequestTime is missing")
        # isdigit() alone would accept other scripts' digits ("٣"); insist on ASCII.
        if not (request_time.isascii() and request_time.isdigit()) or len(request_time) > _MAX_TIME_DIGITS:
            raise Rejection(Reject.INVALID_REQUEST_TIME, "RequestTime is not a Unix time in seconds")
        if abs(self._clock() - int(request_time)) > self._max_age:
            raise Rejection(Reject.STALE_REQUEST, "RequestTime is outside the accepted window")
        # Hex is case-insensitive; anything that is not 64 hex digits cannot match any token.
        given = query.sign.lower()
        if len(given) != 64 or not _HEX.issuperset(given):
            raise Rejection(Reject.INVALID_SIGNATURE, "Sign is not a SHA-256 hex digest")
        given_bytes = given.encode()
        rt = request_time.encode()
        matched = False
        # Compare against every token (rotation) without stopping early, each in constant time.
        for token in tokens:
            expected = hashlib.sha256(token + rt).hexdigest().encode()
            matched |= hmac.compare_digest(expected, given_bytes)
        if not matched:
            raise Rejection(Reject.INVALID_SIGNATURE, "Sign does not match any token for this app")
