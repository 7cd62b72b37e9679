"""`ledger migrate`: apply sql/NNN_*.sql in order, once each, safely from several processes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import asyncpg

from ledger import db

log = logging.getLogger(__name__)

# Two processes migrating at once serialise on this session-level advisory lock.
MIGRATION_LOCK_ID = 7310432180000
MIGRATION_FILE = re.compile(r"^(\d{3})_[\w-]+\.sql$")


def sql_dir() -> Path:
    """sql/ beside the package in a checkout; the packaged copy otherwise."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "sql", here / "sql"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("no sql/ directory found next to the ledger package")


def migration_files(directory: Path | None = None) -> list[Path]:
    directory = directory or sql_dir()
    files = [p for p in directory.iterdir() if MIGRATION_FILE.match(p.name)]
    return sorted(files, key=lambda p: p.name)


async def apply_migrations(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply every migration not yet recorded; return the names applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_ID)
    try:
        await conn.execute(
            """
            CREATE SCHEMA IF NOT EXISTS ledger;
            CREATE TABLE IF NOT EXISTS ledger.schema_migrations (
                name text PRIMARY KEY,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM ledger.schema_migrations")}
        for path in migration_files(directory):
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO ledger.schema_migrations (name) VALUES ($1)", path.name)
            log.info("applied %s", path.name)
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_ID)
    return applied_now


async def migrate(dsn: str) -> list[str]:
    conn = await db.retry("connect to PostgreSQL", lambda: db.connect(dsn))
    try:
        return await apply_migrations(conn)
    finally:
        await conn.close()
