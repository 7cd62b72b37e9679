"""`ledger projector`: tail ledger.events by seq and fold it into the projections.

One batch = read up to ``projector_batch_size`` events after the checkpoint, load the rows
they touch (or find them in the in-memory cache), fold, and write atomically (one statement,
see ``store``): the rows, one ``ledger.changes`` row per changed entity (at the last seq
that changed it, with the row as written), and the checkpoint; the commit NOTIFYs
``ledger_changes`` with the new checkpoint. The write is fenced by the checkpoint it was
folded on, so a batch never applies on top of anything else.

The projector wakes on LISTEN ``ledger_events`` (the recorder NOTIFYs on every append) and
polls every ``projector_poll_interval`` seconds anyway, so a lost notification costs
latency, never data. Only the holder of the advisory lock writes (see ``lock``): others
wait as standbys and take over within a second when it dies. Lost database connections are
retried with backoff.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable

import asyncpg

from ledger import db
from ledger.config import Settings
from ledger.log.recorder import NOTIFY_CHANNEL as EVENTS_CHANNEL
from ledger.projections import lock
from ledger.projections.fold import Fold
from ledger.projections.store import (
    CheckpointMoved,
    PreparedBatch,
    commit_batch,
    connect,
    load_rows,
    prepare_batch,
    read_checkpoint,
    read_events,
    restore_indexes,
)
from ledger.service import run_until_signalled

log = logging.getLogger(__name__)

__all__ = ["Projector", "run"]


async def _wait(stop: asyncio.Event, timeout: float, wake: asyncio.Event | None = None) -> None:
    """Sleep until ``stop`` (or ``wake``) is set, at most ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(stop.wait())]
    if wake is not None:
        waiters.append(asyncio.ensure_future(wake.wait()))
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Projector:
    """The projection writer. ``run(stop)`` is the service (standby, lead, reconnect);
    ``catch_up()`` applies everything in the log now and returns (tests, tools)."""

    def __init__(
        self,
        settings: Settings,
        *,
        batch_size: int | None = None,
        cache_rows: int = 50_000,
        standby_interval: float = 0.5,
        write_changes: bool = True,
    ) -> None:
        self.dsn = settings.require_database()
        self.batch_size = batch_size or settings.projector_batch_size
        self.poll_interval = settings.projector_poll_interval
        self.cache_rows = cache_rows
        self.standby_interval = standby_interval
        self.write_changes = write_changes
        self.checkpoint = 0
        self.fold = Fold()
        self.leading = asyncio.Event()  # set while this instance holds the lease

    # -- one batch ------------------------------------------------------------------------

    async def start_term(self, conn: asyncpg.Connection) -> None:
        """Begin writing on a connection that holds the lock: trust nothing cached."""
        restored = await restore_indexes(conn)  # left dropped by a rebuild that died
        if restored:
            log.warning("projector: recreated indexes an interrupted rebuild dropped: %s", ", ".join(restored))
        self.checkpoint = await read_checkpoint(conn)
        self.fold = Fold()

    async def step(self, conn: asyncpg.Connection) -> int:
        """Fold and write the next batch; return how many events it held (0: caught up)."""
        events = await read_events(conn, self.checkpoint, self.batch_size)
        await self.apply_batch(conn, events)
        return len(events)

    async def apply_batch(self, conn: asyncpg.Connection, events: list) -> None:
        """Fold ``events`` (the next ones after the checkpoint) and write them."""
        if not events:
            return
        try:
            await load_rows(conn, self.fold, events)
            batch = self._fold(events)
            await commit_batch(conn, batch)
        except BaseException:
            self.fold = Fold()  # the cache may now be ahead of the database
            raise
        self.checkpoint = batch.checkpoint
        if len(self.fold) > self.cache_rows:
            self.fold.evict()

    def _fold(self, events: list) -> PreparedBatch:
        apply = self.fold.apply
        for seq, type_, payload, recorded_at in events:
            apply(seq, type_, payload, recorded_at)
        return prepare_batch(self.fold, self.checkpoint, events[-1][0], changes=self.write_changes)

    async def drain(
        self,
        conn: asyncpg.Connection,
        reader: asyncpg.Connection,
        loader: asyncpg.Connection,
        progress: Callable[[int, int], None] | None = None,
    ) -> int:
        """Apply everything up to the end of the log, pipelined for `ledger rebuild`: while
        batch N is written on ``conn``, batch N+1 is read (``reader``), its missing rows
        loaded (``loader``) and folded, so PostgreSQL and Python work at the same time.

        Safe because a row the fold lacks was last changed by a committed batch (the cache
        is only cleared when no write is in flight), and batches commit in order, each
        fenced by the checkpoint it was folded on."""
        total = 0
        writing: asyncio.Future | None = None
        pending = asyncio.ensure_future(read_events(reader, self.checkpoint, self.batch_size))
        try:
            while events := await pending:
                pending = asyncio.ensure_future(read_events(reader, events[-1][0], self.batch_size))
                if len(self.fold) > self.cache_rows:
                    if writing is not None:  # drain the pipeline first: all folded is then stored
                        await writing
                        writing = None
                    self.fold.evict()
                await load_rows(loader, self.fold, events)
                batch = self._fold(events)
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(self._commit(conn, batch))
                self.checkpoint = batch.checkpoint  # the next batch folds on this one
                total += len(events)
                if progress is not None:
                    progress(batch.checkpoint, total)
            if writing is not None:
                await writing
                writing = None
        except BaseException:
            self.fold = Fold()
            for future in (pending, writing):
                if future is not None and not future.done():
                    future.cancel()
            raise
        return total

    @staticmethod
    async def _commit(conn: asyncpg.Connection, batch: PreparedBatch) -> PreparedBatch:
        await commit_batch(conn, batch)
        return batch

    async def catch_up(self) -> int:
        """Take the lock (waiting for it), apply every event in the log, release; return
        the checkpoint."""
        conn = await db.retry("connect to PostgreSQL", lambda: connect(self.dsn))
        try:
            await lock.acquire(conn)
            await self.start_term(conn)
            while await self.step(conn):
                pass
            await lock.release(conn)
            return self.checkpoint
        finally:
            await conn.close()

    # -- the service ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Standby until the lock is ours, then project until ``stop``; reconnect on loss."""
        backoff = db.Backoff()
        while not stop.is_set():
            conn: asyncpg.Connection | None = None
            try:
                conn = await connect(self.dsn)
                if not await lock.wait_for_lease(conn, stop, self.standby_interval):
                    break
                backoff.reset()
                log.info("projector: lease acquired, projecting")
                self.leading.set()
                await self._lead(conn, stop)
            except (*db.TRANSIENT_ERRORS, asyncpg.PostgresError, CheckpointMoved) as exc:
                delay = backoff.next_delay()
                log.warning("projector: %s: %s; retrying in %.1fs", type(exc).__name__, exc, delay)
                await _wait(stop, delay)
            finally:
                self.leading.clear()
                if conn is not None and not conn.is_closed():
                    try:
                        await asyncio.wait_for(conn.close(), 5)
                    except Exception:  # noqa: BLE001 - the connection is going away regardless
                        conn.terminate()

    async def _lead(self, conn: asyncpg.Connection, stop: asyncio.Event) -> None:
        await self.start_term(conn)
        wake = asyncio.Event()
        await conn.add_listener(EVENTS_CHANNEL, lambda *_: wake.set())
        checked = 0.0
        while not stop.is_set():
            wake.clear()  # before reading: a NOTIFY during the batch is not lost
            applied = await self.step(conn)
            now = time.monotonic()
            if now - checked > 0.5:  # a rebuild waiting for the lease waits at most this long
                checked = now
                if await lock.someone_waits(conn):
                    log.info("projector: yielding the lease to a waiting `ledger rebuild`")
                    await lock.release(conn)
                    return
            if applied >= self.batch_size:
                await asyncio.sleep(0)  # let the rest of the process breathe
                continue
            await _wait(stop, self.poll_interval, wake)


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`ledger projector`: run until SIGINT/SIGTERM."""
    settings.require_database()

    run_until_signalled(Projector(settings).run)
    return 0
