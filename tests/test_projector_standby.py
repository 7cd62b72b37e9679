"""Two real `ledger projector` processes: one writes, the other waits; SIGKILL the writer
and the standby takes over within seconds, applying every event exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import asyncpg

from ledger.log import recorder
from ledger.projections.lock import PROJECTOR_LOCK_ID
from ledger.projections.store import read_checkpoint
from tests.support.events import task_events, to_log_event
from tests.support.projections import wait_until

_LEADER = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objid = $1::bigint::oid
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def start_projector(database_url: str, name: str) -> subprocess.Popen:
    # asyncpg passes unknown DSN parameters to the server: each process is named in pg_stat_activity.
    env = {**os.environ, "LEDGER_DATABASE_URL": f"{database_url}?application_name={name}",
           "LEDGER_PROJECTOR_POLL_INTERVAL": "0.5"}
    return subprocess.Popen([sys.executable, "-m", "ledger", "projector"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def leader(conn: asyncpg.Connection) -> list[str]:
    return [r[0] for r in await conn.fetch(_LEADER, PROJECTOR_LOCK_ID & 0xFFFFFFFF)]


async def test_standby_takes_over_when_the_leader_is_killed(database_url, conn):
    processes = {name: start_projector(database_url, name) for name in ("projector-a", "projector-b")}
    try:
        async def one_leader() -> bool:
            return len(await leader(conn)) == 1

        await wait_until(one_leader, timeout=30, what="a projector to take the lock")
        first = (await leader(conn))[0]
        standby = next(n for n in processes if n != first)
        before = await recorder.append(conn, [to_log_event(e) for e in task_events()])

        async def caught_up_to(seq: int) -> bool:
            return await read_checkpoint(conn) >= seq

        await wait_until(lambda: caught_up_to(before.last_seq), timeout=15, what="the leader to project")
        assert processes[standby].poll() is None  # the standby is alive, waiting

        processes[first].send_signal(signal.SIGKILL)
        processes[first].wait(10)
        killed_at = time.monotonic()
        after = await recorder.append(conn, [to_log_event(e) for e in task_events()])
        await wait_until(lambda: caught_up_to(after.last_seq), timeout=15, what="the standby to take over")
        takeover = time.monotonic() - killed_at
        assert await leader(conn) == [standby]
        assert takeover < 5, f"takeover took {takeover:.1f}s"
        # every event applied exactly once: two tasks, each with its four events
        rows = await conn.fetch("SELECT state, first_seq, last_seq FROM ledger.tasks ORDER BY first_seq")
        assert [(r["state"], r["last_seq"] - r["first_seq"]) for r in rows] == [("SUCCESS", 3), ("SUCCESS", 3)]
        changes = await conn.fetchval("SELECT count(*) FROM ledger.changes WHERE kind = 'task'")
        assert changes >= 2
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    # the survivor stopped cleanly on SIGTERM
    assert processes[standby].returncode == 0, processes[standby].stderr.read().decode()[-2000:]
