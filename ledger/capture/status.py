"""Capture reports its state to ledger.capture_status, for /readyz in the web process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

import asyncpg
from kombu.utils.url import maybe_sanitize_url

from ledger import db

log = logging.getLogger(__name__)

REPORT_EVERY = 2.0  # seconds; /readyz calls a capture silent after several missed reports

_UPSERT = """
INSERT INTO ledger.capture_status (capture_id, broker, connected, stored, started_at, reported_at)
VALUES ($1, $2, $3, $4, now(), now())
ON CONFLICT (capture_id) DO UPDATE
SET broker = EXCLUDED.broker, connected = EXCLUDED.connected, stored = EXCLUDED.stored,
    reported_at = EXCLUDED.reported_at
"""


class StatusReporter:
    """Upserts this process's row every REPORT_EVERY seconds; deletes it on a clean stop.
    A database that is down is simply retried at the next report: capture goes on."""

    def __init__(self, dsn: str, broker_url: str, connected: Callable[[], bool], stored: Callable[[], int]) -> None:
        self.dsn = dsn
        self.capture_id = f"{socket.gethostname()}:{os.getpid()}"
        self.broker = maybe_sanitize_url(broker_url)
        self.connected, self.stored = connected, stored

    async def run(self) -> None:
        conn = None
        try:
            while True:
                try:
                    if conn is None or conn.is_closed():
                        conn = await db.connect(self.dsn)
                        # rows of processes long gone (killed, or their host replaced)
                        await conn.execute(
                            "DELETE FROM ledger.capture_status WHERE reported_at < now() - interval '1 hour'"
                        )
                    await conn.execute(_UPSERT, self.capture_id, self.broker, self.connected(), self.stored())
                except (*db.TRANSIENT_ERRORS, asyncpg.PostgresError) as exc:
                    log.debug("capture status not reported (%s); retrying", exc)
                    conn = None
                await asyncio.sleep(REPORT_EVERY)
        finally:
            if conn is not None and not conn.is_closed():
                try:
                    await conn.execute("DELETE FROM ledger.capture_status WHERE capture_id = $1", self.capture_id)
                finally:
                    await conn.close()

