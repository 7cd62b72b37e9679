"""ledger.celery.instrument: group, group index and chord membership in Celery's events.

The real-worker tests read the wire with Celery's own EventReceiver (tests.support.worker.
EventCollector), on Redis and on RabbitMQ, with the worker sending task events (-E) and not.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from celery import Celery, chord, group, signals

from ledger.celery import (
    META_EVENT,
    LedgerRequestMixin,
    instrument,
    is_instrumented,
    signature_id,
)
from tests.support.worker import (
    EventCollector,
    make_app,
    running_worker,
    wait_for,
    workload_config,
)


def _meta_receivers() -> int:
    return sum(1 for key, _ in signals.task_received.receivers if str(key[0]).startswith("ledger.celery.meta."))


def _message(app: Celery, **kwargs: Any):
    return app.amqp.create_task_message("task-1", "proj.add", (1, 2), {}, create_sent_event=True, **kwargs)


def test_instrument_turns_on_events_and_is_idempotent() -> None:
    app = Celery("plain", broker="memory://", set_as_current=False)
    assert not app.conf.task_send_sent_event and not app.conf.worker_send_task_events
    original = app.amqp.task_protocols[2]
    receivers = _meta_receivers()

    instrument(app)
    instrument(app)

    assert is_instrumented(app)
    assert app.conf.task_send_sent_event is True
    assert app.conf.worker_send_task_events is True
    # One wrapper around Celery's own message factory, not a wrapper around a wrapper.
    assert app.amqp.task_protocols[2].__wrapped__ == original
    assert [c for c in app.Task.Request.__mro__ if c is LedgerRequestMixin] == [LedgerRequestMixin]
    assert _meta_receivers() == receivers + 1


def test_task_sent_carries_group_index_and_chord() -> None:
    app = instrument(Celery("sent", broker="memory://", set_as_current=False))
    callback = app.signature("proj.tsum", options={"task_id": "callback-1"})

    member = _message(app, group_id="group-1", group_index=2, chord=callback)
    assert member.sent_event["group_id"] == "group-1"
    assert member.sent_event["group_index"] == 2
    assert member.sent_event["chord_id"] == "callback-1"
    assert member.sent_event["uuid"] == "task-1"

    # A task outside groups and chords: Celery's task-sent, untouched.
    plain = _message(app)
    assert not {"group_id", "group_index", "chord_id"} & set(plain.sent_event)
    # No sent event asked for: nothing to annotate, and nothing breaks.
    assert app.amqp.create_task_message("t", "proj.add", (), {}, group_id="g").sent_event is None

    # Protocol 1 keeps the group and chord in the body.
    v1 = app.amqp.task_protocols[1]("task-2", "proj.add", (), {}, group_id="g", group_index=0,
                                    chord=callback, create_sent_event=True)
    assert (v1.sent_event["group_id"], v1.sent_event["group_index"], v1.sent_event["chord_id"]) == ("g", 0, "callback-1")


def test_signature_id_of_a_chain_body_is_its_last_task() -> None:
    app = Celery("sig", broker="memory://", set_as_current=False)
    body = app.signature("a", options={"task_id": "first"}) | app.signature("b", options={"task_id": "last"})
    assert signature_id(dict(body)) == "last"
    assert signature_id(None) is None
    assert signature_id({"task": "x", "options": {}}) is None


def _received(event: dict) -> dict:
    # What EventReceiver adds before State sees an event (raw events lack it).
    return {**event, "local_received": event["timestamp"]}


def _by(events: list[dict], type_: str) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for event in events:
        if event["type"] == type_:
            found.setdefault(event["uuid"], []).append(event)
    return found


@pytest.mark.parametrize("task_events", [True, False], ids=["with-E", "without-E"])
def test_real_worker_sends_group_and_chord_membership(
    broker_url: str, event_exchange: str, redis_url: str, task_events: bool
) -> None:
    # instrument=2: the worker and this client both call instrument(app) twice.
    config = workload_config(broker_url, event_exchange, redis_url, witness=False, instrument=2,
                             task_events=task_events)
    app = make_app(config)
    add, tsum = app.tasks["workload.add"], app.tasks["workload.tsum"]
    custom_add = app.tasks["workload.custom_add"]  # its own base class and Request

    with EventCollector(broker_url, event_exchange) as collector, running_worker(config):
        plain = add.delay(1, 2)
        grouped = group(custom_add.s(i, i) for i in range(3)).apply_async()
        callback = chord(add.s(i, 1) for i in range(2))(tsum.s())
        header = callback.parent
        chained = (add.s(1, 1) | add.s(2)).apply_async()
        assert plain.get(timeout=30) == 3
        assert grouped.get(timeout=30) == [0, 2, 4]
        assert callback.get(timeout=30) == 3
        assert chained.get(timeout=30) == 4

        members = {m.id: (grouped.id, i, None) for i, m in enumerate(grouped.results)}
        members |= {m.id: (header.id, i, callback.id) for i, m in enumerate(header.results)}
        outside = [plain.id, chained.parent.id, chained.id]
        every = [*members, *outside, callback.id]

        def arrived() -> list[dict] | None:
            events = collector.snapshot()
            if task_events:
                done = {e["uuid"] for e in events if e["type"] == "task-succeeded"}
            else:  # no task events: the meta events are what must arrive
                done = {e["uuid"] for e in events if e["type"] == META_EVENT} | set(outside)
            return events if done >= set(every) else None

        events = wait_for(arrived, 20, "the worker's events to reach the receiver")

    sent, meta = _by(events, "task-sent"), _by(events, META_EVENT)
    for task_id, (group_id, index, chord_id) in members.items():
        [s] = sent[task_id]
        assert (s.get("group_id"), s.get("group_index"), s.get("chord_id")) == (group_id, index, chord_id)
        [m] = meta[task_id]  # exactly one, although instrument ran twice
        assert (m["group_id"], m["group_index"], m["chord_id"]) == (group_id, index, chord_id)
        assert m["root_id"] == s["root_id"] and m["parent_id"] == s["parent_id"]
        assert m["hostname"].startswith("workload-")
        worker_events = [e for e in events if e.get("uuid") == task_id and e["type"] in
                         ("task-started", "task-succeeded")]
        assert len(worker_events) == (2 if task_events else 0)
        for e in worker_events:
            assert (e["group_id"], e["group_index"], e.get("chord_id")) == (group_id, index, chord_id)
            # The custom Request still runs under instrument's.
            assert e.get("custom_request", False) is (group_id == grouped.id)

    # Celery gives the chord callback the header's group id (no index); it feeds no chord.
    [callback_meta] = meta[callback.id]
    assert (callback_meta["group_id"], callback_meta["group_index"], callback_meta["chord_id"]) == (header.id, None, None)

    # Tasks outside groups: Celery's events, no extra fields, no extra events.
    for task_id in outside:
        assert task_id not in meta
        own = [e for e in events if e.get("uuid") == task_id]
        assert own and not any({"group_id", "group_index", "chord_id"} & set(e) for e in own)
    assert Counter(e["type"] for e in events if e["type"].startswith("ledger-")) == {META_EVENT: len(members) + 1}

    if task_events:
        # celery.events.state is undisturbed: every task ends SUCCESS, and the meta event,
        # even arriving after task-started, does not mask STARTED (a task-* type would).
        state = app.events.State()
        for event in sorted(events, key=lambda e: e["timestamp"]):
            state.event(_received(event))
        assert {task_id: state.tasks[task_id].state for task_id in every} == {t: "SUCCESS" for t in every}
        member = next(iter(members))
        ordered = app.events.State()
        for type_ in ("task-received", "task-started", META_EVENT):
            ordered.event(_received(next(e for e in events if e["type"] == type_ and e.get("uuid") == member)))
        assert ordered.tasks[member].state == "STARTED"
    app.close()
