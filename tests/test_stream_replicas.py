"""Two uvicorn replicas, clients on both, a real Celery worker's workload captured and
projected: every client receives the same sequence of changes, and it ends in the states
Celery's own result backend reports (retries and group membership included)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from tests.support.api import running_api
from tests.support.capture import capture_settings, running_capture, wait_for_events
from tests.support.stream import StreamClient, running_projector, settle
from tests.support.worker import (
    backend_report,
    cleanup,
    run_workload_on_worker,
    workload_config,
)


def final_rows(client: StreamClient, sub: str) -> dict[str, dict[str, Any]]:
    """The last row pushed for each key of `sub`."""
    rows: dict[str, dict[str, Any]] = {}
    for m in client.of(sub):
        if m["type"] == "changes":
            for c in m["changes"]:
                rows[c["key"]] = c["data"]
    return rows


async def test_two_replicas_push_the_same_changes_ending_in_the_backend_states(
    database_url: str, redis_url: str, event_exchange: str
) -> None:
    config = workload_config(redis_url, event_exchange, redis_url)
    settings = capture_settings(database_url, redis_url, event_exchange)
    cleanup(config)
    try:
        async with contextlib.AsyncExitStack() as stack:
            apis = [await stack.enter_async_context(running_api(database_url, stream_heartbeat=2.0)) for _ in range(2)]
            await stack.enter_async_context(running_projector(database_url))
            await stack.enter_async_context(running_capture(settings))
            clients = []
            for i, api in enumerate(apis):
                for header in (True, False):  # header auth, and the browser's first-message auth
                    client = await stack.enter_async_context(
                        StreamClient.connect(api, header=header, name=f"replica{i}-{'header' if header else 'message'}"))
                    await client.subscribe("tasks", "tasks", limit=0)
                    await client.subscribe("workers", "workers")
                    clients.append(client)
            for client in clients:
                await client.live("tasks")
                await client.live("workers")

            workload, sent = await asyncio.to_thread(run_workload_on_worker, config)
            await wait_for_events(database_url, len(sent))
            end = await settle(apis, database_url)
            for client in clients:  # a pong after the end means every earlier change is in
                await client.send({"type": "ping", "id": "end"})
                await client.wait_for(lambda m: m["type"] == "pong" and m.get("id") == "end")

            # late subscribers catch up from the start of the feed, on the other replica
            late = await stack.enter_async_context(StreamClient.connect(apis[1], name="late"))
            for group_id in workload.groups:
                await late.subscribe(group_id, "group", group_id=group_id, since=0)
            for group_id in workload.groups:
                assert (await late.live(group_id))["seq"] >= end

        report = await asyncio.to_thread(backend_report, config, workload)
    finally:
        cleanup(config)

    # the same sequence everywhere, in log order
    first = clients[0]
    for sub in ("tasks", "workers"):
        sequence = first.changes(sub)
        assert sequence, sub
        assert [s for s, *_ in sequence] == sorted(s for s, *_ in sequence)
        for other in clients[1:]:
            assert other.changes(sub) == sequence, f"{other.name} differs from {first.name} on {sub}"
        assert sequence[-1][0] <= end

    # ending in what Celery's result backend says
    rows = final_rows(first, "tasks")
    assert set(workload.tasks) <= set(rows)
    for task_id, expected in report.items():
        row = rows[task_id]
        assert row["state"] == expected["state"], (task_id, row["state"], expected)
        assert row["name"] == expected["name"]
        assert (row["retries"] or 0) == (expected["retries"] or 0), (task_id, row["retries"], expected)
        if "group_id" in expected:
            assert (row["group_id"], row["group_index"]) == (expected["group_id"], expected["group_index"])
    workers = final_rows(first, "workers")
    assert len(workers) == 1 and next(iter(workers.values()))["offline_at"] is not None  # worker-offline came last

    # group subscriptions: the group's row and exactly the members Celery's backend lists (a
    # chord's callback carries its header's group id but is not a member), in their final states
    for group_id, members in workload.groups.items():
        group_rows = final_rows(late, group_id)
        assert set(group_rows) == {group_id, *members}
        assert all(group_rows[m] == rows[m] for m in members)
        assert all(group_rows[m]["state"] == report[m]["state"] for m in members)
    assert any(rows[cb]["group_id"] in workload.groups for cb in workload.chords)  # the case above is real
