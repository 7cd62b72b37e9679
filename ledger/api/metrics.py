"""/metrics in Prometheus text format: HTTP requests counted in-process, ledger figures read
from PostgreSQL (cached briefly: counting millions of rows on every scrape would hurt)."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import asyncpg
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestMetrics:
    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.seconds: Counter[tuple[str, str]] = Counter()


class MetricsMiddleware:
    """Counts requests by route template (not raw path: ids would explode the label set)."""

    def __init__(self, app: ASGIApp, metrics: RequestMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests[(label, scope["method"], status)] += 1
            self.metrics.seconds[(label, scope["method"])] += time.perf_counter() - started


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class LedgerFigures:
    """Database figures, recomputed at most every `ttl` seconds."""

    def __init__(self, ttl: float = 10.0) -> None:
        self.ttl, self._at, self._value = ttl, 0.0, None

    async def get(self, pool: asyncpg.Pool) -> dict[str, Any]:
        if self._value is None or time.monotonic() - self._at > self.ttl:
            self._value = await self._read(pool)
            self._at = time.monotonic()
        return self._value

    async def _read(self, pool: asyncpg.Pool) -> dict[str, Any]:
        async with pool.acquire() as conn:
            last_seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.events")
            return {
                "last_seq": last_seq,
                **dict(await conn.fetchrow("SELECT events, quarantined FROM ledger.log_counts")),
                "checkpoints": {r["projection"]: r["seq"] for r in
                                await conn.fetch("SELECT projection, seq FROM ledger.checkpoints")},
                "tasks": {r["state"]: r["n"] for r in
                          await conn.fetch("SELECT state, count(*) AS n FROM ledger.tasks GROUP BY state")},
            }


def render(requests: RequestMetrics, figures: dict[str, Any], lag: int) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            out.append(f"{name}{{{text}}} {value}" if text else f"{name} {value}")

    metric("ledger_events_captured_total", "counter", "Events in the log.", [({}, figures["events"])])
    metric("ledger_log_last_seq", "gauge", "The log's last position.", [({}, figures["last_seq"])])
    metric("ledger_events_quarantined_total", "counter", "Messages capture quarantined.",
           [({}, figures["quarantined"])])
    metric("ledger_projector_lag_events", "gauge", "Log positions the slowest projection is behind.", [({}, lag)])
    metric("ledger_projection_checkpoint_seq", "gauge", "Last log position each projection applied.",
           [({"projection": k}, v) for k, v in sorted(figures["checkpoints"].items())])
    metric("ledger_tasks", "gauge", "Tasks by state.", [({"state": k}, v) for k, v in sorted(figures["tasks"].items())])
    metric("ledger_http_requests_total", "counter", "HTTP requests by route, method and status.",
           [({"route": r, "method": m, "status": s}, n) for (r, m, s), n in sorted(requests.requests.items())])
    metric("ledger_http_request_seconds_total", "counter", "Time spent answering HTTP requests.",
           [({"route": r, "method": m}, round(v, 6)) for (r, m), v in sorted(requests.seconds.items())])
    return "\n".join(out) + "\n"
