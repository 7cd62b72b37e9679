"""`ledger capture`: broker -> decode -> batch -> ledger.events, until told to stop.

``Capture(settings).run(stop_event)`` runs in any event loop (``ledger up`` runs it in
process); ``run(settings, args)`` is the CLI entry, which stops on SIGTERM/SIGINT. Stopping
means: stop consuming, decode what was already received, commit it (and ack it on
RabbitMQ), then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from urllib.parse import urlsplit

from ledger.capture.amqp_source import AmqpSource
from ledger.capture.batch import Batcher, Stats, Writer
from ledger.capture.decode import Decoder
from ledger.capture.enable_events import EnableEventsBroadcaster
from ledger.capture.redis_source import RedisSource
from ledger.capture.status import StatusReporter
from ledger.config import Settings
from ledger.service import run_until_signalled

log = logging.getLogger(__name__)

REDIS_SCHEMES = {"redis", "rediss", "redis+socket", "unix", "socket"}
AMQP_SCHEMES = {"amqp", "amqps", "pyamqp", "pyamqps", "librabbitmq"}
SHUTDOWN_GRACE = 15.0  # seconds to keep retrying the database after a stop request
STATS_EVERY = 30.0


def broker_kind(url: str) -> str:
    scheme = urlsplit(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in AMQP_SCHEMES:
        return "amqp"
    raise SystemExit(f"capture supports Redis and RabbitMQ brokers, not {scheme}://")


class Capture:
    """One capture process: a broker source feeding a batcher that a writer commits."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.broker_url = settings.require_broker()
        self.kind = broker_kind(self.broker_url)
        self.decoder = Decoder(
            self.kind, max_event_bytes=settings.capture_max_event_bytes, redact_fields=settings.redact_fields
        )
        self.batcher = Batcher(settings.capture_batch_size, settings.capture_batch_ms / 1000.0)
        self.writer = Writer(settings.require_database(), self.kind)
        self.source: RedisSource | AmqpSource
        if self.kind == "redis":
            self.source = RedisSource(self.broker_url, settings.event_exchange, self.decoder, self.batcher)
        else:
            self.source = AmqpSource(
                self.broker_url,
                settings.event_exchange,
                settings.capture_queue,
                settings.capture_prefetch,
                self.decoder,
                self.batcher,
            )

    @property
    def ready(self) -> asyncio.Event:
        """Set while subscribed (Redis) or consuming (RabbitMQ)."""
        return self.source.ready

    @property
    def stats(self) -> Stats:
        return self.writer.stats

    async def run(self, stop: asyncio.Event | None = None) -> Stats:
        stop = stop or asyncio.Event()
        flushing = asyncio.Event()
        give_up: list[float] = []
        writer = asyncio.create_task(self._write_loop(flushing, give_up), name="ledger-capture-writer")
        writer.add_done_callback(lambda t: t.cancelled() or t.exception() is None or stop.set())
        reporter = asyncio.create_task(self._report(), name="ledger-capture-stats")
        status = StatusReporter(self.settings.require_database(), self.broker_url,
                                lambda: self.ready.is_set(), lambda: self.stats.inserted)
        status_task = asyncio.create_task(status.run(), name="ledger-capture-status")
        broadcaster = None
        if self.settings.enable_events_interval > 0:
            broadcaster = EnableEventsBroadcaster(self.broker_url, self.settings.enable_events_interval)
            broadcaster.start()
        log.info(
            "capture: %s -> PostgreSQL, exchange %r, batches of up to %d events or %.0f ms",
            self.kind,
            self.settings.event_exchange,
            self.settings.capture_batch_size,
            self.settings.capture_batch_ms,
        )
        try:
            await self.source.run(stop)
        finally:
            log.info("capture: stopping; committing %d event(s) already received", self.batcher.pending())
            give_up.append(time.monotonic() + SHUTDOWN_GRACE)
            flushing.set()
            try:
                await writer
            finally:
                reporter.cancel()
                status_task.cancel()
                await asyncio.gather(status_task, return_exceptions=True)
                if broadcaster is not None:
                    broadcaster.stop()
                await self.source.close() if isinstance(self.source, AmqpSource) else None
                await self.writer.close()
        s = self.stats
        log.info(
            "capture: stopped; %d inserted, %d duplicate(s) skipped, %d quarantined, %d batch(es)",
            s.inserted, s.duplicates, s.quarantined, s.batches,
        )
        return s

    async def _write_loop(self, flushing: asyncio.Event, give_up: list[float]) -> None:
        deadline = lambda: give_up[0] if give_up else None  # noqa: E731
        await self.writer.connect()
        while (batch := await self.batcher.next_batch(flushing)) is not None:
            if await self.writer.write(batch, deadline) and batch.ack is not None:
                await batch.ack()

    async def _report(self) -> None:
        last, then = 0, time.monotonic()
        while True:
            await asyncio.sleep(STATS_EVERY)
            now, s = time.monotonic(), self.stats
            if s.inserted != last:
                log.info(
                    "capture: %d events stored (%.0f/s), %d duplicates, %d quarantined",
                    s.inserted, (s.inserted - last) / (now - then), s.duplicates, s.quarantined,
                )
            last, then = s.inserted, now


def run(settings: Settings, args: argparse.Namespace | None = None) -> int:
    """CLI entry: capture until SIGTERM or SIGINT, then flush and exit 0."""
    capture = Capture(settings)

    run_until_signalled(capture.run)
    return 0
