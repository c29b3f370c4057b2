"""Why a Matrix transaction is refused: stable codes, and the HTTP status and Matrix ``errcode`` of each.

A refusal is answered in Matrix's error shape, ``{"errcode": "M_…", "error": "<code>"}``, with
the stable code in ``error``. Codes are part of the public contract (docs/matrix.md): never rename
one, only add.
"""

from __future__ import annotations

from enum import Enum

from relay.errors import RelayError


class MatrixReject(str, Enum):
    MISSING_TOKEN = "missing_token"  # noqa: S105 - an error code, not a secret
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - an error code, not a secret
    INVALID_TXN_ID = "invalid_txn_id"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    TOO_MANY_EVENTS = "too_many_events"
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"
    INCOMPLETE_BODY = "incomplete_body"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    SPOOL_FULL = "spool_full"
    SPOOL_UNAVAILABLE = "spool_unavailable"


# (HTTP status, Matrix errcode). The homeserver retries every non-200 with backoff.
ANSWERS: dict[MatrixReject, tuple[int, str]] = {
    MatrixReject.MISSING_TOKEN: (403, "M_FORBIDDEN"),
    MatrixReject.INVALID_TOKEN: (403, "M_FORBIDDEN"),
    MatrixReject.INVALID_TXN_ID: (400, "M_INVALID_PARAM"),
    MatrixReject.INVALID_JSON: (400, "M_NOT_JSON"),
    MatrixReject.NOT_AN_OBJECT: (400, "M_BAD_JSON"),
    MatrixReject.MISSING_FIELD: (400, "M_BAD_JSON"),
    MatrixReject.INVALID_FIELD: (400, "M_BAD_JSON"),
    MatrixReject.TOO_MANY_EVENTS: (413, "M_TOO_LARGE"),
    MatrixReject.BODY_TOO_LARGE: (413, "M_TOO_LARGE"),
    MatrixReject.BODY_TIMEOUT: (408, "M_UNKNOWN"),
    MatrixReject.INCOMPLETE_BODY: (400, "M_UNKNOWN"),
    MatrixReject.UNSUPPORTED_ENCODING: (415, "M_UNKNOWN"),
    MatrixReject.SPOOL_FULL: (503, "M_UNKNOWN"),
    MatrixReject.SPOOL_UNAVAILABLE: (503, "M_UNKNOWN"),
}


class MatrixRejection(RelayError):
    """A transaction the relay refuses; ``detail`` is for the log, never the reply."""

    def __init__(self, code: MatrixReject, detail: str = "") -> None:
        super().__init__(f"{code.value}: {detail}" if detail else code.value)
        self.code = code
        self.detail = detail

    @property
    def status(self) -> int:
        return ANSWERS[self.code][0]
