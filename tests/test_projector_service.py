"""The running projector: LISTEN/NOTIFY wake-up, polling fallback, the change feed,
checkpoints, reconnects, workers' status, and rebuild yielding."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator

import asyncpg
import orjson
import pytest
from celery.events.state import Worker

from ledger import db
from ledger.config import Settings
from ledger.log import recorder
from ledger.projections import store, worker_status
from ledger.projections.projector import Projector
from ledger.projections.store import read_checkpoint
from tests.support.events import celery_event, task_events, to_log_event
from tests.support.projections import wait_until


@contextlib.asynccontextmanager
async def running(projector: Projector) -> AsyncIterator[Projector]:
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        await asyncio.wait_for(projector.leading.wait(), 10)
        yield projector
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@contextlib.asynccontextmanager
async def notifications(dsn: str) -> AsyncIterator[asyncio.Queue[int]]:
    """Checkpoints the projector announces on ledger_changes."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    listener = await db.connect(dsn)
    await listener.add_listener("ledger_changes", lambda *args: queue.put_nowait(int(args[3])))
    try:
        yield queue
    finally:
        await listener.close()


async def until_notified(queue: asyncio.Queue[int], seq: int, timeout: float) -> float:
    """Seconds until a NOTIFY announces a checkpoint >= seq."""
    started = time.monotonic()
    while True:
        got = await asyncio.wait_for(queue.get(), timeout - (time.monotonic() - started))
        if got >= seq:
            return time.monotonic() - started


async def test_wakes_on_notify_and_writes_rows_changes_and_checkpoint(database_url, conn):
    # A 30 s poll interval: only the recorder's NOTIFY can wake it quickly.
    settings = Settings(database_url=database_url, projector_poll_interval=30)
    events = task_events(hostname="celery@w1") + [
        celery_event("worker-heartbeat", "celery@w1", freq=2.0, active=1, processed=7, loadavg=[0.5, 0.25, 0.1],
                     sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
    ]
    async with notifications(database_url) as announced, running(Projector(settings)):
        result = await recorder.append(conn, [to_log_event(e) for e in events])
        assert await until_notified(announced, result.last_seq, 5) < 2
    task_id = events[0]["uuid"]
    task = await conn.fetchrow("SELECT * FROM ledger.tasks WHERE task_id = $1", task_id)
    assert (task["state"], task["name"], task["worker"], task["client"]) == ("SUCCESS", "tests.add", "celery@w1", "client@test")
    assert (task["first_seq"], task["last_seq"]) == (result.last_seq - 4, result.last_seq - 1)
    worker = await conn.fetchrow("SELECT * FROM ledger.workers WHERE hostname = 'celery@w1'")
    assert (worker["freq"], worker["processed"], worker["loadavg"], worker["sw_ver"]) == (2.0, 7, [0.5, 0.25, 0.1], "5.7.0")
    assert await read_checkpoint(conn) == result.last_seq
    # One change per entity changed in the batch, at the last seq that changed it, with the row.
    changes = {(r["kind"], r["key"]): r for r in await conn.fetch("SELECT * FROM ledger.changes")}
    assert set(changes) == {("task", task_id), ("worker", "celery@w1")}
    assert changes["task", task_id]["seq"] == result.last_seq - 1
    assert changes["worker", "celery@w1"]["seq"] == result.last_seq
    stored = dict(task)
    assert changes["task", task_id]["data"] == {**stored, "extra": stored["extra"]}
    assert await conn.fetchval("SELECT count(*) FROM ledger.task_names WHERE name = 'tests.add' AND tasks = 1") == 1


async def test_polls_when_a_notification_is_lost(database_url, conn):
    settings = Settings(database_url=database_url, projector_poll_interval=0.2)
    async with running(Projector(settings)):
        # Append the way the recorder does, minus its NOTIFY: the wake-up is lost for real.
        event = to_log_event(task_events()[0])
        seq = await conn.fetchval(
            "INSERT INTO ledger.events (event_key, type, task_id, hostname, payload) VALUES ($1, $2, $3, $4, $5::jsonb) RETURNING seq",
            event.key, event.type, event.task_id, event.hostname, orjson.loads(event.payload_json),
        )
        await wait_until(lambda: _checkpoint_at(conn, seq), timeout=5, what="the poll to pick the event up")
    assert await conn.fetchval("SELECT state FROM ledger.tasks WHERE task_id = $1", event.task_id) == "PENDING"


async def _checkpoint_at(conn: asyncpg.Connection, seq: int) -> bool:
    return await read_checkpoint(conn) >= seq


async def test_reconnects_after_losing_its_database_session(database_url, conn):
    settings = Settings(database_url=database_url, projector_poll_interval=0.2)
    async with running(Projector(settings)) as projector:
        first = await recorder.append(conn, [to_log_event(e) for e in task_events()])
        await wait_until(lambda: _checkpoint_at(conn, first.last_seq), what="first batch")
        # Kill the projector's session (it holds the lock and LISTENs): a real lost connection.
        killed = await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND objid = $1::bigint::oid AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            7310432180020 & 0xFFFFFFFF,
        )
        assert killed == 1
        second = await recorder.append(conn, [to_log_event(e) for e in task_events()])
        await wait_until(lambda: _checkpoint_at(conn, second.last_seq), timeout=15, what="projection after reconnect")
        assert projector.leading.is_set()
    assert await conn.fetchval("SELECT count(*) FROM ledger.tasks WHERE state = 'SUCCESS'") == 2


@pytest.mark.parametrize("copy_threshold", [200, 1], ids=["one-statement", "copy-then-statement"])
async def test_one_change_row_per_entity_per_batch_and_positions_only_grow(database_url, conn, monkeypatch, copy_threshold):
    monkeypatch.setattr(store, "COPY_THRESHOLD", copy_threshold)  # both write paths
    settings = Settings(database_url=database_url, projector_batch_size=3)
    events = []
    for _ in range(4):
        events += task_events(hostname="celery@w2")
    await recorder.append(conn, [to_log_event(e) for e in events])
    await Projector(settings).catch_up()
    rows = await conn.fetch("SELECT seq, kind, key, data FROM ledger.changes ORDER BY seq, kind, key")
    # 16 events in batches of 3: a task changed in a batch appears once for it, at its last seq there.
    batches: dict[int, set] = {}
    for row in rows:
        batch = (row["seq"] - 1) // 3
        key = (row["kind"], row["key"])
        assert key not in batches.setdefault(batch, set()), "two changes for one entity in one batch"
        batches[batch].add(key)
        assert row["data"]["last_seq"] == row["seq"]
    final = {}
    for row in rows:
        final[(row["kind"], row["key"])] = row["data"]
    for task in await conn.fetch("SELECT * FROM ledger.tasks"):
        assert final[("task", task["task_id"])] == dict(task)
        assert task["state"] == "SUCCESS"


async def test_worker_online_lost_offline_as_celery_computes(database_url, conn):
    """Status follows Celery's Worker.alive: now < last heartbeat + freq * 2."""
    online = celery_event("worker-online", "celery@hb", freq=2.0, sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
    beat = celery_event("worker-heartbeat", "celery@hb", freq=2.0, active=0, processed=1, loadavg=[0.1, 0.1, 0.1])
    await recorder.append(conn, [to_log_event(online), to_log_event(beat)])
    await Projector(Settings(database_url=database_url)).catch_up()
    row = dict(await conn.fetchrow("SELECT * FROM ledger.workers WHERE hostname = 'celery@hb'"))
    recorded = await conn.fetchval("SELECT max(extract(epoch FROM recorded_at))::float8 FROM ledger.events")
    assert row["last_heartbeat"] == pytest.approx(recorded)
    celery_worker = Worker("celery@hb", freq=2.0)
    celery_worker.event("heartbeat", beat["timestamp"], row["last_heartbeat"], {})
    for offset, expected in ((0.0, "online"), (3.9, "online"), (4.1, "lost"), (60.0, "lost")):
        now = row["last_heartbeat"] + offset
        assert worker_status(row, now) == expected
        assert (expected == "online") == (now < celery_worker.heartbeat_expires)
    # a task event is a sign of life; worker-offline ends it; a later heartbeat revives it
    started = celery_event("task-started", "celery@hb", uuid="t-hb")
    await recorder.append(conn, [to_log_event(started)])
    await Projector(Settings(database_url=database_url)).catch_up()
    row = dict(await conn.fetchrow("SELECT * FROM ledger.workers WHERE hostname = 'celery@hb'"))
    assert worker_status(row, time.time()) == "online"
    offline = celery_event("worker-offline", "celery@hb", freq=2.0)
    stale = {**beat, "clock": 10**6}  # sent before the offline, delivered after it
    await recorder.append(conn, [to_log_event(offline), to_log_event(stale)])
    await Projector(Settings(database_url=database_url)).catch_up()
    row = dict(await conn.fetchrow("SELECT * FROM ledger.workers WHERE hostname = 'celery@hb'"))
    assert row["offline_at"] == offline["timestamp"] and worker_status(row, time.time()) == "offline"
    again = celery_event("worker-online", "celery@hb", freq=2.0)
    await recorder.append(conn, [to_log_event(again)])
    await Projector(Settings(database_url=database_url)).catch_up()
    row = dict(await conn.fetchrow("SELECT * FROM ledger.workers WHERE hostname = 'celery@hb'"))
    assert row["offline_at"] is None and worker_status(row, time.time()) == "online"
    assert row["first_seen"] == online["timestamp"] and row["last_seen"] == again["timestamp"]


async def test_groups_and_chords_from_instrumented_events(database_url, conn):
    events = []
    for index in range(3):
        sent = task_events(name="proj.add")
        tid = sent[0]["uuid"]
        sent[0].update(group_id="g-1", group_index=index, chord_id="cb-1")
        events += sent[:1]
        # the worker's metadata event, then the rest of its life (not annotated)
        events.append(celery_event("ledger-task-meta", "celery@test", uuid=tid, group_id="g-1", group_index=index,
                                   chord_id="cb-1", parent_id=None, root_id=tid))
        events += sent[1:] if index < 2 else sent[1:3]
    await recorder.append(conn, [to_log_event(e) for e in events])
    await Projector(Settings(database_url=database_url, projector_batch_size=4)).catch_up()
    group = await conn.fetchrow("SELECT * FROM ledger.groups WHERE group_id = 'g-1'")
    assert (group["size"], group["chord_id"], group["states"]) == (3, "cb-1", {"SUCCESS": 2, "STARTED": 1})
    members = await conn.fetch("SELECT group_index, chord_id FROM ledger.tasks WHERE group_id = 'g-1' ORDER BY group_index")
    assert [(m["group_index"], m["chord_id"]) for m in members] == [(0, "cb-1"), (1, "cb-1"), (2, "cb-1")]
    change = await conn.fetchrow("SELECT * FROM ledger.changes WHERE kind = 'group' ORDER BY seq DESC LIMIT 1")
    assert change["data"]["states"] == {"SUCCESS": 2, "STARTED": 1}
    assert orjson.loads(orjson.dumps(change["data"]))["size"] == 3


async def test_bad_events_never_stop_the_projector(database_url, conn):
    bad = [
        celery_event("task-succeeded", uuid=None),
        celery_event("task-succeeded", uuid=["not", "a", "string"]),
        celery_event("task-received", uuid="t-bad", name={"odd": 1}, retries="3", eta=5, timestamp="yesterday",
                     group_id=7, group_index="x", clock="late"),
        celery_event("worker-heartbeat", hostname=None),
        celery_event("worker-heartbeat", "celery@bad", freq="fast", loadavg="high", active=-1, processed=2**40),
        celery_event("task", uuid="t-nosubject"),
        celery_event("something-else", uuid="t-other"),
    ]
    logged = [to_log_event(e) for e in bad]
    # capture only fills the indexed columns from well-formed fields; the payload keeps all
    logged = [
        dataclasses.replace(
            e,
            task_id=e.task_id if isinstance(e.task_id, str) else None,
            sent_at=e.sent_at if isinstance(e.sent_at, float) else None,
            clock=e.clock if isinstance(e.clock, int) else None,
        )
        for e in logged
    ]
    result = await recorder.append(conn, logged)
    assert await Projector(Settings(database_url=database_url)).catch_up() == result.last_seq
    row = await conn.fetchrow("SELECT * FROM ledger.tasks WHERE task_id = 't-bad'")
    assert row["state"] == "RECEIVED" and row["name"] == '{"odd":1}' and row["retries"] is None
    assert row["extra"]["retries"] == "3" and row["extra"]["clock"] == "late" and row["group_id"] == "7"
    worker = await conn.fetchrow("SELECT * FROM ledger.workers WHERE hostname = 'celery@bad'")
    assert (worker["freq"], worker["loadavg"], worker["active"], worker["processed"]) == (None, None, -1, None)
