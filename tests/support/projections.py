"""Helpers for projection tests: generated task histories in Celery's wire format, Celery's
own ``State`` as the reference, and reading projection tables back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import asyncpg
from celery.events.state import State
from hypothesis import strategies as st

from ledger.log import recorder
from tests.support.events import to_log_event
from tests.support.waiting import wait_until  # noqa: F401 - re-exported

WORKERS = ("celery@alpha", "celery@beta")
CLIENT = "client@app"

# The fields celery.events.state.Task keeps (Task._fields minus the object links).
CELERY_TASK_FIELDS = (
    "name", "state", "received", "sent", "started", "rejected", "succeeded", "failed", "retried",
    "revoked", "args", "kwargs", "eta", "expires", "retries", "result", "exception", "timestamp",
    "runtime", "traceback", "exchange", "routing_key", "clock", "client", "root_id", "parent_id",
)
# Attributes State sets that are bookkeeping or envelope, not task data.
_CELERY_INTERNAL = {
    "uuid", "cluster_state", "children", "_serializer_handlers", "worker", "type", "hostname",
    "utcoffset", "pid", "local_received", "root", "parent", "group_id", "group_index", "chord_id", "queue",
}
LINEAGE = ("group_id", "group_index", "chord_id", "parent_id", "root_id")

KINDS = ("sent", "received", "started", "succeeded", "failed", "retried", "revoked", "rejected", "progress", "meta")

small_text = st.text(alphabet="abcxyz(),' 0123456789", max_size=12)
times = st.floats(min_value=1.7e9, max_value=1.7e9 + 1000, allow_nan=False)


@st.composite
def task_history(draw: st.DrawFn, task_id: str, parent_id: str | None, group: tuple[str, int, str | None] | None) -> list[dict]:
    """Events of one task, in causal order, as Celery's dispatcher would send them."""
    name = draw(st.sampled_from(["proj.add", "proj.mul", "proj.fail"]))
    lineage = {"root_id": parent_id or task_id, "parent_id": parent_id}
    membership = {}
    if group is not None:
        membership = {"group_id": group[0], "group_index": group[1]}
        if group[2] is not None:
            membership["chord_id"] = group[2]
    kinds = draw(st.lists(st.sampled_from(KINDS), min_size=1, max_size=7))
    events = []
    for kind in kinds:
        worker = draw(st.sampled_from(WORKERS))
        base = {"utcoffset": 0, "pid": 100, "clock": draw(st.integers(1, 10_000)), "timestamp": draw(times)}
        tagged = membership if draw(st.booleans()) else {}  # instrumented events carry membership
        if kind == "sent":
            event = {**base, "type": "task-sent", "hostname": CLIENT, "uuid": task_id, "name": name,
                     "args": draw(small_text), "kwargs": "{}", "retries": draw(st.integers(0, 3)), "eta": None,
                     "expires": None, "queue": "celery", "exchange": "", "routing_key": "celery",
                     **lineage, **tagged}
        elif kind == "received":
            event = {**base, "type": "task-received", "hostname": worker, "uuid": task_id, "name": name,
                     "args": draw(small_text), "kwargs": "{}", "retries": draw(st.integers(0, 3)),
                     "eta": draw(st.sampled_from([None, "2026-01-01T00:00:00+00:00"])), "expires": None, **lineage}
        elif kind == "started":
            event = {**base, "type": "task-started", "hostname": worker, "uuid": task_id, **tagged}
        elif kind == "succeeded":
            event = {**base, "type": "task-succeeded", "hostname": worker, "uuid": task_id,
                     "result": draw(small_text), "runtime": draw(st.floats(0, 10)), **tagged}
        elif kind in ("failed", "retried"):
            event = {**base, "type": f"task-{kind}", "hostname": worker, "uuid": task_id,
                     "exception": "ValueError('boom')", "traceback": "Traceback ...", **tagged}
        elif kind == "revoked":
            event = {**base, "type": "task-revoked", "hostname": worker, "uuid": task_id,
                     "terminated": draw(st.booleans()), "signum": None, "expired": False, **tagged}
        elif kind == "rejected":
            event = {**base, "type": "task-rejected", "hostname": worker, "uuid": task_id, "requeue": False}
        elif kind == "progress":  # a custom task event, as Task.send_event sends
            event = {**base, "type": "task-progress", "hostname": worker, "uuid": task_id,
                     "current": draw(st.integers(0, 100))}
        else:
            event = {**base, "type": "ledger-task-meta", "hostname": worker, "uuid": task_id,
                     **lineage, **membership}
        events.append(event)
    return events


@st.composite
def histories(draw: st.DrawFn, prefix: str = "") -> list[dict]:
    """Several tasks' events (some in a group or chord, some children of others), shuffled,
    with duplicates (redeliveries) sprinkled in."""
    n = draw(st.integers(1, 4))
    ids = [f"{prefix}task-{i}" for i in range(n)]
    group = (f"{prefix}group-1", f"{prefix}chord-cb" if draw(st.booleans()) else None)
    events: list[dict] = []
    for index, task_id in enumerate(ids):
        parent = ids[0] if index and draw(st.booleans()) else None
        member = (group[0], index, group[1]) if draw(st.booleans()) else None
        events += draw(task_history(task_id, parent, member))
    events = list(draw(st.permutations(events)))
    for _ in range(draw(st.integers(0, 3))):
        original = events[draw(st.integers(0, len(events) - 1))]
        events.insert(draw(st.integers(0, len(events))), dict(original))
    return events


def deduplicate(events: Sequence[dict]) -> list[dict]:
    """What the log keeps of a redelivered stream: the first of each identical event."""
    seen: set[bytes] = set()
    kept = []
    for event in events:
        key = to_log_event(event).key
        if key not in seen:
            seen.add(key)
            kept.append(event)
    return kept


def celery_state(events: Sequence[dict]) -> State:
    """Celery's own State fed the events in order (copies: State mutates them)."""
    state = State()
    for event in events:
        state.event({**event, "local_received": event.get("timestamp")})
    return state


def celery_view(task: Any, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    """What Celery's State knows about a task, comparable with :func:`ledger_view`.

    ``lineage``: parent/root that only the ledger's metadata events told (State ignores
    those events), filled in where State has none."""
    view = {field: getattr(task, field, None) for field in CELERY_TASK_FIELDS}
    for key in ("parent_id", "root_id"):
        if view[key] is None and lineage:
            view[key] = lineage[key]
    view["worker"] = task.worker.hostname if task.worker is not None else None
    view["queue"] = task.__dict__.get("queue")
    view["extra"] = {
        k: v for k, v in task.__dict__.items() if k not in _CELERY_INTERNAL and k not in CELERY_TASK_FIELDS
    }
    return view


def ledger_view(row: dict[str, Any]) -> dict[str, Any]:
    view = {field: row[field] for field in CELERY_TASK_FIELDS}
    view["worker"] = row["worker"]
    view["queue"] = row["queue"]
    view["extra"] = dict(row["extra"])
    return view


def expected_lineage(events: Sequence[dict], task_id: str) -> dict[str, Any]:
    """Membership is taken from any event that carries it."""
    found: dict[str, Any] = dict.fromkeys(LINEAGE)
    for event in events:
        if event.get("uuid") == task_id:
            for key in LINEAGE:
                if event.get(key) is not None:
                    found[key] = event[key]
    return found


async def append_events(conn: asyncpg.Connection, events: Sequence[dict], chunk: int = 7) -> None:
    """Append through the real recorder, in several batches as capture would."""
    for start in range(0, len(events), chunk):
        await recorder.append(conn, [to_log_event(e) for e in events[start : start + chunk]])


PROJECTION_TABLES = {
    "tasks": "task_id",
    "groups": "group_id",
    "workers": "hostname",
    "task_names": "name",
    "checkpoints": "projection",
}


async def table_rows(conn: asyncpg.Connection, table: str, exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    key = PROJECTION_TABLES[table]
    rows = [dict(r) for r in await conn.fetch(f"SELECT * FROM ledger.{table} ORDER BY {key}")]
    for row in rows:
        for column in exclude:
            row.pop(column, None)
    return rows
