"""What each subscription topic matches, in the change feed (live) and in SQL (snapshot and
catch-up). A topic only says *what* matches; `subscription.py` decides when it is sent."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import asyncpg
import orjson

from ledger.api.models import TaskListQuery
from ledger.api.queries import Params
from ledger.stream import filters
from ledger.stream.protocol import (
    SubscribeGroup,
    SubscribeLog,
    SubscribeTask,
    SubscribeTasks,
    SubscribeWorker,
    SubscribeWorkers,
)

CHANGE_COLUMNS = "seq, kind, key, data"
EVENT_COLUMNS = "seq, type, task_id, hostname, sent_at, clock, recorded_at, routing_key, payload"


@dataclass(slots=True)
class Change:
    """One row of ledger.changes; its JSON is encoded once, however many sockets get it."""

    seq: int
    kind: str
    key: str
    data: dict[str, Any]
    _fragment: orjson.Fragment | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> Change:
        return cls(r["seq"], r["kind"], r["key"], r["data"])

    def item(self) -> orjson.Fragment:
        if self._fragment is None:
            self._fragment = orjson.Fragment(orjson.dumps({"kind": self.kind, "key": self.key, "data": self.data}))
        return self._fragment


@dataclass(slots=True)
class LogEvent:
    seq: int
    type: str
    row: dict[str, Any]
    _fragment: orjson.Fragment | None = field(default=None, repr=False)

    @classmethod
    def from_record(cls, r: asyncpg.Record) -> LogEvent:
        return cls(r["seq"], r["type"], dict(r))

    def item(self) -> orjson.Fragment:
        if self._fragment is None:
            self._fragment = orjson.Fragment(orjson.dumps(self.row))
        return self._fragment


class Topic:
    source: ClassVar[str] = "changes"  # or "events" (the raw log)
    index: tuple[str, str | None]  # how the hub finds candidates quickly

    def accepts(self, change: Any) -> bool:
        raise NotImplementedError

    def where(self, p: Params) -> str:
        """Pre-filter on ledger.changes (alias c) or ledger.events for catch-up."""
        raise NotImplementedError

    async def prepare(self, conn: Any) -> None:
        """Anything the topic must know before catching up with `since`."""

    async def snapshot(self, conn: asyncpg.Connection) -> list[dict[str, Any]]:
        """Current rows as change items; runs inside the snapshot transaction."""
        return []


class TaskTopic(Topic):
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.index = ("task", task_id)

    def accepts(self, change: Change) -> bool:
        return change.kind == "task" and change.key == self.task_id

    def where(self, p: Params) -> str:
        return f"c.kind = 'task' AND c.key = {p(self.task_id)}"

    async def snapshot(self, conn: asyncpg.Connection) -> list[dict[str, Any]]:
        return _items("task", "task_id", await conn.fetch(
            "SELECT to_jsonb(t) AS data FROM ledger.tasks t WHERE t.task_id = $1", self.task_id))


class GroupTopic(Topic):
    """The group's own row and its member tasks. Celery sends a chord's callback with its
    header's group id, but it is not a member (as GET /v1/groups/{id} and Celery's
    GroupResult say): the callback is the group's chord_id, which the group row and every
    header member's row carry, so it is known before the callback's first change."""

    def __init__(self, group_id: str) -> None:
        self.group_id = group_id
        self.index = ("group", group_id)
        self.chord_id: str | None = None

    def accepts(self, change: Change) -> bool:
        data = change.data
        if change.kind == "group":
            if change.key != self.group_id:
                return False
            self.chord_id = self.chord_id or data.get("chord_id")
            return True
        if change.kind != "task" or data.get("group_id") != self.group_id:
            return False
        self.chord_id = self.chord_id or data.get("chord_id")
        return change.key != self.chord_id

    def where(self, p: Params) -> str:
        g = p(self.group_id)
        return f"((c.kind = 'group' AND c.key = {g}) OR (c.kind = 'task' AND c.data->>'group_id' = {g}))"

    async def prepare(self, conn: Any) -> None:
        self.chord_id = self.chord_id or await conn.fetchval(
            "SELECT chord_id FROM ledger.groups WHERE group_id = $1", self.group_id)

    async def snapshot(self, conn: asyncpg.Connection) -> list[dict[str, Any]]:
        group = await conn.fetch("SELECT to_jsonb(g) AS data FROM ledger.groups g WHERE g.group_id = $1", self.group_id)
        members = await conn.fetch(
            "SELECT to_jsonb(t) AS data FROM ledger.tasks t WHERE t.group_id = $1"
            " AND t.task_id IS DISTINCT FROM (SELECT chord_id FROM ledger.groups WHERE group_id = $1)"
            " ORDER BY t.group_index NULLS LAST, t.first_seq", self.group_id)
        if group:
            self.chord_id = self.chord_id or group[0]["data"].get("chord_id")
        return _items("group", "group_id", group) + _items("task", "task_id", members)


class WorkerTopic(Topic):
    def __init__(self, hostname: str | None) -> None:
        self.hostname = hostname  # None: every worker
        self.index = ("worker", hostname) if hostname is not None else ("workers", None)

    def accepts(self, change: Change) -> bool:
        return change.kind == "worker" and (self.hostname is None or change.key == self.hostname)

    def where(self, p: Params) -> str:
        if self.hostname is None:
            return "c.kind = 'worker'"
        return f"c.kind = 'worker' AND c.key = {p(self.hostname)}"

    async def snapshot(self, conn: asyncpg.Connection) -> list[dict[str, Any]]:
        if self.hostname is None:
            rows = await conn.fetch("SELECT to_jsonb(w) AS data FROM ledger.workers w ORDER BY w.hostname")
        else:
            rows = await conn.fetch("SELECT to_jsonb(w) AS data FROM ledger.workers w WHERE w.hostname = $1",
                                    self.hostname)
        return _items("worker", "hostname", rows)


class TasksTopic(Topic):
    """The task list under the filters of GET /v1/tasks."""

    index = ("tasks", None)

    def __init__(self, query: TaskListQuery, limit: int) -> None:
        self.query, self.limit = query, limit
        self.mutable = filters.is_mutable(query)

    def accepts(self, change: Change) -> bool:
        return change.kind == "task" and filters.matches(self.query, change.data)

    def where(self, p: Params) -> str:
        return "c.kind = 'task'"  # leavers do not match the filter any more: decide in Python

    async def snapshot(self, conn: asyncpg.Connection) -> list[dict[str, Any]]:
        if self.limit == 0:
            return []
        p = Params()
        where = filters.where_sql(self.query, p)
        rows = await conn.fetch(
            f"SELECT to_jsonb(t) AS data FROM ledger.tasks t WHERE {where}"
            f" ORDER BY t.last_seq DESC LIMIT {p(self.limit)}", *p.values)
        return _items("task", "task_id", rows)


class LogTopic(Topic):
    source = "events"
    index = ("log", None)

    def __init__(self, types: list[str] | None) -> None:
        types = types or []
        self.exact = frozenset(t for t in types if not t.endswith("*"))
        self.prefixes = tuple(t[:-1] for t in types if t.endswith("*"))
        self.everything = not types or "" in self.prefixes

    def accepts(self, event: LogEvent) -> bool:
        return self.everything or event.type in self.exact or event.type.startswith(self.prefixes)

    def where(self, p: Params) -> str:
        if self.everything:
            return "TRUE"
        clauses = []
        if self.exact:
            clauses.append(f"c.type = ANY({p(sorted(self.exact))}::text[])")
        for prefix in self.prefixes:
            clauses.append(f"starts_with(c.type, {p(prefix)})")
        return "(" + " OR ".join(clauses) + ")"


def _items(kind: str, key_column: str, rows: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [{"kind": kind, "key": r["data"][key_column], "data": r["data"]} for r in rows]


def topic_for(message: Any) -> Topic:
    if isinstance(message, SubscribeTask):
        return TaskTopic(message.task_id)
    if isinstance(message, SubscribeGroup):
        return GroupTopic(message.group_id)
    if isinstance(message, SubscribeWorker):
        return WorkerTopic(message.hostname)
    if isinstance(message, SubscribeWorkers):
        return WorkerTopic(None)
    if isinstance(message, SubscribeTasks):
        return TasksTopic(message.query, message.limit)
    if isinstance(message, SubscribeLog):
        return LogTopic(message.types)
    raise TypeError(f"not a subscribe message: {message!r}")
