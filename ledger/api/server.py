"""`ledger serve`: the API on uvicorn. `serve()` runs it inside another event loop (for
`ledger up` and tests) until a stop event is set."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
from collections.abc import Iterator, Sequence

import uvicorn
from starlette.applications import Starlette

from ledger.api.app import create_app
from ledger.config import Settings
from ledger.service import run_until_signalled


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signals to its host (the stop event decides)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _config(app: Starlette, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        access_log=False,  # /metrics counts requests; a log line per request costs throughput
        lifespan="on",
        proxy_headers=True,
    )


async def serve(
    settings: Settings,
    stop: asyncio.Event,
    *,
    app: Starlette | None = None,
    sockets: Sequence[socket.socket] | None = None,
    started: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set, then shut down gracefully. `started` is set once listening."""
    server = _EmbeddedServer(_config(app or create_app(settings), settings))

    async def run_server() -> None:
        try:
            await server.serve(sockets=list(sockets) if sockets else None)
        except SystemExit:
            # uvicorn exits the process when it cannot bind; in `ledger up` the other parts
            # must stop cleanly instead, so it becomes an ordinary error here.
            raise RuntimeError(f"the web server could not start on {settings.host}:{settings.port}") from None

    serving = asyncio.create_task(run_server())
    stopping = asyncio.create_task(stop.wait())
    try:
        while not server.started:
            if serving.done():
                await serving  # raises what made startup fail
                raise RuntimeError("uvicorn stopped during startup")
            await asyncio.wait([serving, stopping], timeout=0.02, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                break
        if started is not None and server.started:
            started.set()
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
    finally:
        server.should_exit = True
        stopping.cancel()
        await serving


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`ledger serve`: serve until SIGINT or SIGTERM, finish in-flight requests, exit 0."""
    settings.require_database()

    run_until_signalled(lambda stop: serve(settings, stop))
    return 0
