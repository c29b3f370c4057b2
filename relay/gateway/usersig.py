"""Tencent's UserSig (TLSSigAPIv2): made from the console's secret key, verified, cached per app.

A UserSig authenticates every REST call as the App admin: ``base64url*(zlib(JSON{..., TLS.sig}))``
where ``TLS.sig = base64(HMAC-SHA256(key, "TLS.identifier:…\\nTLS.sdkappid:…\\nTLS.time:…\\nTLS.expire:…\\n"))``.
The key is the console's secret key as UTF-8 text (not hex-decoded). The key never reaches a log,
a repr or an exception; a UserSig is itself a credential (an admin token until it expires).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import orjson

from relay.errors import RelayError

SigProblem = Literal["malformed", "wrong_app", "wrong_identifier", "expired", "bad_signature"]

# Lifetime and renewal margin of the UserSigs the relay makes. Tencent's docs recommend at least
# 24 h. 48 h keeps a leaked UserSig (it travels in the URL, so proxies may log it) short-lived;
# renewing once less than 24 h remain means every UserSig sent has a day left: far beyond any
# clock skew between us and Tencent, and a renewal costs one HMAC per app per day.
LIFETIME = 48 * 3600
RENEW_BEFORE = 24 * 3600

# TLSSigAPIv2's URL-safe alphabet: standard base64 with + / = replaced by * - _.
_TO_SIG = bytes.maketrans(b"+/=", b"*-_")
_FROM_SIG = bytes.maketrans(b"*-_", b"+/=")
# A UserSig is a few hundred bytes; refuse to inflate anything that grows past this.
_MAX_INFLATED = 4096


class UserSigError(RelayError):
    """A UserSig that does not verify; ``problem`` names why (never the key or the UserSig)."""

    def __init__(self, problem: SigProblem, detail: str = "") -> None:
        super().__init__(f"{problem}: {detail}" if detail else problem)
        self.problem: SigProblem = problem
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SigFields:
    """What a verified UserSig says: who, for which app, made when (Unix s), valid for how long (s)."""

    identifier: str
    sdk_app_id: int
    time: int
    expire: int

    @property
    def expires_at(self) -> int:
        return self.time + self.expire


def _content(identifier: str, sdk_app_id: int, t: int, expire: int) -> bytes:
    # Each line ends with "\n"; the TLS.userbuf line only exists for user buffers, never used here.
    return f"TLS.identifier:{identifier}\nTLS.sdkappid:{sdk_app_id}\nTLS.time:{t}\nTLS.expire:{expire}\n".encode()


def hmac_sig(identifier: str, sdk_app_id: int | str, key: str, *, t: int, expire: int) -> str:
    """The ``TLS.sig`` field: base64 of HMAC-SHA256 over the four content lines."""
    digest = hmac.new(key.encode(), _content(identifier, int(sdk_app_id), t, expire), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def make_usersig(sdk_app_id: int | str, identifier: str, key: str, *, now: float, expire: int) -> str:
    """A UserSig for *identifier* in *sdk_app_id*, made at *now* and valid for *expire* seconds."""
    app, t = int(sdk_app_id), int(now)
    doc = {
        "TLS.ver": "2.0",
        "TLS.identifier": identifier,
        "TLS.sdkappid": app,  # app, expire and time are JSON numbers
        "TLS.expire": expire,
        "TLS.time": t,
        "TLS.sig": hmac_sig(identifier, app, key, t=t, expire=expire),
    }
    return base64.b64encode(zlib.compress(orjson.dumps(doc))).translate(_TO_SIG).decode()


def _number(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _decode(sig: str) -> tuple[SigFields, str]:
    """Undo the encoding (no key involved); raise ``malformed`` on anything that is not a UserSig."""
    try:
        raw = base64.b64decode(sig.encode("ascii").translate(_FROM_SIG), validate=True)
        inflater = zlib.decompressobj()
        text = inflater.decompress(raw, _MAX_INFLATED)
        if inflater.unconsumed_tail or not inflater.eof:
            raise UserSigError("malformed", "not a complete zlib stream (or too large)")
        doc = orjson.loads(text)
    except (UnicodeEncodeError, binascii.Error, zlib.error, orjson.JSONDecodeError) as exc:
        raise UserSigError("malformed", type(exc).__name__) from None
    if not isinstance(doc, dict) or doc.get("TLS.ver") != "2.0":
        raise UserSigError("malformed", "not a TLS 2.0 document")
    identifier, app, t, expire, mac = (
        doc.get(k) for k in ("TLS.identifier", "TLS.sdkappid", "TLS.time", "TLS.expire", "TLS.sig")
    )
    if not (isinstance(identifier, str) and isinstance(mac, str)):
        raise UserSigError("malformed", "TLS.identifier or TLS.sig is not a string")
    app_n, t_n, expire_n = _number(app), _number(t), _number(expire)
    if app_n is None or t_n is None or expire_n is None:
        raise UserSigError("malformed", "TLS.sdkappid, TLS.time or TLS.expire is not a number")
    return SigFields(identifier, app_n, t_n, expire_n), mac


def verify_usersig(sig: str, sdk_app_id: int | str, identifier: str, key: str, *, now: float) -> SigFields:
    """Return the fields of *sig* if it is valid for *identifier* in *sdk_app_id* at *now*.

    Raise :class:`UserSigError` naming the first problem: malformed, wrong_app, wrong_identifier,
    expired (``now > time + expire``), bad_signature (HMAC compared in constant time).
    """
    fields, mac = _decode(sig)
    if fields.sdk_app_id != int(sdk_app_id):
        raise UserSigError("wrong_app", f"made for app {fields.sdk_app_id}")
    if fields.identifier != identifier:
        raise UserSigError("wrong_identifier", "made for another identifier")
    if now > fields.expires_at:
        raise UserSigError("expired", f"expired at {fields.expires_at}")
    expected = hmac_sig(fields.identifier, fields.sdk_app_id, key, t=fields.time, expire=fields.expire)
    if not hmac.compare_digest(expected.encode(), mac.encode()):
        raise UserSigError("bad_signature", "TLS.sig does not match the key")
    return fields


Renewal = Literal["new", "renewal", "invalidated"]


class UserSigs:
    """One cached UserSig per app for the admin identifier, renewed well before it expires.

    ``get`` makes a UserSig on first use, and again once fewer than *renew_before* seconds of its
    *lifetime* remain or after :meth:`invalidate` (Tencent answered 7000x: expired, bad or
    mismatched UserSig). *on_made* hears why each one was made (a metric).
    """

    def __init__(
        self,
        admin: str,
        secret_keys: Mapping[str, str],
        *,
        lifetime: int = LIFETIME,
        renew_before: int = RENEW_BEFORE,
        clock: Callable[[], float] = time.time,
        on_made: Callable[[Renewal], None] | None = None,
    ) -> None:
        if not 0 <= renew_before < lifetime:
            raise ValueError("renew_before must be at least 0 and shorter than the lifetime")
        for app in secret_keys:
            if not app.isascii() or not app.isdigit():
                raise ValueError(f"SdkAppID {app!r} is not a number")
        self.admin = admin
        self._keys = dict(secret_keys)
        self._lifetime = lifetime
        self._renew_before = renew_before
        self._clock = clock
        self._on_made = on_made
        self._cache: dict[str, tuple[str, float]] = {}  # app -> (UserSig, renew at)
        self._invalidated: set[str] = set()

    def __repr__(self) -> str:
        return f"UserSigs(admin={self.admin!r}, apps={sorted(self._keys)!r})"

    def has_key(self, app: str) -> bool:
        return app in self._keys

    def get(self, app: str) -> str:
        """The current UserSig for *app*; ``KeyError`` (naming only the app) if it has no secret key."""
        key = self._keys.get(app)
        if key is None:
            raise KeyError(app)
        now = self._clock()
        cached = self._cache.get(app)
        if cached is not None and now < cached[1]:
            return cached[0]
        reason: Renewal = "new" if cached is None else "renewal"
        if app in self._invalidated:
            reason = "invalidated"
            self._invalidated.discard(app)
        sig = make_usersig(app, self.admin, key, now=now, expire=self._lifetime)
        self._cache[app] = (sig, int(now) + self._lifetime - self._renew_before)
        if self._on_made is not None:
            self._on_made(reason)
        return sig

    def invalidate(self, app: str) -> None:
        """Forget *app*'s UserSig so the next :meth:`get` makes a new one (after a 7000x answer)."""
        if self._cache.pop(app, None) is not None:
            self._invalidated.add(app)
