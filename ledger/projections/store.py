"""Reading and writing the projection tables, their checkpoints and the change feed.

A batch is written by ONE statement (:func:`prepare_batch`): a fence (the stored checkpoint
is the one the batch was folded on), one upsert per table (arrays through ``unnest``), the
``ledger.changes`` rows (``to_jsonb`` of the rows as written), the checkpoint and the NOTIFY
``ledger_changes`` - atomic on its own and a single round trip, which keeps push latency
low. Big batches (rebuild) COPY their new tasks first, in the same transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from ledger import db
from ledger.projections.fold import Fold, group_row_out, name_row_out
from ledger.projections.task_state import TASK_COLUMNS, task_row_in, task_row_out, to_text
from ledger.projections.worker_state import WORKER_COLUMNS, worker_row_out

NOTIFY_CHANNEL = "ledger_changes"
#: One checkpoint row per projection, all written together.
PROJECTIONS = ("tasks", "groups", "workers", "task_names")
#: Tables `ledger rebuild` empties (the log itself is never touched).
ALL_TABLES = ("tasks", "groups", "workers", "task_names", "changes", "checkpoints")

_PG_TYPES = {"text": "text", "float": "float8", "int": "int4", "bigint": "int8", "json": "text", "float[]": "text"}
_GROUP_TYPES = {
    "group_id": "text", "chord_id": "text", "size": "int", "states": "json",
    "first_seen": "float", "last_seen": "float", "first_seq": "bigint", "last_seq": "bigint",
}
_NAME_TYPES = {"name": "text", "tasks": "bigint", "first_seen": "float", "last_seen": "float", "last_seq": "bigint"}


def _quote(column: str) -> str:
    return f'"{column}"'


def _upsert_sql(table: str, columns: dict[str, str], key: str, first: int, returning: str) -> str:
    """INSERT ... SELECT FROM unnest(one array per column, from $first) ON CONFLICT (key)
    DO UPDATE every column, only if the fence holds. json and float[] travel as text."""
    names = list(columns)
    params = ", ".join(f"${i}::{_PG_TYPES[columns[c]]}[]" for i, c in enumerate(names, first))
    selected = []
    for c in names:
        if columns[c] == "json":
            selected.append(f"u.{_quote(c)}::jsonb")
        elif columns[c] == "float[]":
            # a 2-D unnest cannot carry arrays: '{1.0,2.0}' literals travel as text
            selected.append(f"u.{_quote(c)}::float8[]")
        else:
            selected.append(f"u.{_quote(c)}")
    updates = ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in names if c != key)
    return (
        f"INSERT INTO ledger.{table} ({', '.join(map(_quote, names))}) "
        f"SELECT {', '.join(selected)} FROM unnest({params}) AS u({', '.join(map(_quote, names))}) "
        f"WHERE (SELECT ok FROM fence) "
        f"ON CONFLICT ({_quote(key)}) DO UPDATE SET {updates} RETURNING {returning}"
    )


READ_EVENTS = """
SELECT seq, type, payload, extract(epoch FROM recorded_at)::float8 AS recorded_at
FROM ledger.events WHERE seq > $1 ORDER BY seq LIMIT $2
"""


class CheckpointMoved(RuntimeError):
    """Someone else wrote the projections since we read the checkpoint: stop writing."""


async def read_checkpoint(conn: asyncpg.Connection, *, for_update: bool = False) -> int:
    """The position every projection has applied (0 when nothing yet).

    Readers (API /readyz, the stream) use this for the projector's lag."""
    lock = " FOR UPDATE" if for_update else ""
    rows = await conn.fetch(
        f"SELECT seq FROM ledger.checkpoints WHERE projection = ANY($1::text[]){lock}", list(PROJECTIONS)
    )
    return min((r["seq"] for r in rows), default=0) if len(rows) == len(PROJECTIONS) else 0


async def read_events(conn: asyncpg.Connection, after: int, limit: int) -> list[asyncpg.Record]:
    """The next events as (seq, type, payload, recorded_at epoch seconds) records."""
    return await conn.fetch(READ_EVENTS, after, limit)


def _needed(events: Sequence[Any]) -> tuple[set[str], set[str], set[str], set[str]]:
    """Keys of the rows a batch of events may touch: tasks, hostnames, groups, names."""
    tasks: set[str] = set()
    hosts: set[str] = set()
    groups: set[str] = set()
    names: set[str] = set()
    for _, type_, payload, _ in events:
        if type(payload) is not dict:
            continue
        hostname = payload.get("hostname")
        if type(hostname) is str and not type_.startswith("ledger-") and type_ != "task-sent":
            hosts.add(hostname)
        task_id = payload.get("uuid")
        if type(task_id) is str:
            tasks.add(task_id)
        group_id = to_text(payload.get("group_id"))
        if group_id is not None:
            groups.add(group_id)
        name = to_text(payload.get("name"))
        if name is not None:
            names.add(name)
    return tasks, hosts, groups, names


async def load_rows(conn: asyncpg.Connection, fold: Fold, events: Sequence[Any]) -> None:
    """Put into ``fold`` every stored row the events may change that it does not hold yet."""
    if fold.holds_all_others:
        if fold.holds_all_tasks:
            return
        # only evicted task rows can be missing; their groups and names are held
        wanted = {e[2].get("uuid") for e in events if type(e[2]) is dict}
        missing = [t for t in wanted.difference(fold.tasks) if type(t) is str]
        if missing:
            for record in await conn.fetch("SELECT * FROM ledger.tasks WHERE task_id = ANY($1::text[])", missing):
                fold.tasks[record["task_id"]] = task_row_in(record)
        return
    tasks, hosts, groups, names = _needed(events)
    missing = [t for t in tasks if t not in fold.tasks]
    if missing:
        for record in await conn.fetch("SELECT * FROM ledger.tasks WHERE task_id = ANY($1::text[])", missing):
            row = task_row_in(record)
            fold.tasks[row["task_id"]] = row
            if row["group_id"] is not None:
                groups.add(row["group_id"])
            if row["name"] is not None:
                names.add(row["name"])
    # Rows the fold already holds reference groups and names that must be held too.
    for task_id in tasks:
        row = fold.tasks.get(task_id)
        if row is not None:
            for key, into in (("group_id", groups), ("name", names)):
                value = to_text(row[key])
                if value is not None:
                    into.add(value)
    for table, key, wanted, into, convert in (
        ("groups", "group_id", groups, fold.groups, dict),
        ("workers", "hostname", hosts, fold.workers, dict),
        ("task_names", "name", names, fold.task_names, dict),
    ):
        missing = [k for k in wanted if k not in into]
        if missing:
            for record in await conn.fetch(f"SELECT * FROM ledger.{table} WHERE {key} = ANY($1::text[])", missing):
                row = convert(record)
                if table == "groups":
                    row["states"] = dict(row["states"] or {})
                into[row[key]] = row


def _columns(rows: Sequence[dict[str, Any]], columns: dict[str, str]) -> list[list[Any]]:
    arrays = []
    for column, kind in columns.items():
        if kind == "json":
            arrays.append([orjson.dumps(r[column]).decode() for r in rows])
        elif kind == "float[]":
            arrays.append(
                [None if r[column] is None else "{" + ",".join(repr(v) for v in r[column]) + "}" for r in rows]
            )
        else:
            arrays.append([r[column] for r in rows])
    return arrays


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection for the projector: jsonb in binary format, so new task rows can be
    written with COPY (asyncpg's binary COPY needs a binary codec for every column), and
    asynchronous commit."""
    conn = await db.connect(dsn)
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )
    # Projections are derived data: a crash may lose the last commits' flush, but each
    # commit carries its checkpoint, so what is lost is simply folded again from the log.
    # Not waiting for the WAL flush takes milliseconds off every batch (push latency).
    await conn.execute("SET synchronous_commit = off")
    return conn


#: Below this many new tasks a batch writes them with the one statement; above, with COPY.
COPY_THRESHOLD = 200

# (upsert table, CTE name, columns, key, change kind or None)
_TABLES = (
    ("tasks", "t", TASK_COLUMNS, "task_id", "task"),
    ("groups", "g", _GROUP_TYPES, "group_id", "group"),
    ("workers", "w", WORKER_COLUMNS, "hostname", "worker"),
    ("task_names", "n", _NAME_TYPES, "name", None),
)


@dataclass(slots=True)
class PreparedBatch:
    """Everything one batch writes, serialised from the fold: once prepared, the fold may
    move on (rebuild folds the next batch while this one is being written)."""

    previous: int  # the checkpoint the stored rows reflect
    checkpoint: int  # the checkpoint this batch brings them to
    copy_tasks: list[tuple[Any, ...]] = field(default_factory=list)
    sql: str = ""
    args: list[Any] = field(default_factory=list)


def _batch_sql(present: tuple[bool, ...], copied: bool, changes: bool) -> tuple[str, int]:
    """One statement writing a batch: the fence (the stored checkpoint is the one the batch
    was folded on), the upserts, the change feed (``to_jsonb`` of the rows as written), the
    checkpoint and the NOTIFY. Every write is conditioned on the fence, so a failed fence
    writes nothing; the statement returns whether it held. Parameters: $1 projections,
    $2 previous, $3 checkpoint, then each present table's arrays, then (key, seq) arrays
    per change kind."""
    ctes = [
        "fence AS (SELECT (SELECT CASE WHEN count(*) = cardinality($1::text[]) THEN min(seq) ELSE 0 END"
        " FROM ledger.checkpoints WHERE projection = ANY($1::text[])) = $2::int8 AS ok)"
    ]
    n = 4
    for (table, alias, columns, key, kind), here in zip(_TABLES, present):
        if here:
            ctes.append(f"{alias} AS ({_upsert_sql(table, columns, key, n, '*' if kind else '1')})")
            n += len(columns)
    feeds = []
    if changes:
        for (table, alias, columns, key, kind), here in zip(_TABLES, present):
            if kind and here:
                feeds.append(
                    f"SELECT u.seq, '{kind}', x.{key}, to_jsonb(x) FROM {alias} x"
                    f" JOIN unnest(${n}::text[], ${n + 1}::int8[]) AS u(key, seq) ON x.{key} = u.key"
                )
                n += 2
        if copied:  # COPYed earlier in this transaction: visible in the table itself
            feeds.append(
                f"SELECT u.seq, 'task', x.task_id, to_jsonb(x) FROM ledger.tasks x"
                f" JOIN unnest(${n}::text[], ${n + 1}::int8[]) AS u(key, seq) ON x.task_id = u.key"
                f" WHERE (SELECT ok FROM fence)"
            )
            n += 2
    if feeds:
        ctes.append(f"c AS (INSERT INTO ledger.changes (seq, kind, key, data) {' UNION ALL '.join(feeds)} RETURNING 1)")
    ctes.append(
        "cp AS (INSERT INTO ledger.checkpoints (projection, seq, updated_at)"
        " SELECT p, $3::int8, now() FROM unnest($1::text[]) AS p WHERE (SELECT ok FROM fence)"
        " ON CONFLICT (projection) DO UPDATE SET seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at RETURNING 1)"
    )
    sql = (
        "WITH " + ",\n".join(ctes) + "\nSELECT ok, CASE WHEN ok THEN pg_notify('" + NOTIFY_CHANNEL + "', $3::int8::text) END,"
        " (SELECT count(*) FROM cp) FROM fence"
    )
    return sql, n - 1


def prepare_batch(fold: Fold, previous: int, checkpoint: int, *, changes: bool = True) -> PreparedBatch:
    """Serialise what ``fold`` changed since the last batch into one statement.

    A task first seen after ``previous`` cannot be stored yet (one writer, fenced by the
    checkpoint): when there are many such tasks (rebuild), they go by COPY beforehand."""
    batch = PreparedBatch(previous, checkpoint)
    changed = fold.take_changed()
    changed_tasks = changed[0]
    task_rows = [task_row_out(fold.tasks[k]) for k in changed_tasks]
    new_count = sum(1 for r in task_rows if r["first_seq"] > previous)
    copied: dict[str, int] = {}
    if new_count >= COPY_THRESHOLD:
        upserted = []
        for row in task_rows:
            if row["first_seq"] > previous:
                batch.copy_tasks.append(tuple(row.values()))
                copied[row["task_id"]] = changed_tasks[row["task_id"]]
            else:
                upserted.append(row)
        task_rows = upserted
    rows_by_table = (
        task_rows,
        [group_row_out(fold.groups[k]) for k in changed[1]],
        [worker_row_out(fold.workers[k]) for k in changed[2]],
        [name_row_out(fold.task_names[k]) for k in changed[3]],
    )
    present = tuple(bool(rows) for rows in rows_by_table)
    sql, count = _batch_sql(present, bool(copied), changes)
    args: list[Any] = [list(PROJECTIONS), previous, checkpoint]
    for (_, _, columns, _, _), rows in zip(_TABLES, rows_by_table):
        if rows:
            args += _columns(rows, columns)
    if changes:
        for (_, _, _, key, kind), rows, keyed in zip(_TABLES, rows_by_table, changed):
            if kind and rows:
                keys = [r[key] for r in rows]
                args += [keys, [keyed[k] for k in keys]]
        if copied:
            args += [list(copied), list(copied.values())]
    assert len(args) == count, (len(args), count)
    batch.sql, batch.args = sql, args
    return batch


async def commit_batch(conn: asyncpg.Connection, batch: PreparedBatch) -> None:
    """Write a prepared batch: one statement (atomic on its own), or COPY + that statement in
    one transaction. Raises CheckpointMoved, writing nothing, if the stored checkpoint is not
    the one the batch was folded on. The commit NOTIFYs ``ledger_changes``."""
    if batch.copy_tasks:
        async with conn.transaction():
            await conn.copy_records_to_table(
                "tasks", schema_name="ledger", columns=list(TASK_COLUMNS), records=batch.copy_tasks
            )
            ok = await conn.fetchval(batch.sql, *batch.args)
            if not ok:
                raise CheckpointMoved(f"the stored checkpoint is not {batch.previous}")
    else:
        ok = await conn.fetchval(batch.sql, *batch.args)
        if not ok:
            raise CheckpointMoved(f"the stored checkpoint is not {batch.previous}")


_FINAL_CHANGES = """
INSERT INTO ledger.changes (seq, kind, key, data)
SELECT last_seq, '{kind}', {key}, to_jsonb(x) FROM ledger.{table} x ORDER BY last_seq
"""


async def write_final_changes(conn: asyncpg.Connection) -> int:
    """One change per task, group and worker: its row, at the last seq that changed it.
    `ledger rebuild` writes the feed this way at the end instead of batch by batch (the
    same rows a client resuming from any position needs, at a fraction of the cost)."""
    written = 0
    async with conn.transaction():
        for kind, table, key in (("task", "tasks", "task_id"), ("group", "groups", "group_id"), ("worker", "workers", "hostname")):
            status = await conn.execute(_FINAL_CHANGES.format(kind=kind, table=table, key=key))
            written += int(status.split()[-1])
    return written


async def truncate_all(conn: asyncpg.Connection) -> None:
    await conn.execute("TRUNCATE " + ", ".join(f"ledger.{t}" for t in ALL_TABLES))


#: Tables whose secondary indexes a rebuild drops and recreates (the large ones).
REBUILD_INDEXED_TABLES = ("tasks", "changes")

_SECONDARY_INDEXES = """
SELECT i.indexname, i.indexdef FROM pg_indexes i
WHERE i.schemaname = 'ledger' AND i.tablename = ANY($1::text[])
  AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                  WHERE c.conname = i.indexname AND c.connamespace = 'ledger'::regnamespace)
ORDER BY i.indexname
"""


async def drop_secondary_indexes(conn: asyncpg.Connection) -> list[str]:
    """Drop the non-constraint indexes of the big tables, keeping their definitions in
    ledger.rebuild_dropped_indexes (same transaction) until :func:`restore_indexes`."""
    async with conn.transaction():
        indexes = await conn.fetch(_SECONDARY_INDEXES, list(REBUILD_INDEXED_TABLES))
        await conn.executemany(
            "INSERT INTO ledger.rebuild_dropped_indexes (name, definition) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            [(r["indexname"], r["indexdef"]) for r in indexes],
        )
        for r in indexes:
            await conn.execute(f'DROP INDEX ledger."{r["indexname"]}"')
    return [r["indexname"] for r in indexes]


async def restore_indexes(conn: asyncpg.Connection, table: str | None = None) -> list[str]:
    """Recreate every index a rebuild dropped (also after a rebuild died half way), or
    only those on ``table``."""
    restored = []
    for r in await conn.fetch(
        "SELECT name, definition FROM ledger.rebuild_dropped_indexes"
        " WHERE $1::text IS NULL OR definition LIKE '% ON ledger.' || $1::text || ' %' ORDER BY name",
        table,
    ):
        async with conn.transaction():
            exists = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_indexes WHERE schemaname = 'ledger' AND indexname = $1)", r["name"]
            )
            if not exists:
                await conn.execute(r["definition"])  # pg_get_indexdef() output, as PostgreSQL wrote it
            await conn.execute("DELETE FROM ledger.rebuild_dropped_indexes WHERE name = $1", r["name"])
        restored.append(r["name"])
    return restored


__all__ = [
    "ALL_TABLES",
    "NOTIFY_CHANNEL",
    "PROJECTIONS",
    "CheckpointMoved",
    "PreparedBatch",
    "commit_batch",
    "connect",
    "drop_secondary_indexes",
    "load_rows",
    "prepare_batch",
    "read_checkpoint",
    "read_events",
    "restore_indexes",
    "truncate_all",
    "write_final_changes",
]
