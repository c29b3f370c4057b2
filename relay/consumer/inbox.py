"""Exactly-once effect in PostgreSQL: the inbox pattern. The eventID goes into the inbox table with
``INSERT … ON CONFLICT DO NOTHING`` in the same transaction as the handler's own statements; no row
inserted means the event was applied before, and the handler is not called. A stream reader's last
offset is stored in that same transaction, so a restart resumes right after what was applied.

asyncpg is an optional dependency: ``pip install 'revoke-relay[consumer]'``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

INBOX_TABLE = "relay_inbox"
OFFSETS_TABLE = "relay_inbox_offsets"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {INBOX_TABLE} (
    consumer   text        NOT NULL,
    event_id   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
CREATE TABLE IF NOT EXISTS {OFFSETS_TABLE} (
    consumer    text   NOT NULL,
    stream      text   NOT NULL,
    last_offset bigint NOT NULL,
    PRIMARY KEY (consumer, stream)
);
"""
# Two services starting at once would race on CREATE TABLE IF NOT EXISTS (a unique violation in
# pg_type): the schema is created under a transaction-scoped advisory lock.
_SCHEMA_LOCK = 0x72656C6179  # "relay"


class Inbox(Protocol):
    """Where a :class:`~relay.consumer.Consumer` records what it applied (PostgresInbox; a test twin)."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def apply(
        self,
        event_id: str,
        handle: Callable[[Any], Awaitable[None]],
        *,
        stream: str | None = None,
        offset: int | None = None,
    ) -> bool:
        """Call ``handle(tx)`` once per eventID inside one transaction with the inbox row (and the
        stream *offset*); True if it ran, False for an eventID applied before. Raises what it raised."""

    async def last_offset(self, stream: str) -> int | None:
        """The offset of the last entry of *stream* applied, or None."""


class PostgresInbox:
    """The inbox in PostgreSQL under *name* (one per consuming service); creates its tables itself."""

    def __init__(self, dsn: str, name: str, *, pool_size: int = 2) -> None:
        self.dsn = dsn
        self.name = name
        self._pool_size = pool_size
        self._pool: Any = None

    async def start(self) -> None:
        try:
            import asyncpg
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RuntimeError("PostgresInbox needs asyncpg: pip install 'revoke-relay[consumer]'") from exc
        if self._pool is not None:
            return
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self._pool_size)
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK)
            await connection.execute(_SCHEMA)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def apply(
        self,
        event_id: str,
        handle: Callable[[Any], Awaitable[None]],
        *,
        stream: str | None = None,
        offset: int | None = None,
    ) -> bool:
        if self._pool is None:
            raise RuntimeError("the inbox is not started")
        async with self._pool.acquire() as connection, connection.transaction():
            fresh = await connection.fetchval(
                f"INSERT INTO {INBOX_TABLE} (consumer, event_id) VALUES ($1, $2)"  # noqa: S608 - constant table
                " ON CONFLICT DO NOTHING RETURNING true",
                self.name,
                event_id,
            )
            if fresh:
                await handle(connection)
            if stream is not None and offset is not None:
                await connection.execute(
                    f"INSERT INTO {OFFSETS_TABLE} (consumer, stream, last_offset) VALUES ($1, $2, $3)"  # noqa: S608
                    " ON CONFLICT (consumer, stream) DO UPDATE SET last_offset = EXCLUDED.last_offset",
                    self.name,
                    stream,
                    offset,
                )
        return bool(fresh)

    async def last_offset(self, stream: str) -> int | None:
        if self._pool is None:
            raise RuntimeError("the inbox is not started")
        value = await self._pool.fetchval(
            f"SELECT last_offset FROM {OFFSETS_TABLE} WHERE consumer = $1 AND stream = $2",  # noqa: S608
            self.name,
            stream,
        )
        return int(value) if value is not None else None
