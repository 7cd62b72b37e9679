"""`ledger projector`: tail ledger.events by seq and fold it into the projections.

One batch = read up to ``projector_batch_size`` events after the checkpoint, load the rows
they touch (or find them in the in-memory cache), fold, and write in one transaction: the
rows (bulk upserts), one ``ledger.changes`` row per changed entity, and the checkpoint;
the commit NOTIFYs ``ledger_changes``. The checkpoint is re-read ``FOR UPDATE`` inside
that transaction, so a batch never applies on top of anything but what it was folded from.

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
import signal
import time

import asyncpg

from ledger import db
from ledger.config import Settings
from ledger.log.recorder import NOTIFY_CHANNEL as EVENTS_CHANNEL
from ledger.projections import lock
from ledger.projections.fold import Fold
from ledger.projections.store import CheckpointMoved, load_rows, read_checkpoint, read_events, write_batch

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
        self.checkpoint = await read_checkpoint(conn)
        self.fold = Fold()

    async def step(self, conn: asyncpg.Connection) -> int:
        """Fold and write the next batch; return how many events it held (0: caught up)."""
        events = await read_events(conn, self.checkpoint, self.batch_size)
        if not events:
            return 0
        last = events[-1][0]
        fold = self.fold
        try:
            await load_rows(conn, fold, events)
            apply = fold.apply
            for seq, type_, payload, recorded_at in events:
                apply(seq, type_, payload, recorded_at)
            async with conn.transaction():
                stored = await read_checkpoint(conn, for_update=True)
                if stored != self.checkpoint:
                    raise CheckpointMoved(f"checkpoint is {stored}, expected {self.checkpoint}")
                await write_batch(conn, fold, last, changes=self.write_changes)
        except BaseException:
            self.fold = Fold()  # the cache may now be ahead of the database
            raise
        self.checkpoint = last
        if len(fold) > self.cache_rows:
            fold.clear()
        return len(events)

    async def catch_up(self) -> int:
        """Take the lock (waiting for it), apply every event in the log, release; return
        the checkpoint."""
        conn = await db.retry("connect to PostgreSQL", lambda: db.connect(self.dsn))
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
                conn = await db.connect(self.dsn)
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
            if applied < self.batch_size or now - checked > 1.0:
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

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await Projector(settings).run(stop)

    asyncio.run(main())
    return 0
