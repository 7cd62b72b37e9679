"""Opt-in integration for your Celery app: group, group index and chord in the events.

Celery's events never say which group a task belongs to, where it sits in the group, or
which chord callback it feeds; the task message headers do. ``instrument(app)`` copies that
into the event stream so the ledger can show groups and chords::

    from celery import Celery
    from ledger.celery import instrument

    app = Celery("proj", broker="redis://localhost:6379/0")
    instrument(app)  # before the worker starts and before the client sends tasks

What it turns on and adds (in the client and in the worker, both run your app module):

- ``task_send_sent_event = True`` and ``worker_send_task_events = True`` (``-E``), so every
  ``task-sent``, ``task-received`` ... ``task-succeeded`` is published.
- ``task-sent`` (client side, also retries and chain/chord steps sent from a worker) carries
  ``group_id``, ``group_index`` and ``chord_id`` when the task has them.
- Every task event a worker sends through its request (started, succeeded, failed, retried,
  rejected, revoked, cancelled) carries the same fields when the task has them.
- When a worker receives a task that is in a group or feeds a chord, it sends one
  ``ledger-task-meta`` event: ``uuid``, ``group_id``, ``group_index``, ``chord_id``,
  ``parent_id``, ``root_id``. It is sent whether or not the worker runs with ``-E`` (the
  dispatcher's group filter is widened to the ``ledger`` group) and batched like task events
  (routing key ``ledger.multi``, a list body). Its group is ``ledger``, which
  ``celery.events.state.State`` and Flower ignore, so their task states are undisturbed.

``chord_id`` is the task id of the chord callback a chord header task feeds (for a chain
callback, its last task: the id of the chord's ``AsyncResult``). Celery itself gives the chord
callback the header's group id and no group index, so a task with ``group_id`` and
``group_index`` None is a chord callback, not a member. Tasks outside groups and chords get no
extra fields and no extra events. Calling ``instrument`` twice is
harmless. A task class with its own ``Request`` keeps it: ``celery worker`` subclasses it at
start-up (its ``send_event`` still runs).
"""

from __future__ import annotations

import functools
import itertools
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import celery
from celery import signals
from celery.utils.imports import symbol_by_name

__all__ = ["META_EVENT", "LedgerRequestMixin", "instrument", "is_instrumented", "signature_id", "task_membership"]

#: Type of the event a worker sends on receiving a task that is in a group or chord.
META_EVENT = "ledger-task-meta"
META_GROUP = "ledger"

_instrumented: weakref.WeakSet[celery.Celery] = weakref.WeakSet()
# Signal receivers are told apart by dispatch_uid; id(app) could be reused after an app is gone.
_uids = itertools.count(1)


def instrument(app: celery.Celery) -> celery.Celery:
    """Turn on task and sent events and add group/chord membership to them. Idempotent."""
    if app in _instrumented:
        return app
    app.conf.task_send_sent_event = True
    app.conf.worker_send_task_events = True
    _annotate_sent_events(app)
    _annotate_worker_events(app)
    uid = next(_uids)
    signals.celeryd_after_setup.connect(
        functools.partial(_on_worker_setup, weakref.ref(app)),
        weak=False,
        dispatch_uid=f"ledger.celery.request.{uid}",
    )
    signals.task_received.connect(
        functools.partial(_on_task_received, weakref.ref(app)),
        weak=False,
        dispatch_uid=f"ledger.celery.meta.{uid}",
    )
    # The receivers hold only a weak reference to the app; drop them when the app goes.
    weakref.finalize(app, signals.celeryd_after_setup.disconnect, dispatch_uid=f"ledger.celery.request.{uid}")
    weakref.finalize(app, signals.task_received.disconnect, dispatch_uid=f"ledger.celery.meta.{uid}")
    _instrumented.add(app)
    return app


def is_instrumented(app: celery.Celery) -> bool:
    return app in _instrumented


def signature_id(sig: Any) -> str | None:
    """The task id a (serialised) signature will run as; for a chain, its last task's."""
    if not isinstance(sig, Mapping):
        return None
    options = sig.get("options") or {}
    if options.get("task_id"):
        return options["task_id"]
    tasks = (sig.get("kwargs") or {}).get("tasks") or sig.get("tasks")
    if sig.get("subtask_type") == "chain" and tasks:
        return signature_id(tasks[-1])
    return None


def task_membership(group_id: Any, group_index: Any, chord: Any) -> dict[str, Any]:
    """The fields instrument adds to an event; empty for a task outside groups and chords."""
    fields: dict[str, Any] = {}
    if group_id is not None:
        fields["group_id"] = group_id
    if group_index is not None:
        fields["group_index"] = group_index
    chord_id = signature_id(chord)
    if chord_id is not None:
        fields["chord_id"] = chord_id
    return fields


# -- client side: task-sent -------------------------------------------------------------


def _message_membership(message: Any) -> dict[str, Any]:
    body = message.body
    if isinstance(body, tuple):  # protocol 2: group in the headers, chord in the embed
        headers = message.headers
        embed = body[2] if len(body) > 2 and isinstance(body[2], Mapping) else {}
        return task_membership(headers.get("group"), headers.get("group_index"), embed.get("chord"))
    if isinstance(body, Mapping):  # protocol 1: everything in the body
        return task_membership(body.get("group"), body.get("group_index"), body.get("chord"))
    return {}


def _wrap_message_factory(create: Callable[..., Any]) -> Callable[..., Any]:
    if getattr(create, "_ledger_wrapped", False):
        return create

    @functools.wraps(create)
    def create_task_message(*args: Any, **kwargs: Any) -> Any:
        message = create(*args, **kwargs)
        if message.sent_event is not None:
            message.sent_event.update(_message_membership(message))
        return message

    create_task_message._ledger_wrapped = True  # type: ignore[attr-defined]
    return create_task_message


def _annotate_sent_events(app: celery.Celery) -> None:
    amqp = app.amqp
    for protocol, create in list(amqp.task_protocols.items()):
        amqp.task_protocols[protocol] = _wrap_message_factory(create)
    # create_task_message is a cached_property over task_protocols: drop a cached one.
    amqp.__dict__.pop("create_task_message", None)


# -- worker side: events sent through the Request ---------------------------------------


class LedgerRequestMixin:
    """Adds group/chord membership to every event the worker sends through a request."""

    _ledger_fields: dict[str, Any] | None = None

    def ledger_membership(self) -> dict[str, Any]:
        fields = self._ledger_fields
        if fields is None:
            group = self.group  # type: ignore[attr-defined]
            # Only group members can feed a chord (the header is a group): skip decoding
            # the body for every other task.
            chord = self.chord if group is not None else None  # type: ignore[attr-defined]
            fields = self._ledger_fields = task_membership(group, self.group_index, chord)  # type: ignore[attr-defined]
        return fields

    def send_event(self, type: str, **fields: Any) -> None:
        membership = self.ledger_membership()
        if membership:
            fields = {**membership, **fields}
        super().send_event(type, **fields)  # type: ignore[misc]


@functools.lru_cache(maxsize=None)
def _request_class(base: type) -> type:
    if issubclass(base, LedgerRequestMixin):
        return base
    return type(f"Ledger{base.__name__}", (LedgerRequestMixin, base), {"__module__": __name__})


def _annotate_worker_events(app: celery.Celery) -> None:
    # Tasks defined with @app.task derive from app.Task, so its Request reaches them unless
    # a task class sets its own; the worker resolves task.Request when its consumer starts.
    task_cls = app.Task
    task_cls.Request = _request_class(symbol_by_name(task_cls.Request))


def _on_worker_setup(app_ref: weakref.ref, sender: Any = None, instance: Any = None, **_: Any) -> None:
    """`celery worker` is set up, its consumer not yet started: give every registered task
    (custom bases and custom Request classes too) the annotating Request."""
    app = app_ref()
    if app is None or getattr(instance, "app", None) is not app:
        return
    for task in app.tasks.values():
        request_cls = _request_class(symbol_by_name(task.Request))
        if task.Request is not request_cls:
            task.Request = request_cls


# -- worker side: ledger-task-meta at receipt -------------------------------------------


def _widen(dispatcher: Any) -> None:
    """Let ledger-task-meta through the -E filter, and batch it where task events are."""
    groups = dispatcher.groups
    if groups and META_GROUP not in groups:
        groups.add(META_GROUP)
    buffered = dispatcher.buffer_group
    if "task" in buffered and META_GROUP not in buffered:
        dispatcher.buffer_group = frozenset(buffered) | {META_GROUP}


def _on_task_received(app_ref: weakref.ref, sender: Any = None, request: Any = None, **_: Any) -> None:
    app = app_ref()
    consumer = sender
    if app is None or request is None or getattr(consumer, "app", None) is not app:
        return
    if request.group is None:
        return
    dispatcher = getattr(consumer, "event_dispatcher", None)
    if dispatcher is None or not dispatcher.enabled:
        return
    _widen(dispatcher)
    chord = request.chord
    dispatcher.send(
        META_EVENT,
        uuid=request.id,
        group_id=request.group,
        group_index=request.group_index,
        chord_id=signature_id(chord),
        parent_id=request.parent_id,
        root_id=request.root_id,
    )
