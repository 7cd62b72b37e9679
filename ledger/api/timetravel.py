"""A task or a group as of a past log position, folded from the log itself with the
projections' own pure fold, so the past reads exactly as the projector would have built it."""

from __future__ import annotations

from typing import Any

import asyncpg

from ledger.api import queries
from ledger.api.models import AsOfQuery
from ledger.projections import fold_group, fold_task


async def resolve_seq(conn: asyncpg.Pool, q: AsOfQuery) -> int | None:
    """The log position `q` names (None when it names none: the present)."""
    if q.as_of_seq is not None:
        return q.as_of_seq
    if q.as_of is not None:
        return await queries.seq_at(conn, q.as_of)
    return None


async def _children_as_of(conn: asyncpg.Pool, task_id: str, seq: int) -> list[str]:
    # A child counts once its first event is in the log at `seq` (lineage as known now).
    rows = await conn.fetch(
        "SELECT task_id FROM ledger.tasks WHERE parent_id = $1 AND first_seq <= $2 ORDER BY first_seq, task_id",
        task_id,
        seq,
    )
    return [r["task_id"] for r in rows]


async def task_as_of(conn: asyncpg.Pool, task_id: str, seq: int) -> dict[str, Any] | None:
    """The task row as the projector held it right after applying `seq` (None: not yet seen)."""
    events = await queries.task_events(conn, task_id, upto_seq=seq)
    row = fold_task(events, task_id) if events else None
    if row is None:
        return None
    row = dict(row)
    row["children"] = await _children_as_of(conn, task_id, seq)
    row["as_of_seq"] = seq
    return row


async def group_as_of(conn: asyncpg.Pool, group_id: str, seq: int) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The group row and its members folded from the log up to `seq` (candidates are the
    members known now; those not yet members at `seq` are left out by the fold)."""
    members = [m["task_id"] for m in await queries.group_members(conn, group_id, "task_id")]
    rows = await conn.fetch(
        f"SELECT {queries.EVENT_COLUMNS} FROM ledger.events WHERE task_id = ANY($1::text[]) AND seq <= $2"
        " ORDER BY seq",
        members,
        seq,
    )
    group, folded = fold_group(group_id, rows)
    callback = (group or {}).get("chord_id")
    return group, [m for m in folded if m["task_id"] != callback]  # not a member (see queries.group_members)
