"""Bad input on a real broker ends in quarantine while the good events land (Redis and RabbitMQ)."""

from __future__ import annotations

import json

import asyncpg
import orjson
import pytest

from tests.support.capture import (
    capture_settings,
    delete_capture_queue,
    publish_raw,
    running_capture,
    wait_for_events,
    wait_for_quarantine,
)
from tests.support.events import celery_event


@pytest.fixture
async def cleanup_queue(broker_url: str, event_exchange: str):
    yield
    if broker_url.startswith("amqp"):
        await delete_capture_queue(broker_url, f"{event_exchange}.capture")


async def test_malformed_messages_are_quarantined_and_good_events_land(
    database_url: str, broker_url: str, event_exchange: str, cleanup_queue: None
):
    limit = 4096
    good_single = celery_event("worker-heartbeat", hostname="w1", freq=2.0)
    good_a = celery_event("task-started", uuid="good-a")
    good_b = celery_event("task-succeeded", uuid="good-b", result="4", runtime=0.1)
    wrong_types = celery_event("task-started", uuid="wrong", clock="seven")
    no_type = {k: v for k, v in celery_event("worker-online").items() if k != "type"}
    huge_event = celery_event("task-received", uuid="huge", args="x" * (2 * limit))
    huge_message = b"[" + b" " * (limit * 64) + b"]"
    list_int = 3
    list_no_uuid = celery_event("task-failed", exception="boom")
    mixed = [good_a, list_int, list_no_uuid, good_b]

    messages = [
        ("worker.heartbeat", b"{not json"),
        ("task.started", json.dumps(wrong_types).encode()),
        ("worker.online", json.dumps(no_type).encode()),
        ("task.received", json.dumps(huge_event).encode()),
        ("task.multi", huge_message),
        ("task.multi", json.dumps(mixed).encode()),
        ("worker.heartbeat", json.dumps(good_single).encode()),
    ]
    settings = capture_settings(database_url, broker_url, event_exchange, capture_max_event_bytes=limit)
    async with running_capture(settings) as capture:
        publish_raw(broker_url, event_exchange, messages)
        await wait_for_events(database_url, 3)
        await wait_for_quarantine(database_url, 7)
    assert capture.stats.inserted == 3

    conn = await asyncpg.connect(database_url)
    try:
        stored = await conn.fetch("SELECT type, task_id, routing_key, payload::text AS payload FROM ledger.events ORDER BY seq")
        quarantined = await conn.fetch("SELECT source, routing_key, reason, raw FROM ledger.quarantine ORDER BY id")
    finally:
        await conn.close()
    assert [(r["type"], r["task_id"], r["routing_key"]) for r in stored] == [
        ("task-started", "good-a", "task.multi"),
        ("task-succeeded", "good-b", "task.multi"),
        ("worker-heartbeat", None, "worker.heartbeat"),
    ]
    assert orjson.loads(stored[2]["payload"]) == good_single  # as sent, timestamp untouched

    kind = "redis" if broker_url.startswith("redis") else "amqp"
    assert {r["source"] for r in quarantined} == {kind}
    by_reason = [(r["routing_key"], r["reason"], bytes(r["raw"])) for r in quarantined]
    expected = [
        ("worker.heartbeat", "not JSON", b"{not json"),
        ("task.started", "field 'clock' must be a non-negative 64-bit integer", json.dumps(wrong_types).encode()),
        ("worker.online", "missing field 'type'", json.dumps(no_type).encode()),
        ("task.received", f"exceeds capture_max_event_bytes={limit}", None),
        ("task.multi", "exceeds the size limit", huge_message),
        ("task.multi", "element 1 of the list: not a JSON object", b"3"),
        ("task.multi", "element 2 of the list: task event without field 'uuid'", None),
    ]
    assert len(by_reason) == len(expected)
    for (rk, reason, raw), (want_rk, want_reason, want_raw) in zip(by_reason, expected):
        assert rk == want_rk and want_reason in reason, (rk, reason)
        if want_raw is not None:
            assert raw == want_raw
    assert orjson.loads(by_reason[3][2]) == huge_event
    assert orjson.loads(by_reason[6][2]) == list_no_uuid
