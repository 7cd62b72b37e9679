"""Compatibility routes in other tools' exact JSON shapes, so a frontend switches by base URL:

- django-celery-results' views (django_celery_results/views.py) under /celery/;
- Flower's task API (flower/api/tasks.py, workers.py) under /api/.

Differences that cannot be helped are listed in the functions' docstrings.
"""

from __future__ import annotations

import ast
import builtins
import re
import time
from datetime import datetime
from typing import Any

from starlette.requests import Request

from ledger.api import queries
from ledger.api.errors import bad_param, not_found
from ledger.api.models import (
    DCRGroupDone,
    DCRGroupStatus,
    DCRTaskDone,
    DCRTaskStatus,
    FlowerListedTask,
    FlowerTaskInfo,
    FlowerTasksQuery,
    FlowerTaskTypes,
    FlowerWorker,
    FlowerWorkersQuery,
)
from ledger.projections import worker_status
from ledger.api.routing import endpoint

EXCEPTION_STATES = frozenset({"FAILURE", "RETRY", "REVOKED"})

# --- django-celery-results ------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    """`value` as JSON data, or raise ValueError (sets, bytes, huge ints... are not)."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, float)):
        return value
    if isinstance(value, int):
        if -(2**63) <= value < 2**64:
            return value
        raise ValueError("integer out of JSON range")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not JSON")


def result_value(text: str | None) -> Any:
    """The task's return value as the result backend would give it.

    Events carry the result as Celery's saferepr text ("4", "'abc'", "{'a': 1}"); a Python
    literal is turned back into the value (tuples become lists, as the JSON backend does).
    Anything else (a custom object's repr, or a repr Celery truncated at 1024 characters)
    stays the text the event carried.
    """
    if text is None:
        return None
    try:
        return _jsonable(ast.literal_eval(text))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


_CLASS_TOKEN = re.compile(r"^([A-Za-z_][\w.]*)")


def exception_class(exception: str | None, traceback: str | None) -> str | None:
    """The exception's full class name, as celery.utils.get_full_cls_name gives it.

    Python's traceback names non-builtin exceptions with their module ("tasks.Boom: ...");
    builtins and Celery's own exceptions are looked up by name.
    """
    name = None
    if exception:
        m = _CLASS_TOKEN.match(exception)
        name = m.group(1) if m else None
    last = next((line for line in reversed((traceback or "").splitlines()) if line.strip()), "")
    m = _CLASS_TOKEN.match(last)
    if m and (name is None or m.group(1).rsplit(".", 1)[-1] == name.rsplit(".", 1)[-1]):
        name = m.group(1)
    if not name:
        return None
    if "." in name:
        return name
    if isinstance(getattr(builtins, name, None), type):
        return f"builtins.{name}"
    import celery.exceptions

    found = getattr(celery.exceptions, name, None)
    if isinstance(found, type):
        return f"{found.__module__}.{found.__qualname__}"
    return f"builtins.{name}"


def _revoke_reason(task: dict[str, Any]) -> str:
    extra = task.get("extra") or {}
    if extra.get("expired"):
        return "expired"
    if extra.get("terminated"):
        return "terminated"
    return "revoked"


def dcr_status(state: str) -> str:
    # The result backend never stores RECEIVED: until the task starts it reads PENDING.
    return "PENDING" if state == "RECEIVED" else state


def dcr_task_body(task_id: str, task: dict[str, Any] | None) -> dict[str, Any]:
    """django-celery-results' task_status body.

    - unseen task: PENDING with a null result, as AsyncResult reports an unknown id;
    - SUCCESS: the return value (see result_value);
    - FAILURE / RETRY: result is safe_repr(exception) -- the event carries exactly that --,
      exc the full class name, traceback the worker's traceback;
    - REVOKED: what the backend stores, TaskRevokedError(reason), with no traceback;
    - other states: a null result.
    """
    if task is None:
        return {"id": task_id, "status": "PENDING", "result": None}
    state = dcr_status(task["state"])
    body: dict[str, Any] = {"id": task_id, "status": state, "result": None}
    if state == "SUCCESS":
        body["result"] = result_value(task.get("result"))
    elif state == "REVOKED":
        body.update(result=f"TaskRevokedError('{_revoke_reason(task)}')",
                    exc="celery.exceptions.TaskRevokedError", traceback=None)
    elif state in EXCEPTION_STATES:
        body.update(result=task.get("exception"),
                    exc=exception_class(task.get("exception"), task.get("traceback")),
                    traceback=task.get("traceback"))
    return body


_DCR_TASK = "task_id, state, result, exception, traceback, extra"


async def _dcr_task(request: Request) -> dict[str, Any] | None:
    row = await request.app.state.pool.fetchrow(
        f"SELECT {_DCR_TASK} FROM ledger.tasks WHERE task_id = $1", request.path_params["task_id"]
    )
    return dict(row) if row is not None else None


@endpoint("/celery/task/status/{task_id}/", summary="django-celery-results task_status.", tag="django-celery-results",
          response=DCRTaskStatus)
async def dcr_task_status(request: Request, _: None) -> dict[str, Any]:
    return {"task": dcr_task_body(request.path_params["task_id"], await _dcr_task(request))}


@endpoint("/celery/task/done/{task_id}/", summary="django-celery-results is_task_successful.",
          tag="django-celery-results", response=DCRTaskDone)
async def dcr_task_done(request: Request, _: None) -> dict[str, Any]:
    task = await _dcr_task(request)
    return {"task": {"id": request.path_params["task_id"], "executed": bool(task and task["state"] == "SUCCESS")}}


async def _dcr_members(request: Request) -> list[dict[str, Any]]:
    group_id = request.path_params["group_id"]
    db = request.app.state.pool
    members = await queries.group_members(db, group_id, _DCR_TASK)
    if not members and await queries.get_group(db, group_id) is None:
        # The original fails on an unknown group (GroupResult.restore returns None); we say 404.
        raise not_found("group", group_id)
    return members


@endpoint("/celery/group/status/{group_id}/", summary="django-celery-results group_status.",
          tag="django-celery-results", response=DCRGroupStatus, errors=(404,))
async def dcr_group_status(request: Request, _: None) -> dict[str, Any]:
    members = await _dcr_members(request)
    results = []
    for m in members:
        body = dcr_task_body(m["task_id"], m)
        results.append({"result": body["result"], "status": body["status"]})
    return {"group": {"id": request.path_params["group_id"], "results": results}}


@endpoint("/celery/group/done/{group_id}/", summary="django-celery-results is_group_successful.",
          tag="django-celery-results", response=DCRGroupDone, errors=(404,))
async def dcr_group_done(request: Request, _: None) -> dict[str, Any]:
    members = await _dcr_members(request)
    return {"group": {"id": request.path_params["group_id"],
                      "results": [{"id": m["task_id"], "executed": m["state"] == "SUCCESS"} for m in members]}}


# --- Flower ---------------------------------------------------------------------------------

FLOWER_FIELDS = (
    "args", "client", "clock", "eta", "exception", "exchange", "expires", "failed", "kwargs", "name",
    "received", "result", "retried", "retries", "revoked", "routing_key", "runtime", "sent", "started",
    "state", "succeeded", "timestamp", "traceback", "worker",
)
FLOWER_MAX_TASKS = 10_000
_FLOWER_COLUMNS = "task_id, " + ", ".join(f'"{f}"' for f in FLOWER_FIELDS)


def flower_task(row: dict[str, Any], id_key: str) -> dict[str, Any]:
    """Flower's Task.as_dict() fields, keys sorted as Flower's JSON shows them."""
    out = {f: row[f] for f in FLOWER_FIELDS}
    out[id_key] = row["task_id"]
    return dict(sorted(out.items()))


@endpoint("/api/task/info/{task_id}", summary="Flower: task info.", tag="flower", response=FlowerTaskInfo,
          errors=(404,))
async def flower_task_info(request: Request, _: None) -> dict[str, Any]:
    task_id = request.path_params["task_id"]
    row = await request.app.state.pool.fetchrow(f"SELECT {_FLOWER_COLUMNS} FROM ledger.tasks WHERE task_id = $1",
                                                task_id)
    if row is None:
        raise not_found("task", task_id)
    return flower_task(dict(row), "task-id")


_SEARCH_PART = re.compile(r'(?:[^\s,"]|"(?:\\.|[^"])*")+')


def _search_value(raw: str) -> str:
    return raw.strip('" ') if raw else ""


def parse_flower_search(raw: str | None) -> dict[str, Any]:
    """Flower's search syntax (flower/utils/search.py): words, result:, args:, kwargs:k=v, state:."""
    terms: dict[str, Any] = {}
    for part in _SEARCH_PART.findall(raw or ""):
        if part.startswith("result:"):
            terms["result"] = _search_value(part[7:])
        elif part.startswith("args:"):
            terms.setdefault("args", []).append(_search_value(part[5:]))
        elif part.startswith("kwargs:"):
            key, _, value = part[7:].partition("=")
            terms.setdefault("kwargs", {})[key.strip()] = _search_value(value.strip())
        elif part.startswith("state"):
            terms.setdefault("state", []).append(_search_value(part[len("state:"):]))
        else:
            terms["any"] = _search_value(part)
    return terms


def _kwarg_pattern(key: str, value: str) -> str:
    # "'key': value" inside the kwargs repr, the value quoted or not, ended by , or }
    return re.escape(key) + "['\"]?: ['\"]?" + re.escape(value) + "['\"]?[,}]"


def flower_search_sql(terms: dict[str, Any], p: queries.Params) -> str | None:
    """Flower matches a task when any kind of term matches (terms of one kind must all match)."""
    alternatives = []
    if terms.get("state"):
        alternatives.append(f"state = ANY({p(terms['state'])}::text[])")
    if terms.get("any"):
        alternatives.append(
            "strpos(concat_ws('|', name, task_id, state, worker, args, kwargs, result), " + p(terms["any"]) + ") > 0"
        )
    if terms.get("result"):
        alternatives.append(f"strpos(result, {p(terms['result'])}) > 0")
    if terms.get("kwargs"):
        alternatives.append("(" + " AND ".join(f"kwargs ~ {p(_kwarg_pattern(k, v))}"
                                               for k, v in terms["kwargs"].items()) + ")")
    if terms.get("args"):
        alternatives.append("(" + " AND ".join(f"strpos(args, {p(a)}) > 0" for a in terms["args"]) + ")")
    return "(" + " OR ".join(alternatives) + ")" if alternatives else None


def _flower_time(field: str, value: str) -> float:
    try:
        # Flower: time.mktime(strptime(x, '%Y-%m-%d %H:%M')) -- the server's local time.
        return time.mktime(datetime.strptime(value, "%Y-%m-%d %H:%M").timetuple())
    except ValueError:
        raise bad_param(field, "expected '%Y-%m-%d %H:%M'", status=400) from None


@endpoint("/api/tasks", summary="Flower: list tasks (newest first), with Flower's filters.", tag="flower",
          query=FlowerTasksQuery, response=dict[str, FlowerListedTask], errors=(400, 422))
async def flower_tasks(request: Request, q: FlowerTasksQuery) -> dict[str, Any]:
    p = queries.Params()
    where = []
    if q.taskname and q.taskname != "All":
        where.append(f"name = {p(q.taskname)}")
    if q.workername and q.workername != "All":
        where.append(f"(worker IS NULL OR worker = {p(q.workername)})")  # Flower keeps worker-less tasks
    if q.state and q.state != "All":
        where.append(f"state = {p(q.state)}")
    if q.received_start:
        where.append(f"(received IS NULL OR received >= {p(_flower_time('received_start', q.received_start))})")
    if q.received_end:
        where.append(f"(received IS NULL OR received <= {p(_flower_time('received_end', q.received_end))})")
    search = flower_search_sql(parse_flower_search(q.search), p)
    if search:
        where.append(search)
    # Flower's default order is its event heap newest first: the task's latest event.
    order = "last_seq DESC"
    if q.sort_by:
        key = q.sort_by.lstrip("-")
        default = "''" if key in ("name", "state") else "0"
        collate = ' COLLATE "C"' if key in ("name", "state") else ""
        order = f"coalesce({key}, {default}){collate} {'DESC' if q.sort_by.startswith('-') else 'ASC'}, {order}"
    sql = f"SELECT {_FLOWER_COLUMNS} FROM ledger.tasks" + (" WHERE " + " AND ".join(where) if where else "")
    sql += f" ORDER BY {order}"
    # Flower holds at most max_tasks (10,000 by default) in memory, so "no limit" never meant
    # millions of rows; the ledger keeps that bound.
    sql += f" LIMIT {p(min(q.limit or FLOWER_MAX_TASKS, FLOWER_MAX_TASKS))}"
    if q.offset > 0:
        sql += f" OFFSET {p(q.offset)}"
    rows = await request.app.state.pool.fetch(sql, *p.values)
    return {r["task_id"]: flower_task(dict(r), "uuid") for r in rows}


@endpoint("/api/task/types", summary="Flower: task names seen.", tag="flower", response=FlowerTaskTypes)
async def flower_task_types(request: Request, _: None) -> dict[str, Any]:
    rows = await request.app.state.pool.fetch('SELECT name FROM ledger.task_names ORDER BY name COLLATE "C"')
    return {"task-types": [r["name"] for r in rows]}


@endpoint("/api/workers", summary="Flower: workers. Fields come from worker events (no inspect broadcast).",
          tag="flower", query=FlowerWorkersQuery, response=dict[str, FlowerWorker] | dict[str, bool], errors=(404,))
async def flower_workers(request: Request, q: FlowerWorkersQuery) -> dict[str, Any]:
    """Flower fills this from `inspect` replies (stats, active_queues, registered, conf); the
    ledger knows what worker events carry, so it answers with `stats` built from them,
    `timestamp` (last heartbeat) and `status`. `?status=true` gives {hostname: alive} exactly."""
    rows = await request.app.state.pool.fetch(
        f"SELECT {queries.WORKER_COLUMNS} FROM ledger.workers"
        " WHERE ($1::text IS NULL OR hostname = $1) ORDER BY hostname",
        q.workername,
    )
    if q.workername and not rows:
        raise not_found("worker", q.workername)
    now = queries.now()
    out: dict[str, Any] = {}
    for r in rows:
        w = dict(r)
        alive = worker_status(w, now) == "online"
        if q.status:
            out[w["hostname"]] = alive
            continue
        out[w["hostname"]] = {
            "stats": {
                "pid": w["pid"], "clock": None, "sw_ident": w["sw_ident"], "sw_ver": w["sw_ver"],
                "sw_sys": w["sw_sys"], "freq": w["freq"], "loadavg": w["loadavg"], "active": w["active"],
                "processed": w["processed"],
            },
            "timestamp": w["last_heartbeat"],
            "status": alive,
        }
    return out


routes = [
    dcr_task_status, dcr_task_done, dcr_group_status, dcr_group_done,
    flower_task_info, flower_tasks, flower_task_types, flower_workers,
]
