"""Reading ledger.events by position. Because seq is commit-ordered, tailing
``seq > last_seen`` never misses a row that commits later."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

EVENT_COLUMNS = "seq, type, task_id, hostname, sent_at, clock, recorded_at, routing_key, payload"


async def read_after(
    conn: asyncpg.Connection,
    after: int,
    limit: int,
    *,
    types: Sequence[str] | None = None,
    task_id: str | None = None,
) -> list[asyncpg.Record]:
    """Events with seq > after, in seq order, optionally filtered by type or task."""
    return await conn.fetch(
        f"""
        SELECT {EVENT_COLUMNS} FROM ledger.events
        WHERE seq > $1
          AND ($3::text[] IS NULL OR type = ANY($3::text[]))
          AND ($4::text IS NULL OR task_id = $4::text)
        ORDER BY seq
        LIMIT $2
        """,
        after,
        limit,
        list(types) if types else None,
        task_id,
    )


async def last_seq(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.events")
