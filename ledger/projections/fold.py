"""Every projection folded at once: tasks, groups, workers and task names.

A :class:`Fold` holds rows (as dicts keyed by column name) and applies log events to them
in seq order. It never touches the database: the projector preloads the rows a batch needs
(``store.load_rows``) and writes back what changed. The same class gives the API its "as of"
views through :func:`fold_task` and :func:`fold_group`, so a past state and the live
projection are computed by the very same code.

Groups are derived from member tasks: a task joins a group the first time an event says
its ``group_id``; ``size`` counts members, ``states`` counts members by state, and
``chord_id`` is the chord callback's task id when the members feed a chord. Task names
count the tasks carrying each name.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from ledger.projections.task_state import (
    META_EVENT,
    apply_task_event,
    apply_task_meta,
    new_task_row,
    task_row_out,
    to_float,
    to_text,
)
from ledger.projections.worker_state import (
    apply_worker_event,
    new_worker_row,
    note_seen,
    sign_of_life,
    worker_row_out,
)

__all__ = ["Fold", "fold_group", "fold_task", "fold_workers", "group_row_out", "name_row_out"]

GROUP_COLUMNS = ("group_id", "chord_id", "size", "states", "first_seen", "last_seen", "first_seq", "last_seq")
NAME_COLUMNS = ("name", "tasks", "first_seen", "last_seen", "last_seq")


def new_group_row(group_id: str, seq: int) -> dict[str, Any]:
    return {
        "group_id": group_id,
        "chord_id": None,
        "size": 0,
        "states": {},
        "first_seen": None,
        "last_seen": None,
        "first_seq": seq,
        "last_seq": seq,
    }


def new_name_row(name: str, seq: int) -> dict[str, Any]:
    return {"name": name, "tasks": 0, "first_seen": None, "last_seen": None, "last_seq": seq}




def _count(counts: dict[str, int], key: str, delta: int) -> None:
    value = counts.get(key, 0) + delta
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


class Fold:
    """Projection rows in memory, and which of them the events applied so far changed."""

    def __init__(self) -> None:
        self.tasks: dict[str, dict[str, Any]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, dict[str, Any]] = {}
        self.task_names: dict[str, dict[str, Any]] = {}
        # key -> last seq that changed it, since the last take_changed()
        self.changed_tasks: dict[str, int] = {}
        self.changed_groups: dict[str, int] = {}
        self.changed_workers: dict[str, int] = {}
        self.changed_names: dict[str, int] = {}
        # Set by whoever knows (rebuild, on empty tables): every stored task row / every
        # stored group, worker and task-name row is held here, so nothing needs loading.
        self.holds_all_tasks = False
        self.holds_all_others = False

    def __len__(self) -> int:
        return len(self.tasks) + len(self.groups) + len(self.workers) + len(self.task_names)

    def clear(self) -> None:
        """Forget cached rows (the changes not yet taken stay recorded and must be)."""
        self.tasks.clear()
        self.groups.clear()
        self.workers.clear()
        self.task_names.clear()
        self.holds_all_tasks = self.holds_all_others = False

    def evict(self) -> None:
        """Make room: drop the task rows (the bulk), and the rest unless it is complete."""
        if self.holds_all_others:
            self.tasks.clear()
            self.holds_all_tasks = False
        else:
            self.clear()

    def apply(self, seq: int, type_: str, payload: Mapping[str, Any], recorded_at: float | None = None) -> None:
        """Apply one log event. Events the projections do not know are ignored."""
        if type(payload) is not dict:
            return
        family, _, subject = type_.partition("-")
        if family == "task":
            task_id = payload.get("uuid")
            if type(task_id) is not str or not subject:
                return
            row = self.tasks.get(task_id)
            if row is None:
                row = self.tasks[task_id] = new_task_row(task_id, seq)
            old_name, old_group, old_state = row["name"], row["group_id"], row["state"]
            apply_task_event(row, subject, payload, seq)
            self.changed_tasks[task_id] = seq
            timestamp = payload.get("timestamp")
            if type(timestamp) is not float:
                timestamp = to_float(timestamp)
            if subject != "sent":  # a worker's event: it is alive (task-sent comes from a client)
                hostname = payload.get("hostname")
                if type(hostname) is str:
                    worker = self.workers.get(hostname)
                    if worker is None:
                        worker = self.workers[hostname] = new_worker_row(hostname, seq)
                    sign_of_life(worker, timestamp, recorded_at, seq)
                    self.changed_workers[hostname] = seq
            self._after_task(row, old_name, old_group, old_state, timestamp, seq)
        elif family == "worker":
            hostname = payload.get("hostname")
            if type(hostname) is not str or not subject:
                return
            row = self.workers.get(hostname)
            if row is None:
                row = self.workers[hostname] = new_worker_row(hostname, seq)
            apply_worker_event(row, subject, payload, recorded_at, seq)
            self.changed_workers[hostname] = seq
        elif type_ == META_EVENT:
            task_id = payload.get("uuid")
            if type(task_id) is not str:
                return
            row = self.tasks.get(task_id)
            if row is None:
                row = self.tasks[task_id] = new_task_row(task_id, seq)
            old_name, old_group, old_state = row["name"], row["group_id"], row["state"]
            apply_task_meta(row, payload, seq)
            self.changed_tasks[task_id] = seq
            self._after_task(row, old_name, old_group, old_state, None, seq)

    def apply_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Apply log rows (``seq``, ``type``, ``payload``, optional ``recorded_at``) in order."""
        for record in records:
            seq, type_, payload, recorded_at = event_parts(record)
            self.apply(seq, type_, payload, recorded_at)

    def _after_task(
        self, row: dict[str, Any], old_name: Any, old_group: Any, old_state: str, timestamp: float | None, seq: int
    ) -> None:
        """Keep task names and groups in step with the task row just changed."""
        name = row["name"]
        if name is not None or old_name is not None:
            name = to_text(name)
            if name is not old_name:
                old_name = to_text(old_name)
            if name != old_name and old_name is not None:
                self._name_row(old_name, seq)["tasks"] -= 1
                self.changed_names[old_name] = seq
            if name is not None:
                named = self.task_names.get(name)
                if named is None:
                    named = self.task_names[name] = new_name_row(name, seq)
                if name != old_name:
                    named["tasks"] += 1
                if timestamp is not None:
                    note_seen(named, timestamp)
                named["last_seq"] = seq
                self.changed_names[name] = seq
        group_id = row["group_id"]
        if group_id is None and old_group is None:
            return
        group_id, old_group, state = to_text(group_id), to_text(old_group), row["state"]
        task_id = to_text(row["task_id"])
        if group_id != old_group and old_group is not None:
            left = self._group_row(old_group, seq)
            if task_id != left["chord_id"]:
                left["size"] -= 1
                _count(left["states"], old_state, -1)
            left["last_seq"] = seq
            self.changed_groups[old_group] = seq
        if group_id is None:
            return
        group = self._group_row(group_id, seq)
        chord_id = to_text(row["chord_id"])
        if chord_id is not None:
            group["chord_id"] = chord_id
        # Celery sends a chord's callback with its header's group id, but it is not a member:
        # the result backend's group holds the header tasks only (as /v1/groups lists them).
        if task_id == group["chord_id"]:
            pass
        elif group_id != old_group:  # joins now, with whatever state it already has
            group["size"] += 1
            _count(group["states"], state, +1)
            note_seen(group, to_float(row["timestamp"]))
        elif state != old_state:
            _count(group["states"], old_state, -1)
            _count(group["states"], state, +1)
        note_seen(group, timestamp)
        group["last_seq"] = seq
        self.changed_groups[group_id] = seq

    def _name_row(self, name: str, seq: int) -> dict[str, Any]:
        row = self.task_names.get(name)
        if row is None:
            row = self.task_names[name] = new_name_row(name, seq)
        return row

    def _group_row(self, group_id: str, seq: int) -> dict[str, Any]:
        row = self.groups.get(group_id)
        if row is None:
            row = self.groups[group_id] = new_group_row(group_id, seq)
        return row

    def take_changed(self) -> tuple[dict[str, int], dict[str, int], dict[str, int], dict[str, int]]:
        """(tasks, groups, workers, task names) changed since the last call, key -> seq."""
        taken = (self.changed_tasks, self.changed_groups, self.changed_workers, self.changed_names)
        self.changed_tasks, self.changed_groups, self.changed_workers, self.changed_names = {}, {}, {}, {}
        return taken


def group_row_out(row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "states": dict(row["states"])}


def name_row_out(row: dict[str, Any]) -> dict[str, Any]:
    return dict(row)


def event_parts(record: Mapping[str, Any]) -> tuple[int, str, Any, float | None]:
    """(seq, type, payload, recorded_at) from a log row, a dict or an asyncpg Record."""
    payload = record["payload"]
    if isinstance(payload, (str, bytes)):
        payload = orjson.loads(payload)
    try:
        type_ = record["type"]
    except KeyError:
        type_ = None
    if type_ is None and isinstance(payload, dict):
        type_ = payload.get("type")
    try:
        recorded_at = record["recorded_at"]
    except KeyError:
        recorded_at = None
    if isinstance(recorded_at, datetime.datetime):
        recorded_at = recorded_at.timestamp()
    return record["seq"], type_ if isinstance(type_, str) else "", payload, recorded_at


# -- the public folds the API builds "as of" views with -----------------------------------


def fold_task(events: Iterable[Mapping[str, Any]], task_id: str | None = None) -> dict[str, Any] | None:
    """The ``ledger.tasks`` row of one task from its log events, in seq order.

    ``events`` are log rows (``seq``, ``type``, ``payload`` and optionally ``recorded_at``),
    e.g. ``SELECT seq, type, payload FROM ledger.events WHERE task_id = $1 AND seq <= $2
    ORDER BY seq``. ``task_id`` defaults to the first task event's ``uuid``. Returns None
    when no event concerns the task.
    """
    fold = Fold()
    fold.apply_records(events)
    if task_id is None:
        task_id = next(iter(fold.tasks), None)
    row = fold.tasks.get(task_id) if task_id is not None else None
    return task_row_out(row) if row is not None else None


def fold_group(
    group_id: str, events: Iterable[Mapping[str, Any]]
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """A ``ledger.groups`` row and its member task rows (by group_index, then task id).

    ``events`` must hold every event of the candidate member tasks, in seq order (e.g. all
    events whose task_id is a member's, up to the position wanted); tasks that turn out
    not to be members are left out. Returns (None, []) when no member is found.
    """
    fold = Fold()
    fold.apply_records(events)
    group = fold.groups.get(group_id)
    chord_id = group["chord_id"] if group is not None else None
    members = [
        task_row_out(row)
        for row in fold.tasks.values()
        if to_text(row["group_id"]) == group_id and to_text(row["task_id"]) != chord_id
    ]
    members.sort(key=lambda r: (r["group_index"] is None, r["group_index"] or 0, r["task_id"]))
    return (group_row_out(group) if group is not None and group["size"] > 0 else None), members


def fold_workers(events: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """``ledger.workers`` rows from log events (hostname -> row)."""
    fold = Fold()
    fold.apply_records(events)
    return {hostname: worker_row_out(row) for hostname, row in fold.workers.items()}
