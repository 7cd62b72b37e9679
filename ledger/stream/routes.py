"""Routes and lifespan that `ledger.api.app.create_app` mounts: the ``/v1/stream``
websocket and the ``/v1/tasks/{task_id}/wait`` long poll, both served by one `Hub` per
replica (``app.state.stream_hub``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from ledger.api import queries
from ledger.api.auth import authenticate
from ledger.api.errors import ApiError
from ledger.api.models import Query, TaskDetail
from ledger.api.routing import endpoint
from ledger.stream.filters import FINAL_STATES
from ledger.stream.hub import Hub
from ledger.stream.session import Session

MAX_WAIT = 300.0


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    """Start this replica's hub after the pool is up; stop it (closing every socket with
    1001 and a resume position) before the pool goes."""
    settings = app.state.settings
    hub = Hub(settings.require_database(), app.state.pool, poll_interval=settings.projector_poll_interval)
    await hub.start()
    app.state.stream_hub = hub
    try:
        yield
    finally:
        await hub.stop()


async def stream(websocket: WebSocket) -> None:
    """Live push: subscribe to a task, a group, a worker, all workers, a filtered task list or the raw log; resume with since (JSON protocol: README.md, "Websocket protocol")."""
    app = websocket.app
    settings = app.state.settings
    authenticator = getattr(app.state, "authenticator", None)

    async def auth(token: str | None) -> Any:
        if authenticator is not None:
            return await authenticator(token)
        return await authenticate(app.state.pool, token)

    session = Session(websocket, app.state.stream_hub, queue_size=settings.stream_queue_size,
                      heartbeat=settings.stream_heartbeat, auth_required=settings.auth, authenticate=auth)
    await session.run()


class WaitQuery(Query):
    timeout: float = Field(30.0, ge=0, le=MAX_WAIT, description="Seconds to wait for a final state.")


class WaitResult(BaseModel):
    final: bool = Field(description="True when the task is in SUCCESS, FAILURE, REVOKED or REJECTED.")
    seq: int = Field(description="The change-feed position the answer reflects (use as since on /v1/stream).")
    task: TaskDetail


@endpoint("/v1/tasks/{task_id}/wait", summary=(
    "Long poll: answers as soon as the task reaches a final state (SUCCESS, FAILURE, REVOKED, REJECTED),"
    " or with its current state when `timeout` seconds pass. A task still unknown when the timeout"
    " passes is a 404."), tag="stream", query=WaitQuery, response=WaitResult, errors=(404, 422))
async def wait_task(request: Request, q: WaitQuery) -> dict[str, Any]:
    task_id = request.path_params["task_id"]
    hub: Hub = request.app.state.stream_hub
    pool = request.app.state.pool
    # Register before reading: a change committed after the read reaches the future; one
    # committed before it is in the row.
    fut = hub.wait_for_final(task_id)
    try:
        seq = hub.position()
        row = await queries.get_task(pool, task_id)
        if row is None or row["state"] not in FINAL_STATES:
            try:
                await asyncio.wait_for(asyncio.shield(fut), q.timeout)
            except asyncio.TimeoutError:
                pass
            seq = hub.position()
            row = await queries.get_task(pool, task_id)
    finally:
        hub.forget_waiter(task_id, fut)
        fut.cancel()
    if row is None:
        raise ApiError(404, "task_not_found", f"unknown task {task_id!r} (nothing seen within {q.timeout:g}s)")
    row["as_of_seq"] = None
    return {"final": row["state"] in FINAL_STATES, "seq": max(seq, row["last_seq"]), "task": row}


routes = [WebSocketRoute("/v1/stream", stream, name="stream"), wait_task]
