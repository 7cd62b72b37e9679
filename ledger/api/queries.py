"""The SQL the API runs against the projections and the log, next to the Python that
builds it. Every value travels as a parameter; only column names chosen here are spliced."""

from __future__ import annotations

import base64
import time
from typing import Any

import asyncpg
import orjson

from ledger.api.errors import bad_param
from ledger.api.models import TaskListQuery

TASK_COLUMNS = (
    "task_id, name, state, sent, received, started, succeeded, failed, retried, revoked, rejected,"
    " args, kwargs, result, exception, traceback, eta, expires, retries, runtime, worker, client,"
    " exchange, routing_key, queue, \"timestamp\", clock, parent_id, root_id, group_id, group_index,"
    " chord_id, extra, first_seq, last_seq"
)
TASK_REF_COLUMNS = "task_id, name, state, group_id, group_index"
EVENT_COLUMNS = "seq, type, task_id, hostname, sent_at, clock, recorded_at, routing_key, payload"
GROUP_COLUMNS = "group_id, chord_id, size, states, first_seen, last_seen, first_seq, last_seq"
WORKER_COLUMNS = (
    "hostname, pid, freq, sw_ident, sw_ver, sw_sys, loadavg, active, processed, first_seen, last_seen,"
    " last_heartbeat, offline_at, first_seq, last_seq"
)

# (query field, column, operator): `_after` bounds are inclusive, `_before` exclusive.
_RANGES = [
    (f"{col}_{side}", col, op)
    for col in ("received", "started", "succeeded", "timestamp")
    for side, op in (("after", ">="), ("before", "<"))
]


class Params:
    """Collects query parameters and hands out their $n placeholders."""

    def __init__(self) -> None:
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return f"${len(self.values)}"


def encode_cursor(order: str, first_seq: int, task_id: str) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([order, first_seq, task_id])).decode().rstrip("=")


def decode_cursor(cursor: str, order: str) -> tuple[int, str]:
    try:
        data = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        cursor_order, first_seq, task_id = data
        if not isinstance(first_seq, int) or not isinstance(task_id, str):
            raise ValueError
    except Exception:
        raise bad_param("cursor", "not a cursor this API issued", status=400) from None
    if cursor_order != order:
        raise bad_param("cursor", f"issued for order={cursor_order}, not order={order}", status=400)
    return first_seq, task_id


def task_filter_sql(q: TaskListQuery, p: Params) -> list[str]:
    where: list[str] = []
    for column, values in (("state", q.state), ("name", q.name), ("worker", q.worker)):
        if values:
            # one value: plain equality, so an index on (column, first_seq) also gives the order
            where.append(f"{column} = {p(values[0])}" if len(values) == 1 else f"{column} = ANY({p(values)}::text[])")
    for field, column in (("queue", "queue"), ("group", "group_id"), ("root", "root_id"), ("parent", "parent_id")):
        value = getattr(q, field)
        if value is not None:
            where.append(f"{column} = {p(value)}")
    for field, column, op in _RANGES:
        value = getattr(q, field)
        if value is not None:
            where.append(f'"{column}" {op} {p(value)}')
    if q.search:
        needle = p(q.search)
        where.append(
            "(" + " OR ".join(f"strpos(lower(coalesce({c}, '')), lower({needle})) > 0"
                              for c in ("args", "kwargs", "result", "exception")) + ")"
        )
    return where


async def list_tasks(conn: asyncpg.Pool, q: TaskListQuery) -> tuple[list[dict[str, Any]], str | None]:
    """One keyset page. Order is by first_seq (then task_id), which never changes for a
    task, so paging is stable while tasks keep updating."""
    p = Params()
    where = task_filter_sql(q, p)
    desc = q.order == "newest"
    # A time window that ends (newest first) or starts (oldest first) away from the end the
    # page starts at would make PostgreSQL walk the first_seq index through every task
    # outside the window (it assumes matches are spread evenly). "first_seq + 0" hides that
    # index, so the window's own index finds the rows and only they are sorted.
    far_bound = "_before" if desc else "_after"
    seq_expr = "first_seq + 0" if any(getattr(q, f) is not None for f, _, _ in _RANGES if f.endswith(far_bound)) \
        else "first_seq"
    if q.cursor:
        seq, task_id = decode_cursor(q.cursor, q.order)
        where.append(f"({seq_expr}, task_id) {'<' if desc else '>'} ({p(seq)}, {p(task_id)})")
    direction = "DESC" if desc else "ASC"
    # Choose the page by key first, then read only its rows: a window of thousands of tasks
    # is then sorted from an index (tasks_received includes the keys), not from wide rows.
    page = (
        "SELECT task_id, first_seq FROM ledger.tasks"
        + (" WHERE " + " AND ".join(where) if where else "")
        + f" ORDER BY {seq_expr} {direction}, task_id {direction} LIMIT {p(q.limit + 1)}"
    )
    columns = ", ".join(f"t.{c.strip()}" for c in TASK_COLUMNS.split(","))
    sql = (
        f"SELECT {columns} FROM ({page}) AS page JOIN ledger.tasks t USING (task_id)"
        f" ORDER BY page.first_seq {direction}, t.task_id {direction}"
    )
    rows = [dict(r) for r in await conn.fetch(sql, *p.values)]
    next_cursor = None
    if len(rows) > q.limit:
        rows = rows[: q.limit]
        last = rows[-1]
        next_cursor = encode_cursor(q.order, last["first_seq"], last["task_id"])
    return rows, next_cursor


async def get_task(conn: asyncpg.Pool, task_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(
        f"SELECT {TASK_COLUMNS}, ARRAY(SELECT c.task_id FROM ledger.tasks c WHERE c.parent_id = t.task_id"
        " ORDER BY c.first_seq, c.task_id) AS children FROM ledger.tasks t WHERE t.task_id = $1",
        task_id,
    )
    return dict(row) if row is not None else None


async def task_events(conn: asyncpg.Pool, task_id: str, *, upto_seq: int | None = None,
                      upto_time: float | None = None) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {EVENT_COLUMNS} FROM ledger.events WHERE task_id = $1"
        " AND ($2::bigint IS NULL OR seq <= $2) AND ($3::float8 IS NULL OR recorded_at <= to_timestamp($3))"
        " ORDER BY seq",
        task_id,
        upto_seq,
        upto_time,
    )
    return [dict(r) for r in rows]


async def read_log(conn: asyncpg.Pool, after: int, types: list[str] | None, task_id: str | None,
                   limit: int) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        f"SELECT {EVENT_COLUMNS} FROM ledger.events WHERE seq > $1"
        " AND ($2::text[] IS NULL OR type = ANY($2::text[])) AND ($3::text IS NULL OR task_id = $3)"
        " ORDER BY seq LIMIT $4",
        after,
        types,
        task_id,
        limit,
    )
    return [dict(r) for r in rows]


async def get_group(conn: asyncpg.Pool, group_id: str) -> dict[str, Any] | None:
    row = await conn.fetchrow(f"SELECT {GROUP_COLUMNS} FROM ledger.groups WHERE group_id = $1", group_id)
    return dict(row) if row is not None else None


async def group_members(conn: asyncpg.Pool, group_id: str, columns: str = TASK_COLUMNS) -> list[dict[str, Any]]:
    # Celery sends a chord's callback with its header's group id, but the callback is not a
    # member (GroupResult.restore of the header does not list it): leave it out.
    rows = await conn.fetch(
        f"SELECT {columns} FROM ledger.tasks WHERE group_id = $1"
        " AND task_id IS DISTINCT FROM (SELECT chord_id FROM ledger.groups WHERE group_id = $1)"
        " ORDER BY group_index NULLS LAST, first_seq",
        group_id,
    )
    return [dict(r) for r in rows]


async def log_position(conn: asyncpg.Pool) -> int:
    return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.events")


async def seq_at(pool: asyncpg.Pool, when: float) -> int:
    """The last log position recorded at or before `when` (epoch seconds); 0 if none.

    recorded_at rises with seq (it is taken while the append lock is held, so in commit
    order), so a binary search over the primary key finds it in ~log2(n) index lookups;
    the log has only a BRIN index on recorded_at, which cannot answer "the last one before".
    """
    async with pool.acquire() as conn:
        lo, hi = await conn.fetchrow("SELECT min(seq), max(seq) FROM ledger.events")
        if lo is None:
            return 0
        at = "SELECT seq, extract(epoch FROM recorded_at)::float8 AS t FROM ledger.events WHERE seq >= $1 ORDER BY seq LIMIT 1"
        if (await conn.fetchrow(at, lo))["t"] > when:
            return 0
        # invariant: lo exists and was recorded by `when`; nothing after hi was
        while lo < hi:
            mid = (lo + hi + 1) // 2
            row = await conn.fetchrow(at, mid)
            if row is not None and row["seq"] <= hi and row["t"] <= when:
                lo = row["seq"]
            else:
                hi = mid - 1
        return lo


def now() -> float:
    return time.time()
