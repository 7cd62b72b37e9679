"""Operations routes: /healthz (process up), /readyz (database and projector lag),
/metrics (Prometheus text) and /openapi.json."""

from __future__ import annotations

from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from ledger.api import metrics, openapi
from ledger.api.errors import ORJSONResponse
from ledger.api.models import Health, Readiness
from ledger.api.routing import endpoint

TAG = "operations"


@endpoint("/healthz", scope=None, summary="The process is up (no database check, no token).", tag=TAG,
          response=Health)
async def healthz(request: Request, _: None) -> dict[str, Any]:
    return {"status": "ok"}


async def projector_lag(conn: asyncpg.Pool | asyncpg.Connection) -> tuple[int, int | None, int]:
    """(last log seq, slowest projection's checkpoint or None, lag in positions)."""
    row = await conn.fetchrow(
        "SELECT (SELECT coalesce(max(seq), 0) FROM ledger.events) AS last_seq,"
        " (SELECT min(seq) FROM ledger.checkpoints) AS checkpoint"
    )
    last, checkpoint = row["last_seq"], row["checkpoint"]
    return last, checkpoint, max(0, last - (checkpoint or 0))


@endpoint("/readyz", summary="Ready when the database answers and the projector is within ready_max_lag.",
          tag=TAG, response=Readiness, errors=(503,))
async def readyz(request: Request, _: None) -> Response:
    max_lag = request.app.state.settings.ready_max_lag
    body: dict[str, Any] = {"ready": False, "database": False, "last_seq": None, "checkpoint_seq": None,
                            "lag": None, "max_lag": max_lag, "reason": None}
    try:
        async with request.app.state.pool.acquire(timeout=2) as conn:
            last, checkpoint, lag = await projector_lag(conn)
    except Exception as exc:  # noqa: BLE001 -- readiness must answer, whatever broke
        body["reason"] = f"database unreachable: {type(exc).__name__}"
        return ORJSONResponse(body, status_code=503)
    body.update(database=True, last_seq=last, checkpoint_seq=checkpoint, lag=lag)
    if checkpoint is None and last > 0:
        body["reason"] = "the projector has not checkpointed yet"
    elif lag > max_lag:
        body["reason"] = f"projector lag {lag} exceeds {max_lag}"
    else:
        body["ready"] = True
    return ORJSONResponse(body, status_code=200 if body["ready"] else 503)


@endpoint("/metrics", summary="Prometheus metrics: events, quarantine, projector lag, requests, tasks by state.",
          tag=TAG, content_type="text/plain")
async def metrics_route(request: Request, _: None) -> Response:
    state = request.app.state
    figures = await state.figures.get(state.pool)
    lag = max(0, figures["last_seq"] - min(figures["checkpoints"].values(), default=0))
    return PlainTextResponse(metrics.render(state.request_metrics, figures, lag),
                             media_type="text/plain; version=0.0.4")


@endpoint("/openapi.json", summary="This document.", tag=TAG)
async def openapi_route(request: Request, _: None) -> Response:
    state = request.app.state
    if getattr(state, "openapi", None) is None:
        state.openapi = openapi.build(request.app.routes, auth=state.settings.auth)
    return ORJSONResponse(state.openapi)


routes = [healthz, readyz, metrics_route, openapi_route]
