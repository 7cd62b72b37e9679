"""`ledger up`: every ledger process in one, for a laptop.

Unset LEDGER_DATABASE_URL starts an embedded PostgreSQL, unset LEDGER_BROKER_URL an
embedded Redis (see ledger.embedded). Then: migrate, make sure the local user has a token,
and run capture, projector and the API/websocket server side by side until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from ledger import db
from ledger.config import Settings
from ledger.embedded import EmbeddedServers
from ledger.migrate import migrate
from ledger.service import run_until_signalled

log = logging.getLogger(__name__)


async def local_token(settings: Settings) -> str:
    """The local user's admin token, kept in the data directory and reused across runs."""
    from ledger.api.tokens import authenticate_token, create_token

    path = Path(settings.data_dir) / "local-token"
    conn = await db.connect(settings.require_database())
    try:
        if path.exists():
            token = path.read_text().strip()
            if await authenticate_token(conn, token) is not None:
                return token
        token = await create_token(conn, ["admin"], "ledger up (local user)")
    finally:
        await conn.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token + "\n")
    os.chmod(path, 0o600)
    return token


def banner(settings: Settings, embedded: EmbeddedServers, token: str) -> str:
    def origin(url: str | None) -> str:
        return " (embedded)" if url and url in (embedded.database_url, embedded.broker_url) else ""

    base = f"http://{settings.host}:{settings.port}"
    return "\n".join(
        [
            "Celery Ledger is up. Running in this process:",
            "  capture    Celery events from the broker -> ledger.events",
            "  projector  ledger.events -> tasks, groups, workers",
            f"  web        HTTP API {base}/v1/   websocket ws://{settings.host}:{settings.port}/v1/stream",
            f"database  {settings.database_url}{origin(settings.database_url)}",
            f"broker    {settings.broker_url}{origin(settings.broker_url)}",
            f"data dir  {settings.data_dir}",
            "Point your Celery app at the broker above and call ledger.celery.instrument(app).",
            f"Try:      curl -H 'Authorization: Bearer {token}' {base}/v1/tasks",
            "Local admin token (also in <data dir>/local-token):",
            token,
        ]
    )


async def run_all(settings: Settings, stop: asyncio.Event, embedded: EmbeddedServers) -> bool:
    """Run every part until `stop`; False if a part stopped with an error (and so stopped all)."""
    from ledger.api.server import serve
    from ledger.capture.service import Capture
    from ledger.projections.projector import Projector

    await migrate(settings.require_database())
    token = await local_token(settings)
    print(banner(settings, embedded, token), flush=True)
    parts = {
        "capture": asyncio.create_task(Capture(settings).run(stop)),
        "projector": asyncio.create_task(Projector(settings).run(stop)),
        "web": asyncio.create_task(serve(settings, stop)),
    }
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *parts.values()], return_when=asyncio.FIRST_COMPLETED)
    failed = [name for name, task in parts.items() if task in done and task.exception() is not None]
    for name in failed:
        log.error("%s stopped with an error; stopping everything", name, exc_info=parts[name].exception())
    stop.set()
    await asyncio.gather(*parts.values(), return_exceptions=True)
    waiter.cancel()
    return not failed


def run(settings: Settings, args: argparse.Namespace) -> int:
    embedded = EmbeddedServers()
    try:
        updates = {}
        if not settings.database_url:
            print(f"starting embedded PostgreSQL under {settings.data_dir}/postgres ...", flush=True)
            updates["database_url"] = embedded.start_postgres(Path(settings.data_dir))
        if not settings.broker_url:
            print(f"starting embedded Redis under {settings.data_dir} ...", flush=True)
            updates["broker_url"] = embedded.start_redis(Path(settings.data_dir))
        settings = settings.model_copy(update=updates)

        outcome: list[bool] = []

        async def main(stop: asyncio.Event) -> None:
            outcome.append(await run_all(settings, stop, embedded))

        run_until_signalled(main)
        return 0 if all(outcome) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        embedded.stop()
        print("ledger stopped", file=sys.stderr)
