"""One task's row, folded from its events by Celery's own rules.

This is a port of ``celery.events.state.Task.event`` (Celery 5.x) onto a plain dict whose
keys are the columns of ``ledger.tasks``, so the same code serves the projector, ``ledger
rebuild`` and the API's "as of" views. The rules, all in :data:`MERGE_RULES` and
:func:`apply_task_event`:

- each event type maps to a state (:data:`EVENT_TO_STATE`; any other ``task-xxx`` is the
  custom state ``XXX``) and always records its time in the column of that name
  (``task-succeeded`` sets ``succeeded``);
- an event whose state has *lower* precedence than the current one (``states.PRECEDENCE``)
  arrived out of order: the state stays, and its fields are merged - all of them, except
  for a late ``task-received``, of which only :data:`MERGE_RULES` ``[RECEIVED]`` are kept
  (name, args, kwargs, parent_id, root_id, retries, eta, expires). So a late STARTED never
  overwrites SUCCESS, and a late RECEIVED still fills in the name;
- RETRY always moves on: an event in RETRY, or any event after RETRY, is taken as current;
- ``task-sent`` sets ``client`` to its hostname, every other task event sets ``worker``.

Ledger additions, which Celery's ``State`` does not have:

- lineage (``parent_id``, ``root_id``, ``group_id``, ``group_index``, ``chord_id``) is
  taken from any event that carries a non-null value, in or out of order, and never
  erased by a null: membership is a fact about the task, not about its state;
- ``ledger-task-meta`` events (sent by :mod:`ledger.celery`) carry only lineage and never
  change the state, times, worker or clock;
- fields that are neither columns nor envelope (``terminated``, ``signum``, custom fields)
  go into ``extra``; a column value of the wrong type is kept in ``extra`` under its name
  and the column is left null (see :func:`task_row_out`).
"""

from __future__ import annotations

from typing import Any

import orjson
from celery import states

__all__ = [
    "EVENT_TO_STATE",
    "MERGE_RULES",
    "META_EVENT",
    "TASK_COLUMNS",
    "apply_task_event",
    "apply_task_meta",
    "new_task_row",
    "precedence",
    "task_row_in",
    "task_row_out",
]

META_EVENT = "ledger-task-meta"

#: Task event subject -> state (celery.events.state.TASK_EVENT_TO_STATE).
EVENT_TO_STATE: dict[str, str] = {
    "sent": states.PENDING,
    "received": states.RECEIVED,
    "started": states.STARTED,
    "failed": states.FAILURE,
    "retried": states.RETRY,
    "succeeded": states.SUCCESS,
    "revoked": states.REVOKED,
    "rejected": states.REJECTED,
}

#: Lower index wins; unknown (custom) states rank as None does (celery.states.PRECEDENCE).
_PRECEDENCE = {state: index for index, state in enumerate(states.PRECEDENCE)}
_CUSTOM_PRECEDENCE = _PRECEDENCE[None]


def precedence(state: str) -> int:
    return _PRECEDENCE.get(state, _CUSTOM_PRECEDENCE)


#: How to merge an out-of-order event: state -> the only fields kept from it. A state not
#: listed merges every field (Celery's Task.merge_rules).
MERGE_RULES: dict[str, frozenset[str]] = {
    states.RECEIVED: frozenset(
        ("name", "args", "kwargs", "parent_id", "root_id", "retries", "eta", "expires")
    ),
}

# Column name -> type, in the order of ledger.tasks.
TASK_COLUMNS: dict[str, str] = {
    "task_id": "text",
    "name": "text",
    "state": "text",
    "sent": "float",
    "received": "float",
    "started": "float",
    "succeeded": "float",
    "failed": "float",
    "retried": "float",
    "revoked": "float",
    "rejected": "float",
    "args": "text",
    "kwargs": "text",
    "result": "text",
    "exception": "text",
    "traceback": "text",
    "eta": "text",
    "expires": "text",
    "retries": "int",
    "runtime": "float",
    "worker": "text",
    "client": "text",
    "exchange": "text",
    "routing_key": "text",
    "queue": "text",
    "timestamp": "float",
    "clock": "bigint",
    "parent_id": "text",
    "root_id": "text",
    "group_id": "text",
    "group_index": "int",
    "chord_id": "text",
    "extra": "json",
    "first_seq": "bigint",
    "last_seq": "bigint",
}

LINEAGE = ("parent_id", "root_id", "group_id", "group_index", "chord_id")

# What an event field does to the row: merged into its column, lineage (sticky), ignored
# (the envelope every event has), or kept in ``extra`` - any other field, including fields
# named like the columns the fold itself owns (task_id, state, worker, client, extra, *_seq).
_OWNED = ("task_id", "state", "worker", "client", "extra", "first_seq", "last_seq")
_MERGED = frozenset(c for c in TASK_COLUMNS if c not in _OWNED and c not in LINEAGE)
_STICKY = frozenset(LINEAGE)
_ENVELOPE = frozenset(("type", "uuid", "hostname", "utcoffset", "pid", "local_received"))

_RETRY = states.RETRY
_rank = _PRECEDENCE.get
_CUSTOM = _CUSTOM_PRECEDENCE


def new_task_row(task_id: str, seq: int) -> dict[str, Any]:
    """A task nobody has told us anything about yet: PENDING, as in Celery."""
    row: dict[str, Any] = dict.fromkeys(TASK_COLUMNS)
    row["task_id"] = task_id
    row["state"] = states.PENDING
    row["extra"] = {}
    row["first_seq"] = seq
    row["last_seq"] = seq
    return row


def _merge(row: dict[str, Any], fields: dict[str, Any], keep: frozenset[str] | None) -> None:
    """Merge an event's fields: columns, lineage (never erased by a null), the envelope
    ignored, anything else into ``extra``; with ``keep``, only those fields (and lineage)."""
    if keep is None:
        extra = row["extra"]
        for key, value in fields.items():
            if key in _MERGED:
                row[key] = value
            elif key in _ENVELOPE:
                continue
            elif key in _STICKY:
                if value is not None:
                    row[key] = value
            else:
                extra[key] = value
    else:
        for key, value in fields.items():
            if key in _STICKY:
                if value is not None:
                    row[key] = value
            elif key in keep:
                row[key] = value  # merge rules only name columns


def apply_task_event(row: dict[str, Any], subject: str, fields: dict[str, Any], seq: int) -> None:
    """Fold one ``task-<subject>`` event (its payload as ``fields``) into ``row``."""
    timestamp = fields.get("timestamp")
    state = EVENT_TO_STATE.get(subject)
    if state is not None:
        row[subject] = timestamp  # e.g. task-succeeded sets "succeeded"
    else:
        state = subject.upper()  # a custom state
    current = row["state"]
    if state != _RETRY and current != _RETRY and _rank(state, _CUSTOM) > _rank(current, _CUSTOM):
        # This state logically happens before the current one: keep the state, merge.
        _merge(row, fields, MERGE_RULES.get(state))
    else:
        _merge(row, fields, None)
        row["state"] = state
        row["timestamp"] = timestamp
    if subject == "sent":
        row["client"] = fields.get("hostname")
    else:
        row["worker"] = fields.get("hostname")
    row["last_seq"] = seq


def apply_task_meta(row: dict[str, Any], fields: dict[str, Any], seq: int) -> None:
    """``ledger-task-meta``: lineage only; state, times and worker are untouched."""
    for key in LINEAGE:
        value = fields.get(key)
        if value is not None:
            row[key] = value
    row["last_seq"] = seq


# -- output: the row as the database (and the change feed) holds it -----------------------

_INT32 = 2**31
_INT64 = 2**63


def to_text(value: Any) -> str | None:
    if value is None or type(value) is str:
        return value
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def to_float(value: Any) -> float | None:
    kind = type(value)
    if kind is float:
        return value
    if kind is int:
        return float(value)
    return None


def _coerce(kind: str, value: Any) -> tuple[bool, Any]:
    """(ok, value) for one column; not ok means the value does not fit the column."""
    if value is None:
        return True, None
    if kind == "text":
        return True, to_text(value)
    if kind == "float":
        converted = to_float(value)
        return converted is not None, converted
    if kind == "int":
        return (type(value) is int and -_INT32 <= value < _INT32), value
    if kind == "bigint":
        return (type(value) is int and -_INT64 <= value < _INT64), value
    return True, value


_TEXT_COLUMNS = tuple(c for c, kind in TASK_COLUMNS.items() if kind == "text")
_FLOAT_COLUMNS = tuple(c for c, kind in TASK_COLUMNS.items() if kind == "float")
_INT_COLUMNS = tuple((c, kind) for c, kind in TASK_COLUMNS.items() if kind in ("int", "bigint"))


def task_row_out(row: dict[str, Any]) -> dict[str, Any]:
    """The row with every column of its database type; misfits move to ``extra``."""
    out = row.copy()
    extra = dict(out["extra"])
    for column in _TEXT_COLUMNS:
        value = out[column]
        if value is not None and type(value) is not str:
            out[column] = to_text(value)
    for column in _FLOAT_COLUMNS:
        value = out[column]
        if value is not None and type(value) is not float:
            converted = to_float(value)
            if converted is None:
                extra[column] = value
            out[column] = converted
    for column, kind in _INT_COLUMNS:
        value = out[column]
        if value is not None:
            ok, converted = _coerce(kind, value)
            if not ok:
                extra[column] = value
                converted = None
            out[column] = converted
    out["extra"] = extra
    return out


# Columns whose misfit values task_row_out parks in ``extra``; nothing else can put these
# names in ``extra`` (they are always merged into their columns), so loading moves them back.
_PARKABLE = tuple(name for name, kind in TASK_COLUMNS.items() if kind in ("float", "int", "bigint"))


def task_row_in(stored: Any) -> dict[str, Any]:
    """A row read from ledger.tasks, ready to fold more events into (inverse of task_row_out)."""
    row = dict(stored)
    extra = row["extra"] = dict(row["extra"] or {})
    for name in _PARKABLE:
        if name in extra:
            row[name] = extra.pop(name)
    return row
