"""The task-list filter of a ``tasks`` subscription: the very filters of ``GET /v1/tasks``
(`ledger.api.models.TaskListQuery`, SQL from `ledger.api.queries.task_filter_sql`), plus the
same predicate in Python for live changes. tests/test_stream_filters.py checks that the two
agree on real rows."""

from __future__ import annotations

from typing import Any

from ledger.api.models import TaskListQuery
from ledger.api.queries import Params, task_filter_sql

FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED"})
SEARCH_COLUMNS = ("args", "kwargs", "result", "exception")
# Paging parameters of /v1/tasks that mean nothing for a subscription.
PAGING = frozenset({"order", "limit", "cursor"})
FILTER_FIELDS = frozenset(TaskListQuery.model_fields) - PAGING

_IN = (("state", "state"), ("name", "name"), ("worker", "worker"))
_EQ = (("queue", "queue"), ("group", "group_id"), ("root", "root_id"), ("parent", "parent_id"))
_RANGES = tuple(
    (f"{col}_{side}", col, side) for col in ("received", "started", "succeeded", "timestamp") for side in ("after", "before")
)


def parse_filter(raw: object) -> TaskListQuery:
    """Validate a subscription's filter object; raises ValueError naming the field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError("filter: must be an object")
    unknown = sorted(set(raw) - FILTER_FIELDS)
    if unknown:
        raise ValueError(f"filter.{unknown[0]}: unknown filter (known: {', '.join(sorted(FILTER_FIELDS))})")
    # /v1/tasks takes lists as repeated or comma-separated parameters; accept both here too
    fixed = {k: (v.split(",") if isinstance(v, str) and k in ("state", "name", "worker") else v) for k, v in raw.items()}
    return TaskListQuery.model_validate(fixed)


def is_mutable(q: TaskListQuery) -> bool:
    """Whether a task can stop matching after it matched (its state moves on), so the
    subscription must remember what it reported in order to announce leavers."""
    return bool(q.state)


def matches(q: TaskListQuery, row: dict[str, Any]) -> bool:
    """`task_filter_sql` as a Python predicate over a projection row."""
    for field, column in _IN:
        wanted = getattr(q, field)
        if wanted and row.get(column) not in wanted:
            return False
    for field, column in _EQ:
        wanted = getattr(q, field)
        if wanted is not None and row.get(column) != wanted:
            return False
    for field, column, side in _RANGES:
        bound = getattr(q, field)
        if bound is None:
            continue
        value = row.get(column)
        if value is None or (value < bound if side == "after" else value >= bound):
            return False
    if q.search:
        needle = q.search.lower()
        if not any(needle in (row.get(c) or "").lower() for c in SEARCH_COLUMNS):
            return False
    return True


def where_sql(q: TaskListQuery, p: Params) -> str:
    return " AND ".join(task_filter_sql(q, p)) or "TRUE"
