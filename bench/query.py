"""Query benchmark: a big log, `ledger rebuild`, then latency through the HTTP API.

    python bench/query.py                    # 10 million events (about two million tasks)
    python bench/query.py --events 1000000   # smaller
    python bench/query.py --reuse            # keep the loaded database from a previous run

1. Generates real-format Celery events (the dicts Celery's dispatcher sends: type, hostname,
   utcoffset, pid, clock, timestamp and each type's fields; group members carry the fields
   `ledger.celery.instrument` adds) and COPYs them into ledger.events in bulk. Loading
   bypasses capture on purpose (capture has its own benchmark); the rows are exactly what
   capture writes (event_key = a hash of the payload, routing key = type with dots).
2. Runs `ledger rebuild` as a subprocess and reports events per second.
3. Starts `ledger serve` (auth on) as a subprocess and measures p50/p99 latency of sequential
   keep-alive requests from one minimal HTTP/1.1 client, for: a task by id, filtered list
   pages, a timeline, and a group of 1,000 members.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.results import write_section  # noqa: E402
from ledger import db  # noqa: E402
from ledger.api.tokens import create_token  # noqa: E402
from ledger.migrate import apply_migrations  # noqa: E402

T0 = 1_750_000_000.0
NAMES = [f"app.tasks.job_{i:02d}" for i in range(20)]
WORKERS = [f"celery@worker-{i}" for i in range(8)]
BIG_GROUPS = 20
GROUP_SIZE = 1000
COPY_COLUMNS = ["event_key", "type", "task_id", "hostname", "sent_at", "clock", "routing_key", "payload"]


def task_id(i: int) -> str:
    return f"{i:08x}-b00c-4e00-8000-{i:012x}"


def group_id(g: int) -> str:
    return f"group-{g:04d}-4e00-8000-000000000000"


class Generator:
    """Deterministic workload: ~4.9 events per task; 1 % of tasks sit in groups of 1,000."""

    def __init__(self, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.clock = 0
        self.events = 0

    def event(self, type_: str, hostname: str, ts: float, **fields) -> tuple:
        self.clock += 1
        payload = {"hostname": hostname, "utcoffset": 0, "pid": 1000 + (hash(hostname) % 5000),
                   "clock": self.clock, "timestamp": ts, "type": type_, **fields}
        raw = orjson.dumps(payload)
        self.events += 1
        return (hashlib.blake2b(raw, digest_size=16).digest(), type_, fields.get("uuid"), hostname, ts,
                self.clock, type_.replace("-", "."), raw.decode())

    def task(self, i: int, ts: float, group: tuple[str, int] | None) -> list[tuple]:
        rng = self.rng
        tid, name = task_id(i), NAMES[i % len(NAMES)]
        worker = WORKERS[rng.randrange(len(WORKERS))]
        parent = task_id(i - 1) if i % 10 == 9 else None
        root = task_id(i - 1) if parent else tid
        args = f"({i}, {rng.randrange(1000)})"
        kwargs = "{'user': 'u%d', 'flag': %s}" % (i % 5000, "True" if i % 2 else "False")
        membership = {"group_id": group[0], "group_index": group[1]} if group else {}
        out = [
            self.event("task-sent", "client@web-1", ts, uuid=tid, name=name, args=args, kwargs=kwargs, retries=0,
                       eta=None, expires=None, queue="celery", exchange="", routing_key="celery", root_id=root,
                       parent_id=parent, **membership),
            self.event("task-received", worker, ts + 0.01, uuid=tid, name=name, args=args, kwargs=kwargs,
                       root_id=root, parent_id=parent, retries=0, eta=None, expires=None),
        ]
        if group:
            out.append(self.event("ledger-task-meta", worker, ts + 0.011, uuid=tid, **membership))
        roll = rng.random()
        t = ts + 0.02
        out.append(self.event("task-started", worker, t, uuid=tid, **membership))
        if roll < 0.25:  # one retry, then success
            out.append(self.event("task-retried", worker, t + 0.1, uuid=tid, exception="TimeoutError('upstream')",
                                  traceback="Traceback (most recent call last):\nTimeoutError: upstream\n",
                                  **membership))
            out.append(self.event("task-received", worker, t + 1, uuid=tid, name=name, args=args, kwargs=kwargs,
                                  root_id=root, parent_id=parent, retries=1, eta=None, expires=None))
            t += 1.01
            out.append(self.event("task-started", worker, t, uuid=tid, **membership))
        if roll > 0.97:
            out.append(self.event("task-revoked", worker, t + 0.05, uuid=tid, terminated=True, signum=15,
                                  expired=False, **membership))
        elif roll > 0.90:
            out.append(self.event("task-failed", worker, t + 0.05, uuid=tid, exception=f"ValueError('bad {i}')",
                                  traceback=f"Traceback (most recent call last):\nValueError: bad {i}\n",
                                  **membership))
        else:
            out.append(self.event("task-succeeded", worker, t + 0.05, uuid=tid, result=str(i * 2),
                                  runtime=0.05, **membership))
        return out

    def chunks(self, target: int, chunk: int = 50_000) -> Iterator[list[tuple]]:
        """Events in log order, interleaving tasks as a busy cluster does."""
        buf: list[tuple] = []
        i = 0
        heartbeat_every = 2000
        group_every = max(1, (target // 5) // (BIG_GROUPS * GROUP_SIZE))  # spread the big groups out
        members = [0] * BIG_GROUPS
        g = 0
        while self.events < target:
            ts = T0 + i * 0.04
            group = None
            if i % group_every == 0 and g < BIG_GROUPS:
                group = (group_id(g), members[g])
                members[g] += 1
                if members[g] == GROUP_SIZE:
                    g += 1
            buf.extend(self.task(i, ts, group))
            if i % heartbeat_every == 0:
                for w in WORKERS:
                    buf.append(self.event("worker-heartbeat", w, ts, freq=2.0, active=1, processed=i,
                                          loadavg=[0.5, 0.4, 0.3], sw_ident="py-celery", sw_ver="5.5.0",
                                          sw_sys="Linux"))
            i += 1
            if len(buf) >= chunk:
                yield buf
                buf = []
        if buf:
            yield buf
        self.tasks = i


async def load(dsn: str, target: int) -> tuple[int, int, float]:
    conn = await asyncpg.connect(dsn)  # no JSON codec: payload goes as jsonb text
    gen = Generator()
    started = time.perf_counter()
    try:
        for n, chunk in enumerate(gen.chunks(target)):
            await conn.copy_records_to_table("events", schema_name="ledger", records=chunk, columns=COPY_COLUMNS)
            if n % 20 == 0:
                rate = gen.events / (time.perf_counter() - started)
                print(f"  loaded {gen.events:,} events ({rate:,.0f}/s)", flush=True)
        await conn.execute("ANALYZE ledger.events")
        # COPY bypasses the recorder, which keeps the running totals /metrics reads.
        await conn.execute("UPDATE ledger.log_counts SET events = (SELECT count(*) FROM ledger.events)")
    finally:
        await conn.close()
    return gen.events, gen.tasks, time.perf_counter() - started


def with_database(dsn: str, name: str) -> str:
    return urlunsplit(urlsplit(dsn)._replace(path="/" + name))


async def prepare(admin_dsn: str, name: str, target: int, reuse: bool) -> tuple[str, dict]:
    dsn = with_database(admin_dsn, name)
    admin = await asyncpg.connect(admin_dsn)
    try:
        exists = await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists and reuse:
            conn = await asyncpg.connect(dsn)
            try:
                have = await conn.fetchval("SELECT count(*) FROM ledger.events")
                tasks = await conn.fetchval("SELECT count(DISTINCT task_id) FROM ledger.events")
            finally:
                await conn.close()
            if have >= target * 0.99:
                print(f"reusing {name}: {have:,} events")
                saved = await saved_figure(dsn, "load")
                info = {"events": have, "tasks": tasks, "load_s": None, "load_at": None}
                if saved and saved[0]["events"] == have:
                    info.update(load_s=saved[0]["load_s"], load_at=saved[1])
                return dsn, info
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await db.connect(dsn)
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    print(f"loading {target:,} events into {name} ...", flush=True)
    events, tasks, seconds = await load(dsn, target)
    print(f"loaded {events:,} events ({tasks:,} tasks) in {seconds:.0f} s = {events / seconds:,.0f} events/s")
    await save_figure(dsn, "load", {"events": events, "tasks": tasks, "load_s": seconds})
    return dsn, {"events": events, "tasks": tasks, "load_s": seconds, "load_at": None}


FIGURES = "CREATE TABLE IF NOT EXISTS public.bench_query_figures (name text PRIMARY KEY, value jsonb NOT NULL, at timestamptz NOT NULL DEFAULT now())"


async def save_figure(dsn: str, name: str, value: dict) -> None:
    """Keep load and rebuild figures in the bench database, so a --reuse run can quote them."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(FIGURES)
        await conn.execute("INSERT INTO public.bench_query_figures (name, value) VALUES ($1, $2::jsonb)"
                           " ON CONFLICT (name) DO UPDATE SET value = excluded.value, at = now()",
                           name, orjson.dumps(value).decode())
    finally:
        await conn.close()


async def saved_figure(dsn: str, name: str) -> tuple[dict, str] | None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(FIGURES)
        row = await conn.fetchrow("SELECT value::text, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC' AS at"
                                  " FROM public.bench_query_figures WHERE name = $1", name)
    finally:
        await conn.close()
    return (orjson.loads(row[0]), row[1]) if row else None


def rebuild(dsn: str) -> tuple[float | None, str]:
    print("ledger rebuild ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ledger", "rebuild", "--no-progress", "--database-url", dsn],
                          cwd=ROOT, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
    if proc.returncode != 0:
        print(f"rebuild failed ({proc.returncode}): {' | '.join(tail)}")
        return None, " | ".join(tail)
    print(f"rebuild took {elapsed:.1f} s", flush=True)
    return elapsed, " | ".join(tail)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]


async def measure(base: str, token: str, requests: int, info: dict) -> dict[str, tuple[float, float, int]]:
    rng = random.Random(11)
    n_tasks = info["tasks"]
    states = ["SUCCESS", "FAILURE", "REVOKED"]

    def by_id() -> str:
        return f"/v1/tasks/{task_id(rng.randrange(n_tasks))}"

    def timeline() -> str:
        return f"/v1/tasks/{task_id(rng.randrange(n_tasks))}/timeline"

    def by_state() -> str:
        return f"/v1/tasks?state={rng.choice(states)}&limit=50"

    def by_name_state() -> str:
        return f"/v1/tasks?name={rng.choice(NAMES)}&state=SUCCESS&limit=50"

    def by_worker() -> str:
        return f"/v1/tasks?worker={rng.choice(WORKERS)}&limit=50"

    def by_recent() -> str:  # a dashboard's "last 10 minutes": the window ends at the newest task
        end = T0 + n_tasks * 0.04
        return f"/v1/tasks?received_after={end - 600 + rng.random()}&limit=50"

    def by_window() -> str:  # a 10-minute window anywhere in the past (about 15,000 tasks)
        start = T0 + rng.random() * (n_tasks * 0.04 - 600)
        return f"/v1/tasks?received_after={start}&received_before={start + 600}&limit=50"

    def by_search() -> str:
        return f"/v1/tasks?name={rng.choice(NAMES)}&search=u{rng.randrange(5000)}'&limit=50"

    def group() -> str:
        return f"/v1/groups/{group_id(rng.randrange(BIG_GROUPS))}"

    kinds = {"task by id": (by_id, requests),
             "list: state": (by_state, requests // 2),
             "list: name + state": (by_name_state, requests // 2),
             "list: worker": (by_worker, requests // 2),
             "list: received, last 10 min": (by_recent, requests // 2),
             "list: received, past 10 min": (by_window, requests // 2),
             "list: name + rare text": (by_search, 20),
             "timeline": (timeline, requests), "group of 1,000": (group, max(50, requests // 10))}
    results = {}
    client = RawClient(base, token)
    await client.connect()
    try:
        for label, (make, count) in kinds.items():
            for _ in range(min(200, count)):  # warm-up: connection, caches
                status, _ = await client.get(make())
                assert status == 200
            samples = []
            for _ in range(count):
                path = make()
                t = time.perf_counter()
                status, body = await client.get(path)
                samples.append((time.perf_counter() - t) * 1000)
                if status != 200:
                    raise SystemExit(f"{path}: {status} {body[:200]!r}")
            if label == "group of 1,000":
                assert len(orjson.loads(body)["members"]) == GROUP_SIZE, "groups must hold 1,000 members"
            results[label] = (percentile(samples, 0.5), percentile(samples, 0.99), count)
            print(f"  {label:<26} p50 {results[label][0]:6.2f} ms   p99 {results[label][1]:6.2f} ms   ({count} requests)",
                  flush=True)
    finally:
        await client.close()
    return results


class RawClient:
    """A minimal keep-alive HTTP/1.1 GET client, so the figures measure the server and not
    a client library (httpx alone adds ~2 ms to a 40 kB response on this machine)."""

    def __init__(self, base: str, token: str) -> None:
        parts = urlsplit(base)
        self.host, self.port, self.token = parts.hostname, parts.port, token

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                          f"Authorization: Bearer {self.token}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (line.partition(b":") for line in lines[1:]) if k.lower() == b"content-length")
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()


async def serve_and_measure(dsn: str, requests: int, info: dict) -> dict:
    conn = await db.connect(dsn)
    try:
        token = await create_token(conn, ["read"], "bench/query.py")
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    port = free_port()
    env = dict(os.environ, LEDGER_DATABASE_URL=dsn, LEDGER_PORT=str(port), LEDGER_LOG_LEVEL="warning")
    server = subprocess.Popen([sys.executable, "-m", "ledger", "serve"], cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient(base_url=base) as http:
            while True:
                try:
                    if (await http.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("ledger serve did not come up")
                await asyncio.sleep(0.1)
        print("latency through the HTTP API:", flush=True)
        return await measure(base, token, requests, info)
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="events to load (default 10 million)")
    parser.add_argument("--admin-dsn", default=os.environ.get("LEDGER_BENCH_PG_DSN",
                                                              "postgresql://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--database", default="ledger_bench_query", help="database to (re)create for the run")
    parser.add_argument("--reuse", action="store_true", help="reuse an already loaded database of that size")
    parser.add_argument("--skip-rebuild", action="store_true", help="projections already built (with --reuse)")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per kind")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/RESULTS.md")
    args = parser.parse_args()

    dsn, info = asyncio.run(prepare(args.admin_dsn, args.database, args.events, args.reuse))
    rebuild_at = None
    if args.skip_rebuild:
        saved = asyncio.run(saved_figure(dsn, "rebuild"))
        rebuild_s, rebuild_note = (None, "skipped") if not saved else (saved[0]["seconds"], "")
        rebuild_at = saved[1] if saved else None
    else:
        rebuild_s, rebuild_note = rebuild(dsn)
        if rebuild_s:
            asyncio.run(save_figure(dsn, "rebuild", {"seconds": rebuild_s, "events": info["events"]}))
    rebuild_rate = info["events"] / rebuild_s if rebuild_s else None
    if rebuild_rate:
        print(f"rebuild: {rebuild_rate:,.0f} events/s")
    latencies = asyncio.run(serve_and_measure(dsn, args.requests, info))
    load_avg = " / ".join(f"{x:.1f}" for x in os.getloadavg())

    rows = []
    for label, (p50, p99, count) in latencies.items():
        target = 25.0 if label.startswith("list") else {"task by id": 5.0, "timeline": 10.0}.get(label)
        verdict = "—" if target is None else ("met" if p99 <= target else "**not met**")
        rows.append(f"| {label} | {p50:.2f} | {p99:.2f} | {'≤ %g' % target if target else '—'} | {verdict} | {count} |")
    load_line = (f"{info['events']:,} events ({info['tasks']:,} tasks) loaded by COPY in {info['load_s']:.0f} s "
                 f"({info['events'] / info['load_s']:,.0f} events/s; capture bypassed for loading"
                 + (f"; loaded by the run of {info['load_at']})" if info["load_at"] else ")")
                 if info["load_s"] else f"{info['events']:,} events ({info['tasks']:,} tasks), reused from a previous load")
    if rebuild_rate:
        rebuild_line = (f"`ledger rebuild`: {rebuild_s:.1f} s for {info['events']:,} events = "
                        f"**{rebuild_rate:,.0f} events/s** (target ≥ 50,000: {'met' if rebuild_rate >= 50_000 else '**not met**'})"
                        + (f" — measured by the run of {rebuild_at}" if rebuild_at else ""))
    else:
        rebuild_line = f"`ledger rebuild`: not measured ({rebuild_note})"
    body = "\n".join([
        load_line,
        "",
        rebuild_line,
        "",
        f"Latency through the HTTP API (`ledger serve` subprocess, auth on, one keep-alive HTTP/1.1 client, "
        f"sequential requests; load average when measuring: {load_avg}; the machine's 2 cores are shared):",
        "",
        "| request | p50 ms | p99 ms | target p99 | | requests |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "Requests: task by id = `/v1/tasks/{id}` (random among all tasks); list = a first page of 50 from "
        "`/v1/tasks` under the filter named (state: SUCCESS, FAILURE or REVOKED; name + state; worker; received in "
        "the last 10 minutes of the data; a random 10-minute window of received time in the past, ~15,000 tasks; "
        "a name plus a text that only one task in 5,000 has: with no text index PostgreSQL scans the tasks for it); "
        "timeline = `/v1/tasks/{id}/timeline`; group = `/v1/groups/{id}` with its 1,000 member rows.",
    ])
    print(body)
    if not args.no_write:
        write_section("query", "Query API and rebuild (bench/query.py)", body)


if __name__ == "__main__":
    main()
