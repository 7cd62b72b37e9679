"""Batching decoded events into commits, bounded by size and by latency.

A source decodes each message straight into the open batch (``batcher.current``), then calls
``added(ack)``. A batch is sealed when it reaches ``size`` events or when its first event has
waited ``max_wait`` seconds; the writer commits sealed batches one at a time, in order, and
only then runs their ack callback (RabbitMQ acks after commit). While one batch commits the
source keeps decoding into the next, so PostgreSQL and Python work in parallel.

A message never straddles two batches, so "this batch committed" means "every message up to
its ack token is stored".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg

from ledger import db
from ledger.log.recorder import AppendResult, Event, Rejected, append

log = logging.getLogger(__name__)

Ack = Callable[[], Awaitable[None]]
# Also seal a batch at this many bytes received, so a run of large events never makes one
# statement of gigabytes.
MAX_BATCH_BYTES = 32 << 20


@dataclass(slots=True)
class Batch:
    events: list[Event] = field(default_factory=list)
    rejects: list[Rejected] = field(default_factory=list)
    ack: Ack | None = None
    first: float | None = None  # when its first message was added
    nbytes: int = 0  # size of the messages in it, as received

    def __len__(self) -> int:
        return len(self.events) + len(self.rejects)


@dataclass(slots=True)
class Stats:
    inserted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    batches: int = 0

    def add(self, result: AppendResult) -> None:
        self.inserted += result.inserted
        self.duplicates += result.duplicates
        self.quarantined += result.quarantined
        self.batches += 1


class Batcher:
    def __init__(self, size: int, max_wait: float, max_sealed: int = 4, max_bytes: int = MAX_BATCH_BYTES) -> None:
        self.size, self.max_wait, self.max_sealed, self.max_bytes = size, max_wait, max_sealed, max_bytes
        self.current = Batch()
        self.sealed: deque[Batch] = deque()
        self._changed = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def added(self, nbytes: int, ack: Ack | None = None) -> None:
        """One message of ``nbytes`` was decoded into ``current``; ``ack`` runs once it has committed."""
        batch = self.current
        batch.nbytes += nbytes
        if ack is not None:
            batch.ack = ack
        if batch.first is None:
            batch.first = time.monotonic()
            self._changed.set()  # the writer starts this batch's latency clock
        if len(batch) >= self.size or batch.nbytes >= self.max_bytes:
            self.seal()

    def seal(self) -> None:
        batch = self.current
        if batch.first is None:
            return
        self.sealed.append(batch)
        self.current = Batch()
        self._changed.set()
        if len(self.sealed) >= self.max_sealed:
            self._room.clear()

    async def room(self) -> None:
        """Backpressure: wait while the writer is several batches behind."""
        if not self._room.is_set():
            await self._room.wait()

    def pending(self) -> int:
        return len(self.current) + sum(len(b) for b in self.sealed)

    async def next_batch(self, stopping: asyncio.Event) -> Batch | None:
        """The next batch to commit: sealed ones first, else the open one once it is old enough.

        Returns None when ``stopping`` is set and nothing is left."""
        while True:
            self._changed.clear()
            if self.sealed:
                batch = self.sealed.popleft()
                if len(self.sealed) < self.max_sealed:
                    self._room.set()
                return batch
            if self.current.first is not None:
                wait = self.current.first + self.max_wait - time.monotonic()
                if wait <= 0 or stopping.is_set():
                    self.seal()
                    continue
                await _wait_any(self._changed, stopping, timeout=wait)
                continue
            if stopping.is_set():
                return None
            await _wait_any(self._changed, stopping)


async def _wait_any(a: asyncio.Event, b: asyncio.Event, timeout: float | None = None) -> None:
    if a.is_set() or b.is_set():
        return
    tasks = [asyncio.ensure_future(a.wait()), asyncio.ensure_future(b.wait())]
    try:
        await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


class Writer:
    """Commits batches through ``recorder.append``; reconnects and retries the same batch.

    Retrying is safe because the log deduplicates: if a commit succeeded but its reply was
    lost, the retry inserts nothing."""

    def __init__(self, dsn: str, source: str) -> None:
        self.dsn, self.source = dsn, source
        self.conn: asyncpg.Connection | None = None
        self.stats = Stats()
        self.backoff = db.Backoff(base=0.1, cap=5.0)

    async def connect(self) -> None:
        """Connect now (so a wrong DSN shows at start-up); ``write`` reconnects as needed."""
        try:
            self.conn = await db.connect(self.dsn)
            log.info("capture: connected to PostgreSQL")
        except Exception as exc:  # noqa: BLE001 - write() retries with backoff
            log.warning("capture: PostgreSQL not reachable yet (%s: %s)", type(exc).__name__, exc)

    async def write(self, batch: Batch, give_up_at: Callable[[], float | None] = lambda: None) -> bool:
        """Commit ``batch``; True once committed, False if ``give_up_at()`` passed first."""
        while True:
            try:
                if self.conn is None or self.conn.is_closed():
                    self.conn = await db.connect(self.dsn)
                    log.info("capture: connected to PostgreSQL")
                result = await append(self.conn, batch.events, batch.rejects, source=self.source)
            except Exception as exc:  # noqa: BLE001 - any failure: reconnect and retry, never drop
                await self._close()
                deadline = give_up_at()
                if deadline is not None and time.monotonic() >= deadline:
                    log.error("capture: giving up on a batch of %d after %s: %s", len(batch), type(exc).__name__, exc)
                    return False
                delay = self.backoff.next_delay()
                log.warning("capture: commit failed (%s: %s); retrying in %.1fs", type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)
                continue
            self.backoff.reset()
            self.stats.add(result)
            if result.quarantined:
                log.warning("capture: quarantined %d message(s) or event(s)", result.quarantined)
            return True

    async def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:  # noqa: BLE001
                conn.terminate()
