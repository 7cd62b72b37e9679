"""Capture throughput, loss, duplicates and memory against the local Redis and RabbitMQ.

A separate publisher process sends real-format Celery events on the wire exactly as Celery
does: each task's ``task-sent`` as a single message (as clients send it), the worker's
``task-received``/``task-started``/``task-succeeded`` in ``task.multi`` lists of 24 (as the
worker's buffered dispatcher sends them), and ``worker-heartbeat`` singles from 4 workers.
On Redis it PUBLISHes kombu envelopes (base64 body) to ``/0.<exchange>/<routing key>``; on
RabbitMQ it publishes to the topic exchange. Messages are built before the clock starts.

``ledger capture`` runs as its own process against a fresh database. Scenarios:
- sustained: a fixed rate for N seconds; "kept up" = every event committed within 2 s of the
  publisher's end;
- burst: 150,000 events published as fast as the publisher can.

Reported: events/s committed (count / span of recorded_at), loss (published - stored),
duplicates stored (rows - distinct keys) and redeliveries skipped, capture peak RSS (VmHWM).

    python bench/capture.py                       # both brokers, default targets
    python bench/capture.py --brokers redis --redis-rate 40000 --seconds 10 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.results import write_section  # noqa: E402
from ledger.migrate import apply_migrations  # noqa: E402
from tests.support.capture import redis_envelope as kombu_envelope  # noqa: E402 - the one wire-format helper

PG_ADMIN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
DB_NAME = "ledger_bench_capture"
HOSTS = [f"celery@bench-{i}" for i in range(4)]


# --- real-format events -------------------------------------------------------------------

def _event(clock: itertools.count, type_: str, hostname: str, **fields) -> dict:
    return {"hostname": hostname, "utcoffset": 0, "pid": 4242, "clock": next(clock), "timestamp": time.time(), "type": type_, **fields}


def build_messages(n_events: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """(routing_key, JSON body) in publish order, ``n_events`` events in all."""
    rnd = random.Random(seed)
    client_clock, worker_clock = itertools.count(1), itertools.count(1)
    messages: list[tuple[str, bytes]] = []
    buffers: dict[str, list[dict]] = {h: [] for h in HOSTS}
    count = 0
    run = uuid.uuid4().hex[:8]
    task_no = 0
    while count < n_events:
        task_no += 1
        if task_no % 200 == 0:
            host = HOSTS[task_no // 200 % len(HOSTS)]
            hb = _event(worker_clock, "worker-heartbeat", host, freq=2.0, active=4, processed=task_no,
                        loadavg=[0.5, 0.4, 0.3], sw_ident="py-celery", sw_ver="5.7.0", sw_sys="Linux")
            messages.append(("worker.heartbeat", orjson.dumps(hb)))
            count += 1
        tid = f"{run}-{task_no:08d}-{uuid.UUID(int=rnd.getrandbits(128))}"
        args, kwargs = f"({task_no}, {rnd.randint(0, 999)})", "{'callback': None}"
        sent = _event(client_clock, "task-sent", "client@bench", uuid=tid, root_id=tid, parent_id=None,
                      name="bench.tasks.add", args=args, kwargs=kwargs, retries=0, eta=None, expires=None,
                      queue="celery", exchange="", routing_key="celery")
        messages.append(("task.sent", orjson.dumps(sent)))
        count += 1
        host = HOSTS[task_no % len(HOSTS)]
        buf = buffers[host]
        buf.append(_event(worker_clock, "task-received", host, uuid=tid, name="bench.tasks.add", args=args,
                          kwargs=kwargs, root_id=tid, parent_id=None, retries=0, eta=None, expires=None))
        buf.append(_event(worker_clock, "task-started", host, uuid=tid))
        buf.append(_event(worker_clock, "task-succeeded", host, uuid=tid, result=str(task_no), runtime=0.0012))
        count += 3
        if len(buf) >= 24:
            messages.append(("task.multi", orjson.dumps(buf)))
            buffers[host] = []
    for buf in buffers.values():
        if buf:
            messages.append(("task.multi", orjson.dumps(buf)))
    return messages


def count_events(messages: list[tuple[str, bytes]]) -> int:
    return sum(len(orjson.loads(b)) if rk == "task.multi" else 1 for rk, b in messages)


# --- publisher process --------------------------------------------------------------------

def _paced(messages, rate: float | None, events_of):
    """Yield chunks of messages, sleeping so that at most ``rate`` events/s go out."""
    start, sent, i = time.monotonic(), 0, 0
    tick = 0.005
    while i < len(messages):
        if rate:
            target = (time.monotonic() - start + tick) * rate
            chunk = []
            while i < len(messages) and sent < target:
                chunk.append(messages[i])
                sent += events_of[i]
                i += 1
        else:
            chunk = messages[i : i + 500]
            i += len(chunk)
        if chunk:
            yield chunk
        if rate:
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


def publish_redis(exchange: str, n_events: int, rate: float | None, result) -> None:
    import redis

    messages = build_messages(n_events)
    events_of = [len(orjson.loads(b)) if rk == "task.multi" else 1 for rk, b in messages]
    wire = [(f"/0.{exchange}/{rk}", kombu_envelope(b, rk, exchange)) for rk, b in messages]
    client = redis.Redis.from_url(REDIS_URL)
    start, cpu0 = time.monotonic(), time.process_time()
    for chunk in _paced(wire, rate, events_of):
        pipe = client.pipeline(transaction=False)
        for channel, data in chunk:
            pipe.publish(channel, data)
        pipe.execute()
    result.put((sum(events_of), len(messages), time.monotonic() - start, time.process_time() - cpu0))


def publish_amqp(exchange: str, n_events: int, rate: float | None, result) -> None:
    # py-amqp (kombu's own AMQP client) publishes ~4x faster than an asyncio client here.
    import amqp
    from urllib.parse import urlsplit

    messages = build_messages(n_events)
    events_of = [len(orjson.loads(b)) if rk == "task.multi" else 1 for rk, b in messages]
    wire = [(rk, amqp.Message(b, content_type="application/json", content_encoding="utf-8", delivery_mode=1,
                              application_headers={"hostname": "bench"})) for rk, b in messages]
    parts = urlsplit(AMQP_URL)
    conn = amqp.Connection(f"{parts.hostname}:{parts.port or 5672}", userid=parts.username or "guest",
                           password=parts.password or "guest")
    conn.connect()
    channel = conn.channel()
    start, cpu0 = time.monotonic(), time.process_time()
    for chunk in _paced(wire, rate, events_of):
        for rk, message in chunk:
            channel.basic_publish(message, exchange=exchange, routing_key=rk)
    elapsed = time.monotonic() - start
    conn.close()
    result.put((sum(events_of), len(messages), elapsed, time.process_time() - cpu0))


# --- capture process ----------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a local process has used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pids(name: str) -> list[int]:
    """Local processes called ``name`` (the broker's server), to charge their CPU."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == name:
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


async def backend_pids(dsn: str) -> list[int]:
    """PostgreSQL backends connected to the bench database other than ours (capture's writer)."""
    conn = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()")]
    finally:
        await conn.close()


class CaptureProc:
    def __init__(self, broker_url: str, exchange: str, queue: str) -> None:
        self.log_path = Path(tempfile.mkstemp(prefix="bench-capture-", suffix=".log")[1])
        env = dict(os.environ, LEDGER_DATABASE_URL=PG_ADMIN.rsplit("/", 1)[0] + "/" + DB_NAME,
                   LEDGER_BROKER_URL=broker_url, LEDGER_EVENT_EXCHANGE=exchange, LEDGER_CAPTURE_QUEUE=queue,
                   LEDGER_ENABLE_EVENTS_INTERVAL="0")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ledger", "capture"], env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            if "capture: subscribed" in text or "capture: consuming" in text:
                return
            if self.proc.poll() is not None:
                raise RuntimeError(text)
            time.sleep(0.05)
        raise TimeoutError(self.log_path.read_text())

    def peak_rss_mb(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)


    def stop(self) -> str:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        return self.log_path.read_text(errors="replace")


# --- one scenario -------------------------------------------------------------------------

async def fresh_database() -> str:
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    await admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    await admin.close()
    dsn = PG_ADMIN.rsplit("/", 1)[0] + "/" + DB_NAME
    conn = await asyncpg.connect(dsn)
    await apply_migrations(conn)
    await conn.close()
    return dsn


async def delete_queue(queue: str) -> None:
    import aiormq

    from ledger.capture.amqp_source import aiormq_url

    connection = await aiormq.connect(aiormq_url(AMQP_URL))
    channel = await connection.channel()
    await channel.queue_delete(queue)
    await connection.close()


async def declare_queue(exchange: str, queue: str) -> None:
    import aiormq

    from ledger.capture.amqp_source import aiormq_url, declare

    connection = await aiormq.connect(aiormq_url(AMQP_URL))
    await declare(await connection.channel(), exchange, queue)
    await connection.close()


async def publish(broker: str, exchange: str, n_events: int, rate: float | None) -> tuple:
    """Run the publisher process; (events, messages, seconds, publisher CPU seconds)."""
    result: mp.Queue = mp.Queue()
    target = publish_redis if broker == "redis" else publish_amqp
    publisher = mp.Process(target=target, args=(exchange, n_events, rate, result))
    publisher.start()
    out = await asyncio.to_thread(result.get)
    publisher.join()
    return out


async def scenario(broker: str, n_events: int, rate: float | None, n_captures: int = 1, backlog: bool = False) -> dict:
    """``backlog`` (RabbitMQ): publish everything while capture is down, then time the drain."""
    dsn = await fresh_database()
    exchange = f"bench.{uuid.uuid4().hex[:8]}"
    queue = f"{exchange}.capture"
    url = REDIS_URL if broker == "redis" else AMQP_URL
    captures: list[CaptureProc] = []
    try:
        if backlog:
            await declare_queue(exchange, queue)
            published, n_messages, publish_s, publisher_cpu = await publish(broker, exchange, n_events, rate)
        captures = [CaptureProc(url, exchange, queue) for _ in range(n_captures)]
        for capture in captures:
            capture.wait_ready()
        cpu0 = sum(c.cpu_seconds() for c in captures)
        for _ in range(200):  # capture's writer connects at start-up
            if len(pg_pids := await backend_pids(dsn)) >= n_captures:
                break
            await asyncio.sleep(0.05)
        pg_cpu0 = sum(cpu_seconds(pid) for pid in pg_pids)
        broker_pids = server_pids("redis-server" if broker == "redis" else "beam.smp")
        broker_cpu0 = sum(cpu_seconds(pid) for pid in broker_pids)
        if not backlog:
            published, n_messages, publish_s, publisher_cpu = await publish(broker, exchange, n_events, rate)
        end_publish = time.time()
        conn = await asyncpg.connect(dsn)
        stored, last_change, deadline = -1, time.monotonic(), time.monotonic() + 120
        while time.monotonic() < deadline:
            count = await conn.fetchval("SELECT count(*) FROM ledger.events")
            if count >= published:
                break
            if count != stored:
                stored, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > 10:
                break  # no progress for 10 s: the rest is lost
            await asyncio.sleep(0.05)
        row = await conn.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT event_key) AS keys, "
            "extract(epoch FROM min(recorded_at)) AS first, extract(epoch FROM max(recorded_at)) AS last FROM ledger.events"
        )
        await conn.close()
        rss = max(c.peak_rss_mb() for c in captures)
        cpu = sum(c.cpu_seconds() for c in captures) - cpu0
        pg_cpu = sum(cpu_seconds(pid) for pid in pg_pids) - pg_cpu0
        broker_cpu = sum(cpu_seconds(pid) for pid in broker_pids) - broker_cpu0
    finally:
        log = "\n".join(c.stop() for c in captures)
        if broker == "amqp":
            await delete_queue(queue)
    span = float(row["last"] - row["first"]) if row["n"] > 1 else float("nan")
    skipped = [int(n) for n in re.findall(r"(\d+) duplicate\(s\) skipped", log)]
    return {
        "broker": broker,
        "kind": ("backlog drained after a restart" if backlog else f"sustained {rate:,.0f}/s" if rate else "burst")
        + (f", {n_captures} captures" if n_captures > 1 else ""),
        "published": published,
        "messages": n_messages,
        "publish_rate": published / publish_s,
        "stored": row["n"],
        "lost": published - row["n"],
        "duplicates": row["n"] - row["keys"],
        "skipped": sum(skipped),
        "commit_rate": row["n"] / span if span else float("nan"),
        "lag_after_publish": float(row["last"]) - end_publish,
        "rss_mb": rss,
        "cpu_s": cpu,
        "pg_cpu_s": pg_cpu,
        "broker_cpu_s": broker_cpu,
        "publisher_cpu_s": publisher_cpu,
    }


def fmt(r: dict) -> str:
    return (
        f"| {r['broker']} | {r['kind']} | {r['published']:,} ({r['messages']:,} msgs) | {r['publish_rate']:,.0f} | "
        f"{r['commit_rate']:,.0f} | {r['lost']:,} | {r['duplicates']} ({r['skipped']} skipped) | "
        f"{r['lag_after_publish']:+.2f} s | {r['cpu_s'] / r['stored'] * 1e6:.0f} µs | "
        f"{r['pg_cpu_s'] / r['stored'] * 1e6:.0f} µs | {r['broker_cpu_s'] / r['stored'] * 1e6:.0f} µs | "
        f"{r['publisher_cpu_s'] / r['stored'] * 1e6:.0f} µs | {r['rss_mb']:.0f} MB |"
    )


HEADER = (
    "| broker | scenario | events published | publish ev/s | committed ev/s | lost | duplicates stored | "
    "last commit vs publish end | CPU/event: capture | PostgreSQL | broker | publisher | capture peak RSS |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--brokers", default="redis,amqp")
    parser.add_argument("--redis-rate", type=float, default=30000)
    parser.add_argument("--amqp-rate", type=float, default=20000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--burst", type=int, default=150_000)
    parser.add_argument("--no-backlog", dest="backlog", action="store_false",
                        help="skip the RabbitMQ scenario that drains a backlog published while capture was down")
    parser.add_argument("--captures", type=int, default=1, help="capture processes to run side by side")
    parser.add_argument("--no-write", action="store_true", help="print only; do not update bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    load_before = os.getloadavg()[0]
    print(HEADER)
    for broker in args.brokers.split(","):
        rate = args.redis_rate if broker == "redis" else args.amqp_rate
        for n, r in ((int(rate * args.seconds), rate), (args.burst, None)):
            result = await scenario(broker, n, r, args.captures)
            rows.append(result)
            print(fmt(result), flush=True)
        if broker == "amqp" and args.backlog:
            result = await scenario(broker, args.burst, None, args.captures, backlog=True)
            rows.append(result)
            print(fmt(result), flush=True)
    body = (
        "Publisher: a separate process sending real-format events (task-sent singles, task.multi lists of 24, "
        "worker heartbeats; 25% of events are single messages). Capture: `ledger capture` as its own process, "
        "default settings (batches of 5000 / 20 ms), against the machine's PostgreSQL. Everything shares the 2 cores, "
        f"with whatever else runs on the machine: 1-minute load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.\n\n"
        + HEADER + "\n" + "\n".join(fmt(r) for r in rows) + "\n\n"
        "committed ev/s = stored / (last recorded_at - first recorded_at). A sustained run kept up if its last "
        "commit came within ~1 s of the publisher's end. Duplicates stored are always 0 (unique event_key); "
        "'skipped' counts redeliveries the log absorbed. CPU/event = CPU seconds each process used during the "
        "run / events stored (capture, its PostgreSQL backend, redis-server or RabbitMQ's beam.smp, the publisher). "
        "'backlog drained after a restart' (RabbitMQ): the events are published while capture is down, then "
        "capture starts; its row shows capture + PostgreSQL + RabbitMQ throughput without a publisher competing "
        "for the cores, and its 'last commit' column is the drain time from capture's start."
    )
    if not args.no_write:
        write_section("capture", "Capture throughput (bench/capture.py)", body)


if __name__ == "__main__":
    asyncio.run(main())
