"""The pure task fold against Celery's own celery.events.state.State."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings

from ledger.projections import fold_group, fold_task
from ledger.projections.fold import Fold
from ledger.projections.task_state import task_row_in, task_row_out
from tests.support.events import celery_event
from tests.support.projections import (
    celery_state,
    celery_view,
    deduplicate,
    expected_lineage,
    histories,
    ledger_view,
)


def log_rows(events):
    return [{"seq": seq, "type": e["type"], "payload": e} for seq, e in enumerate(events, 1)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories())
def test_fold_matches_celery_state_on_shuffled_duplicated_histories(events):
    logged = deduplicate(events)  # what the log keeps of a redelivered stream
    state = celery_state(logged)
    fold = Fold()
    fold.apply_records(log_rows(logged))
    for task_id, task in state.tasks.items():
        row = task_row_out(fold.tasks[task_id])
        lineage = expected_lineage(logged, task_id)
        assert ledger_view(row) == celery_view(task, lineage), task_id
        assert {k: row[k] for k in lineage} == lineage
        # fold_task over this task's events alone gives the same row
        own = [r for r in log_rows(logged) if r["payload"].get("uuid") == task_id]
        assert fold_task(own) == {**row, "first_seq": own[0]["seq"], "last_seq": own[-1]["seq"]}
    # tasks only the ledger's metadata events mention exist, untouched by them: PENDING
    for task_id in set(fold.tasks) - set(state.tasks):
        assert fold.tasks[task_id]["state"] == "PENDING"


@settings(max_examples=200, deadline=None)
@given(histories())
def test_fold_is_independent_of_batch_boundaries_and_reloads(events):
    """Folding in batches, reloading rows as the database returns them, gives the same rows."""
    rows = log_rows(deduplicate(events))
    whole = Fold()
    whole.apply_records(rows)
    pieces = Fold()
    for start in range(0, len(rows), 3):
        pieces.apply_records(rows[start : start + 3])
        pieces.tasks = {k: task_row_in(task_row_out(v)) for k, v in pieces.tasks.items()}
    assert {k: task_row_out(v) for k, v in pieces.tasks.items()} == {k: task_row_out(v) for k, v in whole.tasks.items()}
    assert pieces.groups == whole.groups and pieces.task_names == whole.task_names


def test_late_started_never_overwrites_success_and_late_received_fills_in():
    succeeded = celery_event("task-succeeded", "celery@w", uuid="t", result="4", runtime=1.0)
    started = celery_event("task-started", "celery@w", uuid="t")
    received = celery_event("task-received", "celery@w", uuid="t", name="proj.add", args="(2, 2)", kwargs="{}",
                            retries=0, eta=None, expires=None, root_id="t", parent_id=None, queue="q")
    row = fold_task(log_rows([succeeded, started, received]))
    assert row["state"] == "SUCCESS" and row["result"] == "4"
    assert (row["name"], row["args"], row["retries"]) == ("proj.add", "(2, 2)", 0)
    assert row["started"] == started["timestamp"] and row["received"] == received["timestamp"]
    assert row["queue"] is None  # merge rule for a late RECEIVED keeps only name, args, ...


def test_retry_always_moves_on():
    events = [
        celery_event("task-received", "celery@w", uuid="t", name="x"),
        celery_event("task-retried", "celery@w", uuid="t", exception="E()"),
        celery_event("task-received", "celery@w", uuid="t", name="x", retries=1),
    ]
    assert fold_task(log_rows(events[:2]))["state"] == "RETRY"
    assert fold_task(log_rows(events))["state"] == "RECEIVED"


def test_metadata_event_sets_membership_and_never_state():
    events = [
        celery_event("task-succeeded", "celery@w", uuid="t", result="1"),
        celery_event("ledger-task-meta", "celery@w", uuid="t", group_id="g", group_index=2, chord_id="cb",
                     parent_id="p", root_id="r"),
    ]
    row = fold_task(log_rows(events))
    assert row["state"] == "SUCCESS" and row["timestamp"] == events[0]["timestamp"]
    assert (row["group_id"], row["group_index"], row["chord_id"], row["parent_id"], row["root_id"]) == (
        "g", 2, "cb", "p", "r")
    assert row["clock"] == events[0]["clock"]


def test_unknown_fields_go_to_extra_and_misfits_are_kept_there():
    events = [celery_event("task-revoked", "celery@w", uuid="t", terminated=True, signum=9, retries="three")]
    row = fold_task(log_rows(events))
    assert row["state"] == "REVOKED"
    assert row["extra"] == {"terminated": True, "signum": 9, "retries": "three"}
    assert row["retries"] is None


def test_group_and_chord_membership():
    events = []
    for index in range(3):
        events.append(celery_event("task-sent", "client@a", uuid=f"m{index}", name="proj.add", group_id="g",
                                   group_index=index, chord_id="cb"))
    events.append(celery_event("task-succeeded", "celery@w", uuid="m1", result="1"))
    events.append(celery_event("task-failed", "celery@w", uuid="m2", exception="E()"))
    events.append(celery_event("task-sent", "client@a", uuid="other", name="proj.add"))
    group, members = fold_group("g", log_rows(events))
    assert group["size"] == 3 and group["chord_id"] == "cb"
    assert group["states"] == {"PENDING": 1, "SUCCESS": 1, "FAILURE": 1}
    assert [m["task_id"] for m in members] == ["m0", "m1", "m2"]
    assert fold_group("nope", log_rows(events)) == (None, [])
