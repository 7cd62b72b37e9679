"""No event lost, none stored twice: redelivery, concurrent captures, database loss, SIGKILL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.support.capture import (
    CaptureProcess,
    capture_settings,
    count_events,
    delete_capture_queue,
    publish_events,
    publish_stream,
    running_capture,
    task_stream,
    wait_for_events,
)


@pytest.fixture
async def cleanup_queue(broker_url: str, event_exchange: str):
    yield
    if broker_url.startswith("amqp"):
        await delete_capture_queue(broker_url, f"{event_exchange}.capture")


async def _distinct_task_ids(database_url: str) -> tuple[int, set[str]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT task_id FROM ledger.events")
    finally:
        await conn.close()
    return len(rows), {r["task_id"] for r in rows}


async def test_duplicate_publish_is_a_no_op(database_url, broker_url, event_exchange, cleanup_queue):
    batches = task_stream(240, prefix="dup")
    settings = capture_settings(database_url, broker_url, event_exchange)
    async with running_capture(settings) as capture:
        publish_events(broker_url, event_exchange, batches)
        publish_events(broker_url, event_exchange, batches)  # the same bytes again
        await wait_for_events(database_url, 240)
        deadline = asyncio.get_running_loop().time() + 20
        while capture.stats.inserted + capture.stats.duplicates < 480:
            assert asyncio.get_running_loop().time() < deadline, capture.stats
            await asyncio.sleep(0.02)  # waiting for the second copy to be processed
    assert (capture.stats.inserted, capture.stats.duplicates) == (240, 240)
    total, ids = await _distinct_task_ids(database_url)
    assert total == 240 and ids == {f"dup{i}" for i in range(240)}


async def test_two_captures_at_once_store_each_event_once(database_url, broker_url, event_exchange, cleanup_queue):
    """Redis: both receive every event and dedupe. RabbitMQ: they share the queue."""
    settings = capture_settings(database_url, broker_url, event_exchange, capture_batch_size=50)
    async with running_capture(settings) as first, running_capture(settings) as second:
        await asyncio.to_thread(publish_stream, broker_url, event_exchange, task_stream(2400, prefix="two"))
        await wait_for_events(database_url, 2400)
    total, ids = await _distinct_task_ids(database_url)
    assert total == 2400 and ids == {f"two{i}" for i in range(2400)}
    stored = first.stats.inserted + second.stats.inserted
    assert stored == 2400
    if broker_url.startswith("redis"):
        assert first.stats.duplicates + second.stats.duplicates == 2400


async def test_database_connection_lost_mid_stream(database_url, broker_url, event_exchange, cleanup_queue):
    n = 6000
    settings = capture_settings(database_url, broker_url, event_exchange, capture_batch_size=200)
    admin = await asyncpg.connect(database_url)
    try:
        async with running_capture(settings) as capture:
            publisher = asyncio.create_task(
                asyncio.to_thread(publish_stream, broker_url, event_exchange, task_stream(n, prefix="db"), 6000)
            )
            await wait_for_events(database_url, 600)
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            )
            assert killed >= 1  # capture's connection was among them
            await publisher
            await wait_for_events(database_url, n)
        total, ids = await _distinct_task_ids(database_url)
        assert total == n and ids == {f"db{i}" for i in range(n)}
    finally:
        await admin.close()


async def test_redis_sigterm_flushes_what_was_received(database_url, redis_url, event_exchange):
    settings = capture_settings(database_url, redis_url, event_exchange, capture_batch_ms=200.0)
    with CaptureProcess(settings) as proc:
        proc.wait_ready()
        publish_stream(redis_url, event_exchange, task_stream(4800, prefix="term"))
        assert proc.stop() == 0
    assert await count_events(database_url) == 4800
    assert "stopped; 4800 inserted" in proc.log()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
async def test_rabbitmq_stopped_mid_stream_then_restarted_stores_every_event_once(database_url, amqp_url, event_exchange, how):
    """SIGKILL: no flush, no acks for what was in flight. SIGTERM: flush, ack, exit 0."""
    n = 24_000
    settings = capture_settings(database_url, amqp_url, event_exchange, capture_batch_size=500)
    try:
        first = CaptureProcess(settings).start()
        try:
            first.wait_ready()
            publisher = asyncio.create_task(
                asyncio.to_thread(publish_stream, amqp_url, event_exchange, task_stream(n, prefix="kill"), 8000)
            )
            await wait_for_events(database_url, 4000, timeout=60)
            if how == "SIGKILL":
                first.kill()
            else:
                assert first.stop() == 0
                assert "capture: stopped; " in first.log()
            stored_at_kill = await count_events(database_url)
            assert stored_at_kill < n, "the kill must land mid-stream"
            await publisher  # the rest is published while capture is down: RabbitMQ buffers it
        finally:
            if first.proc and first.proc.poll() is None:
                first.kill()
        with CaptureProcess(settings) as second:
            second.wait_ready()
            await wait_for_events(database_url, n, timeout=90)
            assert second.stop() == 0
        # the restart found in the queue what the killed process had not acked
        assert "capture: stopped; " in second.log() and " 0 inserted" not in second.log()
        total, ids = await _distinct_task_ids(database_url)
        assert total == n and ids == {f"kill{i}" for i in range(n)}
    finally:
        await delete_capture_queue(amqp_url, settings.capture_queue)
