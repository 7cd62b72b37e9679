"""The Starlette application: routes, error handlers, metrics, and a lifespan that owns the
PostgreSQL pool.

Stream hook: if ``ledger/stream/routes.py`` exists, its ``routes`` list is mounted here and
its optional ``lifespan(app)`` (an async context manager) runs inside ours, after the pool is
up; it finds ``app.state.pool``, ``app.state.settings`` and ``app.state.authenticator``.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute

from ledger import db
from ledger.api import compat, native, ops
from ledger.api.auth import Authenticator
from ledger.api.errors import EXCEPTION_HANDLERS
from ledger.api.metrics import LedgerFigures, MetricsMiddleware, RequestMetrics
from ledger.config import Settings


def stream_extension() -> tuple[list[BaseRoute], Callable[[Starlette], Any] | None]:
    """The websocket routes and lifespan from ledger.stream.routes, if that module exists."""
    try:
        stream = importlib.import_module("ledger.stream.routes")
    except ModuleNotFoundError as exc:
        if exc.name in ("ledger.stream", "ledger.stream.routes"):
            return [], None
        raise
    return list(stream.routes), getattr(stream, "lifespan", None)


def create_app(
    settings: Settings,
    *,
    pool: asyncpg.Pool | None = None,
    pool_size: int = 10,
    auth_cache_ttl: float = 2.0,
    extra_routes: Sequence[BaseRoute] = (),
    with_stream: bool = True,
) -> Starlette:
    """The API app. Give `pool` to share one (the caller then closes it); otherwise the app
    opens its own on startup (retrying with backoff until PostgreSQL answers)."""
    stream_routes, stream_lifespan = stream_extension() if with_stream else ([], None)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        own = pool is None
        app.state.pool = pool or await db.retry(
            "connect to PostgreSQL",
            lambda: db.create_pool(settings.require_database(), min_size=1, max_size=pool_size),
        )
        app.state.authenticator = Authenticator(app.state.pool, ttl=auth_cache_ttl)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if stream_lifespan is not None:
                    await stack.enter_async_context(stream_lifespan(app))
                yield
        finally:
            if own:
                await app.state.pool.close()

    request_metrics = RequestMetrics()
    app = Starlette(
        routes=[*ops.routes, *native.routes, *compat.routes, *stream_routes, *extra_routes],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        middleware=[Middleware(MetricsMiddleware, metrics=request_metrics)],
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.request_metrics = request_metrics
    app.state.figures = LedgerFigures()
    app.state.openapi = None
    return app
