"""A `tasks` subscription decides live changes with a Python predicate and its snapshot with
the SQL of GET /v1/tasks: on real projected rows, the two must agree for any filter."""

from __future__ import annotations

import uuid

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ledger.api.queries import Params
from ledger.stream import filters
from tests.support.stream import lifecycle, project, record

NAMES = ["tests.add", "tests.mul", "tests.other"]
WORKERS = ["celery@a", "celery@b"]
STATES = ["PENDING", "RECEIVED", "STARTED", "SUCCESS", "FAILURE"]

filter_dicts = st.fixed_dictionaries({}, optional={
    "state": st.lists(st.sampled_from(STATES), min_size=1, max_size=3),
    "name": st.lists(st.sampled_from(NAMES), min_size=1, max_size=2),
    "worker": st.lists(st.sampled_from(WORKERS), min_size=1, max_size=2),
    "queue": st.sampled_from(["celery", "other"]),
    "group": st.sampled_from(["g1", "g2"]),
    "received_after": st.floats(0, 2e9),
    "started_before": st.floats(0, 2e9),
    "succeeded_after": st.floats(0, 2e9),
    "timestamp_before": st.floats(0, 2e9),
    "search": st.sampled_from(["boom", "(2", "VALUE", "zzz", "4"]),
})


async def _seed(conn: asyncpg.Connection, database_url: str) -> None:
    events = []
    for i in range(24):
        steps = lifecycle(str(uuid.uuid4()), name=NAMES[i % 3], worker=WORKERS[i % 2],
                          group=(f"g{1 + i % 2}", i) if i % 3 else None, fail=i % 4 == 0,
                          args=f"({i}, 2)")
        events += steps[: 1 + i % 4]  # tasks stopped at every stage
    await record(conn, events)
    await project(database_url)


async def test_python_predicate_agrees_with_the_api_sql(database_url: str, conn: asyncpg.Connection) -> None:
    await _seed(conn, database_url)
    rows = [r["data"] for r in await conn.fetch("SELECT to_jsonb(t) AS data FROM ledger.tasks t")]
    assert len(rows) == 24 and len({r["state"] for r in rows}) >= 4
    checked = []

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(filter_dicts)
    def agree(raw: dict) -> None:
        checked.append(filters.parse_filter(raw))

    agree()
    for q in checked:
        p = Params()
        where = filters.where_sql(q, p)
        in_sql = {r["task_id"] for r in await conn.fetch(f"SELECT task_id FROM ledger.tasks WHERE {where}", *p.values)}
        in_python = {r["task_id"] for r in rows if filters.matches(q, r)}
        assert in_python == in_sql, q
    assert any(len(x) not in (0, 24) for x in [
        {r["task_id"] for r in rows if filters.matches(q, r)} for q in checked])  # filters really filtered
