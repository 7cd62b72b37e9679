"""Projections: pure folds of ``ledger.events`` into the views people query.

- ``task_state``   one task's row from its events, by Celery's own merge rules (one table);
- ``worker_state`` one worker's row, and whether it is online, offline or lost;
- ``fold``         every projection at once (tasks, groups, workers, task names), plus the
                   public ``fold_task`` / ``fold_group`` the API uses for "as of" views;
- ``store``        reading and writing the projection tables, checkpoint and change feed;
- ``projector``    the long-running writer (`ledger projector`), one at a time by lock;
- ``rebuild``      drop everything and replay from seq 0 (`ledger rebuild`).
"""

from ledger.projections.fold import Fold, fold_group, fold_task, fold_workers
from ledger.projections.worker_state import worker_status

__all__ = ["Fold", "fold_group", "fold_task", "fold_workers", "worker_status"]
