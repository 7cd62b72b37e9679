"""Reading and writing the projection tables, their checkpoints and the change feed.

Everything a batch changed is written in bulk - tasks seen for the first time with COPY, the
other rows with one upsert per table (arrays through ``unnest``) - in the same transaction
as the checkpoint and the ``ledger.changes`` rows (built in the database from the rows just
written, ``to_jsonb(row)``), and the commit NOTIFYs ``ledger_changes`` with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import orjson

from ledger import db
from ledger.projections.fold import GROUP_COLUMNS, NAME_COLUMNS, Fold, event_parts, group_row_out, name_row_out
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


def _upsert_sql(table: str, columns: dict[str, str], key: str) -> str:
    """INSERT ... SELECT FROM unnest(one array per column) ON CONFLICT (key) DO UPDATE all.

    json and float[] columns travel as text, cast in the SELECT."""
    names = list(columns)
    params = ", ".join(f"${i}::{_PG_TYPES[columns[c]]}[]" for i, c in enumerate(names, 1))
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
        f"ON CONFLICT ({_quote(key)}) DO UPDATE SET {updates}"
    )


_UPSERT_TASKS = _upsert_sql("tasks", TASK_COLUMNS, "task_id")
_UPSERT_GROUPS = _upsert_sql("groups", _GROUP_TYPES, "group_id")
_UPSERT_NAMES = _upsert_sql("task_names", _NAME_TYPES, "name")
_UPSERT_WORKERS = _upsert_sql("workers", WORKER_COLUMNS, "hostname")

_WRITE_CHECKPOINT = """
INSERT INTO ledger.checkpoints (projection, seq, updated_at)
SELECT p, $2, now() FROM unnest($1::text[]) AS p
ON CONFLICT (projection) DO UPDATE SET seq = EXCLUDED.seq, updated_at = EXCLUDED.updated_at
"""

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


async def read_events(conn: asyncpg.Connection, after: int, limit: int) -> list[tuple[int, str, Any, float | None]]:
    records = await conn.fetch(READ_EVENTS, after, limit)
    return [(r[0], r[1], r[2], r[3]) for r in records]


def _needed(events: Sequence[tuple[int, str, Any, float | None]]) -> tuple[set[str], set[str], set[str], set[str]]:
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


async def load_rows(conn: asyncpg.Connection, fold: Fold, events: Sequence[tuple[int, str, Any, float | None]]) -> None:
    """Put into ``fold`` every stored row the events may change that it does not hold yet."""
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


_CHANGES_FROM = {
    # kind -> (table, key column): the change row's data is the stored row, as JSON
    "task": ("tasks", "task_id"),
    "group": ("groups", "group_id"),
    "worker": ("workers", "hostname"),
}
_INSERT_CHANGES_FROM = {
    kind: f"""
INSERT INTO ledger.changes (seq, kind, key, data)
SELECT u.seq, '{kind}', t.{key}, to_jsonb(t)
FROM unnest($1::text[], $2::int8[]) AS u(key, seq) JOIN ledger.{table} t ON t.{key} = u.key
"""
    for kind, (table, key) in _CHANGES_FROM.items()
}


async def connect(dsn: str) -> asyncpg.Connection:
    """A connection for the projector: jsonb in binary format, so new task rows can be
    written with COPY (asyncpg's binary COPY needs a binary codec for every column)."""
    conn = await db.connect(dsn)
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        encoder=lambda value: b"\x01" + orjson.dumps(value),
        decoder=lambda data: orjson.loads(data[1:]),
        format="binary",
    )
    return conn


@dataclass(slots=True)
class PreparedBatch:
    """Everything one batch writes, serialised from the fold: once prepared, the fold may
    move on (rebuild folds the next batch while this one is being written)."""

    previous: int  # the checkpoint the stored rows reflect
    checkpoint: int  # the checkpoint this batch brings them to
    new_tasks: list[tuple[Any, ...]] = field(default_factory=list)
    statements: list[tuple[str, list[list[Any]]]] = field(default_factory=list)
    changes: list[tuple[str, list[str], list[int]]] = field(default_factory=list)


def prepare_batch(fold: Fold, previous: int, checkpoint: int, *, changes: bool = True) -> PreparedBatch:
    """Serialise what ``fold`` changed since the last batch.

    A task first seen after ``previous`` cannot be stored yet (one writer, fenced by the
    checkpoint), so new tasks go by COPY and only the others by upsert."""
    batch = PreparedBatch(previous, checkpoint)
    changed_tasks, changed_groups, changed_workers, changed_names = fold.take_changed()
    if changed_tasks:
        tasks = fold.tasks
        old = []
        for key in changed_tasks:
            row = task_row_out(tasks[key])
            if row["first_seq"] > previous:
                batch.new_tasks.append(tuple(row.values()))
            else:
                old.append(row)
        if old:
            batch.statements.append((_UPSERT_TASKS, _columns(old, TASK_COLUMNS)))
    if changed_groups:
        rows = [group_row_out(fold.groups[k]) for k in changed_groups]
        batch.statements.append((_UPSERT_GROUPS, _columns(rows, _GROUP_TYPES)))
    if changed_workers:
        rows = [worker_row_out(fold.workers[k]) for k in changed_workers]
        batch.statements.append((_UPSERT_WORKERS, _columns(rows, WORKER_COLUMNS)))
    if changed_names:
        rows = [name_row_out(fold.task_names[k]) for k in changed_names]
        batch.statements.append((_UPSERT_NAMES, _columns(rows, _NAME_TYPES)))
    if changes:
        for kind, changed in (("task", changed_tasks), ("group", changed_groups), ("worker", changed_workers)):
            if changed:
                batch.changes.append((_INSERT_CHANGES_FROM[kind], list(changed), list(changed.values())))
    return batch


async def commit_batch(conn: asyncpg.Connection, batch: PreparedBatch) -> None:
    """Write a prepared batch, its change feed and checkpoint in one transaction, after
    checking (FOR UPDATE) that the stored checkpoint is the one the batch was folded on;
    the commit NOTIFYs ``ledger_changes``."""
    async with conn.transaction():
        stored = await read_checkpoint(conn, for_update=True)
        if stored != batch.previous:
            raise CheckpointMoved(f"checkpoint is {stored}, expected {batch.previous}")
        if batch.new_tasks:
            await conn.copy_records_to_table(
                "tasks", schema_name="ledger", columns=list(TASK_COLUMNS), records=batch.new_tasks
            )
        for statement, arrays in batch.statements:
            await conn.execute(statement, *arrays)
        for statement, keys, seqs in batch.changes:  # after the rows: data is the stored row
            await conn.execute(statement, keys, seqs)
        await conn.execute(_WRITE_CHECKPOINT, list(PROJECTIONS), batch.checkpoint)
        await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(batch.checkpoint))


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


async def restore_indexes(conn: asyncpg.Connection) -> list[str]:
    """Recreate every index a rebuild dropped (also after a rebuild died half way)."""
    restored = []
    for r in await conn.fetch("SELECT name, definition FROM ledger.rebuild_dropped_indexes ORDER BY name"):
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
    "commit_batch",
    "connect",
    "prepare_batch",
    "PreparedBatch",
    "drop_secondary_indexes",
    "restore_indexes",
    "GROUP_COLUMNS",
    "NAME_COLUMNS",
    "event_parts",
    "load_rows",
    "read_checkpoint",
    "read_events",
    "truncate_all",
    "write_batch",
]
