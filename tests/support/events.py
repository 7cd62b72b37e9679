"""Real-format Celery events for tests that do not need a worker.

They are shaped exactly as Celery's dispatcher sends them (type, hostname, utcoffset, pid,
clock, timestamp, plus each type's own fields), and turned into log rows the same way
capture does, through ``ledger.log.recorder.Event``.
"""

from __future__ import annotations

import hashlib
import itertools
import time
import uuid as uuidlib

import orjson

from ledger.log.recorder import Event

_clock = itertools.count(1)


def celery_event(type_: str, hostname: str = "celery@test", **fields) -> dict:
    return {
        "hostname": hostname,
        "utcoffset": 0,
        "pid": 4242,
        "clock": next(_clock),
        "timestamp": time.time(),
        "type": type_,
        **fields,
    }


def task_events(task_id: str | None = None, name: str = "tests.add", hostname: str = "celery@test") -> list[dict]:
    """A successful task's life: sent, received, started, succeeded."""
    task_id = task_id or str(uuidlib.uuid4())
    return [
        celery_event("task-sent", hostname="client@test", uuid=task_id, name=name, args="(2, 2)",
                     kwargs="{}", retries=0, eta=None, expires=None, queue="celery",
                     exchange="", routing_key="celery", root_id=task_id, parent_id=None),
        celery_event("task-received", hostname, uuid=task_id, name=name, args="(2, 2)", kwargs="{}",
                     root_id=task_id, parent_id=None, retries=0, eta=None, expires=None),
        celery_event("task-started", hostname, uuid=task_id),
        celery_event("task-succeeded", hostname, uuid=task_id, result="4", runtime=0.01),
    ]


def to_log_event(payload: dict, routing_key: str | None = None) -> Event:
    raw = orjson.dumps(payload)
    return Event(
        key=hashlib.blake2b(raw, digest_size=16).digest(),
        type=payload["type"],
        task_id=payload.get("uuid"),
        hostname=payload.get("hostname"),
        sent_at=payload.get("timestamp"),
        clock=payload.get("clock"),
        routing_key=routing_key or payload["type"].replace("-", "."),
        payload_json=raw.decode(),
    )


async def record(conn, payloads) -> int | None:
    """Append Celery event payloads to the log as capture does; returns the last seq."""
    from ledger.log.recorder import append

    result = await append(conn, [to_log_event(p) for p in payloads], source="test")
    return result.last_seq


async def project(database_url: str) -> int:
    """Apply every event in the log now (the projector's catch-up); returns the checkpoint."""
    from ledger.config import Settings
    from ledger.projections.projector import Projector

    return await Projector(Settings(database_url=database_url)).catch_up()
