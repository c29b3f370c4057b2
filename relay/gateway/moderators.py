"""Verifying who the moderator is: an ID token (a JWT, e.g. the moderator's OIDC ID token).

Without a token the moderator is *asserted* by the calling service's key. With one, it is
*verified*: the token's signature checks against the issuer's published keys (a JWKS file, or its
URL), it was issued by ``RELAY_API_JWT_ISSUER`` for ``RELAY_API_JWT_AUDIENCE`` and has not
expired, and the moderator is its ``RELAY_API_JWT_CLAIM``. PyJWT does the checking; only
asymmetric algorithms are accepted, and each key verifies with the one algorithm bound to it, so
neither ``none`` nor an HMAC made with a public key as the secret can pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson
import structlog

from relay.errors import ConfigError, RelayError
from relay.gateway.text import nfc, refusal

log = structlog.get_logger()

# Key type → the algorithms a key of that type may verify (RFC 7518; EdDSA: RFC 8037).
ALGORITHMS: Mapping[str, frozenset[str]] = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
}
LEEWAY = 30.0  # seconds of clock skew allowed on exp / nbf / iat
REFRESH = 600.0  # a remote JWKS is fetched again this often…
UNKNOWN_KID_REFRESH = 30.0  # …and at most this often when a token names a key it does not hold
_MAX_JWKS_BYTES = 1 << 20


class TokenRefused(RelayError):
    """The token does not prove who the moderator is (401); ``detail`` is for the log only."""


class KeysUnavailable(RelayError):
    """The issuer's keys have not been fetched yet (503: retry)."""


def parse_jwks(data: object, source: str) -> dict[str, Any]:
    """Validate a JWKS document: its asymmetric signing keys, by kid. Raise ValueError naming the
    problem (never a key's material)."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError(f"{source}: not a JWK set (an object with a 'keys' array)")
    keys: dict[str, Any] = {}
    for index, item in enumerate(data["keys"]):
        if not isinstance(item, dict):
            raise ValueError(f"{source}: keys[{index}] is not an object")
        kty = item.get("kty")
        if not isinstance(kty, str) or kty not in ALGORITHMS:
            raise ValueError(f"{source}: keys[{index}] has kty {str(kty)[:10]!r}; only RSA, EC and OKP keys verify")
        if item.get("use", "sig") != "sig":
            continue  # an encryption key: not for signatures
        alg = item.get("alg")
        if alg is not None and alg not in ALGORITHMS[kty]:
            raise ValueError(f"{source}: keys[{index}] has alg {str(alg)[:10]!r}, not an asymmetric one for {kty}")
        try:
            jwt.PyJWK(item, algorithm=alg or min(ALGORITHMS[kty]))  # the material parses
        except jwt.PyJWTError as exc:
            raise ValueError(f"{source}: keys[{index}] is not a usable key ({type(exc).__name__})") from None
        kid = item.get("kid")
        kid = kid if isinstance(kid, str) else ""
        if kid in keys:
            raise ValueError(f"{source}: keys[{index}] has the kid of an earlier key (or neither has one)")
        keys[kid] = item
    if not keys:
        raise ValueError(f"{source}: no signing keys")
    return keys


def load_jwks_file(path: Path) -> dict[str, Any]:
    """The keys of a JWKS file; raise :class:`ConfigError` naming ``RELAY_API_JWKS_FILE``."""
    try:
        return parse_jwks(orjson.loads(path.read_bytes()), f"RELAY_API_JWKS_FILE: {path}")
    except OSError as exc:
        raise ConfigError([f"RELAY_API_JWKS_FILE: cannot read {path}: {exc.strerror or type(exc).__name__}"]) from None
    except orjson.JSONDecodeError:
        raise ConfigError([f"RELAY_API_JWKS_FILE: {path} is not JSON"]) from None
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None


class Verifier:
    """Checks moderator tokens against one issuer's keys (a file, reloadable; or a URL, refreshed)."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        claim: str,
        *,
        keys: Mapping[str, Any] | None = None,
        url: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self.claim = claim
        self.url = url
        self._keys: Mapping[str, Any] = keys or {}
        self._clock = clock
        self._fetched = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._fetching: asyncio.Lock | None = None

    def replace_keys(self, keys: Mapping[str, Any]) -> None:
        self._keys = keys

    async def start(self) -> None:
        if self.url is not None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
            self._fetching = asyncio.Lock()
            self._refresher = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
        if self._session is not None:
            await self._session.close()

    async def verify(self, token: str) -> str:
        """The moderator the token names; raise :class:`TokenRefused` or :class:`KeysUnavailable`."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRefused("not a JWT") from None
        kid = header.get("kid")
        jwk = await self._key(kid if isinstance(kid, str) else "")
        kty = str(jwk.get("kty"))
        alg = jwk.get("alg") or header.get("alg")
        if alg not in ALGORITHMS[kty]:
            raise TokenRefused(f"algorithm {str(alg)[:10]!r} is not accepted for a {kty} key")
        try:
            claims = jwt.decode(
                token,
                key=jwt.PyJWK(dict(jwk), algorithm=alg),
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRefused("expired") from None
        except jwt.PyJWTError as exc:
            raise TokenRefused(type(exc).__name__) from None
        value = claims.get(self.claim)
        if not isinstance(value, str) or not value or len(value) > 256 or refusal(value, identifier=True):
            raise TokenRefused(f"claim {self.claim!r} is not a usable moderator ID")
        return nfc(value)

    async def _key(self, kid: str) -> Mapping[str, Any]:
        jwk = self._pick(kid)
        if jwk is None and self.url is not None and self._clock() - self._fetched >= UNKNOWN_KID_REFRESH:
            await self._fetch()  # a key rotated in since the last fetch
            jwk = self._pick(kid)
        if jwk is None:
            if not self._keys:
                raise KeysUnavailable("the issuer's keys have not been fetched yet")
            raise TokenRefused("signed with a key the issuer does not publish")
        return jwk

    def _pick(self, kid: str) -> Mapping[str, Any] | None:
        if kid in self._keys:
            return self._keys[kid]  # type: ignore[no-any-return]
        if not kid and len(self._keys) == 1:
            return next(iter(self._keys.values()))  # type: ignore[no-any-return]
        return None

    async def _refresh_loop(self) -> None:
        while True:
            await self._fetch()
            await asyncio.sleep(REFRESH if self._keys else 5.0)

    async def _fetch(self) -> None:
        assert self._session is not None
        assert self._fetching is not None
        assert self.url is not None
        async with self._fetching:
            self._fetched = self._clock()
            try:
                async with self._session.get(self.url, allow_redirects=False) as response:
                    if response.status != 200:
                        raise ValueError(f"HTTP {response.status}")
                    raw = await response.content.read(_MAX_JWKS_BYTES + 1)
                    if len(raw) > _MAX_JWKS_BYTES:
                        raise ValueError("larger than 1 MiB")
                self._keys = parse_jwks(orjson.loads(raw), "RELAY_API_JWKS_URL")
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                log.warning("relay.jwks_fetch_failed", url=self.url, error=str(exc)[:200] or type(exc).__name__)
            else:
                log.info("relay.jwks_fetched", url=self.url, keys=len(self._keys))
