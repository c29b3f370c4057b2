"""structlog, configured once: JSON lines (orjson) or a console renderer, dotted event names.

Events are stable ids (``relay.publish_failed``) with fields, never sentences. A last processor
masks any field whose name says it is a secret, so a careless ``log.info(..., token=...)`` cannot
leak a callback token or an AMQP password.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

_SECRET_KEYS = frozenset({"token", "tokens", "sign", "signature", "password", "amqp_url", "authorization"})


def _mask_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event.keys() & _SECRET_KEYS:
        event[key] = "***"
    return event


def configure(level: str = "info", fmt: str = "json") -> None:
    """Configure structlog for the process; safe to call again (tests, CLI sub-commands)."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _mask_secrets,
        structlog.processors.format_exc_info,
    ]
    if fmt == "console":
        renderer: Any = structlog.dev.ConsoleRenderer(colors=False)
        factory: Any = structlog.PrintLoggerFactory(sys.stdout)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(sys.stdout.buffer)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries log through stdlib logging; keep their warnings, in the same stream.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")


def get_logger() -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger()  # type: ignore[no-any-return]
