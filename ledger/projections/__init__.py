"""Projections: pure folds of ``ledger.events`` into the views people query.

- ``task_state``   one task's row from its events, by Celery's own merge rules (one table);
- ``worker_state`` one worker's row, and whether it is online, offline or lost;
- ``fold``         every projection at once (tasks, groups, workers, task names);
- ``store``        reading and writing the projection tables, checkpoint and change feed;
- ``projector``    the long-running writer (`ledger projector`), one at a time by lock;
- ``rebuild``      drop everything and replay from seq 0 (`ledger rebuild`).

Public, for the API and the stream (same code as the projector, so "as of" views read
exactly as the projection would have):

- ``fold_task(events, task_id=None) -> row | None``: a ``ledger.tasks`` row from log rows
  (``seq``, ``type``, ``payload``; ``recorded_at`` optional), in seq order;
- ``fold_group(group_id, events) -> (group row | None, [member task rows])``;
- ``fold_workers(events) -> {hostname: row}``;
- ``worker_status(row, now) -> "online" | "offline" | "lost"``;
- ``ledger.projections.store.read_checkpoint(conn) -> int``: the position applied;
- ``ledger.projections.projector.Projector(settings)``: ``run(stop)``, ``catch_up()``.
"""

from ledger.projections.fold import Fold, fold_group, fold_task, fold_workers
from ledger.projections.worker_state import worker_status

__all__ = ["Fold", "fold_group", "fold_task", "fold_workers", "worker_status"]
