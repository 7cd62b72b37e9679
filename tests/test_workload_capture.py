"""A real worker's workload, captured: every event sent is in the log exactly once.

"Every event sent" is known independently of capture: the workload app's dispatchers (client,
worker main process, pool children) push each event they published onto a Redis list, the
witness (tests/support/workload_app.py). The log must hold exactly that set of events, each
once, identified by (type, uuid, hostname, clock, timestamp), with the group ids instrument
adds.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import asyncpg
import orjson

from tests.support.capture import (
    capture_settings,
    delete_capture_queue,
    running_capture,
)
from tests.support.worker import (
    Workload,
    cleanup,
    event_identity,
    run_workload_on_worker,
    workload_config,
)

QUIESCENCE_TIMEOUT = 20.0


async def _log(database_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT payload::text FROM ledger.events ORDER BY seq")
    finally:
        await conn.close()
    return [orjson.loads(r[0]) for r in rows]


async def _wait_for_log(database_url: str, expected: set[tuple]) -> list[dict[str, Any]]:
    """Poll the log until it holds every expected event (capture commits within ms)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + QUIESCENCE_TIMEOUT
    while True:
        log = await _log(database_url)
        missing = expected - {event_identity(e) for e in log}
        if not missing:
            return log
        if loop.time() > deadline:
            raise AssertionError(f"{len(missing)} sent events never reached the log, e.g. {sorted(missing)[:5]}")
        await asyncio.sleep(0.05)  # polling another component's commits


async def _capture_workload(
    database_url: str, broker_url: str, event_exchange: str, redis_url: str, **config: Any
) -> tuple[Workload, list[dict[str, Any]], list[dict[str, Any]]]:
    """Capture running, a worker runs the workload; returns (workload, sent, log) once the
    log holds every sent event and nothing more arrives."""
    config_ = workload_config(broker_url, event_exchange, redis_url, **config)
    settings = capture_settings(database_url, broker_url, event_exchange)
    cleanup(config_)
    try:
        async with running_capture(settings):
            workload, sent = await asyncio.to_thread(run_workload_on_worker, config_)
            log = await _wait_for_log(database_url, {event_identity(e) for e in sent})
        assert await _log(database_url) == log  # capture stopped: its log is final
    finally:
        cleanup(config_)
        if broker_url.startswith("amqp"):
            await delete_capture_queue(broker_url, settings.capture_queue)
    return workload, sent, log


def _assert_exactly_once_as_sent(sent: list[dict[str, Any]], log: list[dict[str, Any]]) -> None:
    sent_ids = Counter(event_identity(e) for e in sent)
    log_ids = Counter(event_identity(e) for e in log)
    assert max(sent_ids.values()) == 1, "the witness saw one event twice"
    assert log_ids == sent_ids  # each sent event once, and nothing the app did not send
    # Stored as sent: every field, every value (no localised timestamp, no rewritten clock).
    by_identity = {event_identity(e): e for e in sent}
    for event in log:
        assert event == by_identity[event_identity(event)]


def _assert_outcomes(workload: Workload, log: list[dict[str, Any]], *, sent_events: bool) -> None:
    """The workload had every kind of task, and the log shows how each one ended."""
    types = Counter(e["type"] for e in log)
    assert types["worker-online"] == 1 and types["worker-offline"] == 1
    assert len(workload.by_state("FAILURE")) == 1 and len(workload.by_state("REVOKED")) == 2
    assert workload.chains and len(workload.groups) == 2 and len(workload.chords) == 1
    for task in workload.tasks.values():
        own = [e for e in log if e.get("uuid") == task.id]
        kinds = Counter(e["type"] for e in own)
        assert kinds[task.final_event] == 1, (task, kinds)
        assert kinds["task-sent"] == (1 + task.retries if sent_events else 0), (task, kinds)
        assert kinds["task-retried"] == task.retries, (task, kinds)
        if task.expired or task.terminated:
            [revoked] = [e for e in own if e["type"] == "task-revoked"]
            assert revoked["expired"] is task.expired and revoked["terminated"] is task.terminated
        if task.expired:  # held for its countdown, expired meanwhile: never started
            assert not kinds["task-started"]
        if task.parent_id:
            assert all(e["parent_id"] == task.parent_id for e in own if "parent_id" in e)


async def test_workload_events_land_in_the_log_exactly_once(
    database_url: str, broker_url: str, event_exchange: str, redis_url: str
) -> None:
    workload, sent, log = await _capture_workload(database_url, broker_url, event_exchange, redis_url)
    _assert_exactly_once_as_sent(sent, log)
    _assert_outcomes(workload, log, sent_events=True)

    # Group ids, indexes and chord membership, where instrument put them.
    for task in workload.tasks.values():
        if task.group_index is None:
            continue
        own = [e for e in log if e.get("uuid") == task.id]
        annotated = [e for e in own if e["type"] in ("task-sent", "ledger-task-meta", "task-started", "task-succeeded")]
        assert Counter(e["type"] for e in annotated) == {
            "task-sent": 1, "ledger-task-meta": 1, "task-started": 1, "task-succeeded": 1
        }
        for e in annotated:
            assert (e["group_id"], e["group_index"], e.get("chord_id")) == (task.group_id, task.group_index, task.chord_id)
    for callback_id, header_id in workload.chords.items():
        members = [e["uuid"] for e in log if e["type"] == "ledger-task-meta" and e["chord_id"] == callback_id]
        assert sorted(members) == sorted(workload.groups[header_id])


async def test_workload_of_an_app_without_the_integration(
    database_url: str, event_exchange: str, redis_url: str
) -> None:
    """A plain Celery app (task events on, as with -E; no instrument): its events are all captured, once;
    Celery sends no task-sent and no group ids, and the ledger adds none."""
    workload, sent, log = await _capture_workload(database_url, redis_url, event_exchange, redis_url, instrument=0)
    _assert_exactly_once_as_sent(sent, log)
    _assert_outcomes(workload, log, sent_events=False)
    assert not [e for e in log if e["type"].startswith("ledger-") or "group_id" in e]
