"""capture's periodic `enable_events` broadcast makes a worker started without -E send task events.

The worker is a real `celery worker` subprocess running this module's app (configured from
environment variables, so the worker process builds the same app).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid

from celery import Celery

from tests.support.capture import capture_settings, count_events, running_capture

app = Celery(
    "capture-enable-events",
    broker=os.environ.get("CAPTURE_TEST_BROKER", "memory://"),
    set_as_current=False,
)
app.conf.event_exchange = os.environ.get("CAPTURE_TEST_EXCHANGE", "celeryev")
app.conf.task_default_queue = os.environ.get("CAPTURE_TEST_QUEUE", "celery")
app.conf.worker_send_task_events = False  # what -E would turn on: left off on purpose
app.conf.broker_connection_retry_on_startup = True


@app.task(name="capture_test.add")
def add(x: int, y: int) -> int:
    return x + y


async def test_enable_events_broadcast_turns_on_task_events(database_url, redis_url, event_exchange):
    queue = f"q.{uuid.uuid4().hex[:10]}"
    hostname = f"enable-{uuid.uuid4().hex[:8]}@test"
    env = dict(os.environ, CAPTURE_TEST_BROKER=redis_url, CAPTURE_TEST_EXCHANGE=event_exchange, CAPTURE_TEST_QUEUE=queue)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.test_capture_enable_events:app", "worker", "-P", "solo",
         "-Q", queue, "-n", hostname, "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    client = Celery(broker=redis_url, set_as_current=False)
    client.conf.task_default_queue = queue
    settings = capture_settings(database_url, redis_url, event_exchange, enable_events_interval=0.5)
    try:
        async with running_capture(settings) as capture:
            # worker-online arrives even without -E: the worker is up and publishing to our exchange
            deadline = time.monotonic() + 60
            while await count_events(database_url, "hostname = $1", hostname) == 0:
                assert time.monotonic() < deadline, "the worker never came online"
                await asyncio.sleep(0.1)  # polling the log for another process's events
            # keep sending tasks until their events show up (the broadcast may land after the first)
            sent: list[str] = []
            while await count_events(database_url, "type = 'task-succeeded' AND hostname = $1", hostname) == 0:
                assert time.monotonic() < deadline, f"no task events from {hostname} after {len(sent)} tasks"
                sent.append(client.send_task("capture_test.add", (2, 2), queue=queue).id)
                await asyncio.sleep(0.5)  # pacing the task stream while waiting for the broadcast
            assert capture.stats.inserted > 0
        succeeded = await count_events(
            database_url, "type = 'task-succeeded' AND hostname = $1 AND task_id = ANY($2::text[])", hostname, sent
        )
        assert succeeded >= 1
    finally:
        worker.terminate()
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(10)
