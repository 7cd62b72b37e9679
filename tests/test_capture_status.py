"""Capture reports to ledger.capture_status, and /readyz (another process's view) says when
events cannot flow: a capture without its broker, or captures that all went silent."""

from __future__ import annotations

import asyncio

from ledger.api.ops import capture_problem
from ledger.capture import Capture
from tests.support.api import running_api
from tests.support.capture import capture_settings, running_capture
from tests.support.waiting import wait_until

DEAD_BROKER = "redis://127.0.0.1:1/0"  # nothing listens on port 1: connection refused


async def test_readyz_reports_a_capture_that_cannot_reach_its_broker(database_url, event_exchange):
    capture = Capture(capture_settings(database_url, DEAD_BROKER, event_exchange))
    stop = asyncio.Event()
    async with running_api(database_url) as api, api.client("read") as http:
        task = asyncio.create_task(capture.run(stop))
        try:
            async def reported():
                r = await http.get("/readyz")
                return r if r.json()["captures"] else None

            r = await wait_until(reported, 20, "the capture's first report")
            body = r.json()
            assert r.status_code == 503 and body["ready"] is False and body["database"] is True
            assert "not connected to its broker" in body["reason"] and DEAD_BROKER in body["reason"]
            [state] = body["captures"]
            assert state["connected"] is False and state["broker"] == DEAD_BROKER
            assert not task.done()  # still retrying with backoff, not crashed
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
        # A clean stop withdraws its report.
        r = await http.get("/readyz")
        assert r.status_code == 200 and r.json()["captures"] == []


async def test_readyz_shows_a_connected_capture_as_ready(database_url, redis_url, event_exchange):
    async with running_capture(capture_settings(database_url, redis_url, event_exchange)) as capture:
        async with running_api(database_url) as api, api.client("read") as http:
            async def reported():
                r = await http.get("/readyz")
                return r if r.json()["captures"] else None

            r = await wait_until(reported, 20, "the capture's first report")
            assert r.status_code == 200 and r.json()["ready"] is True
            [state] = r.json()["captures"]
            assert state["connected"] is True and state["stored"] == capture.stats.inserted


def test_captures_that_all_went_silent_are_a_problem_but_none_at_all_is_not():
    live_ok = {"capture_id": "a:1", "broker": "redis://r", "connected": True, "seconds_since_report": 1.0}
    silent = {"capture_id": "b:2", "broker": "redis://r", "connected": True, "seconds_since_report": 120.0}
    assert capture_problem([]) is None
    assert capture_problem([live_ok, silent]) is None  # one live capture keeps events flowing
    assert capture_problem([silent]) == "no capture process has reported for 120 s"
