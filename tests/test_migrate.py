"""`ledger migrate` applies every file once, and is safe twice and concurrently."""

import asyncio

from ledger import db
from ledger.migrate import apply_migrations, migration_files


async def test_migrations_are_recorded_and_idempotent(conn):
    names = [p.name for p in migration_files()]
    recorded = [r["name"] for r in await conn.fetch("SELECT name FROM ledger.schema_migrations ORDER BY name")]
    assert recorded == names
    assert await apply_migrations(conn) == []


async def test_two_processes_migrating_at_once(pg_admin_dsn):
    import uuid

    import asyncpg

    from tests.conftest import with_database

    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        dsn = with_database(pg_admin_dsn, name)
        a, b = await db.connect(dsn), await db.connect(dsn)
        try:
            applied_a, applied_b = await asyncio.gather(apply_migrations(a), apply_migrations(b))
            # Exactly one of them applied everything; the other found nothing to do.
            assert sorted(applied_a + applied_b) == [p.name for p in migration_files()]
            assert not (applied_a and applied_b)
        finally:
            await a.close()
            await b.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
