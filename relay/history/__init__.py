"""The history: every event kept in a RabbitMQ stream (``RELAY_AUDIT_STREAM``), read back by time
window and filters for ``relay history``, ``relay replay`` and ``relay export`` (docs/history.md)."""

from relay.history.select import Selection, parse_filter, parse_when
from relay.history.stream import HistoryError, Record, read

__all__ = ["HistoryError", "Record", "Selection", "parse_filter", "parse_when", "read"]
