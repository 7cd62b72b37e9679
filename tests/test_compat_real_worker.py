"""A real worker's workload (successes, a failure, retries, a revoked and an expired task, a
group, a chord, a chain): the django-celery-results routes answer exactly what that
package's views compute from Celery's own result backend, and Flower's task info reports
the backend's state for every task.

The expected bodies are computed here with the views' own logic (django_celery_results/
views.py: AsyncResult, GroupResult.restore, safe_repr, get_full_cls_name), against the
result backend the worker wrote to; the ledger only saw the events.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
from celery import states
from celery.result import AsyncResult, GroupResult
from celery.utils import get_full_cls_name
from kombu.utils.encoding import safe_repr

from tests.support.api import project, record, running_api
from tests.support.worker import (
    Workload,
    cleanup,
    run_workload_on_worker,
    workload_config,
)
from tests.support.workload_app import make_app


def views_say(config: Any, workload: Workload) -> dict[str, Any]:
    """What django-celery-results' four views would answer, from the real result backend."""
    app = make_app(config)
    try:
        out: dict[str, Any] = {}
        for task_id in workload.tasks:
            result = AsyncResult(task_id, app=app)
            state, retval = result.state, result.result
            data = {"id": task_id, "status": state, "result": retval}
            if state in states.EXCEPTION_STATES:
                data.update({"result": safe_repr(retval), "exc": get_full_cls_name(retval.__class__),
                             "traceback": result.traceback})
            out[f"/celery/task/status/{task_id}/"] = {"task": data}
            out[f"/celery/task/done/{task_id}/"] = {"task": {"id": task_id, "executed": result.successful()}}
        for group_id in workload.groups:
            restored = GroupResult.restore(group_id, app=app)
            out[f"/celery/group/status/{group_id}/"] = {"group": {"id": group_id, "results": [
                {"result": r.result, "status": r.status} for r in restored.results]}}
            out[f"/celery/group/done/{group_id}/"] = {"group": {"id": group_id, "results": [
                {"id": r.id, "executed": r.successful()} for r in restored.results]}}
        return json.loads(json.dumps(out))  # as JsonResponse would encode it (tuples -> lists)
    finally:
        app.close()


async def test_compat_routes_match_celerys_result_backend(database_url: str, conn: asyncpg.Connection,
                                                        redis_url: str, event_exchange: str) -> None:
    config = workload_config(redis_url, event_exchange, redis_url)
    cleanup(config)
    try:
        workload, sent = await asyncio.to_thread(run_workload_on_worker, config)
        expected = await asyncio.to_thread(views_say, config, workload)
    finally:
        cleanup(config)
    await record(conn, sent)  # every event the app published, as capture would append it
    await project(database_url)

    failures = [t for t in workload.tasks.values() if t.state == "FAILURE"]
    revoked = [t for t in workload.tasks.values() if t.state == "REVOKED"]
    assert failures and revoked and workload.groups and workload.chords  # the workload covers them
    async with running_api(database_url) as api, api.client("read") as http:
        for path, body in expected.items():
            r = await http.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.json() == body, path
        for task in workload.tasks.values():
            info = (await http.get(f"/api/task/info/{task.id}")).json()
            assert info["state"] == task.state and info["name"] == task.name, task
            assert info["retries"] == task.retries, task
        for group_id, members in workload.groups.items():
            body = (await http.get(f"/v1/groups/{group_id}")).json()
            assert [m["task_id"] for m in body["members"]] == members  # in group order, no chord callback
            assert body["group"]["size"] == len(members) and body["group"]["states"] == {"SUCCESS": len(members)}
            # The stored projection row (what the change feed pushes) agrees: no chord callback.
            stored = await conn.fetchrow("SELECT size, states FROM ledger.groups WHERE group_id = $1", group_id)
            assert (stored["size"], stored["states"]) == (len(members), {"SUCCESS": len(members)})
        for callback, header in workload.chords.items():
            tree = (await http.get(f"/v1/tasks/{workload.groups[header][0]}/tree")).json()
            assert tree["chord"]["task_id"] == callback and tree["chord"]["state"] == "SUCCESS"
