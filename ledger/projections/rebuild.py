"""`ledger rebuild`: empty every projection and replay the log from seq 0.

It takes the projector lock first (waiting for it: a running projector sees the wait,
yields, and resumes from the rebuilt checkpoint once the rebuild lets go), empties the
projections, the change feed and the checkpoints, then folds the log in large batches with
the projector's own code, so the result is what the live projector would have built.
Each batch commits with its checkpoint: a rebuild that is interrupted leaves consistent
projections that the projector simply continues.

For speed, the secondary indexes of tasks and changes are dropped during the replay and
built once at the end, and the change feed is written at the end as one row per task,
group and worker at the last seq that changed it (a client resuming from any position gets
every entity changed after it, in its current state).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

from ledger import db
from ledger.config import Settings
from ledger.projections import lock
from ledger.projections.projector import Projector
from ledger.projections.store import (
    connect,
    drop_secondary_indexes,
    restore_indexes,
    truncate_all,
    write_final_changes,
)

__all__ = ["ProgressBar", "RebuildResult", "rebuild", "run"]

#: Events per transaction while rebuilding (larger than live: nobody waits on latency).
REBUILD_BATCH = 20_000


@dataclass(slots=True)
class RebuildResult:
    events: int
    checkpoint: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class ProgressBar:
    """A one-line progress bar redrawn in place on a terminal (at most 10 times a second)."""

    def __init__(self, total: int, stream: TextIO = sys.stderr, width: int = 30) -> None:
        self.total, self.stream, self.width = max(total, 1), stream, width
        self.started = time.monotonic()
        self.drawn = 0.0
        self.events = 0

    def update(self, done: int, events: int, *, final: bool = False) -> None:
        self.events = events
        now = time.monotonic()
        if not final and now - self.drawn < 0.1:
            return
        self.drawn = now
        fraction = min(done / self.total, 1.0)
        filled = int(fraction * self.width)
        elapsed = now - self.started
        rate = events / elapsed if elapsed > 0 else 0.0
        eta = (elapsed / fraction - elapsed) if 0 < fraction < 1 else 0.0
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(
            f"\rrebuild [{bar}] {fraction:6.1%}  {events:,} events  {rate:,.0f} ev/s  eta {eta:4.0f}s "
        )
        if final:
            self.stream.write("\n")
        self.stream.flush()


async def rebuild(
    settings: Settings,
    *,
    batch_size: int = REBUILD_BATCH,
    cache_rows: int = 300_000,
    progress: Callable[[int, int, int], None] | None = None,
    on_indexes: Callable[[], None] | None = None,
) -> RebuildResult:
    """Rebuild every projection from the log. ``progress(position, last_seq, events)``
    is called after each batch, ``on_indexes()`` before the change feed and indexes are
    written."""
    dsn = settings.require_database()
    # Hundreds of thousands of row dicts stay alive, none in a reference cycle: the cyclic
    # GC would traverse them over and over (a third of the CPU time) for nothing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return await _rebuild(dsn, settings, batch_size, cache_rows, progress, on_indexes)
    finally:
        if gc_was_enabled:
            gc.enable()


async def _rebuild(
    dsn: str,
    settings: Settings,
    batch_size: int,
    cache_rows: int,
    progress: Callable[[int, int, int], None] | None,
    on_indexes: Callable[[], None] | None,
) -> RebuildResult:
    conn = await db.retry("connect to PostgreSQL", lambda: connect(dsn))
    reader = await db.retry("connect to PostgreSQL", lambda: connect(dsn))
    loader = await db.retry("connect to PostgreSQL", lambda: connect(dsn))
    for session in (conn, loader):  # index builds sort in memory rather than on disk
        await session.execute("SET maintenance_work_mem = '256MB'")
    try:
        await lock.acquire(conn)
        started = time.monotonic()
        await truncate_all(conn)
        # The change feed is written once at the end (one row per entity, at its last seq),
        # not batch by batch: the same positions for resuming clients, far less work.
        projector = Projector(settings, batch_size=batch_size, cache_rows=cache_rows, write_changes=False)
        await projector.start_term(conn)  # checkpoint 0; recreates indexes a dead rebuild left dropped
        # The tables are empty: every row there will ever be is the fold's own.
        projector.fold.holds_all_tasks = projector.fold.holds_all_others = True
        await drop_secondary_indexes(conn)
        last_seq = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.events")
        if progress:
            progress(0, last_seq, 0)
        events = await projector.drain(
            conn, reader, loader, None if progress is None else lambda position, done: progress(position, last_seq, done)
        )
        if on_indexes:
            on_indexes()

        async def feed() -> None:  # the change feed, then its index
            await write_final_changes(loader)
            await restore_indexes(loader, "changes")

        # Two tables, two sessions: PostgreSQL builds the task indexes and the feed at once.
        await asyncio.gather(feed(), restore_indexes(conn, "tasks"))
        await restore_indexes(conn)  # anything else a dead rebuild left dropped
        await lock.release(conn)
        return RebuildResult(events, projector.checkpoint, time.monotonic() - started)
    finally:
        await loader.close()
        await reader.close()
        await conn.close()


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`ledger rebuild [--no-progress]`."""
    settings.require_database()
    bar: ProgressBar | None = None

    def show(position: int, last_seq: int, events: int) -> None:
        nonlocal bar
        if bar is None:
            bar = ProgressBar(last_seq)
        bar.update(position, events)

    def indexes() -> None:
        if bar is not None:
            bar.update(bar.total, bar.events, final=True)
        print("rebuild: writing the change feed and recreating indexes", file=sys.stderr, flush=True)

    show_progress = not getattr(args, "no_progress", False)
    if show_progress:
        print("rebuild: taking the projector lock (a running projector yields it)", file=sys.stderr, flush=True)
    result = asyncio.run(
        rebuild(settings, progress=show if show_progress else None, on_indexes=indexes if show_progress else None)
    )
    print(
        f"rebuilt projections from {result.events:,} events up to seq {result.checkpoint} "
        f"in {result.seconds:.1f}s ({result.rate:,.0f} events/s)"
    )
    return 0
