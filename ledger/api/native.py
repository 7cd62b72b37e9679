"""The native API under /v1/: tasks, timelines, trees, groups, workers, task names, the log."""

from __future__ import annotations

from collections import Counter
from typing import Any

from starlette.requests import Request

from ledger.api import queries, timetravel
from ledger.api.errors import ApiError, not_found
from ledger.api.models import (
    AsOfQuery,
    EventPage,
    EventsQuery,
    GroupDetail,
    TaskDetail,
    TaskListQuery,
    TaskNameList,
    TaskPage,
    TaskTree,
    Timeline,
    Worker,
    WorkerList,
    WorkersQuery,
)
from ledger.api.routing import endpoint
from ledger.projections import worker_status

TAG = "native"


def pool(request: Request):
    return request.app.state.pool


@endpoint("/v1/tasks", summary="List tasks, filtered, newest first, with keyset pagination.", tag=TAG,
          query=TaskListQuery, response=TaskPage, errors=(400, 422))
async def list_tasks(request: Request, q: TaskListQuery) -> dict[str, Any]:
    rows, next_cursor = await queries.list_tasks(pool(request), q)
    return {"tasks": rows, "next_cursor": next_cursor}


@endpoint("/v1/tasks/{task_id}", summary="One task; with as_of_seq or as_of, as it stood then.", tag=TAG,
          query=AsOfQuery, response=TaskDetail, errors=(404, 422))
async def get_task(request: Request, q: AsOfQuery) -> dict[str, Any]:
    task_id = request.path_params["task_id"]
    seq = await timetravel.resolve_seq(pool(request), q)
    if seq is not None:
        row = await timetravel.task_as_of(pool(request), task_id, seq)
    else:
        row = await queries.get_task(pool(request), task_id)
        if row is not None:
            row["as_of_seq"] = None
    if row is None:
        raise not_found("task", task_id)
    return row


@endpoint("/v1/tasks/{task_id}/timeline", summary="Every event of a task from the log, in log order.", tag=TAG,
          response=Timeline, errors=(404,))
async def task_timeline(request: Request, _: None) -> dict[str, Any]:
    task_id = request.path_params["task_id"]
    events = await queries.task_events(pool(request), task_id)
    if not events:
        raise not_found("task", task_id)
    return {"task_id": task_id, "events": events}


def _ref(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {k: row.get(k) for k in ("task_id", "name", "state", "group_id", "group_index")}


@endpoint("/v1/tasks/{task_id}/tree", summary="A task's parent, root, children, group and chord.", tag=TAG,
          response=TaskTree, errors=(404,))
async def task_tree(request: Request, _: None) -> dict[str, Any]:
    db = pool(request)
    task_id = request.path_params["task_id"]
    task = await queries.get_task(db, task_id)
    if task is None:
        raise not_found("task", task_id)
    wanted = [i for i in (task["parent_id"], task["root_id"]) if i]
    related = {
        r["task_id"]: dict(r)
        for r in await db.fetch(f"SELECT {queries.TASK_REF_COLUMNS} FROM ledger.tasks WHERE task_id = ANY($1::text[])",
                                wanted)
    }
    children = await db.fetch(
        f"SELECT {queries.TASK_REF_COLUMNS} FROM ledger.tasks WHERE parent_id = $1 ORDER BY first_seq, task_id",
        task_id,
    )
    group = await queries.get_group(db, task["group_id"]) if task["group_id"] else None
    members = await queries.group_members(db, task["group_id"], queries.TASK_REF_COLUMNS) if task["group_id"] else []
    chord_id = (group or {}).get("chord_id") or task.get("chord_id")
    chord = None
    if chord_id:
        chord = _ref(dict(r)) if (r := await db.fetchrow(
            f"SELECT {queries.TASK_REF_COLUMNS} FROM ledger.tasks WHERE task_id = $1", chord_id)) else {
            "task_id": chord_id, "name": None, "state": "PENDING", "group_id": None, "group_index": None}
    return {
        "task": _ref(task),
        "parent": _ref(related.get(task["parent_id"])) if task["parent_id"] else None,
        "root": _ref(related.get(task["root_id"])) if task["root_id"] else None,
        "children": [_ref(dict(c)) for c in children],
        "group": group,
        "group_members": members,
        "chord": chord,
    }


@endpoint("/v1/groups/{group_id}", summary="A group (or chord header) with its members in group order.", tag=TAG,
          query=AsOfQuery, response=GroupDetail, errors=(404, 422))
async def get_group(request: Request, q: AsOfQuery) -> dict[str, Any]:
    db = pool(request)
    group_id = request.path_params["group_id"]
    group = await queries.get_group(db, group_id)
    if group is None:
        raise not_found("group", group_id)
    seq = await timetravel.resolve_seq(db, q)
    if seq is not None:
        past, members = await timetravel.group_as_of(db, group_id, seq)
        if past is None:
            raise ApiError(404, "group_not_found", f"group {group_id!r} had no member at seq {seq}")
        group = {k: past.get(k) for k in group}
    else:
        members = await queries.group_members(db, group_id)
    # size and states from the members listed (the projection also counts a chord's callback,
    # which Celery sends with its header's group id but which is not a member)
    group["size"] = len(members)
    group["states"] = dict(Counter(m["state"] for m in members))
    return {"group": group, "members": members, "as_of_seq": seq}


@endpoint("/v1/workers", summary="Workers with their status (online, offline, lost).", tag=TAG,
          query=WorkersQuery, response=WorkerList, errors=(422,))
async def list_workers(request: Request, q: WorkersQuery) -> dict[str, Any]:
    now = queries.now()
    rows = await pool(request).fetch(f"SELECT {queries.WORKER_COLUMNS} FROM ledger.workers ORDER BY hostname")
    workers = []
    for r in rows:
        w = dict(r)
        w["status"] = worker_status(w, now)
        if not q.status or w["status"] in q.status:
            workers.append(w)
    return {"workers": workers}


@endpoint("/v1/workers/{hostname}", summary="One worker with its status.", tag=TAG,
          response=Worker, errors=(404,))
async def get_worker(request: Request, _: None) -> dict[str, Any]:
    hostname = request.path_params["hostname"]
    row = await pool(request).fetchrow(f"SELECT {queries.WORKER_COLUMNS} FROM ledger.workers WHERE hostname = $1",
                                       hostname)
    if row is None:
        raise not_found("worker", hostname)
    w = dict(row)
    w["status"] = worker_status(w, queries.now())
    return w


@endpoint("/v1/task-names", summary="Every task name seen, with how many tasks carried it.", tag=TAG,
          response=TaskNameList)
async def task_names(request: Request, _: None) -> dict[str, Any]:
    rows = await pool(request).fetch("SELECT name, tasks, first_seen, last_seen FROM ledger.task_names ORDER BY name")
    return {"task_names": [dict(r) for r in rows]}


@endpoint("/v1/events", summary="The raw log: events after a position, optionally of some types or one task.",
          tag=TAG, query=EventsQuery, response=EventPage, errors=(422,))
async def read_log(request: Request, q: EventsQuery) -> dict[str, Any]:
    events = await queries.read_log(pool(request), q.after, q.type, q.task_id, q.limit)
    return {"events": events, "next_after": events[-1]["seq"] if events else q.after}


routes = [list_tasks, get_task, task_timeline, task_tree, get_group, list_workers, get_worker, task_names, read_log]
