"""The projector lease: a session-level PostgreSQL advisory lock.

The lock is held by the very session that writes the projections, so when that session
dies (process killed, network lost) PostgreSQL drops the lock and the writes together:
there is never a moment with two writers. Standbys poll with ``pg_try_advisory_lock`` and
so never show up in ``pg_locks`` as waiting; ``ledger rebuild`` waits with a blocking
``pg_advisory_lock``, which the leader notices (:func:`someone_waits`) and yields to.
"""

from __future__ import annotations

import asyncio

import asyncpg

PROJECTOR_LOCK_ID = 7310432180020

_WAITERS = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND NOT granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1
)
"""


async def try_acquire(conn: asyncpg.Connection) -> bool:
    return await conn.fetchval("SELECT pg_try_advisory_lock($1)", PROJECTOR_LOCK_ID)


async def acquire(conn: asyncpg.Connection) -> None:
    """Wait for the lock (blocking: a running projector sees the wait and yields)."""
    await conn.execute("SELECT pg_advisory_lock($1)", PROJECTOR_LOCK_ID)


async def release(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", PROJECTOR_LOCK_ID)


async def wait_for_lease(conn: asyncpg.Connection, stop: asyncio.Event, interval: float = 0.5) -> bool:
    """Standby: poll until the lock is ours (True) or ``stop`` is set (False)."""
    while not stop.is_set():
        if await try_acquire(conn):
            return True
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except asyncio.TimeoutError:
            pass
    return False


async def someone_waits(conn: asyncpg.Connection) -> bool:
    """Is a session blocked waiting for the projector lock (i.e. `ledger rebuild`)?"""
    return await conn.fetchval(_WAITERS, PROJECTOR_LOCK_ID >> 32, PROJECTOR_LOCK_ID & 0xFFFFFFFF)
