"""How fast `ledger rebuild` replays the log.

Appends N synthetic events in Celery's wire format (tasks sent -> received -> started ->
succeeded/failed/retried, a tenth of them in groups with ledger-task-meta events, worker
heartbeats in between, several tasks in flight at once) through the real recorder into a
fresh database, then times ``ledger rebuild`` (the same function the CLI runs) a few times
and reports the median events per second. Target: >= 50,000 events/s.

    python bench/rebuild.py --events 500000
    LEDGER_BENCH_PG=postgresql://postgres@127.0.0.1:5432/postgres python bench/rebuild.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import machine, write_section  # noqa: E402
from ledger import db  # noqa: E402
from ledger.config import Settings  # noqa: E402
from ledger.log import recorder  # noqa: E402
from ledger.migrate import apply_migrations  # noqa: E402
from tests.support.events import to_log_event  # noqa: E402 - events made as the tests make them
from ledger.projections.rebuild import rebuild  # noqa: E402

WORKERS = [f"celery@worker{i}" for i in range(4)]
NAMES = ["proj.tasks.add", "proj.tasks.mul", "proj.tasks.fetch", "proj.tasks.report", "proj.tasks.flaky"]


def synthetic_events(n: int, seed: int = 7) -> Iterator[dict]:
    """Real-format events, several tasks interleaved, until n events have been produced."""
    rng = random.Random(seed)
    clock = 0
    now = 1_760_000_000.0
    produced = 0
    in_flight: list[list[dict]] = []

    def event(type_: str, hostname: str, **fields) -> dict:
        nonlocal clock, now
        clock += 1
        now += 0.0005
        return {"hostname": hostname, "utcoffset": 0, "pid": 4242, "clock": clock, "timestamp": now,
                "type": type_, **fields}

    def task_life() -> list[dict]:
        task_id = str(uuid.UUID(int=rng.getrandbits(128)))
        name = rng.choice(NAMES)
        worker = rng.choice(WORKERS)
        args = f"({rng.randint(0, 999)}, {rng.randint(0, 999)})"
        member = {}
        if rng.random() < 0.1:
            member = {"group_id": f"group-{rng.randint(0, n // 100)}", "group_index": rng.randint(0, 9)}
        life = [
            event("task-sent", "client@app", uuid=task_id, name=name, args=args, kwargs="{}", retries=0, eta=None,
                  expires=None, queue="celery", exchange="", routing_key="celery", root_id=task_id,
                  parent_id=None, **member),
            event("task-received", worker, uuid=task_id, name=name, args=args, kwargs="{}", root_id=task_id,
                  parent_id=None, retries=0, eta=None, expires=None),
        ]
        if member:
            life.append(event("ledger-task-meta", worker, uuid=task_id, root_id=task_id, parent_id=None, **member))
        life.append(event("task-started", worker, uuid=task_id, **member))
        roll = rng.random()
        if roll < 0.85:
            life.append(event("task-succeeded", worker, uuid=task_id, result=str(rng.randint(0, 10**6)),
                              runtime=rng.random(), **member))
        elif roll < 0.95:
            life.append(event("task-failed", worker, uuid=task_id, exception="ValueError('bad input')",
                              traceback="Traceback (most recent call last):\n  ...\nValueError: bad input", **member))
        else:
            life.append(event("task-retried", worker, uuid=task_id, exception="Retry()", traceback="...", **member))
        return life

    while produced < n:
        while len(in_flight) < 20:
            in_flight.append(task_life())
        if rng.random() < 0.005:
            yield event("worker-heartbeat", rng.choice(WORKERS), freq=2.0, active=rng.randint(0, 8),
                        processed=produced, loadavg=[0.5, 0.4, 0.3], sw_ident="py-celery", sw_ver="5.7.0",
                        sw_sys="Linux")
            produced += 1
            continue
        life = in_flight[rng.randrange(len(in_flight))]
        yield life.pop(0)
        produced += 1
        if not life:
            in_flight.remove(life)


def to_event(payload: dict) -> recorder.Event:
    return to_log_event(payload, routing_key="task.multi")


async def load(dsn: str, n: int) -> float:
    conn = await db.connect(dsn)
    started = time.monotonic()
    try:
        batch: list[recorder.Event] = []
        for payload in synthetic_events(n):
            batch.append(to_event(payload))
            if len(batch) == 5000:
                await recorder.append(conn, batch)
                batch = []
        if batch:
            await recorder.append(conn, batch)
    finally:
        await conn.close()
    return time.monotonic() - started


def _cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def timed_rebuild(settings: Settings, admin: asyncpg.Connection, database: str):
    """Run a rebuild; also sum the CPU its PostgreSQL backends and this process used (the
    machine is shared, so wall time alone says little)."""
    first: dict[int, float] = {}
    last: dict[int, float] = {}
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for row in await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database):
                cpu = _cpu_seconds(row["pid"])
                if cpu is not None:
                    first.setdefault(row["pid"], cpu)
                    last[row["pid"]] = cpu
            try:
                await asyncio.wait_for(done.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    python_before = time.process_time()
    started = time.monotonic()
    replayed: list[float] = []
    result = await rebuild(settings, on_indexes=lambda: replayed.append(time.monotonic() - started))
    python_cpu = time.process_time() - python_before
    done.set()
    await sampler
    postgres_cpu = sum(last[pid] - first[pid] for pid in last)
    return result, python_cpu, postgres_cpu, replayed[0]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    options = parser.parse_args()
    admin_dsn = os.environ.get("LEDGER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
    name = f"ledger_bench_rebuild_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
    try:
        conn = await db.connect(dsn)
        await apply_migrations(conn)
        await conn.close()
        load_seconds = await load(dsn, options.events)
        print(f"appended {options.events:,} events in {load_seconds:.1f}s")
        settings = Settings(database_url=dsn)
        results = []
        cpu = []
        replays = []
        for run in range(options.runs):
            result, python_cpu, postgres_cpu, replay = await timed_rebuild(settings, admin, name)
            results.append(result)
            cpu.append((python_cpu, postgres_cpu))
            replays.append(replay)
            print(f"run {run + 1}: {result.events:,} events in {result.seconds:.2f}s = {result.rate:,.0f} events/s"
                  f" (replay {replay:.2f}s, feed + indexes {result.seconds - replay:.2f}s;"
                  f" CPU: python {python_cpu:.2f}s, postgres {postgres_cpu:.2f}s)")
        conn = await db.connect(dsn)
        counts = {t: await conn.fetchval(f"SELECT count(*) FROM ledger.{t}") for t in ("tasks", "groups", "workers", "changes")}
        await conn.close()
    finally:
        if not options.keep:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    rates = sorted(r.rate for r in results)
    median = statistics.median(rates)
    python_cpu = statistics.median(c[0] for c in cpu)
    postgres_cpu = statistics.median(c[1] for c in cpu)
    loadavg = os.getloadavg()[0]
    replay = statistics.median(replays)
    verdict = "met" if median >= 50_000 else "NOT met"
    body = f"""
{options.events:,} synthetic real-format events ({counts['tasks']:,} tasks, {counts['groups']:,} groups,
{counts['workers']} workers), appended through the recorder in {load_seconds:.1f}s. `ledger rebuild`
(the same function the CLI runs: truncate, drop secondary indexes, replay in batches of 20,000
with the projector's fold - pipelined read / fold / COPY + upsert -, change feed of
{counts['changes']:,} rows, indexes rebuilt), {options.runs} runs on {machine()}:

| | events/s |
|---|---|
| median | {median:,.0f} |
| min | {rates[0]:,.0f} |
| max | {rates[-1]:,.0f} |

Median time of the replay itself (read, fold, write the projections): {replay:.1f}s
({options.events / replay:,.0f} events/s); the rest of each run writes the change feed (one row per
task, group and worker, `to_jsonb`) while the task indexes are rebuilt, on two sessions.

CPU per run (median): this process {python_cpu:.2f}s, its PostgreSQL backends {postgres_cpu:.2f}s, i.e.
{options.events / max(python_cpu, 1e-9):,.0f} events per Python CPU-second; load average at the end {loadavg:.1f}
(the machine is shared: wall time includes waiting for the CPU).

Target >= 50,000 events/s: **{verdict}** (median).
"""
    print(body)
    write_section("rebuild", "ledger rebuild: events per second", body)


if __name__ == "__main__":
    asyncio.run(main())
