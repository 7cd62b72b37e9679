"""`ledger rebuild` replays the log into exactly the rows the live projector built."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys

from ledger.config import Settings
from ledger.projections import store
from ledger.projections.projector import Projector
from ledger.projections.rebuild import rebuild
from ledger.projections.store import read_checkpoint
from tests.support.events import celery_event, task_events
from tests.support.projections import append_events, table_rows, wait_until

TABLES = ("tasks", "groups", "workers", "task_names", "checkpoints")


def workload(seed: int, tasks: int = 120) -> list[dict]:
    """Tasks (some failing, retrying, in groups and chords, children of others), worker
    heartbeats and an offline, interleaved and partly out of order."""
    rng = random.Random(seed)
    events: list[dict] = []
    parents: list[str] = []
    for index in range(tasks):
        life = task_events(name=rng.choice(["proj.add", "proj.mul", "proj.io"]),
                           hostname=rng.choice(["celery@r1", "celery@r2"]))
        task_id = life[0]["uuid"]
        if parents and rng.random() < 0.3:
            for event in life[:2]:
                event.update(parent_id=rng.choice(parents), root_id=parents[0])
        if rng.random() < 0.3:
            membership = {"group_id": f"g-{index % 5}", "group_index": index, "chord_id": f"cb-{index % 5}"}
            life[0].update(membership)
            life.insert(2, celery_event("ledger-task-meta", life[1]["hostname"], uuid=task_id, **membership,
                                        parent_id=None, root_id=task_id))
        roll = rng.random()
        if roll < 0.15:
            life[-1] = celery_event("task-failed", life[1]["hostname"], uuid=task_id, exception="KeyError('x')",
                                    traceback="Traceback ...")
        elif roll < 0.25:
            life[-1] = celery_event("task-retried", life[1]["hostname"], uuid=task_id, exception="Retry()",
                                    traceback="...")
        if rng.random() < 0.2:  # out of order: the final event overtakes started
            life[-1], life[-2] = life[-2], life[-1]
        parents.append(task_id)
        events += life
        if index % 10 == 0:
            events.append(celery_event("worker-heartbeat", rng.choice(["celery@r1", "celery@r2"]), freq=2.0,
                                       active=rng.randint(0, 4), processed=index, loadavg=[0.1, 0.2, 0.3],
                                       sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux"))
    events.append(celery_event("worker-offline", "celery@r2", freq=2.0))
    return events


async def snapshot(conn) -> dict[str, list[dict]]:
    return {t: await table_rows(conn, t, exclude=("updated_at",)) for t in TABLES}


async def test_rebuild_gives_the_rows_the_live_projector_built(database_url, conn, monkeypatch):
    settings = Settings(database_url=database_url, projector_batch_size=37, projector_poll_interval=0.2)
    projector = Projector(settings)
    stop = asyncio.Event()
    service = asyncio.create_task(projector.run(stop))
    try:
        events = workload(seed=3)
        # appended in small batches while the projector runs: its batches cut across tasks
        for start in range(0, len(events), 50):
            await append_events(conn, events[start : start + 50], chunk=13)
            await asyncio.sleep(0)
        last = await conn.fetchval("SELECT max(seq) FROM ledger.events")

        async def caught_up() -> bool:
            return await read_checkpoint(conn) >= last

        await wait_until(caught_up, what="the live projector")
        live = await snapshot(conn)
        live_changes = await conn.fetchval("SELECT count(*) FROM ledger.changes")
        assert len(live["tasks"]) == 120 and live["groups"] and len(live["workers"]) == 2

        # The real CLI, while the live projector holds the lock: it must yield, then resume.
        env = {**os.environ, "LEDGER_DATABASE_URL": database_url}
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "ledger", "rebuild"], env=env, capture_output=True,
            text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "rebuild [" in done.stderr and "100.0%" in done.stderr  # the progress bar
        assert f"{len(events)} events".replace(str(len(events)), f"{len(events):,}") in done.stdout

        rebuilt = await snapshot(conn)
        for table in TABLES:
            assert rebuilt[table] == live[table], table
        assert await conn.fetchval("SELECT count(*) FROM ledger.changes") <= live_changes

        # In process, the other write paths: new tasks by COPY, small batches through the
        # read/fold/write pipeline, and a cache small enough to be cleared and reloaded.
        monkeypatch.setattr(store, "COPY_THRESHOLD", 1)
        result = await rebuild(settings, batch_size=41, cache_rows=60)
        assert result.events == len(events) and result.checkpoint == last
        again = await snapshot(conn)
        for table in TABLES:
            assert again[table] == live[table], table
        feed = await conn.fetch("SELECT kind, key, data FROM ledger.changes ORDER BY seq")
        latest = {(r["kind"], r["key"]): r["data"] for r in feed}
        for task in live["tasks"]:
            assert latest[("task", task["task_id"])] == {**task, "extra": task["extra"]}

        # the live projector took the lease back and carries on from the rebuilt checkpoint
        more = task_events(hostname="celery@r1")
        await append_events(conn, more)
        new_last = await conn.fetchval("SELECT max(seq) FROM ledger.events")

        async def resumed() -> bool:
            return await read_checkpoint(conn) >= new_last

        await wait_until(resumed, timeout=15, what="the live projector to resume after the rebuild")
        assert await conn.fetchval("SELECT state FROM ledger.tasks WHERE task_id = $1", more[0]["uuid"]) == "SUCCESS"
        assert projector.leading.is_set()
    finally:
        stop.set()
        await asyncio.wait_for(service, 10)


async def test_rebuild_without_progress_and_on_an_empty_log(database_url):
    env = {**os.environ, "LEDGER_DATABASE_URL": database_url}
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ledger", "rebuild", "--no-progress"], env=env,
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "rebuild [" not in done.stderr
    assert "from 0 events" in done.stdout


async def test_indexes_a_dead_rebuild_dropped_come_back(database_url, conn):
    from ledger.projections.store import connect, drop_secondary_indexes

    async def index_names() -> set[str]:
        rows = await conn.fetch("SELECT indexname FROM pg_indexes WHERE schemaname = 'ledger' AND tablename IN ('tasks', 'changes')")
        return {r[0] for r in rows}

    before = await index_names()
    assert {"tasks_state_last_seq", "tasks_group", "changes_kind_key_seq"} <= before
    writer = await connect(database_url)
    try:
        dropped = await drop_secondary_indexes(writer)  # as a rebuild does, then "dies"
    finally:
        await writer.close()
    assert "tasks_state_last_seq" in dropped and "tasks_pkey" not in dropped
    assert await index_names() == before - set(dropped)
    await append_events(conn, task_events())
    await Projector(Settings(database_url=database_url)).catch_up()  # a new projector term
    assert await index_names() == before
    assert await conn.fetchval("SELECT count(*) FROM ledger.rebuild_dropped_indexes") == 0
