"""Appending to ledger.events.

Why insert order equals commit order: every append takes the transaction-scoped advisory
lock ``ledger.append_lock_id()`` *before* its INSERT draws seq values, and the lock is held
until COMMIT. A second appender waits, then draws larger seq values and commits later. So
no row with a smaller seq can become visible after one with a larger seq.

Idempotency: each event carries ``event_key`` (a hash of the event as sent); a redelivered
event hits the unique key and is skipped with ON CONFLICT DO NOTHING.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

log = logging.getLogger(__name__)

NOTIFY_CHANNEL = "ledger_events"


@dataclass(slots=True, unsafe_hash=True)
class Event:
    """One decoded Celery event, ready to append. Treat it as immutable.

    Not ``frozen``: capture builds tens of thousands per second and a frozen dataclass's
    __init__ costs ~1 µs more per event (measured); hashing and ``dataclasses.replace``
    work as before."""

    key: bytes
    type: str
    task_id: str | None
    hostname: str | None
    sent_at: float | None
    clock: int | None
    routing_key: str | None
    payload_json: str  # the event as received, JSON text


@dataclass(slots=True, frozen=True)
class Rejected:
    """Input that could not become an event, kept with its raw bytes."""

    source: str
    routing_key: str | None
    reason: str
    raw: bytes

    @property
    def key(self) -> bytes:
        return hashlib.blake2b(self.raw + b"\0" + self.reason.encode(), digest_size=16).digest()


@dataclass(slots=True)
class AppendResult:
    inserted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    last_seq: int | None = None


_INSERT_EVENTS = """
INSERT INTO ledger.events (event_key, type, task_id, hostname, sent_at, clock, routing_key, payload)
SELECT k, t, tid, h, ts, c, rk, p::jsonb
FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::int8[], $7::text[], $8::text[])
     WITH ORDINALITY AS u(k, t, tid, h, ts, c, rk, p, ord)
ORDER BY ord
ON CONFLICT (event_key) DO NOTHING
RETURNING seq
"""

_INSERT_QUARANTINE = """
INSERT INTO ledger.quarantine (quarantine_key, source, routing_key, reason, raw)
SELECT * FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::bytea[])
ON CONFLICT (quarantine_key) DO NOTHING
"""


def _columns(events: Sequence[Event]) -> list[list]:
    return [
        [e.key for e in events],
        [e.type for e in events],
        [e.task_id for e in events],
        [e.hostname for e in events],
        [e.sent_at for e in events],
        [e.clock for e in events],
        [e.routing_key for e in events],
        [e.payload_json for e in events],
    ]


# The batch path only needs how many rows went in and the last seq: counting server-side
# saves sending thousands of seqs back per batch.
_INSERT_EVENTS_COUNT = f"WITH ins AS ({_INSERT_EVENTS}) SELECT count(*), max(seq) FROM ins"


async def _insert_locked(conn: asyncpg.Connection, events: Sequence[Event]) -> list[int]:
    await conn.execute("SELECT pg_advisory_xact_lock(ledger.append_lock_id())")
    rows = await conn.fetch(_INSERT_EVENTS, *_columns(events))
    return [r[0] for r in rows]


async def _insert_locked_count(conn: asyncpg.Connection, events: Sequence[Event]) -> tuple[int, int | None]:
    await conn.execute("SELECT pg_advisory_xact_lock(ledger.append_lock_id())")
    row = await conn.fetchrow(_INSERT_EVENTS_COUNT, *_columns(events))
    return row[0], row[1]


_COUNT = "UPDATE ledger.log_counts SET events = events + $1, quarantined = quarantined + $2"


async def insert_quarantine(conn: asyncpg.Connection, rejected: Sequence[Rejected]) -> int:
    """Quarantine rejects (a redelivered one is skipped); returns how many went in."""
    if not rejected:
        return 0
    return await conn.fetchval(
        f"WITH ins AS ({_INSERT_QUARANTINE} RETURNING 1) SELECT count(*) FROM ins",
        [r.key for r in rejected],
        [r.source for r in rejected],
        [r.routing_key for r in rejected],
        [r.reason for r in rejected],
        [r.raw for r in rejected],
    )


async def append(
    conn: asyncpg.Connection,
    events: Sequence[Event],
    rejected: Sequence[Rejected] = (),
    *,
    source: str = "capture",
) -> AppendResult:
    """Append events and quarantine rejects in one transaction; NOTIFY readers on commit.

    If PostgreSQL refuses an event the decoder let through (e.g. a NUL character, which
    jsonb cannot store), the batch is retried event by event and the refused ones are
    quarantined, so one bad event never blocks the rest.
    """
    result = AppendResult()
    rejected = list(rejected)
    try:
        async with conn.transaction():
            inserted, last_seq = await _insert_locked_count(conn, events) if events else (0, None)
            quarantined = await insert_quarantine(conn, rejected)
            if inserted or quarantined:
                await conn.execute(_COUNT, inserted, quarantined)
            result.inserted, result.duplicates = inserted, len(events) - inserted
            result.quarantined, result.last_seq = len(rejected), last_seq
            if inserted:
                await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(last_seq))
        return result
    except (asyncpg.DataError, asyncpg.exceptions.UntranslatableCharacterError):
        if not events:
            raise  # nothing an event-by-event retry could set aside
    # Slow path: find the events PostgreSQL refuses, one by one.
    result = AppendResult()
    async with conn.transaction():
        seqs: list[int] = []
        good = 0
        for event in events:
            try:
                async with conn.transaction():  # savepoint
                    seqs += await _insert_locked(conn, [event])
                    good += 1
            except asyncpg.DataError as exc:
                rejected.append(
                    Rejected(source, event.routing_key, f"refused by PostgreSQL: {exc}", event.payload_json.encode())
                )
        quarantined = await insert_quarantine(conn, rejected)
        if seqs or quarantined:
            await conn.execute(_COUNT, len(seqs), quarantined)
        _finish(result, good, seqs, len(rejected))
        if seqs:
            await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, str(result.last_seq))
    return result


def _finish(result: AppendResult, attempted: int, seqs: list[int], quarantined: int) -> None:
    result.inserted = len(seqs)
    result.duplicates = attempted - len(seqs)
    result.quarantined = quarantined
    result.last_seq = max(seqs) if seqs else None
