"""django-celery-results and Flower compatibility, field by field.

Expected shapes come from the seeds (../shared/seeds/001_*, 002_*) and the originals' code:
django_celery_results/views.py builds its bodies from AsyncResult with
``celery.utils.get_full_cls_name`` and ``kombu.utils.encoding.safe_repr`` (used here to
compute the expected values); Flower answers from ``celery.events.state.State`` (fed here
the very same events, to compute the expected task fields).
"""

from __future__ import annotations

import time
from datetime import datetime

from celery.events.state import State
from celery.exceptions import TaskRevokedError
from celery.utils import get_full_cls_name
from kombu.utils.encoding import safe_repr

from tests.support.api import TRACEBACK, Loaded, loaded_api  # noqa: F401

# The field sets of the seeds' example responses.
SEED_DCR_TASK = {"id", "status", "result"}
SEED_DCR_FAILED_TASK = {"id", "status", "result", "exc", "traceback"}
SEED_DCR_GROUP_STATUS_ITEM = {"result", "status"}
SEED_DCR_GROUP_DONE_ITEM = {"id", "executed"}
SEED_FLOWER_TASK_INFO = {
    "args", "client", "clock", "eta", "exception", "exchange", "expires", "failed", "kwargs", "name", "received",
    "result", "retried", "retries", "revoked", "routing_key", "runtime", "sent", "started", "state", "succeeded",
    "task-id", "timestamp", "traceback", "worker",
}
SEED_FLOWER_LIST_TASK = SEED_FLOWER_TASK_INFO - {"task-id"} | {"uuid"}


async def get(api, path: str, expect: int = 200, **params):
    async with api.client("read") as http:
        r = await http.get(path, params=params)
    assert r.status_code == expect, (path, r.status_code, r.text)
    return r.json()


# --- django-celery-results -------------------------------------------------------------------


async def test_dcr_task_status_success_failure_revoked_and_unseen(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    body = await get(api, f"/celery/task/status/{w.A}/")
    assert body == {"task": {"id": w.A, "status": "SUCCESS", "result": 4}}
    assert set(body["task"]) == SEED_DCR_TASK

    # A literal result comes back as the value the JSON result backend would give (tuple -> list).
    body = await get(api, f"/celery/task/status/{w.C}/")
    assert body["task"]["result"] == {"a": [1, 2], "b": [3, "x"]}

    failed = (await get(api, f"/celery/task/status/{w.B}/"))["task"]
    assert set(failed) == SEED_DCR_FAILED_TASK
    exc = ValueError("boom")
    assert failed == {"id": w.B, "status": "FAILURE", "result": safe_repr(exc), "exc": get_full_cls_name(exc.__class__),
                      "traceback": TRACEBACK}

    revoked = (await get(api, f"/celery/task/status/{w.E}/"))["task"]
    exc = TaskRevokedError("terminated")  # what the backend stores for a terminated task
    assert revoked == {"id": w.E, "status": "REVOKED", "result": safe_repr(exc),
                       "exc": get_full_cls_name(exc.__class__), "traceback": None}

    # AsyncResult of an id nobody has seen: PENDING, result None (never a 404)
    assert await get(api, "/celery/task/status/never-seen-id/") == {
        "task": {"id": "never-seen-id", "status": "PENDING", "result": None}}
    assert (await get(api, f"/celery/task/status/{w.F}/"))["task"] == {"id": w.F, "status": "PENDING", "result": None}


async def test_dcr_task_done(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    for task_id, executed in [(w.A, True), (w.C, True), (w.B, False), (w.E, False), (w.F, False), ("nope", False)]:
        assert await get(api, f"/celery/task/done/{task_id}/") == {"task": {"id": task_id, "executed": executed}}


async def test_dcr_group_status_and_done(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    body = await get(api, f"/celery/group/status/{w.G}/")
    assert body == {"group": {"id": w.G, "results": [
        {"result": 4, "status": "SUCCESS"}, {"result": "ValueError('boom')", "status": "FAILURE"}]}}
    assert all(set(item) == SEED_DCR_GROUP_STATUS_ITEM for item in body["group"]["results"])
    done = await get(api, f"/celery/group/done/{w.G}/")
    assert done == {"group": {"id": w.G, "results": [{"id": w.A, "executed": True}, {"id": w.B, "executed": False}]}}
    assert all(set(item) == SEED_DCR_GROUP_DONE_ITEM for item in done["group"]["results"])
    for route in ("status", "done"):
        body = await get(api, f"/celery/group/{route}/no-such-group/", 404)
        assert body["error"] == "group_not_found"


async def test_dcr_paths_without_trailing_slash_redirect(loaded_api: Loaded) -> None:
    async with loaded_api.api.client("read", follow_redirects=True) as http:
        r = await http.get(f"/celery/task/status/{loaded_api.ids.A}")
    assert r.status_code == 200 and r.json()["task"]["status"] == "SUCCESS"


# --- Flower ------------------------------------------------------------------------------------


def celery_state(events: list[dict]) -> State:
    state = State()
    for event in events:
        state.event(dict(event, local_received=time.time()))
    return state


def flower_expected(state: State, task_id: str, id_key: str) -> dict:
    task = state.tasks[task_id]
    out = {k: v for k, v in task.as_dict().items() if k in SEED_FLOWER_TASK_INFO}
    out["worker"] = task.worker.hostname if task.worker is not None else None
    out[id_key] = task_id
    return out


async def test_flower_task_info_has_exactly_the_seed_fields_with_celerys_values(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    state = celery_state(loaded_api.events)
    for task_id in (w.A, w.B, w.C, w.E):
        body = await get(api, f"/api/task/info/{task_id}")
        assert set(body) == SEED_FLOWER_TASK_INFO
        expected = flower_expected(state, task_id, "task-id")
        # Flower's `client` is set by task-sent; State keeps it as the sender hostname too
        assert {k: body[k] for k in expected} == expected, task_id
    assert list(body) == sorted(body)  # Flower's JSON lists keys sorted
    assert (await get(api, "/api/task/info/nope", 404))["error"] == "task_not_found"


async def test_flower_tasks_list_shape_order_and_filters(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api
    state = celery_state(loaded_api.events)
    body = await get(api, "/api/tasks")
    # Celery's own "tasks by time" order (newest event first) is Flower's default order
    assert list(body) == [uuid for uuid, _ in state.tasks_by_time()]
    for task_id, task in body.items():
        assert set(task) == SEED_FLOWER_LIST_TASK and task["uuid"] == task_id
        assert task == flower_expected(state, task_id, "uuid")

    async def keys(**params):
        return list(await get(api, "/api/tasks", **params))

    everything = await keys()
    assert await keys(limit=2) == everything[:2]
    assert await keys(limit=2, offset=2) == everything[2:4]
    assert await keys(limit=0) == everything  # Flower: limit 0 means no limit
    assert set(await keys(taskname="tests.add")) == {w.A, w.B}
    assert set(await keys(taskname="All")) == set(everything)
    assert set(await keys(state="FAILURE")) == {w.B}
    # Flower keeps tasks with no worker yet (sent only) when filtering by worker
    assert set(await keys(workername="celery@w2")) == {w.C, w.D, w.F}
    # Flower: a stable Python sort of the default order, None as '' or 0.0
    for sort_by, key in [("name", lambda k: body[k]["name"] or ""), ("state", lambda k: body[k]["state"] or ""),
                         ("received", lambda k: body[k]["received"] or 0.0),
                         ("started", lambda k: body[k]["started"] or 0.0)]:
        assert await keys(sort_by=sort_by) == sorted(everything, key=key), sort_by
        assert await keys(sort_by="-" + sort_by) == sorted(everything, key=key, reverse=True), sort_by

    def local(ts: float) -> str:
        return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")

    # received_start/end are minutes in the server's local time; tasks never received pass
    from tests.support.api import T0
    assert set(await keys(received_start=local(T0 + 120))) == {w.D, w.F}
    assert set(await keys(received_end=local(T0 - 120))) == {w.D, w.F}
    assert set(await keys(received_start=local(T0 - 120), received_end=local(T0 + 120))) == set(everything)


async def test_flower_search_syntax(loaded_api: Loaded) -> None:
    w, api = loaded_api.ids, loaded_api.api

    async def found(search: str) -> set[str]:
        return set(await get(api, "/api/tasks", search=search))

    assert await found("tests.mul") == {w.C}                 # any field
    assert await found("celery@w2") == {w.C}                 # the worker's hostname
    assert await found("result:4") == {w.A}
    assert await found("args:(1,") == {w.B}
    assert await found("kwargs:user=alice") == {w.F}
    assert await found("kwargs:n=3") == {w.F}
    assert await found("kwargs:n=4") == set()
    assert await found("state:REVOKED") == {w.E}
    assert await found("state:REVOKED result:4") == {w.A, w.E}   # kinds of terms are OR-ed


async def test_flower_bad_parameters_name_the_field(loaded_api: Loaded) -> None:
    api = loaded_api.api
    assert (await get(api, "/api/tasks", 422, sort_by="worker"))["field"] == "sort_by"
    assert (await get(api, "/api/tasks", 422, limit="x"))["field"] == "limit"
    body = await get(api, "/api/tasks", 400, received_start="21/11/2026")
    assert body["field"] == "received_start" and "%Y-%m-%d %H:%M" in body["detail"]


async def test_flower_task_types_and_workers(loaded_api: Loaded) -> None:
    api = loaded_api.api
    assert await get(api, "/api/task/types") == {
        "task-types": ["tests.add", "tests.mail", "tests.mul", "tests.sleep", "tests.sum"]}
    assert await get(api, "/api/workers", status="true") == {"celery@w1": True, "celery@w2": False, "celery@w3": False}
    workers = await get(api, "/api/workers")
    assert list(workers) == ["celery@w1", "celery@w2", "celery@w3"]
    assert workers["celery@w1"]["stats"]["sw_ver"] == "5.5.0" and workers["celery@w1"]["status"] is True
    assert list(await get(api, "/api/workers", workername="celery@w2")) == ["celery@w2"]
    assert (await get(api, "/api/workers", 404, workername="celery@nope"))["error"] == "worker_not_found"
