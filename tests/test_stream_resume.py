"""Resume with `since` under a continuous stream: a client whose connection is cut at
random moments (seeded schedule), reconnecting each time with the last position it saw per
subscription, alternately to one of two replicas, ends with exactly what a client that
never disconnected received: same changes, same order, nothing twice. STREAM_SEED=<n> replays another schedule."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from typing import Any

import asyncpg

from tests.support.api import running_api
from tests.support.stream import (
    StreamClient,
    lifecycle,
    record,
    running_projector,
    settle,
    worker_heartbeat,
    worker_online,
)

SEED = int(os.environ.get("STREAM_SEED", "20261121"))
TASKS = 160
GROUP = "resume-group"
SUBS: dict[str, dict[str, Any]] = {
    "all": {"topic": "tasks", "limit": 0},
    "running": {"topic": "tasks", "filter": {"state": ["STARTED", "RECEIVED"]}},  # tasks enter and leave
    "failed": {"topic": "tasks", "filter": {"state": "FAILURE", "name": "tests.flaky"}},
    "group": {"topic": "group", "group_id": GROUP},
    "workers": {"topic": "workers"},
    "log": {"topic": "log", "types": ["task-started", "task-f*", "worker-*"]},
}


def pushed(messages: list[dict[str, Any]], sub: str) -> list[tuple]:
    """Everything data-bearing pushed for `sub`, in order (snapshots excluded: both start empty)."""
    out: list[tuple] = []
    for m in messages:
        if m.get("sub") != sub:
            continue
        if m["type"] == "changes":
            out.extend((m["seq"], c["kind"], c["key"], c.get("match"), c["data"].get("state"),
                        c["data"].get("last_seq")) for c in m["changes"])
        elif m["type"] == "event":
            out.append((m["seq"], m["event"]["type"], m["event"]["task_id"]))
    return out


def resume_point(messages: list[dict[str, Any]], sub: str) -> int | None:
    seqs = [m["seq"] for m in messages if m.get("sub") == sub and m["type"] in ("snapshot", "changes", "event", "live")]
    return seqs[-1] if seqs else None


async def produce(conn: asyncpg.Connection, rng: random.Random) -> None:
    """Task lifecycles interleaved, appended a few events at a time, as capture would."""
    workers = ["celery@r1", "celery@r2"]
    await record(conn, [worker_online(w) for w in workers])
    pending: list[list[dict]] = []
    for i in range(TASKS):
        events = lifecycle(str(uuid.UUID(int=rng.getrandbits(128))), worker=workers[i % 2],
                           name="tests.flaky" if i % 5 == 0 else "tests.add",
                           group=(GROUP, i) if i % 3 == 0 else None, fail=i % 5 == 0)
        pending.append(events)
        while pending and (len(pending) > 6 or i == TASKS - 1):
            batch = []
            for _ in range(rng.randint(1, 4)):
                j = rng.randrange(len(pending))
                batch.append(pending[j].pop(0))
                if not pending[j]:
                    pending.pop(j)
                if not pending:
                    break
            if rng.random() < 0.1:
                batch.append(worker_heartbeat(rng.choice(workers), processed=i))
            await record(conn, batch)
            await asyncio.sleep(rng.uniform(0, 0.004))  # pacing the producer, so the stream is continuous


async def subscribe_all(client: StreamClient, since: dict[str, int | None]) -> None:
    for sub, spec in SUBS.items():
        await client.subscribe(sub, since=since.get(sub), **spec)


async def test_reconnecting_with_since_at_random_moments_loses_nothing_and_repeats_nothing(
    database_url: str, conn: asyncpg.Connection
) -> None:
    rng = random.Random(SEED)
    async with contextlib.AsyncExitStack() as stack:
        apis = [await stack.enter_async_context(running_api(database_url, stream_heartbeat=2.0)) for _ in range(2)]
        await stack.enter_async_context(running_projector(database_url))
        steady = await stack.enter_async_context(StreamClient.connect(apis[0], name="steady"))
        await subscribe_all(steady, {})
        for sub in SUBS:
            await steady.live(sub)

        flaky_seen: list[dict[str, Any]] = []  # every message the flaky client processed, all connections
        since: dict[str, int | None] = {}
        producer: asyncio.Task | None = None
        connections = 0
        while producer is None or not producer.done() or connections < 3:
            api = apis[connections % 2]
            async with StreamClient.connect(api, name=f"flaky-{connections}") as flaky:
                await subscribe_all(flaky, since)
                if producer is None:  # both clients start from the same (empty) snapshots
                    for sub in SUBS:
                        await flaky.live(sub)
                    producer = asyncio.create_task(produce(conn, rng))
                # cut the connection after a random number of messages (sometimes at once)
                cut_after = rng.choice([0, rng.randint(1, 10), rng.randint(10, 60)])
                try:
                    await flaky.wait_for(lambda m, n=[0]: (n.__setitem__(0, n[0] + 1) or n[0] >= cut_after),
                                         timeout=5)
                except asyncio.TimeoutError:
                    pass  # a quiet moment: cut anyway
                flaky.ws.transport.abort()
                await flaky.closed.wait()
            received = list(flaky.messages)
            flaky_seen.extend(received)
            for sub in SUBS:
                point = resume_point(received, sub)
                if point is not None:
                    since[sub] = point
            connections += 1
        await producer

        expected_events = await conn.fetchval("SELECT max(seq) FROM ledger.events")
        end = await settle(apis, database_url, expected_events)
        # the last connection stays until every subscription is live past the end
        async with StreamClient.connect(apis[connections % 2], name="flaky-last") as flaky:
            await subscribe_all(flaky, since)
            for sub in SUBS:
                assert (await flaky.live(sub))["seq"] >= end
            flaky_seen.extend(flaky.messages)
        # the steady client has everything up to `end` once a pong comes back after it
        await steady.send({"type": "ping", "id": "end"})
        await steady.wait_for(lambda m: m["type"] == "pong" and m.get("id") == "end")
        assert not steady.closed.is_set()

    assert connections >= 3
    for sub in SUBS:
        reference = pushed(steady.messages, sub)
        union = pushed(flaky_seen, sub)
        assert reference, sub
        assert len(set(union)) == len(union), f"{sub}: duplicates after resume"
        assert union == reference, f"{sub}: {len(union)} items after resumes vs {len(reference)} never disconnected"
    # leavers were announced across resumes too
    assert any(item[3] is False for item in pushed(flaky_seen, "running"))
    assert {item[4] for item in pushed(steady.messages, "failed")} == {"FAILURE"}


async def test_a_replica_that_loses_its_database_connection_misses_nothing(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """The hub's LISTEN connection is killed (PostgreSQL terminates the backend) three times
    under a continuous stream: notifications are lost, the hub reconnects and reads on from
    its cursor, and its clients still receive the whole change feed, once each."""
    rng = random.Random(SEED + 1)
    killer = await asyncpg.connect(database_url)  # `conn` is the producer's
    async with running_api(database_url, stream_heartbeat=2.0) as api, running_projector(database_url):
        hub = api.app.state.stream_hub
        async with StreamClient.connect(api, name="watcher") as client:
            await client.subscribe("all", "tasks", limit=0)
            await client.subscribe("log", "log", types=["task-succeeded", "task-failed"])
            await client.live("all")
            await client.live("log")
            producer = asyncio.create_task(produce(conn, rng))
            kills = 0
            while kills < 3:
                mark = len(client.messages)
                await client.wait_for(lambda m: m["type"] in ("changes", "event"), start=mark + 20)
                pid = hub._listen.get_server_pid()
                assert await killer.fetchval("SELECT pg_terminate_backend($1)", pid)
                kills += 1
                while hub._listen is None or hub._listen.get_server_pid() == pid:
                    await asyncio.sleep(0.01)  # the hub is reconnecting
            await producer
            end = await settle([api], database_url, await conn.fetchval("SELECT max(seq) FROM ledger.events"))
            await client.send({"type": "ping", "id": "end"})
            await client.wait_for(lambda m: m["type"] == "pong" and m.get("id") == "end")
            assert not client.closed.is_set()
    await killer.close()

    feed = [(r["seq"], r["key"]) for r in await conn.fetch(
        "SELECT seq, key FROM ledger.changes WHERE kind = 'task' AND seq <= $1 ORDER BY seq, key", end)]
    got = [(seq, key) for seq, _, key, _ in client.changes("all")]
    assert sorted(got) == feed and len(got) == len(set(got))
    final_events = [r["seq"] for r in await conn.fetch(
        "SELECT seq FROM ledger.events WHERE type IN ('task-succeeded', 'task-failed') ORDER BY seq")]
    assert [m["seq"] for m in client.of("log") if m["type"] == "event"] == final_events
    assert len(final_events) == TASKS
