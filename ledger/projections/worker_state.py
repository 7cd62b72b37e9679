"""One worker's row, and whether it is online, offline or lost.

Celery (``celery.events.state.Worker``) calls a worker alive while
``now < last_heartbeat + freq * 2`` (HEARTBEAT_EXPIRE_WINDOW = 200 %), where heartbeats are
the times the *receiver* got ``worker-online`` / ``worker-heartbeat`` events, and task
events from the worker count as a sign of life too. ``worker-offline`` clears the
heartbeats. A worker seen only through task events has Celery's default ``freq`` of 60 s.

Here the receiver's time is the log's ``recorded_at`` (when the ledger stored the event),
so the fold stays a pure function of the log. A sign of life only revives a worker that
went offline if the sender stamped it after the ``worker-offline`` (a stale heartbeat
delivered late does not bring a dead worker back).
"""

from __future__ import annotations

from typing import Any, Literal

from ledger.projections.task_state import to_float, to_text

__all__ = ["WORKER_COLUMNS", "apply_worker_event", "new_worker_row", "worker_row_out", "worker_status"]

#: Celery's expire window: a heartbeat is good for freq * 200 %.
HEARTBEAT_EXPIRE_WINDOW = 200
#: Celery's Worker() default when no heartbeat said otherwise.
DEFAULT_FREQ = 60.0

WORKER_COLUMNS: dict[str, str] = {
    "hostname": "text",
    "pid": "int",
    "freq": "float",
    "sw_ident": "text",
    "sw_ver": "text",
    "sw_sys": "text",
    "loadavg": "float[]",
    "active": "int",
    "processed": "int",
    "first_seen": "float",
    "last_seen": "float",
    "last_heartbeat": "float",
    "offline_at": "float",
    "first_seq": "bigint",
    "last_seq": "bigint",
}

# Fields a worker event sets on the worker (the rest of Worker._fields is bookkeeping).
_WORKER_FIELDS = ("pid", "freq", "sw_ident", "sw_ver", "sw_sys", "loadavg", "active", "processed")
_INT32 = 2**31

WorkerStatus = Literal["online", "offline", "lost"]


def new_worker_row(hostname: str, seq: int) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(WORKER_COLUMNS)
    row["hostname"] = hostname
    row["first_seq"] = seq
    row["last_seq"] = seq
    return row


def note_seen(row: dict[str, Any], timestamp: float | None) -> None:
    """Widen a row's first_seen/last_seen to include `timestamp` (workers, groups, task names)."""
    if timestamp is None:
        return
    first = row["first_seen"]
    if first is None or timestamp < first:
        row["first_seen"] = timestamp
    last = row["last_seen"]
    if last is None or timestamp > last:
        row["last_seen"] = timestamp


def sign_of_life(row: dict[str, Any], timestamp: float | None, recorded_at: float | None, seq: int) -> None:
    """A heartbeat, an online event or a task event from this worker."""
    offline_at = row["offline_at"]
    if offline_at is not None:
        if timestamp is not None and timestamp <= offline_at:
            row["last_seq"] = seq
            return  # sent before it went offline: stale
        row["offline_at"] = None
    if recorded_at is not None:
        last = row["last_heartbeat"]
        if last is None or recorded_at > last:
            row["last_heartbeat"] = recorded_at
    note_seen(row, timestamp)
    row["last_seq"] = seq


def apply_worker_event(
    row: dict[str, Any], subject: str, fields: dict[str, Any], recorded_at: float | None, seq: int
) -> None:
    """Fold one ``worker-<subject>`` event into ``row``."""
    timestamp = to_float(fields.get("timestamp"))
    for key in _WORKER_FIELDS:
        if key in fields:
            row[key] = fields[key]
    if subject == "offline":
        row["offline_at"] = timestamp if timestamp is not None else recorded_at
        row["last_heartbeat"] = None  # Celery clears the heartbeats
        note_seen(row, timestamp)
        row["last_seq"] = seq
    elif subject in ("online", "heartbeat"):
        sign_of_life(row, timestamp, recorded_at, seq)
    else:  # worker-elect and friends: fields only
        note_seen(row, timestamp)
        row["last_seq"] = seq


def worker_status(row: dict[str, Any], now: float) -> WorkerStatus:
    """``offline`` after worker-offline; ``online`` while its last heartbeat is fresh
    (``now < last_heartbeat + freq * 2``, as Celery's Worker.alive); ``lost`` otherwise."""
    if row.get("offline_at") is not None:
        return "offline"
    last = row.get("last_heartbeat")
    if last is None:
        return "lost"
    freq = to_float(row.get("freq")) or DEFAULT_FREQ
    return "online" if now < last + freq * (HEARTBEAT_EXPIRE_WINDOW / 100.0) else "lost"


def worker_row_out(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every column of its database type (a misfit value becomes null)."""
    out = dict(row)
    out["hostname"] = to_text(out["hostname"])
    for key in ("sw_ident", "sw_ver", "sw_sys"):
        out[key] = to_text(out[key])
    out["freq"] = to_float(out["freq"])
    for key in ("pid", "active", "processed"):
        value = out[key]
        out[key] = value if type(value) is int and -_INT32 <= value < _INT32 else None
    loadavg = out["loadavg"]
    if isinstance(loadavg, list) and all(to_float(v) is not None for v in loadavg):
        out["loadavg"] = [to_float(v) for v in loadavg]
    else:
        out["loadavg"] = None
    return out
