"""The per-replica fan-out hub.

One LISTEN connection per replica. A NOTIFY (``ledger_changes`` from the projector,
``ledger_events`` from the recorder) is only a wake-up: the hub then reads
``ledger.changes WHERE seq > cursor ORDER BY seq`` (and ``ledger.events`` while someone
subscribes to the raw log) and dispatches each row to the matching subscriptions. It also
reads on a timer, so a lost notification costs latency, never data. Both tables are
commit-ordered by seq (the append lock; the single projector), so tailing by position
never skips a row that commits late.

Dispatch never awaits: rows go into each socket's bounded queue (`Session.offer`), and a
socket that cannot keep up is cut off there, so no subscriber can delay another.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from itertools import groupby
from typing import Any

import asyncpg

from ledger import db
from ledger.api.queries import Params
from ledger.log.recorder import NOTIFY_CHANNEL as EVENTS_CHANNEL
from ledger.stream.filters import FINAL_STATES
from ledger.stream.subscription import Subscription
from ledger.stream.topics import CHANGE_COLUMNS, EVENT_COLUMNS, Change, LogEvent, Topic

log = logging.getLogger(__name__)

CHANGES_CHANNEL = "ledger_changes"
PUMP_BATCH = 5000

_MAX_SEQ = {
    # the projections' checkpoint counts too: a batch may change nothing visible, and the
    # next change is past the checkpoint either way
    "changes": "SELECT greatest((SELECT coalesce(max(seq), 0) FROM ledger.changes),"
               " (SELECT coalesce(min(seq), 0) FROM ledger.checkpoints))",
    "events": "SELECT coalesce(max(seq), 0) FROM ledger.events",
}


class Hub:
    def __init__(self, dsn: str, pool: asyncpg.Pool, *, poll_interval: float = 1.0) -> None:
        self.dsn, self.pool, self.poll_interval = dsn, pool, poll_interval
        self._cursor = {"changes": 0, "events": 0}
        self._index: dict[tuple[str, str | None], set[Subscription]] = defaultdict(set)
        self._log_subs = 0
        self._events_end = 0  # the log's committed end, as far as we know
        self.waiters: dict[str, set[asyncio.Future[dict[str, Any]]]] = defaultdict(set)
        self.sessions: set[Any] = set()
        self._wake = asyncio.Event()
        self._due = {"changes": True, "events": True, "timer": True}  # what a wake-up is for
        self._listen: asyncpg.Connection | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.started = asyncio.Event()
        self.dispatched = 0  # positions dispatched, for tests and metrics

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._connect()
        self._task = asyncio.create_task(self._run(), name="stream-hub")
        self.started.set()

    async def stop(self) -> None:
        self._stopping = True
        for session in list(self.sessions):
            session.shutdown()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._close_listen()

    async def _connect(self) -> None:
        async def connect() -> asyncpg.Connection:
            conn = await db.connect(self.dsn)
            await conn.add_listener(CHANGES_CHANNEL, self._on_notify)
            await conn.add_listener(EVENTS_CHANNEL, self._on_notify)
            conn.add_termination_listener(lambda _c: self._wake_all())
            return conn

        self._listen = await db.retry("stream hub LISTEN", connect)
        if not self.started.is_set():
            # Start at the current end: history is read per subscription, from the database.
            # On a reconnect the cursors stay: the next pump reads what was missed meanwhile.
            for source, sql in _MAX_SEQ.items():
                self._cursor[source] = await self._listen.fetchval(sql)

    async def _close_listen(self) -> None:
        if self._listen is not None and not self._listen.is_closed():
            try:
                await asyncio.wait_for(self._listen.close(), 2)
            except Exception:  # a connection already broken is as good as closed
                self._listen.terminate()
        self._listen = None

    def _wake_all(self) -> None:
        self._due["changes"] = self._due["events"] = self._due["timer"] = True
        self._wake.set()

    def _on_notify(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        if channel == EVENTS_CHANNEL:
            try:  # the recorder's payload: the last seq of a committed append
                self._events_end = max(self._events_end, int(payload))
            except ValueError:
                pass
            if self._log_subs == 0:
                # Nobody wants the raw log: follow its end, no query needed.
                self._cursor["events"] = max(self._cursor["events"], self._events_end)
                return
            self._due["events"] = True
        else:
            self._due["changes"] = True
        self._wake.set()

    async def _run(self) -> None:
        backoff = db.Backoff()
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_interval)
            except asyncio.TimeoutError:
                self._wake_all()  # the timer: read both feeds, in case a NOTIFY was lost
            self._wake.clear()
            try:
                if self._listen is None or self._listen.is_closed():
                    await self._close_listen()
                    await self._connect()
                await self._pump()
                backoff.reset()
            except db.TRANSIENT_ERRORS as exc:
                delay = backoff.next_delay()
                log.warning("stream hub lost the database (%s); retrying in %.1fs", exc, delay)
                await self._close_listen()
                self._wake_all()
                await asyncio.sleep(delay)
            except Exception:
                log.exception("stream hub pump failed; retrying")
                self._wake_all()
                await asyncio.sleep(backoff.next_delay())

    async def _pump(self) -> None:
        assert self._listen is not None
        conn = self._listen
        # clear a flag before reading its feed: a NOTIFY arriving during the read sets it again
        if self._due["changes"]:
            self._due["changes"] = False
            while True:
                rows, reached, more = await _read(
                    conn, "changes", self._cursor["changes"], None, "TRUE", [], PUMP_BATCH)
                self._dispatch_changes(rows, reached)
                if not more:
                    break
        if not self._due["events"]:
            return
        self._due["events"] = False
        if self._due["timer"] or not self._events_end:
            self._due["timer"] = False
            # a NOTIFY may have been lost: learn the end of the log from the table
            self._events_end = max(self._events_end, await conn.fetchval(_MAX_SEQ["events"]))
        if not self._log_subs:
            self._cursor["events"] = max(self._cursor["events"], self._events_end)
            return
        # Read only the events some subscription wants (and only up to a known end, so the
        # cursor passes the rows nobody wants).
        p = Params()
        for _ in range(3):
            p(None)  # $1..$3 are _read's
        where = _union_where(self._index.get(("log", None), ()), p)
        upto = self._events_end
        while True:
            rows, reached, more = await _read(
                conn, "events", self._cursor["events"], upto, where, p.values[3:], PUMP_BATCH)
            self._dispatch_events(rows, reached if more else upto)
            if not more:
                break

    # --- dispatch (never awaits) -----------------------------------------------------------

    def _dispatch_changes(self, rows: list[Change], reached: int) -> None:
        index = self._index
        for seq, group in groupby(rows, key=lambda r: r.seq):
            targets: dict[Subscription, list[Change]] = {}
            for ch in group:
                if ch.kind == "task":
                    keys = [("task", ch.key), ("tasks", None)]
                    group_id = ch.data.get("group_id")
                    if group_id is not None:
                        keys.append(("group", group_id))
                    if ch.key in self.waiters and ch.data.get("state") in FINAL_STATES:
                        for fut in self.waiters.pop(ch.key):
                            if not fut.done():
                                fut.set_result(ch.data)
                elif ch.kind == "worker":
                    keys = [("worker", ch.key), ("workers", None)]
                else:
                    keys = [(ch.kind, ch.key)]
                for key in keys:
                    subs = index.get(key)
                    if subs:
                        for sub in subs:
                            targets.setdefault(sub, []).append(ch)
            for sub, matched in targets.items():
                sub.on_rows(seq, matched)
            self.dispatched += 1
        self._cursor["changes"] = max(self._cursor["changes"], reached)

    def _dispatch_events(self, rows: list[LogEvent], reached: int) -> None:
        subs = tuple(self._index.get(("log", None), ()))
        for ev in rows:
            for sub in subs:
                sub.on_rows(ev.seq, [ev])
        self._cursor["events"] = max(self._cursor["events"], reached)

    # --- subscriptions ---------------------------------------------------------------------

    def position(self, source: str = "changes") -> int:
        """Every row at or below this has been dispatched to live subscriptions."""
        return self._cursor[source]

    def add(self, sub: Subscription) -> None:
        self._index[sub.topic.index].add(sub)
        if sub.source == "events":
            self._log_subs += 1

    def remove(self, sub: Subscription) -> None:
        subs = self._index.get(sub.topic.index)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self._index[sub.topic.index]
            if sub.source == "events":
                self._log_subs -= 1

    def subscriptions(self) -> int:
        return sum(len(s) for s in self._index.values())

    async def snapshot(self, topic: Topic) -> tuple[list[dict[str, Any]], int]:
        """Current rows and the position they reflect, from one consistent snapshot."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            items = await topic.snapshot(conn)
            seq = await conn.fetchval(_MAX_SEQ[topic.source])
        return items, seq

    async def fetch(self, topic: Topic, after: int, upto: int, limit: int) -> tuple[list[Any], int]:
        """Matching rows with after < seq <= upto (whole positions only), and how far that
        read reached: every matching row at or below the returned position is in the list."""
        p = Params()
        p(None)  # $1..$3 are taken by _read
        p(None)
        p(None)
        where = topic.where(p)
        async with self.pool.acquire() as conn:
            rows, reached, more = await _read(conn, topic.source, after, upto, where, p.values[3:], limit)
        return rows, (reached if more else upto)

    # --- long poll -------------------------------------------------------------------------

    def wait_for_final(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiters[task_id].add(fut)
        return fut

    def forget_waiter(self, task_id: str, fut: asyncio.Future[dict[str, Any]]) -> None:
        waiters = self.waiters.get(task_id)
        if waiters is not None:
            waiters.discard(fut)
            if not waiters:
                del self.waiters[task_id]


def _union_where(subs: Any, p: Params) -> str:
    """A WHERE clause matching what any of these raw-log subscriptions wants."""
    exact: set[str] = set()
    prefixes: set[str] = set()
    for sub in subs:
        topic = sub.topic
        if topic.everything:
            return "TRUE"
        exact |= topic.exact
        prefixes.update(topic.prefixes)
    if not exact and not prefixes:
        return "FALSE"
    clauses = [f"c.type = ANY({p(sorted(exact))}::text[])"] if exact else []
    clauses += [f"starts_with(c.type, {p(prefix)})" for prefix in sorted(prefixes)]
    return "(" + " OR ".join(clauses) + ")"


async def _read(
    conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy,
    source: str,
    after: int,
    upto: int | None,
    where: str,
    params: list[Any],
    limit: int,
) -> tuple[list[Any], int, bool]:
    """Rows after `after` (up to `upto`) matching `where`, in seq order, never splitting the
    rows of one seq. Returns (rows, reached, more): `reached` is the last seq fully read when
    `more`, else the last row's seq (or `after`)."""
    table, columns, order = (
        ("ledger.changes", CHANGE_COLUMNS, "c.seq, c.kind, c.key")
        if source == "changes"
        else ("ledger.events", EVENT_COLUMNS, "c.seq")
    )
    sql = (f"SELECT {columns} FROM {table} c WHERE c.seq > $1 AND ($2::bigint IS NULL OR c.seq <= $2)"
           f" AND {where} ORDER BY {order} LIMIT $3")
    records = await conn.fetch(sql, after, upto, limit, *params)
    make = Change.from_record if source == "changes" else LogEvent.from_record
    rows = [make(r) for r in records]
    if len(rows) < limit:
        return rows, (rows[-1].seq if rows else after), False
    last = rows[-1].seq
    if rows[0].seq == last:
        # one position holds more rows than the batch: read all of them
        more_rows = await conn.fetch(
            f"SELECT {columns} FROM {table} c WHERE c.seq > $1 AND c.seq <= $2 AND $3::int IS NOT NULL"
            f" AND {where} ORDER BY {order}",
            last - 1, last, 0, *params)
        return [make(r) for r in more_rows], last, True
    complete = [r for r in rows if r.seq != last]
    return complete, complete[-1].seq, True
