"""Running capture in a test, publishing to it, and waiting for its results.

Typical use (in-process, on the test's event loop)::

    settings = capture_settings(database_url, broker_url, event_exchange)
    async with running_capture(settings):          # returns once subscribed/consuming
        publish_events(broker_url, event_exchange, [ev1, ev2], routing_key="task.multi")
        await wait_for_events(database_url, 2)     # polls ledger.events with a deadline

As a real process (``ledger capture``), e.g. to SIGKILL it::

    proc = CaptureProcess(settings); proc.start(); proc.wait_ready()
    ...; proc.kill()   # or proc.stop() for SIGTERM and a clean flush

Each test gets its own exchange (the ``event_exchange`` fixture) and, on RabbitMQ, its own
durable queue ``<exchange>.capture``; ``delete_capture_queue`` removes it afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import orjson
from kombu import Connection, Producer

from ledger.capture import Capture
from ledger.config import Settings

READY_MARKERS = ("capture: subscribed to Redis", "capture: consuming RabbitMQ")


def capture_settings(database_url: str, broker_url: str, event_exchange: str, **overrides) -> Settings:
    """Settings for a test's capture: its own exchange and queue, no enable_events broadcast."""
    values = dict(
        database_url=database_url,
        broker_url=broker_url,
        event_exchange=event_exchange,
        capture_queue=f"{event_exchange}.capture",
        capture_batch_ms=10.0,
        enable_events_interval=0,
    )
    values.update(overrides)
    return Settings(**values)


def capture_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``ledger capture`` use ``settings``."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        env[f"LEDGER_{name.upper()}"] = str(value)
    return env


@asynccontextmanager
async def running_capture(settings: Settings, ready_timeout: float = 20.0) -> AsyncIterator[Capture]:
    """Capture as a task on the current loop; stops (flushing) when the block exits."""
    capture = Capture(settings)
    stop = asyncio.Event()
    task = asyncio.create_task(capture.run(stop))
    try:
        ready = asyncio.ensure_future(capture.ready.wait())
        done, _ = await asyncio.wait([ready, task], timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if task in done:
            task.result()  # raises what made capture exit
        if ready not in done:
            raise TimeoutError(f"capture not ready after {ready_timeout}s")
        yield capture
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


class CaptureProcess:
    """``ledger capture`` as a subprocess; its log goes to ``self.log_path``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.log_path = Path(tempfile.mkstemp(prefix="ledger-capture-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self._log_offset = 0

    def start(self) -> CaptureProcess:
        self._log_offset = self.log_path.stat().st_size
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ledger", "capture"],
                env=capture_env(self.settings),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until this run logged that it subscribed / is consuming."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")
            if any(marker in text for marker in READY_MARKERS):
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ledger capture exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)  # polling a log file written by another process
        raise TimeoutError(f"ledger capture not ready after {timeout}s:\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: capture flushes what it received and exits 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def __enter__(self) -> CaptureProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


async def count_events(database_url: str, where: str = "TRUE", *args: object) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        return await conn.fetchval(f"SELECT count(*) FROM ledger.events WHERE {where}", *args)
    finally:
        await conn.close()


async def wait_for_events(
    database_url: str, n: int, timeout: float = 30.0, where: str = "TRUE", *args: object
) -> int:
    """Poll ``ledger.events`` until at least ``n`` rows match ``where``; returns the count.

    Raises TimeoutError (with the count reached) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            count = await conn.fetchval(f"SELECT count(*) FROM ledger.events WHERE {where}", *args)
            if count >= n:
                return count
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} of {n} events in the log after {timeout}s")
            await asyncio.sleep(0.05)  # polling the database for another process's commits
    finally:
        await conn.close()


async def wait_for_quarantine(database_url: str, n: int, timeout: float = 30.0) -> list[asyncpg.Record]:
    """Poll ``ledger.quarantine`` until it has ``n`` rows; returns them (oldest first)."""
    deadline = time.monotonic() + timeout
    conn = await asyncpg.connect(database_url)
    try:
        while True:
            rows = await conn.fetch("SELECT source, routing_key, reason, raw FROM ledger.quarantine ORDER BY id")
            if len(rows) >= n:
                return rows
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(rows)} of {n} quarantine rows after {timeout}s: {rows}")
            await asyncio.sleep(0.05)
    finally:
        await conn.close()


def _exchange(conn: Connection, name: str):
    from celery.events.event import (
        get_exchange,  # topic, or fanout on Redis: as Celery does
    )

    return get_exchange(conn, name=name)


def publish_raw(
    broker_url: str,
    exchange: str,
    bodies: Iterable[tuple[str, bytes]],
    content_type: str = "application/json",
) -> None:
    """Publish raw message bodies ``(routing_key, body)`` the way Celery's dispatcher does
    (same exchange type, kombu envelope on Redis), without serialising them."""
    with Connection(broker_url) as conn:
        producer = Producer(conn.default_channel, exchange=_exchange(conn, exchange))
        for routing_key, body in bodies:
            producer.publish(
                body,
                routing_key=routing_key,
                content_type=content_type,
                content_encoding="binary" if content_type != "application/json" else "utf-8",
                delivery_mode=1,
                headers={"hostname": "tests"},
            )


def publish_events(broker_url: str, exchange: str, messages: Iterable[dict | list[dict]]) -> None:
    """Publish event dicts (single) or lists (worker batches, routing key task.multi)."""
    publish_raw(
        broker_url,
        exchange,
        (
            ("task.multi" if isinstance(m, list) else m["type"].replace("-", "."), orjson.dumps(m))
            for m in messages
        ),
    )


def task_stream(n_events: int, prefix: str = "t", hostname: str = "celery@stream", batch: int = 24) -> list[list[dict]]:
    """``n_events`` distinct task events (uuid ``{prefix}{i}``) in worker-style batches."""
    from tests.support.events import celery_event

    events = [celery_event("task-started", hostname=hostname, uuid=f"{prefix}{i}") for i in range(n_events)]
    return [events[i : i + batch] for i in range(0, n_events, batch)]


def publish_stream(broker_url: str, exchange: str, batches: list[list[dict]], rate: float | None = None) -> None:
    """Publish batches (``task.multi``), at most ``rate`` events per second if given."""
    start, sent = time.monotonic(), 0
    with Connection(broker_url) as conn:
        producer = Producer(conn.default_channel, exchange=_exchange(conn, exchange))
        for batch in batches:
            producer.publish(orjson.dumps(batch), routing_key="task.multi", content_type="application/json",
                             content_encoding="utf-8", delivery_mode=1)
            sent += len(batch)
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)  # pacing the publisher, not waiting for a condition


def redis_envelope(body: bytes, routing_key: str, exchange: str) -> bytes:
    """A kombu Redis fan-out envelope, as kombu would PUBLISH it."""
    return orjson.dumps(
        {
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": "application/json",
            "headers": {"hostname": "tests"},
            "properties": {
                "delivery_mode": 1,
                "delivery_info": {"exchange": exchange, "routing_key": routing_key},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": str(uuid.uuid4()),
            },
        }
    )


async def delete_capture_queue(amqp_url: str, queue: str) -> None:
    """Remove a test's durable capture queue from RabbitMQ."""
    import aiormq

    from ledger.capture.amqp_source import aiormq_url

    connection = await aiormq.connect(aiormq_url(amqp_url))
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
    finally:
        await connection.close()
