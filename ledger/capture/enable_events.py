"""Periodic ``enable_events`` broadcast, so workers started without ``-E`` send task events.

Celery's ``app.control.enable_events()`` is a synchronous kombu broadcast that may block on
a broker that is down, so it runs in its own daemon thread, never on the event loop.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


def celery_broker_url(url: str) -> str:
    # kombu does not know the redis-py spelling unix:///path.
    return "redis+socket://" + url.removeprefix("unix://") if url.startswith("unix://") else url


class EnableEventsBroadcaster(threading.Thread):
    def __init__(self, broker_url: str, interval: float) -> None:
        super().__init__(name="ledger-capture-enable-events", daemon=True)
        self.broker_url, self.interval = celery_broker_url(broker_url), interval
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        from celery import Celery

        app = Celery("ledger-capture", broker=self.broker_url, set_as_current=False)
        app.conf.broker_connection_retry_on_startup = False
        app.conf.broker_connection_max_retries = 1
        while not self.stopping.is_set():
            try:
                app.control.enable_events()
                self.sent += 1
                log.debug("capture: broadcast enable_events")
            except Exception as exc:  # noqa: BLE001 - broker down: try again next interval
                log.warning("capture: enable_events broadcast failed: %s", exc)
            self.stopping.wait(self.interval)
        try:
            app.close()
        except Exception:  # noqa: BLE001
            pass

    def stop(self) -> None:
        self.stopping.set()
