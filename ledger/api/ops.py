"""Operations routes: /healthz (process up), /readyz (database, projector lag, captures),
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


CAPTURE_SILENT_AFTER = 10.0  # seconds without a report (capture reports every 2 s)


async def capture_states(conn: asyncpg.Pool | asyncpg.Connection) -> list[dict[str, Any]]:
    """What the capture processes last reported (see ledger.capture.status)."""
    rows = await conn.fetch(
        "SELECT capture_id, broker, connected, stored,"
        " extract(epoch FROM now() - reported_at)::float8 AS seconds_since_report"
        " FROM ledger.capture_status WHERE reported_at > now() - interval '1 hour' ORDER BY capture_id"
    )
    return [dict(r) for r in rows]


def capture_problem(captures: list[dict[str, Any]]) -> str | None:
    """Why events may not be flowing, or None: a live capture without its broker, or
    captures that all went silent. No capture at all is not a problem of this process."""
    live = [c for c in captures if c["seconds_since_report"] <= CAPTURE_SILENT_AFTER]
    for c in live:
        if not c["connected"]:
            return f"capture {c['capture_id']} is not connected to its broker {c['broker']}"
    if captures and not live:
        quiet = min(c["seconds_since_report"] for c in captures)
        return f"no capture process has reported for {quiet:.0f} s"
    return None


@endpoint("/readyz", summary="Ready when the database answers, the projector is within ready_max_lag "
          "and every reporting capture is connected to its broker.",
          tag=TAG, response=Readiness, errors=(503,))
async def readyz(request: Request, _: None) -> Response:
    max_lag = request.app.state.settings.ready_max_lag
    body: dict[str, Any] = {"ready": False, "database": False, "last_seq": None, "checkpoint_seq": None,
                            "lag": None, "max_lag": max_lag, "captures": [], "reason": None}
    try:
        async with request.app.state.pool.acquire(timeout=2) as conn:
            last, checkpoint, lag = await projector_lag(conn)
            captures = await capture_states(conn)
    except Exception as exc:  # noqa: BLE001 -- readiness must answer, whatever broke
        body["reason"] = f"database unreachable: {type(exc).__name__}"
        return ORJSONResponse(body, status_code=503)
    body.update(database=True, last_seq=last, checkpoint_seq=checkpoint, lag=lag, captures=captures)
    if problem := capture_problem(captures):
        body["reason"] = problem
    elif checkpoint is None and last > 0:
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
