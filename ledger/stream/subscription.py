"""One subscription on one socket, and how it joins the live feed without a gap or a
duplicate at the seam.

Life of a subscription:
1. ``snapshot`` (no since): the current rows and the position S they reflect, read in one
   REPEATABLE READ transaction; position := S.  With ``since``: position := since.
2. ``catch-up``: matching rows with position < seq <= the hub's cursor, read from the
   database in batches (waiting for room in the socket's queue, so history never overflows).
3. ``buffering``: T := the hub's cursor; from now on the hub hands this subscription every
   row it dispatches (all > T) and they are kept aside; the last stretch (position, T] is
   read from the database.
4. ``live``: the kept rows are emitted (those > position), position := max(position, T),
   and the hub's rows go straight to the socket.
Steps 3-4 need no lock: the hub dispatches a batch and moves its cursor without awaiting,
so reading T and joining the buffer is atomic with respect to dispatch. Every emit skips
rows at or below `position`, which removes the overlap when a snapshot is ahead of the hub.
"""

from __future__ import annotations

import asyncio
import logging
from itertools import groupby
from typing import TYPE_CHECKING, Any

import orjson

from ledger.api.queries import Params
from ledger.stream import filters
from ledger.stream.topics import Change, LogEvent, TasksTopic, Topic

if TYPE_CHECKING:
    from ledger.stream.hub import Hub
    from ledger.stream.session import Session

log = logging.getLogger(__name__)

MAX_MEMBERS = 100_000  # tasks a filtered subscription remembers, to announce leavers
CATCH_UP_ROUNDS = 5  # bulk catch-up rounds before switching to buffering


class Subscription:
    def __init__(self, hub: Hub, session: Session, sub_id: str, topic: Topic, since: int | None) -> None:
        self.hub, self.session, self.id, self.topic, self.since = hub, session, sub_id, topic, since
        self.source = topic.source
        self.position = 0
        self.state = "starting"  # starting -> buffering -> live; closed
        self.buffer: list[tuple[int, list[Any]]] = []
        self.snapshot_sent = since is not None
        # a filtered task list with a state filter remembers what matched, to say when it stops
        self.members: dict[str, None] | None = (
            {} if isinstance(topic, TasksTopic) and topic.mutable else None
        )
        self._checked: set[str] = set()
        self.task: asyncio.Task[None] | None = None

    # --- called by the hub, synchronously -------------------------------------------------

    def on_rows(self, seq: int, rows: list[Any]) -> None:
        if self.state == "live":
            if seq > self.position:
                self.emit(seq, rows)
        elif self.state == "buffering":
            self.buffer.append((seq, rows))
            if len(self.buffer) > self.session.max_queue:
                self.session.overflow()

    def effective_position(self) -> int:
        """Everything matching at or below this has been handed to the socket's queue."""
        if self.state == "live":
            return max(self.position, self.hub.position(self.source))
        return self.position

    # --- emitting ------------------------------------------------------------------------

    def _select(self, rows: list[Any]) -> list[Any]:
        if not isinstance(self.topic, TasksTopic):
            return [r.item() for r in rows if self.topic.accepts(r)]
        out = []
        members = self.members
        for ch in rows:
            if ch.kind != "task":
                continue
            if filters.matches(self.topic.query, ch.data):
                out.append(_tagged(ch, True))
                if members is not None:
                    members[ch.key] = None
                    if len(members) > MAX_MEMBERS:
                        del members[next(iter(members))]
            elif members is not None and ch.key in members:
                del members[ch.key]
                out.append(_tagged(ch, False))
        return out

    def emit(self, seq: int, rows: list[Any]) -> None:
        items = self._select(rows)
        self.position = seq
        if not items:
            return
        if self.source == "events":
            for item in items:
                self.session.offer(
                    orjson.dumps({"type": "event", "sub": self.id, "seq": seq, "event": item}), self, seq)
        else:
            self.session.offer(
                orjson.dumps({"type": "changes", "sub": self.id, "seq": seq, "changes": items}), self, seq)

    # --- joining ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Snapshot or catch-up, then live. Runs as the session's task for this subscription."""
        hub, session = self.hub, self.session
        if self.since is None:
            items, seq = await hub.snapshot(self.topic)
            await session.room(1)
            self.position = seq
            if self.members is not None:
                self.members.update((i["key"], None) for i in items if i["kind"] == "task")
            session.offer(
                orjson.dumps({"type": "snapshot", "sub": self.id, "seq": seq, "items": items}), self, seq,
                snapshot=True)
        else:
            self.position = self.since
            await self.topic.prepare(hub.pool)
        for _ in range(CATCH_UP_ROUNDS):
            target = hub.position(self.source)
            if self.position >= target:
                break
            await self._catch_up(target)
        self.state = "buffering"
        target = hub.position(self.source)
        await self._catch_up(target)
        if self.members is not None and self.since is not None:
            await self._load_members(target)
            while keys := self._unchecked(r for _, rows in self.buffer for r in rows):
                await self._lookback(keys)
        buffered, self.buffer = self.buffer, []
        for seq, rows in buffered:
            if seq > self.position:
                self.emit(seq, rows)
        self.position = max(self.position, target)
        self._checked.clear()
        self.state = "live"
        session.offer(orjson.dumps({"type": "live", "sub": self.id, "seq": self.position}), self, self.position)

    async def _catch_up(self, upto: int) -> None:
        batch = max(1, min(500, self.session.max_queue // 2))
        while self.position < upto:
            await self.session.room(batch)
            rows, reached = await self.hub.fetch(self.topic, self.position, upto, batch)
            if self.members is not None and self.since is not None:
                keys = self._unchecked(rows)
                if keys:
                    await self._lookback(keys)
            for seq, group in groupby(rows, key=lambda r: r.seq):
                self.emit(seq, list(group))
            self.position = reached

    # --- leavers after a resume ----------------------------------------------------------
    # A resumed filtered subscription must announce tasks that matched at `since` and stop
    # matching later. Which tasks matched at `since`: for a task changed after `since`, its
    # last change at or before `since` (lookback); for a task unchanged since, its row now.

    def _unchecked(self, rows: Any) -> list[str]:
        """Keys seen here for the first time that do not match now: did they match at since?"""
        assert isinstance(self.topic, TasksTopic) and self.members is not None
        need = []
        for r in rows:
            if not isinstance(r, Change) or r.kind != "task" or r.key in self._checked:
                continue
            self._checked.add(r.key)
            if r.key not in self.members and not filters.matches(self.topic.query, r.data):
                need.append(r.key)
        return need

    async def _lookback(self, keys: list[str]) -> None:
        assert isinstance(self.topic, TasksTopic) and self.members is not None
        rows = await self.hub.pool.fetch(
            "SELECT DISTINCT ON (key) key, data FROM ledger.changes"
            " WHERE kind = 'task' AND key = ANY($1::text[]) AND seq <= $2 ORDER BY key, seq DESC",
            keys, self.since)
        for r in rows:
            if filters.matches(self.topic.query, r["data"]):
                self.members[r["key"]] = None

    async def _load_members(self, caught_up_to: int) -> None:
        """Tasks that matched at `since` and that catch-up did not meet: those unchanged
        since (their row now is their row then), and those changed after `caught_up_to`
        whose rows the hub may not have dispatched yet (lookback)."""
        assert isinstance(self.topic, TasksTopic) and self.members is not None
        p = Params()
        where = filters.where_sql(self.topic.query, p)
        rows = await self.hub.pool.fetch(
            f"SELECT task_id FROM ledger.tasks WHERE {where} AND last_seq <= {p(self.since)}"
            f" ORDER BY last_seq DESC LIMIT {p(MAX_MEMBERS)}", *p.values)
        for r in rows:
            if r["task_id"] not in self._checked:
                self.members[r["task_id"]] = None
        recent = await self.hub.pool.fetch(
            "SELECT task_id FROM ledger.tasks WHERE last_seq > $1 ORDER BY last_seq LIMIT $2", caught_up_to, MAX_MEMBERS)
        keys = [r["task_id"] for r in recent if r["task_id"] not in self._checked]
        if keys:
            self._checked.update(keys)
            await self._lookback(keys)


def _tagged(ch: Change, match: bool) -> orjson.Fragment:
    return orjson.Fragment(orjson.dumps({"kind": ch.kind, "key": ch.key, "match": match, "data": ch.data}))


__all__ = ["Subscription", "Change", "LogEvent"]
