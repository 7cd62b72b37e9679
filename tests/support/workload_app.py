"""The Celery app real workers run in tests: ``celery -A tests.support.workload_app worker``.

The worker process builds ``app`` from the environment (see ``WorkloadConfig.environ``); a
test builds its own client app with ``make_app(config)``. Both have the same tasks.

The witness: with a witness configured, every event any dispatcher of this app publishes
(client, worker main process, pool children) is also pushed, after the broker accepted it,
onto a Redis list. That is "every event sent", known independently of any receiver.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery, Task
from celery.app.events import Events
from celery.events.dispatcher import EventDispatcher
from celery.worker.request import Request

from ledger.celery import instrument

ENV_PREFIX = "LEDGER_TEST_"


@dataclass(frozen=True)
class WorkloadConfig:
    broker_url: str
    event_exchange: str
    result_backend: str
    witness_url: str | None = None  # a redis-py URL; None: no witness
    witness_key: str | None = None
    instrument: int = 1  # how many times the app calls instrument(app): 0 is off, 2 checks idempotence
    task_events: bool = True  # worker_send_task_events (what -E sets)
    extra: dict[str, Any] = field(default_factory=dict)

    def environ(self) -> dict[str, str]:
        env = {
            "BROKER_URL": self.broker_url,
            "EVENT_EXCHANGE": self.event_exchange,
            "RESULT_BACKEND": self.result_backend,
            "INSTRUMENT": str(int(self.instrument)),
            "TASK_EVENTS": "1" if self.task_events else "0",
        }
        if self.witness_url and self.witness_key:
            env["WITNESS_URL"] = self.witness_url
            env["WITNESS_KEY"] = self.witness_key
        return {ENV_PREFIX + k: v for k, v in env.items()}

    @classmethod
    def from_environ(cls, environ: dict[str, str] | os._Environ = os.environ) -> WorkloadConfig:
        get = lambda name, default=None: environ.get(ENV_PREFIX + name, default)  # noqa: E731
        return cls(
            broker_url=get("BROKER_URL", "redis://127.0.0.1:6379/0"),
            event_exchange=get("EVENT_EXCHANGE", "celeryev"),
            result_backend=get("RESULT_BACKEND", "redis://127.0.0.1:6379/1"),
            witness_url=get("WITNESS_URL"),
            witness_key=get("WITNESS_KEY"),
            instrument=int(get("INSTRUMENT", "1")),
            task_events=get("TASK_EVENTS", "1") == "1",
        )


def witness_events(config: WorkloadConfig) -> type[Events]:
    """An Events whose dispatcher records each published event on the witness list."""
    url, key = config.witness_url, config.witness_key

    class WitnessDispatcher(EventDispatcher):
        _witness: redis.Redis | None = None

        def _publish(self, event, producer, routing_key, **kwargs):
            if producer is None:
                return None
            pending = len(self._outbound_buffer)
            result = super()._publish(event, producer, routing_key, **kwargs)
            if len(self._outbound_buffer) == pending:  # not re-buffered: the broker took it
                self._record(event)
            return result

        def _record(self, event: Any) -> None:
            if self._witness is None:
                self._witness = redis.Redis.from_url(url)
            events = event if isinstance(event, list) else [event]
            self._witness.rpush(key, *(json.dumps(e) for e in events))

    class WitnessEvents(Events):
        dispatcher_cls = WitnessDispatcher

    return WitnessEvents


def make_app(config: WorkloadConfig, main: str = "workload") -> Celery:
    events = witness_events(config) if config.witness_url and config.witness_key else None
    app = Celery(main, broker=config.broker_url, backend=config.result_backend, events=events)
    app.conf.update(
        event_exchange=config.event_exchange,
        # Each test's own control exchange too, so pings and revokes stay in the test.
        control_exchange=f"{config.event_exchange}.control",
        task_default_queue=f"{config.event_exchange}.tasks",
        task_track_started=True,
        # The backend keeps name, retries and worker too: tests compare against it.
        result_extended=True,
        result_expires=600,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    app.conf.update(config.extra)
    for _ in range(config.instrument):
        instrument(app)
    # instrument turns task events on; a test may model a worker started without -E.
    app.conf.worker_send_task_events = config.task_events
    if config.instrument:
        app.conf.task_send_sent_event = True
    register_tasks(app)
    return app


class CountingRequest(Request):
    """A user's own Request class (instrument must keep it and still annotate events)."""

    def send_event(self, type: str, **fields: Any) -> None:
        fields.setdefault("custom_request", True)
        super().send_event(type, **fields)


class CustomTask(Task):
    """A user's task base that is not app.Task, with its own Request."""

    Request = CountingRequest


def register_tasks(app: Celery) -> None:
    @app.task(name="workload.custom_add", base=CustomTask, shared=False)
    def custom_add(x: int, y: int) -> int:
        return x + y

    @app.task(name="workload.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="workload.tsum", shared=False)
    def tsum(numbers: list[int]) -> int:
        return sum(numbers)

    @app.task(name="workload.fail", shared=False)
    def fail(message: str) -> None:
        raise ValueError(message)

    @app.task(name="workload.flaky", bind=True, max_retries=5, shared=False)
    def flaky(self, value: int, failures: int = 2) -> int:
        # Deterministic: fails `failures` times, then succeeds on the next retry.
        if self.request.retries < failures:
            raise self.retry(exc=RuntimeError(f"attempt {self.request.retries}"), countdown=0.05)
        return value

    @app.task(name="workload.slow", shared=False)
    def slow(seconds: float) -> str:
        time.sleep(seconds)  # the task's own work: long enough to be revoked while running
        return "finished"


app = make_app(WorkloadConfig.from_environ())
