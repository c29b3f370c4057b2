"""An audit service on the consumer kit: every event of the history stream (RELAY_AUDIT_STREAM) kept as
one row in PostgreSQL (who, why, when, evidence), and a small CLI to ask it questions.

    python examples/audit_service.py run                       # follow the stream; SIGTERM stops it
    python examples/audit_service.py query --group '@TGS#1' --since 2026-11-01T00:00:00+00:00
    python examples/audit_service.py query --operator alice --type message.revoked

RELAY_AMQP_URL, RELAY_AUDIT_STREAM and AUDIT_POSTGRES_URL configure it. The stream is read from its
first entry; the kit stores the last offset in the same transaction as each row, so a restart resumes
after it and never writes a row twice (docs/consuming.md, docs/history.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson

from relay.consumer import Consumer, Event, PostgresInbox

SCHEMA = """CREATE TABLE IF NOT EXISTS {table} (
    event_id     text PRIMARY KEY,
    type         text NOT NULL,
    received_at  timestamptz,
    sdk_app_id   text,
    group_id     text,
    conversation jsonb NOT NULL,
    msg_id       text,
    sender       text,
    operator     text,
    role         text,
    reason       text,
    requested_by text,
    request_id   text,
    evidence     jsonb,
    raw          jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS {table}_group ON {table} (group_id, received_at);
CREATE INDEX IF NOT EXISTS {table}_operator ON {table} (operator, received_at)"""


class AuditService:
    """Writes each event into *table*; the inbox (named *name*) makes that once per eventID."""

    def __init__(
        self, amqp_url: str, stream: str, postgres_url: str, *, table: str = "audit_events", name: str = "audit-service"
    ) -> None:
        self.table = table
        self.postgres_url = postgres_url
        self.consumer = Consumer(
            amqp_url, stream=stream, start="first", handler=self.handle, inbox=PostgresInbox(postgres_url, name=name)
        )

    async def prepare(self) -> None:
        import asyncpg

        db = await asyncpg.connect(self.postgres_url)
        try:
            await db.execute(SCHEMA.format(table=self.table))
        finally:
            await db.close()

    async def handle(self, event: Event, tx: Any) -> None:
        await tx.execute(
            f"INSERT INTO {self.table} (event_id, type, received_at, sdk_app_id, group_id, conversation, msg_id,"  # noqa: S608
            " sender, operator, role, reason, requested_by, request_id, evidence, raw)"
            " VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, $9, $10, $11, $12, $13, $14::jsonb, $15::jsonb)"
            " ON CONFLICT (event_id) DO NOTHING",
            event.event_id,
            event.type,
            event.received_at,
            event.sdk_app_id,
            event.conversation.get("groupID"),
            orjson.dumps(event.conversation).decode(),
            event.msg_id,
            event.sender,
            event.operator.user_id,
            event.operator.role,
            event.reason,
            event.requested_by,
            event.request_id,
            orjson.dumps(event.raw.get("evidence")).decode(),
            orjson.dumps(event.raw).decode(),
        )

    async def run(self) -> None:
        await self.prepare()
        await self.consumer.run()


async def query(
    postgres_url: str,
    *,
    table: str = "audit_events",
    group: str | None = None,
    operator: str | None = None,
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[dict[str, Any]]:
    """The rows matching every condition given, oldest first."""
    import asyncpg

    conditions: list[str] = []
    values: list[object] = []
    for column, value in (("group_id", group), ("operator", operator), ("type", kind)):
        if value is not None:
            values.append(value)
            conditions.append(f"{column} = ${len(values)}")
    for op, at in ((">=", since), ("<", until)):
        if at is not None:
            values.append(at)
            conditions.append(f"received_at {op} ${len(values)}")
    where = " WHERE " + " AND ".join(conditions) if conditions else ""
    db = await asyncpg.connect(postgres_url)
    try:
        rows = await db.fetch(
            "SELECT received_at, type, event_id, group_id, msg_id, sender, operator, role, reason, requested_by,"  # noqa: S608
            f" request_id FROM {table}{where} ORDER BY received_at, event_id",
            *values,
        )
    finally:
        await db.close()
    return [dict(row) for row in rows]


def line(row: dict[str, Any]) -> str:
    at = row["received_at"].isoformat() if row["received_at"] else "-"
    by = f"{row['role'] or '-'}/{row['operator'] or '-'}"
    asked = f" requested_by={row['requested_by']} request={row['request_id']}" if row["request_id"] else ""
    where = f"group={row['group_id'] or '-'}  msg={row['msg_id']}"
    return f"{at}  {row['type']:<24}  {where}  by={by}  reason={row['reason']!r}{asked}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="audit_service", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="follow the history stream into PostgreSQL")
    ask = sub.add_parser("query", help="print the stored events matching every condition")
    ask.add_argument("--group", help="a group's GroupId")
    ask.add_argument("--operator", help="who recalled (the operator's or moderator's UserID)")
    ask.add_argument("--type", dest="kind", help="message.revoked, message.recall_requested, …")
    ask.add_argument("--since", type=datetime.fromisoformat, help="ISO-8601 with an offset")
    ask.add_argument("--until", type=datetime.fromisoformat, help="ISO-8601 with an offset (exclusive)")
    args = parser.parse_args(argv)
    postgres_url = os.environ.get("AUDIT_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if args.command == "run":
        stream = os.environ.get("RELAY_AUDIT_STREAM")
        if not stream:
            print("audit_service: set RELAY_AUDIT_STREAM", file=sys.stderr)
            return 2
        amqp_url = os.environ.get("RELAY_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
        asyncio.run(AuditService(amqp_url, stream, postgres_url).run())
        return 0
    rows = asyncio.run(
        query(
            postgres_url, group=args.group, operator=args.operator, kind=args.kind, since=args.since, until=args.until
        )
    )
    for row in rows:
        print(line(row))
    print(f"{len(rows)} events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
