"""Correlation stores: send records and the recall gateway's records, one small class per backend
(:mod:`relay.store.memory`, :mod:`relay.store.redis` on any of :mod:`relay.store.topology`'s modes)."""

from relay.store.base import (
    GATEWAY_PREFIX,
    KEY_PREFIX,
    CorrelationStore,
    SendRecord,
    StoreError,
    StoreFull,
    correlation_key,
    msg_id_key,
)

__all__ = [
    "GATEWAY_PREFIX",
    "KEY_PREFIX",
    "CorrelationStore",
    "SendRecord",
    "StoreError",
    "StoreFull",
    "correlation_key",
    "msg_id_key",
]
