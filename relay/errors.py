"""The relay's error tree. Library errors are translated into these at the module boundary."""

from __future__ import annotations

from enum import Enum


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """The environment does not describe a valid configuration; ``problems`` names each variable."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Reject(str, Enum):
    """Stable error codes sent back in ``ErrorInfo`` and used as the ``reason`` metric label.

    The value is the wire code; :data:`STATUS` maps each to its HTTP status. Codes are part of
    the public contract (docs/errors in the README): never rename one, only add.
    """

    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    INVALID_FIELD = "invalid_field"
    TOO_MANY_ITEMS = "too_many_items"
    COMMAND_MISMATCH = "command_mismatch"
    MISSING_PARAMETER = "missing_parameter"
    DUPLICATE_PARAMETER = "duplicate_parameter"
    MISSING_SIGNATURE = "missing_signature"
    INVALID_SIGNATURE = "invalid_signature"
    INVALID_REQUEST_TIME = "invalid_request_time"
    STALE_REQUEST = "stale_request"
    APP_NOT_ALLOWED = "app_not_allowed"
    FORBIDDEN_SOURCE = "forbidden_source"
    BODY_TOO_LARGE = "body_too_large"
    BODY_TIMEOUT = "body_timeout"
    INCOMPLETE_BODY = "incomplete_body"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    UNPROCESSABLE = "unprocessable"
    SPOOL_FULL = "spool_full"
    SPOOL_UNAVAILABLE = "spool_unavailable"
    OVERLOADED = "overloaded"


STATUS: dict[Reject, int] = {
    Reject.INVALID_JSON: 400,
    Reject.NOT_AN_OBJECT: 400,
    Reject.MISSING_FIELD: 400,
    Reject.INVALID_FIELD: 400,
    Reject.TOO_MANY_ITEMS: 400,
    Reject.COMMAND_MISMATCH: 400,
    Reject.MISSING_PARAMETER: 400,
    Reject.DUPLICATE_PARAMETER: 400,
    Reject.MISSING_SIGNATURE: 401,
    Reject.INVALID_SIGNATURE: 401,
    Reject.INVALID_REQUEST_TIME: 401,
    Reject.STALE_REQUEST: 401,
    Reject.APP_NOT_ALLOWED: 403,
    Reject.FORBIDDEN_SOURCE: 403,
    Reject.BODY_TOO_LARGE: 413,
    Reject.BODY_TIMEOUT: 408,
    Reject.INCOMPLETE_BODY: 400,
    # Tencent sends plain JSON; a compressed body is refused rather than inflated (no decompression
    # bombs, no second body format to get wrong).
    Reject.UNSUPPORTED_ENCODING: 415,
    # An exception nothing above names: the request gets a 4xx, never a 500; the log has the traceback.
    Reject.UNPROCESSABLE: 400,
    Reject.SPOOL_FULL: 503,
    Reject.SPOOL_UNAVAILABLE: 503,
    Reject.OVERLOADED: 503,
}


class Rejection(RelayError):
    """A callback the relay refuses; carries the stable code and a detail for the log (not the reply)."""

    def __init__(self, code: Reject, detail: str = "") -> None:
        super().__init__(f"{code.value}: {detail}" if detail else code.value)
        self.code = code
        self.detail = detail

    @property
    def status(self) -> int:
        return STATUS[self.code]


class PublishFailed(RelayError):
    """An event was not confirmed by the broker. ``reason`` is a bounded metric label.

    Reasons: ``disconnected`` (no usable channel, or it died before the confirm), ``blocked``
    (the broker raised a resource alarm), ``timeout`` (no confirm in time — the message may
    still land), ``returned`` (unroutable, ``basic.return``), ``nacked`` (``basic.nack``),
    ``error`` (anything else the client raised).
    """

    def __init__(self, reason: str, detail: str = "", *, in_doubt: bool = False) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        # True when the frame may have reached the broker although no confirm came back
        # (timeout, connection lost mid-flight): a republish can then make a duplicate.
        self.in_doubt = in_doubt


class SpoolError(RelayError):
    """The spool could not make an event durable (disk full, permissions, corruption)."""


class SpoolFull(SpoolError):
    """The spool is at ``RELAY_SPOOL_MAX_BYTES``; new events are refused, none is dropped."""
