"""The native /v1 API against a real uvicorn server, on events appended to the real log and
folded by the projections."""

from __future__ import annotations

from datetime import datetime, timezone

import asyncpg

from tests.support.api import T0, Loaded, loaded_api, record, running_api  # noqa: F401
from tests.support.events import celery_event


async def get_json(api, path: str, expect: int = 200, **params):
    async with api.client("read") as http:
        r = await http.get(path, params=params)
    assert r.status_code == expect, (path, r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    return r.json()


async def ids_of(api, **params) -> list[str]:
    return [t["task_id"] for t in (await get_json(api, "/v1/tasks", **params))["tasks"]]


async def test_task_list_newest_first_and_pages_cover_everything_once(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    everything = await ids_of(api, limit=500)
    # newest first = by the first log position of each task, descending
    assert everything == [w.F, w.E, w.C, w.D, w.B, w.A]
    assert await ids_of(api, order="oldest") == everything[::-1]

    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = await get_json(api, "/v1/tasks", **params)
        seen += [t["task_id"] for t in page["tasks"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == everything and pages == 3


async def test_pages_stay_stable_while_tasks_update(loaded_api: Loaded, conn: asyncpg.Connection,
                                                    database_url: str) -> None:
    w, api = loaded_api.ids, loaded_api.api
    first = await get_json(api, "/v1/tasks", limit=3)
    # the oldest task changes state between pages: it must not jump pages
    from tests.support.api import project
    await record(conn, [celery_event("task-received", "celery@w1", uuid=w.D, name="tests.sum", args="([4],)",
                                     kwargs="{}", timestamp=T0 + 30)])
    await project(database_url)
    second = await get_json(api, "/v1/tasks", limit=3, cursor=first["next_cursor"])
    assert [t["task_id"] for t in first["tasks"] + second["tasks"]] == [w.F, w.E, w.C, w.D, w.B, w.A]
    assert second["tasks"][0]["state"] == "RECEIVED"


async def test_bad_cursor_and_parameters_are_answered_naming_the_field(loaded_api: Loaded) -> None:
    api = loaded_api.api
    page = await get_json(api, "/v1/tasks", limit=2)
    body = await get_json(api, "/v1/tasks", 400, cursor=page["next_cursor"], order="oldest")
    assert body["error"] == "invalid_parameter" and body["field"] == "cursor" and "order" in body["detail"]
    assert (await get_json(api, "/v1/tasks", 400, cursor="garbage!"))["field"] == "cursor"
    for params, field in [({"limit": 0}, "limit"), ({"limit": "many"}, "limit"), ({"order": "sideways"}, "order"),
                          ({"received_after": "yesterday"}, "received_after"), ({"search": ""}, "search")]:
        body = await get_json(api, "/v1/tasks", 422, **params)
        assert body["error"] == "invalid_parameter" and body["field"] == field and field in body["detail"]


async def test_task_list_filters(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    cases = [
        ({"state": "SUCCESS"}, {w.A, w.C}),
        ({"state": "success,failure"}, {w.A, w.B, w.C}),
        ({"name": "tests.add"}, {w.A, w.B}),
        ({"worker": "celery@w2"}, {w.C}),
        ({"queue": "mail"}, {w.F}),
        ({"group": w.G}, {w.A, w.B}),
        ({"root": w.A}, {w.A, w.C}),
        ({"parent": w.A}, {w.C}),
        ({"received_after": T0 + 3, "received_before": T0 + 14}, {w.B, w.C}),  # after inclusive, before exclusive
        ({"received_after": datetime.fromtimestamp(T0 + 3, timezone.utc).isoformat()}, {w.B, w.C, w.E}),
        ({"started_after": T0 + 5}, {w.B, w.C}),
        ({"succeeded_before": T0 + 6}, {w.A}),
        ({"timestamp_after": T0 + 15}, {w.E, w.F}),
        ({"search": "ALICE"}, {w.F}),          # kwargs, case-insensitive
        ({"search": "boom"}, {w.B}),           # exception
        ({"search": "'x'"}, {w.B, w.C}),       # args of B, result of C
        ({"state": "SUCCESS", "name": "tests.mul"}, {w.C}),
        ({"name": "no.such.task"}, set()),
    ]
    for params, expected in cases:
        assert set(await ids_of(api, **params)) == expected, params


async def test_one_task_with_children_and_404(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    a = await get_json(api, f"/v1/tasks/{w.A}")
    assert a["task_id"] == w.A and a["state"] == "SUCCESS" and a["result"] == "4" and a["worker"] == "celery@w1"
    assert a["group_id"] == w.G and a["group_index"] == 0 and a["chord_id"] == w.D
    assert a["children"] == [w.C] and a["as_of_seq"] is None
    c = await get_json(api, f"/v1/tasks/{w.C}")
    assert (c["parent_id"], c["root_id"], c["retries"], c["state"]) == (w.A, w.A, 1, "SUCCESS")
    body = await get_json(api, "/v1/tasks/does-not-exist", 404)
    assert body == {"error": "task_not_found", "detail": "unknown task 'does-not-exist'"}


async def test_timeline_is_every_event_of_the_task_in_log_order(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    body = await get_json(api, f"/v1/tasks/{w.C}/timeline")
    types = [e["type"] for e in body["events"]]
    assert types == ["task-received", "task-started", "task-retried", "task-received", "task-started", "task-succeeded"]
    seqs = [e["seq"] for e in body["events"]]
    assert seqs == sorted(seqs)
    sent = [e for e in loaded_api.events if e.get("uuid") == w.C]
    assert [e["payload"] for e in body["events"]] == sent  # the raw payloads, untouched
    assert (await get_json(api, "/v1/tasks/nope/timeline", 404))["error"] == "task_not_found"


async def test_tree_parent_root_children_group_and_chord(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    tree = await get_json(api, f"/v1/tasks/{w.A}/tree")
    assert tree["task"]["task_id"] == w.A and tree["parent"] is None and tree["root"]["task_id"] == w.A
    assert [c["task_id"] for c in tree["children"]] == [w.C]
    assert tree["group"]["group_id"] == w.G and tree["group"]["chord_id"] == w.D
    assert [(m["task_id"], m["group_index"], m["state"]) for m in tree["group_members"]] == [
        (w.A, 0, "SUCCESS"), (w.B, 1, "FAILURE")]
    assert tree["chord"]["task_id"] == w.D and tree["chord"]["name"] == "tests.sum"
    child = await get_json(api, f"/v1/tasks/{w.C}/tree")
    assert child["parent"]["task_id"] == w.A and child["root"]["task_id"] == w.A
    assert child["children"] == [] and child["group"] is None and child["chord"] is None
    assert (await get_json(api, "/v1/tasks/nope/tree", 404))["error"] == "task_not_found"


async def test_group_with_members_in_order(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    body = await get_json(api, f"/v1/groups/{w.G}")
    assert body["group"]["size"] == 2 and body["group"]["states"] == {"SUCCESS": 1, "FAILURE": 1}
    assert [m["task_id"] for m in body["members"]] == [w.A, w.B]
    assert body["as_of_seq"] is None
    assert (await get_json(api, "/v1/groups/nope", 404))["error"] == "group_not_found"


async def test_task_and_group_as_of_a_log_position_and_a_time(database_url: str, conn: asyncpg.Connection) -> None:
    from tests.support.api import project, sample_workload

    w, events = sample_workload()
    split = next(i for i, e in enumerate(events) if e["type"] == "task-started" and e["uuid"] == w.B)
    first_seq = await record(conn, events[: split + 1])
    between = (await conn.fetchval("SELECT clock_timestamp()")).isoformat()
    await record(conn, events[split + 1:])
    await project(database_url)
    async with running_api(database_url) as api:
        for params in ({"as_of_seq": first_seq}, {"as_of": between}):
            past = await get_json(api, f"/v1/tasks/{w.B}", **params)
            assert past["state"] == "STARTED" and past["failed"] is None and past["as_of_seq"] == first_seq
            group = await get_json(api, f"/v1/groups/{w.G}", **params)
            assert [(m["task_id"], m["state"]) for m in group["members"]] == [(w.A, "SUCCESS"), (w.B, "STARTED")]
            assert group["group"]["states"] == {"SUCCESS": 1, "STARTED": 1} and group["as_of_seq"] == first_seq
        now = await get_json(api, f"/v1/tasks/{w.B}")
        assert now["state"] == "FAILURE"
        # before a task's first event it did not exist yet
        body = await get_json(api, f"/v1/tasks/{w.C}", 404, as_of_seq=first_seq)
        assert body["error"] == "task_not_found"
        assert (await get_json(api, f"/v1/tasks/{w.B}", 422, as_of_seq=1, as_of=between))["error"] == "invalid_parameter"
        assert (await get_json(api, f"/v1/tasks/{w.B}", 422, as_of_seq=-1))["field"] == "as_of_seq"


async def test_workers_with_status(loaded_api: Loaded) -> None:
    api = loaded_api.api
    workers = {x["hostname"]: x for x in (await get_json(api, "/v1/workers"))["workers"]}
    assert {h: x["status"] for h, x in workers.items()} == {
        "celery@w1": "online", "celery@w2": "offline", "celery@w3": "lost"}
    assert workers["celery@w1"]["sw_ver"] == "5.5.0" and workers["celery@w1"]["loadavg"] == [0.1, 0.2, 0.3]
    only = await get_json(api, "/v1/workers", status="offline,lost")
    assert sorted(x["hostname"] for x in only["workers"]) == ["celery@w2", "celery@w3"]
    assert (await get_json(api, "/v1/workers", 422, status="sleepy"))["field"].startswith("status")
    one = await get_json(api, "/v1/workers/celery@w2")
    assert one["status"] == "offline" and one["processed"] == 2
    assert (await get_json(api, "/v1/workers/celery@nope", 404))["error"] == "worker_not_found"


async def test_task_names(loaded_api: Loaded) -> None:
    body = await get_json(loaded_api.api, "/v1/task-names")
    assert {n["name"]: n["tasks"] for n in body["task_names"]} == {
        "tests.add": 2, "tests.mul": 1, "tests.sum": 1, "tests.sleep": 1, "tests.mail": 1}


async def test_raw_log_after_type_task_and_limit(loaded_api: Loaded) -> None:
    api, events = loaded_api.api, loaded_api.events
    page = await get_json(api, "/v1/events", after=0, limit=5)
    assert [e["payload"] for e in page["events"]] == events[:5]
    rest = await get_json(api, "/v1/events", after=page["next_after"], limit=5000)
    assert [e["payload"] for e in rest["events"]] == events[5:]
    assert rest["next_after"] == loaded_api.last_seq
    empty = await get_json(api, "/v1/events", after=loaded_api.last_seq)
    assert empty == {"events": [], "next_after": loaded_api.last_seq}
    typed = await get_json(api, "/v1/events", type="worker-online,worker-offline")
    assert [e["type"] for e in typed["events"]] == ["worker-online", "worker-online", "worker-offline"]
    one = await get_json(api, "/v1/events", task_id=loaded_api.ids.E)
    assert [e["type"] for e in one["events"]] == ["task-received", "task-revoked"]
    assert (await get_json(api, "/v1/events", 422, after=-1))["field"] == "after"
    assert (await get_json(api, "/v1/events", 422, limit=5001))["field"] == "limit"


async def test_seq_at_finds_the_last_position_recorded_by_a_time(database_url: str, conn: asyncpg.Connection) -> None:
    from ledger import db
    from ledger.api.queries import seq_at
    from tests.support.api import sample_workload

    _, events = sample_workload()
    pool = await db.create_pool(database_url)
    try:
        assert await seq_at(pool, 2e9) == 0  # empty log
        marks, lasts = [], []
        for i in range(0, len(events), 5):
            marks.append((await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")))
            lasts.append(await record(conn, events[i:i + 5]))
            await record(conn, events[i:i + 2])  # duplicates: they burn seq values, leaving holes
        end = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
        assert await seq_at(pool, marks[0]) == 0
        for mark, last_before in zip(marks[1:], lasts):
            assert await seq_at(pool, mark) == last_before
        assert await seq_at(pool, end) == lasts[-1]
    finally:
        await pool.close()
