"""The append-only, commit-ordered, idempotent event log (ledger.events)."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from ledger import db
from ledger.log import recorder
from ledger.log.reader import read_after
from tests.support.events import celery_event, task_events, to_log_event


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger.events SET type = 'x'",
        "UPDATE ledger.events SET type = 'x' WHERE false",
        "DELETE FROM ledger.events",
        "TRUNCATE ledger.events",
    ],
)
async def test_database_refuses_rewriting_the_log(conn, statement):
    await recorder.append(conn, [to_log_event(e) for e in task_events()])
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await conn.execute(statement)
    assert await conn.fetchval("SELECT count(*) FROM ledger.events") == 4


async def test_event_is_stored_as_received(conn):
    payload = celery_event("task-succeeded", uuid="t-1", result="'4'", runtime=2.5, utcoffset=-5)
    await recorder.append(conn, [to_log_event(payload, routing_key="task.multi")])
    row = await conn.fetchrow("SELECT * FROM ledger.events")
    assert row["payload"] == payload
    assert (row["type"], row["task_id"], row["hostname"]) == ("task-succeeded", "t-1", "celery@test")
    assert row["sent_at"] == payload["timestamp"] and row["clock"] == payload["clock"]
    assert row["routing_key"] == "task.multi"
    assert row["recorded_at"] is not None


async def test_redelivered_events_are_a_no_op(conn):
    events = [to_log_event(e) for e in task_events()]
    first = await recorder.append(conn, events)
    again = await recorder.append(conn, events[1:] + [to_log_event(celery_event("worker-heartbeat"))])
    assert (first.inserted, first.duplicates) == (4, 0)
    assert (again.inserted, again.duplicates) == (1, 3)
    assert await conn.fetchval("SELECT count(*) FROM ledger.events") == 5
    # The running total /metrics reads counts each stored event once.
    assert await conn.fetchval("SELECT events FROM ledger.log_counts") == 5
    # A duplicate inside one batch is also stored once.
    dup = to_log_event(celery_event("worker-heartbeat"))
    assert (await recorder.append(conn, [dup, dup])).inserted == 1


async def test_event_postgres_refuses_is_quarantined_and_the_rest_land(conn):
    good = [to_log_event(e) for e in task_events()]
    bad = to_log_event(celery_event("task-failed", uuid="t-nul", exception="boom\u0000"))
    result = await recorder.append(conn, [good[0], bad, *good[1:]])
    assert (result.inserted, result.quarantined) == (4, 1)
    row = await conn.fetchrow("SELECT reason, raw FROM ledger.quarantine")
    assert tuple(await conn.fetchrow("SELECT events, quarantined FROM ledger.log_counts")) == (4, 1)
    assert "refused by PostgreSQL" in row["reason"]
    assert b"t-nul" in row["raw"]


async def test_a_writer_that_drew_seq_first_blocks_later_writers_until_it_commits(database_url):
    """The mechanism behind commit order: a second appender waits on the append lock."""
    a, b = await db.connect(database_url), await db.connect(database_url)
    try:
        tx = a.transaction()
        await tx.start()
        await recorder._insert_locked(a, [to_log_event(celery_event("worker-heartbeat", "a@x"))])
        later = asyncio.create_task(recorder.append(b, [to_log_event(celery_event("worker-heartbeat", "b@x"))]))
        # b is waiting on the advisory lock (not merely slow): PostgreSQL says so.
        while not await a.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ):
            assert not later.done()
            await asyncio.sleep(0.01)
        assert not later.done()
        await tx.commit()
        await later
        rows = await a.fetch("SELECT seq, hostname FROM ledger.events ORDER BY seq")
        assert [r["hostname"] for r in rows] == ["a@x", "b@x"]
    finally:
        await a.close()
        await b.close()


async def test_tailing_readers_never_see_a_hole_fill_in_behind_them(database_url):
    """Several writers race; readers tail seq > n. No row may ever appear below a seq
    a reader has already passed (that would be a late commit it skipped)."""
    writers, batches = 4, 40
    rng = random.Random(7)
    done = asyncio.Event()
    violations: list[tuple[int, int]] = []

    async def writer(n: int) -> int:
        conn = await db.connect(database_url)
        written = 0
        try:
            for _ in range(batches):
                events = [to_log_event(celery_event("worker-heartbeat", f"w{n}@x")) for _ in range(rng.randint(1, 30))]
                written += (await recorder.append(conn, events)).inserted
                await asyncio.sleep(0)  # let others interleave
        finally:
            await conn.close()
        return written

    async def reader() -> list[int]:
        conn = await db.connect(database_url)
        seen: list[int] = []
        high = 0
        try:
            while True:
                finished = done.is_set()
                rows = await read_after(conn, high, 10_000)
                for row in rows:
                    seen.append(row["seq"])
                high = max([high, *(r["seq"] for r in rows)])
                # A hole filling in behind us: a committed row below our position we never saw.
                missed = await conn.fetchval(
                    "SELECT count(*) FROM ledger.events WHERE seq <= $1 AND NOT (seq = ANY($2::bigint[]))",
                    high, seen,
                )
                if missed:
                    violations.append((high, missed))
                if finished and not rows:
                    return seen
        finally:
            await conn.close()

    readers = [asyncio.create_task(reader()) for _ in range(2)]
    written = sum(await asyncio.gather(*(writer(n) for n in range(writers))))
    done.set()
    seen_lists = await asyncio.gather(*readers)
    assert violations == []
    for seen in seen_lists:
        assert len(seen) == written == len(set(seen))
        assert seen == sorted(seen)
