"""Push latency: 1,000 websocket clients on one `ledger serve` replica, Celery events at
2,000/s through capture and projector.

Processes (all on this machine, sharing its cores): a publisher sending real-format Celery
events to Redis exactly as Celery does (``task-sent`` singles from the client, the worker's
``task-received``/``task-started``/``task-succeeded`` in ``task.multi`` lists, flushed every
5 ms), ``ledger capture``, ``ledger projector``, ``ledger serve`` (the replica measured) and
the clients (asyncio, ``websockets``; in ``--client-procs`` processes). Each client
subscribes to its own group (topic ``group``); every task belongs to one of the 1,000 groups,
so every task change goes to one client (as a page watching its own batch of work).

Latency = client receive time - the ``timestamp`` the publisher stamped on the event (its
``time.time()`` when it published it; same machine clock), for the newest event a pushed
task change reflects. Memory = the replica's RSS (peak VmHWM, and at the end).

Compared with polling: a client polling every second sees a change 500 ms later on average
(plus one request); the request's own latency under the same load is measured too.

    python bench/push.py                         # 1,000 clients, 2,000 events/s, 15 s
    python bench/push.py --clients 200 --rate 500 --seconds 5 --no-write
    BENCH_NO_DEFLATE=1 python bench/push.py      # clients without permessage-deflate
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.capture import cpu_seconds  # noqa: E402 - one /proc reader for both benches
from bench.results import write_section  # noqa: E402
from ledger.api.tokens import create_token  # noqa: E402
from ledger.migrate import apply_migrations  # noqa: E402
from tests.support.capture import redis_envelope as kombu_envelope  # noqa: E402 - the one wire-format helper

PG_ADMIN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DB_NAME = "ledger_bench_push"
WORKER = "celery@bench-push"
COMPRESSION = None if os.environ.get("BENCH_NO_DEFLATE") else "deflate"  # browsers ask for deflate


# --- publisher process ------------------------------------------------------------------------


def publish(exchange: str, rate: float, seconds: float, groups: int, go, result) -> None:
    """Task lifecycles at `rate` events/s for `seconds`; each event stamped when published."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    go.wait()
    clock = 0
    tick = 0.005
    # tasks in flight: [task id, group, index, next step]
    flying: list[list] = []
    next_task = 0
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start + tick) * rate) - sent
        singles: list[dict] = []
        batch: list[dict] = []
        while due > 0:
            if len(flying) < 64:
                tid = str(uuid.uuid4())
                flying.append([tid, next_task % groups, next_task, 0])
                next_task += 1
            task = flying[sent % len(flying)]
            tid, group, index, step = task
            clock += 1
            now = time.time()
            base = {"hostname": WORKER, "utcoffset": 0, "pid": 4242, "clock": clock, "timestamp": now,
                    "uuid": tid, "group_id": f"g-{group}", "group_index": index}
            if step == 0:
                singles.append({**base, "type": "task-sent", "hostname": "client@bench", "name": "bench.work",
                                "args": "(1, 2)", "kwargs": "{}", "retries": 0, "eta": None, "expires": None,
                                "queue": "celery", "exchange": "", "routing_key": "celery",
                                "root_id": tid, "parent_id": None})
            elif step == 1:
                batch.append({**base, "type": "task-received", "name": "bench.work", "args": "(1, 2)",
                              "kwargs": "{}", "retries": 0, "eta": None, "expires": None,
                              "root_id": tid, "parent_id": None})
            elif step == 2:
                batch.append({**base, "type": "task-started"})
            else:
                batch.append({**base, "type": "task-succeeded", "result": "3", "runtime": 0.001})
            task[3] += 1
            if task[3] == 4:
                flying.remove(task)
            sent += 1
            due -= 1
        pipe = client.pipeline(transaction=False)
        for event in singles:
            rk = "task.sent"
            pipe.publish(f"/0.{exchange}/{rk}", kombu_envelope(orjson.dumps(event), rk, exchange))
        if batch:
            pipe.publish(f"/0.{exchange}/task.multi", kombu_envelope(orjson.dumps(batch), "task.multi", exchange))
        pipe.execute()
        ahead = sent / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)  # pacing the publisher
    result.put((sent, time.monotonic() - start))


# --- client processes -------------------------------------------------------------------------

def clients_proc(url: str, token: str, groups: list[int], ready, go, stop_at, window: float, result) -> None:
    asyncio.run(_clients(url, token, groups, ready, go, stop_at, window, result))


async def _clients(url: str, token: str, groups: list[int], ready, go, stop_at, window: float, result) -> None:
    import websockets

    latencies: list[float] = []
    log_latencies: list[float] = []
    counts = {"messages": 0, "changes": 0, "closed": 0}
    measuring = {"from": None, "to": None}
    live = asyncio.Event()
    n_live = 0

    async def one(group: int) -> None:
        nonlocal n_live
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                      open_timeout=120, ping_interval=None, max_queue=None,
                                      compression=COMPRESSION) as ws:
            await ws.send(orjson.dumps({"type": "subscribe", "sub": "g", "topic": "group", "group_id": f"g-{group}"}).decode())
            if group == 0:  # one probe also follows the raw log: capture + hub, without the projector
                await ws.send(orjson.dumps({"type": "subscribe", "sub": "log", "topic": "log", "types": ["task-started"]}).decode())
            try:
                async for frame in ws:
                    now = time.time()
                    m = orjson.loads(frame)
                    kind = m["type"]
                    if kind == "changes":
                        counts["messages"] += 1
                        if measuring["from"] is not None and measuring["from"] <= now <= measuring["to"]:
                            for c in m["changes"]:
                                if c["kind"] == "task":
                                    latencies.append(now - c["data"]["timestamp"])
                                    counts["changes"] += 1
                    elif kind == "event":
                        if measuring["from"] is not None and measuring["from"] <= now <= measuring["to"]:
                            log_latencies.append(now - m["event"]["payload"]["timestamp"])
                    elif kind == "ping":
                        await ws.send('{"type":"pong"}')
                    elif kind == "live" and m["sub"] == "g":
                        n_live += 1
                        if n_live == len(groups):
                            live.set()
            except websockets.ConnectionClosed:
                counts["closed"] += 1

    tasks = []
    for i, group in enumerate(groups):
        tasks.append(asyncio.create_task(one(group)))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # pacing the connects
    await live.wait()
    ready.set()
    await asyncio.to_thread(go.wait)
    while stop_at.value == 0:
        await asyncio.sleep(0.05)  # the parent starts the window when warm-up ends
    measuring["from"], measuring["to"] = stop_at.value - window, stop_at.value
    while time.time() < measuring["to"] + 0.5:  # and in-flight messages of the window arrive
        await asyncio.sleep(0.1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    result.put((latencies, log_latencies, counts))


# --- the replica and the pipeline ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(name: str, args: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    log_path = Path(tempfile.mkstemp(prefix=f"bench-push-{name}-", suffix=".log")[1])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ledger", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    return proc, log_path


def wait_log(proc: subprocess.Popen, path: Path, pattern: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace")
        if re.search(pattern, text):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited:\n{text}")
        time.sleep(0.05)  # polling another process's log
    raise TimeoutError(path.read_text(errors="replace"))


def rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    now = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
    peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024
    return now, peak


async def fresh_database() -> tuple[str, str]:
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    await admin.close()
    dsn = PG_ADMIN.rsplit("/", 1)[0] + "/" + DB_NAME
    conn = await asyncpg.connect(dsn)
    await apply_migrations(conn)
    token = await create_token(conn, ["read"], "bench push")
    await conn.close()
    return dsn, token


async def capture_latency(dsn: str, start: float, end: float) -> tuple[float, float]:
    """p50/p99 of publish -> row inserted in the log (recorded_at), for the measured window."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY d) AS p50, percentile_cont(0.99) WITHIN GROUP"
            " (ORDER BY d) AS p99 FROM (SELECT extract(epoch FROM recorded_at) - sent_at AS d FROM ledger.events"
            " WHERE sent_at BETWEEN $1 AND $2) x", start, end)
    finally:
        await conn.close()
    return row["p50"] * 1000, row["p99"] * 1000


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def poll_latency(url: str, token: str, n: int = 50) -> float:
    """Median latency of one GET /v1/groups/{id} under the same load (what a poll costs)."""
    import httpx

    times = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        for i in range(n):
            start = time.perf_counter()
            r = await http.get(f"/v1/groups/g-{i}")
            times.append(time.perf_counter() - start)
            assert r.status_code in (200, 404), r.text
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds (after 3 s warm-up)")
    parser.add_argument("--client-procs", type=int, default=2)
    parser.add_argument("--capture-batch-ms", type=float, default=2.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    dsn, token = asyncio.run(fresh_database())
    exchange = f"celeryev.bench.{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = dict(os.environ, LEDGER_DATABASE_URL=dsn, LEDGER_BROKER_URL=REDIS_URL, LEDGER_EVENT_EXCHANGE=exchange,
               LEDGER_ENABLE_EVENTS_INTERVAL="0", LEDGER_CAPTURE_BATCH_MS=str(args.capture_batch_ms),
               LEDGER_PORT=str(port), LEDGER_LOG_LEVEL="WARNING")
    procs = []
    try:
        capture, capture_log = spawn("capture", ["capture"], {**env, "LEDGER_LOG_LEVEL": "INFO"})
        procs.append(capture)
        wait_log(capture, capture_log, r"capture: subscribed")
        projector, _ = spawn("projector", ["projector"], env)
        procs.append(projector)
        serve, serve_log = spawn("serve", ["serve"], {**env, "LEDGER_LOG_LEVEL": "INFO"})
        procs.append(serve)
        wait_log(serve, serve_log, r"Uvicorn running|Application startup complete")
        url = f"ws://127.0.0.1:{port}/v1/stream"

        ready = [mp.Event() for _ in range(args.client_procs)]
        go = mp.Event()
        stop_at = mp.Value("d", 0.0)
        results: mp.Queue = mp.Queue()
        groups = list(range(args.clients))
        shares = [groups[i :: args.client_procs] for i in range(args.client_procs)]
        t0 = time.monotonic()
        clients = [mp.Process(target=clients_proc, args=(url, token, share, ready[i], go, stop_at, args.seconds, results))
                   for i, share in enumerate(shares)]
        for p in clients:
            p.start()
        for r in ready:
            if not r.wait(300):
                raise TimeoutError("clients did not connect")
        connect_s = time.monotonic() - t0
        rss_idle = rss_mb(serve.pid)[0]
        print(f"{args.clients} clients connected and live in {connect_s:.1f}s; replica RSS {rss_idle:.0f} MB")

        warmup = 3.0
        published: mp.Queue = mp.Queue()
        publisher = mp.Process(target=publish, args=(exchange, args.rate, warmup + args.seconds + 0.5, args.clients, go, published))
        publisher.start()
        go.set()
        time.sleep(warmup)  # warm-up: publishing, not measured
        window_end = time.time() + args.seconds
        stop_at.value = window_end
        watched = {"replica": serve.pid, "capture": capture.pid, "projector": projector.pid,
                   "publisher": publisher.pid, **{f"clients {i}": p.pid for i, p in enumerate(clients)}}
        cpu_before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        rss_samples = []
        poll_s = None
        while time.time() < window_end:
            rss_samples.append(rss_mb(serve.pid)[0])
            if poll_s is None and time.time() > window_end - args.seconds / 2:
                poll_s = asyncio.run(poll_latency(f"http://127.0.0.1:{port}", token))
            time.sleep(0.5)  # sampling the replica's memory
        cpu = {name: (cpu_seconds(pid) - cpu_before[name]) / args.seconds for name, pid in watched.items()}
        sent, pub_seconds = published.get(timeout=60)
        latencies: list[float] = []
        log_latencies: list[float] = []
        counts = {"messages": 0, "changes": 0, "closed": 0}
        for _ in clients:
            lat, log_lat, c = results.get(timeout=120)
            latencies += lat
            log_latencies += log_lat
            for k in counts:
                counts[k] += c[k]
        for p in clients:
            p.join(30)
        publisher.join(30)
        rss_end, rss_peak = rss_mb(serve.pid)
        capture_p50, capture_p99 = asyncio.run(capture_latency(dsn, window_end - args.seconds, window_end))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()

    p50, p99 = pct(latencies, 0.50) * 1000, pct(latencies, 0.99) * 1000
    mean = statistics.fmean(latencies) * 1000
    poll_ms = (poll_s or 0) * 1000
    print(f"published {sent} events in {pub_seconds:.1f}s ({sent / pub_seconds:.0f}/s)")
    print(f"task changes received in the {args.seconds:.0f}s window: {counts['changes']} "
          f"({counts['changes'] / args.seconds:.0f}/s); sockets closed early: {counts['closed']}")
    print(f"latency publish -> client: p50 {p50:.1f} ms, p99 {p99:.1f} ms, mean {mean:.1f} ms")
    log_p50, log_p99 = pct(log_latencies, 0.5) * 1000, pct(log_latencies, 0.99) * 1000
    print(f"capture alone (publish -> row in the log): p50 {capture_p50:.1f} ms, p99 {capture_p99:.1f} ms")
    print(f"raw log push (capture + hub, no projector): p50 {log_p50:.1f} ms, p99 {log_p99:.1f} ms")
    print(f"replica RSS: {rss_idle:.0f} MB idle with clients, max sampled {max(rss_samples):.0f} MB, "
          f"peak (VmHWM) {rss_peak:.0f} MB")
    cpu_text = ", ".join(f"{name} {share * 100:.0f}%" for name, share in cpu.items())
    print(f"CPU during the window (of one core): {cpu_text}; load average {os.getloadavg()[0]:.1f}")
    print(f"polling every 1 s instead: 500 ms mean wait + {poll_ms:.1f} ms per request (median under this load)")

    verdict = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    body = f"""
{args.clients} websocket clients on one `ledger serve` replica, each subscribed to its own group;
Celery events published to Redis at {args.rate:.0f}/s (task lifecycles: `task-sent` singles, worker
events in `task.multi` lists flushed every 5 ms) through `ledger capture`
(`LEDGER_CAPTURE_BATCH_MS={args.capture_batch_ms:g}`) and `ledger projector`; publisher,
capture, projector, replica, PostgreSQL, Redis and the clients ({args.client_procs} processes) share the machine.
Latency: from the publisher stamping an event to a client receiving the task change it
produced; {args.seconds:.0f} s measured after a 3 s warm-up.

| figure | value | target |
|---|---|---|
| events published | {sent / pub_seconds:.0f}/s | 2,000/s |
| task changes pushed (measured window) | {counts['changes']} ({counts['changes'] / args.seconds:.0f}/s) | |
| latency p50 | {p50:.1f} ms | ≤ 15 ms: {verdict(p50 <= 15)} |
| latency p99 | {p99:.1f} ms | ≤ 50 ms: {verdict(p99 <= 50)} |
| latency mean | {mean:.1f} ms | |
| capture alone (publish -> row inserted in the log), p50 / p99 | {capture_p50:.1f} / {capture_p99:.1f} ms | |
| raw-log push latency, p50 / p99 (one probe client on `topic: log`: capture + hub, no projector) | {log_p50:.1f} / {log_p99:.1f} ms | |
| replica RSS with {args.clients} clients, idle / max under load / peak | {rss_idle:.0f} / {max(rss_samples):.0f} / {rss_peak:.0f} MB | ≤ 300 MB: {verdict(rss_peak <= 300)} |
| sockets dropped during the run | {counts['closed']} | 0 |
| polling every 1 s instead | 500 ms mean wait + {poll_ms:.1f} ms per request | |

CPU during the window (share of one core): {cpu_text}; machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.
Connecting {args.clients} clients (handshake, auth, subscribe, snapshot, live) took {connect_s:.1f} s.
"""
    if not args.no_write:
        write_section("push", "Push: websocket latency and memory (bench/push.py)", body)


if __name__ == "__main__":
    main()
