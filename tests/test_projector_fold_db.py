"""Events through the real recorder into a real database, folded by the real projector,
compared with Celery's own State given the same (logged) events."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, given, settings

from ledger import db
from ledger.config import Settings
from ledger.log.reader import read_after
from ledger.projections.projector import Projector
from tests.support.projections import (
    append_events,
    celery_state,
    celery_view,
    expected_lineage,
    histories,
    ledger_view,
)


async def _check_example(database_url: str, events: list[dict]) -> None:
    conn = await db.connect(database_url)
    try:
        start = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.events")
        await append_events(conn, events)
        logged = [r["payload"] for r in await read_after(conn, start, 10_000)]
        # batch size 5: tasks span batches, rows are reloaded from the table between them
        await Projector(Settings(database_url=database_url), batch_size=5).catch_up()
        state = celery_state(logged)
        ids = list(state.tasks.keys())
        rows = {r["task_id"]: dict(r) for r in await conn.fetch("SELECT * FROM ledger.tasks WHERE task_id = ANY($1)", ids)}
        for task_id, task in state.tasks.items():
            lineage = expected_lineage(logged, task_id)
            assert ledger_view(rows[task_id]) == celery_view(task, lineage), task_id
            assert {k: rows[task_id][k] for k in lineage} == lineage
    finally:
        await conn.close()


# A sync test: hypothesis drives the examples, each runs its own short event loop.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=histories(prefix="PREFIX"))
def test_projected_rows_match_celery_state(database_url, data):
    prefix = uuid.uuid4().hex[:8] + "-"  # examples share the database: keep their tasks apart
    events = [
        {k: (v.replace("PREFIX", prefix) if isinstance(v, str) else v) for k, v in e.items()} for e in data
    ]
    asyncio.run(_check_example(database_url, events))
