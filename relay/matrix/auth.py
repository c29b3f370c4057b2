"""The homeserver's token (``hs_token``): ``Authorization: Bearer`` or the legacy ``?access_token=``."""

from __future__ import annotations

import hmac

from relay.matrix.errors import MatrixReject, MatrixRejection

_BEARER = "bearer "


class HsTokenAuth:
    def __init__(self, hs_token: str) -> None:
        self._token = hs_token.encode()

    def check(self, authorization: str | None, access_token: str | None) -> None:
        """Raise unless the request carries the homeserver's token (header first, then query).

        Both are accepted because the spec moved from the query to the header (v1.4) and a
        homeserver configured for legacy authorization sends both. The comparison takes the same
        time whatever the token, so it reveals nothing about the secret."""
        presented: str | None = None
        if authorization is not None and authorization[: len(_BEARER)].lower() == _BEARER:
            presented = authorization[len(_BEARER) :].strip()
        elif access_token is not None:
            presented = access_token
        if not presented:
            raise MatrixRejection(MatrixReject.MISSING_TOKEN, "no Authorization: Bearer and no access_token")
        if not hmac.compare_digest(presented.encode(errors="surrogatepass"), self._token):
            raise MatrixRejection(MatrixReject.INVALID_TOKEN, "the token is not RELAY_MATRIX_HS_TOKEN")
