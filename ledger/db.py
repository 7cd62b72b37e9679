"""PostgreSQL connections: asyncpg with JSON codecs, and retry with backoff."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
import orjson

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that mean "the database is not reachable right now", worth retrying.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
)


async def init_connection(conn: asyncpg.Connection) -> None:
    """jsonb and json travel as Python objects, encoded by orjson."""
    for typename in ("jsonb", "json"):
        await conn.set_type_codec(
            typename,
            schema="pg_catalog",
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
        )


async def connect(dsn: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    await init_connection(conn)
    return conn


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, init=init_connection)


class Backoff:
    """Exponential backoff with a cap: 0.1 s, 0.2 s, ... up to `cap`, reset on success."""

    def __init__(self, base: float = 0.1, cap: float = 5.0) -> None:
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


async def retry(
    what: str,
    action: Callable[[], Awaitable[T]],
    *,
    backoff: Backoff | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> T:
    """Run `action` until it succeeds, sleeping with backoff on transient errors."""
    backoff = backoff or Backoff()
    while True:
        try:
            result = await action()
        except TRANSIENT_ERRORS as exc:
            delay = backoff.next_delay()
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
            if on_error:
                on_error(exc)
            await asyncio.sleep(delay)
        else:
            backoff.reset()
            return result
