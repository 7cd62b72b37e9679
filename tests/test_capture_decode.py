"""The decoder: broker message bytes -> events to append and rejects to quarantine."""

from __future__ import annotations

import base64
import json

import orjson
import pytest

from ledger.capture.decode import Decoder, check
from ledger.capture.redact import REDACTED, Redactor
from ledger.log.recorder import Event, Rejected
from tests.support.capture import redis_envelope
from tests.support.events import celery_event, task_events


def decode(body: bytes, routing_key: str = "task.multi", **kw) -> tuple[list[Event], list[Rejected]]:
    events: list[Event] = []
    rejects: list[Rejected] = []
    Decoder("test", **kw).body(body, routing_key, events, rejects)
    return events, rejects


def test_single_event_is_stored_exactly_as_sent():
    sent = celery_event("worker-heartbeat", freq=2.0, active=0, processed=3, loadavg=[0.1, 0.2, 0.3], utcoffset=-5)
    raw = json.dumps(sent).encode()  # Celery serialises with the stdlib json
    (event,), rejects = decode(raw, "worker.heartbeat")
    assert rejects == []
    assert orjson.loads(event.payload_json) == sent
    # no localisation: the sender's timestamp and clock untouched
    assert event.sent_at == sent["timestamp"] and event.clock == sent["clock"]
    assert (event.type, event.hostname, event.task_id, event.routing_key) == (
        "worker-heartbeat", sent["hostname"], None, "worker.heartbeat")


def test_task_multi_list_is_unpacked_in_order():
    batch = task_events() + task_events()
    events, rejects = decode(json.dumps(batch).encode())
    assert rejects == []
    assert [e.type for e in events] == [e["type"] for e in batch]
    assert [e.task_id for e in events] == [e["uuid"] for e in batch]
    assert all(e.routing_key == "task.multi" for e in events)


def test_key_is_stable_across_redelivery_and_distinct_per_event():
    batch = task_events()
    raw = json.dumps(batch).encode()
    first, _ = decode(raw)
    again, _ = decode(raw)
    assert [e.key for e in first] == [e.key for e in again]
    assert len({e.key for e in first}) == len(first)


@pytest.mark.parametrize(
    ("element", "reason"),
    [
        (3, "not a JSON object (got integer)"),
        ([1], "not a JSON object (got array)"),
        ({"hostname": "h", "clock": 1, "timestamp": 1.0}, "missing field 'type'"),
        ({"type": 7, "hostname": "h", "clock": 1, "timestamp": 1.0}, "field 'type' must be a non-empty string"),
        ({"type": "worker-heartbeat", "clock": 1, "timestamp": 1.0}, "missing field 'hostname'"),
        ({"type": "worker-heartbeat", "hostname": ["h"], "clock": 1, "timestamp": 1.0}, "field 'hostname' must be a string"),
        ({"type": "worker-heartbeat", "hostname": "h", "clock": 1, "timestamp": "now"}, "field 'timestamp' must be a finite number"),
        ({"type": "worker-heartbeat", "hostname": "h", "clock": 1.5, "timestamp": 1.0}, "field 'clock' must be a non-negative 64-bit integer"),
        ({"type": "worker-heartbeat", "hostname": "h", "clock": -1, "timestamp": 1.0}, "field 'clock' must be"),
        ({"type": "task-started", "hostname": "h", "clock": 1, "timestamp": 1.0}, "task event without field 'uuid'"),
        ({"type": "task-started", "uuid": 5, "hostname": "h", "clock": 1, "timestamp": 1.0}, "field 'uuid' must be a non-empty string"),
        ({"type": "task-sent", "uuid": "u", "hostname": "h", "clock": 1, "timestamp": 1.0, "retries": "0"}, "field 'retries' must be integer"),
        ({"type": "worker-online", "hostname": "h", "clock": 1, "timestamp": 1.0, "pid": True}, "field 'pid' must be integer"),
    ],
)
def test_invalid_elements_are_rejected_with_a_reason_naming_the_field(element, reason):
    good = celery_event("task-started", uuid="ok")
    events, rejects = decode(orjson.dumps([good, element]))
    assert [e.task_id for e in events] == ["ok"]
    (rejected,) = rejects
    assert rejected.reason.startswith("element 1 of the list: ")
    assert reason in rejected.reason
    assert orjson.loads(rejected.raw) == element
    assert rejected.routing_key == "task.multi" and rejected.source == "test"
    assert check(good) is None


def test_not_json_keeps_the_raw_bytes():
    raw = b"\xff\xfenot json{"
    events, (rejected,) = decode(raw, "worker.heartbeat")
    assert events == []
    assert rejected.raw == raw and rejected.reason.startswith("not JSON")
    assert rejected.routing_key == "worker.heartbeat"


def test_nan_from_stdlib_json_quarantines_only_its_element():
    good = celery_event("task-started", uuid="good")
    nan_runtime = celery_event("task-succeeded", uuid="u", runtime=float("nan"))
    nan_elsewhere = celery_event("task-succeeded", uuid="v", extra=[float("inf")])
    raw = json.dumps([good, nan_runtime, nan_elsewhere]).encode()  # Celery's json writes NaN
    events, rejects = decode(raw)
    assert [e.task_id for e in events] == ["good"]
    assert "field 'runtime' must be" in rejects[0].reason
    assert "NaN or Infinity" in rejects[1].reason and b"Infinity" in rejects[1].raw


def test_empty_list_and_unsupported_content_type_are_rejected():
    assert decode(b"[]")[1][0].reason == "empty list of events"
    events, rejects = [], []
    Decoder("test").body(b"\x80\x04K\x01.", "task.multi", events, rejects, "application/x-python-serialize")
    assert events == [] and "unsupported content-type" in rejects[0].reason and rejects[0].raw == b"\x80\x04K\x01."


def test_oversize_event_and_oversize_message():
    big = celery_event("task-received", uuid="big", args="x" * 5000)
    small = celery_event("task-started", uuid="small")
    events, (rejected,) = decode(orjson.dumps([small, big]), max_event_bytes=4096)
    assert [e.task_id for e in events] == ["small"]
    assert "exceeds capture_max_event_bytes=4096" in rejected.reason
    huge = b"[" + b" " * (4096 * 64) + b"]"
    events, (rejected,) = decode(huge, max_event_bytes=4096)
    assert events == [] and "exceeds the size limit" in rejected.reason and rejected.raw == huge


def test_nul_characters_are_quarantined_not_sent_to_postgres():
    events, (rejected,) = decode(orjson.dumps([celery_event("task-started", uuid="a\x00b")]), "task\x00multi")
    assert events == []
    assert "NUL" in rejected.reason and "\x00" not in rejected.routing_key


def test_redis_envelope_decodes_base64_body_and_routing_key():
    batch = task_events()
    data = redis_envelope(json.dumps(batch).encode(), "task.multi", "celeryev")
    events, rejects = [], []
    Decoder("redis").redis_message(data, b"/0.celeryev/task.multi", events, rejects)
    assert rejects == [] and [orjson.loads(e.payload_json) for e in events] == batch


def test_redis_envelope_garbage():
    events, rejects = [], []
    decoder = Decoder("redis")
    decoder.redis_message(b"garbage", b"/0.celeryev/worker.heartbeat", events, rejects)
    decoder.redis_message(b'{"body": 1}', b"/0.celeryev/x", events, rejects)
    decoder.redis_message(b'{"body": "!!", "properties": {"body_encoding": "base64"}}', b"/0.celeryev/y", events, rejects)
    assert events == []
    assert [r.routing_key for r in rejects] == ["worker.heartbeat", "x", "y"]
    assert "envelope is not JSON" in rejects[0].reason and rejects[0].raw == b"garbage"
    assert "'body' is not a string" in rejects[1].reason
    assert "base64" in rejects[2].reason


def test_redaction_of_saferepr_strings_and_json_values():
    redactor = Redactor(["password", "token"])
    text = "({'user': 'bob', 'password': 'hunter2, with \\'quotes\\''}, [1, {\"token\": [1, (2, 3)]}])"
    out = redactor.text(text)
    assert "hunter2" not in out and "(2, 3)" not in out
    assert out == "({'user': 'bob', 'password': '[redacted]'}, [1, {\"token\": '[redacted]'}])"
    # truncated saferepr (Celery cuts at 1024 chars): the value runs to the end
    assert redactor.text("{'password': 'abcdef") == "{'password': '[redacted]'"
    assert redactor.text("{'passwords': 1, 'a': 2}") == "{'passwords': 1, 'a': 2}"
    value = {"password": "x", "nested": [{"token": 1, "ok": 2}], "ok": "password"}
    assert redactor.value(value) == {"password": REDACTED, "nested": [{"token": REDACTED, "ok": 2}], "ok": "password"}


def test_redacted_events_keep_a_stable_key_and_leave_others_untouched():
    sent = celery_event("task-sent", uuid="u", args="('a',)", kwargs="{'password': 'hunter2', 'n': 1}")
    raw = json.dumps(sent).encode()
    (first,), _ = decode(raw, redact_fields=["password"])
    (again,), _ = decode(raw, redact_fields=["password"])
    assert first.key == again.key
    stored = orjson.loads(first.payload_json)
    assert stored["kwargs"] == "{'password': '[redacted]', 'n': 1}" and "hunter2" not in first.payload_json
    assert {k: v for k, v in stored.items() if k != "kwargs"} == {k: v for k, v in sent.items() if k != "kwargs"}
    other = celery_event("task-started", uuid="u")
    (plain,), _ = decode(orjson.dumps(other), redact_fields=["password"])
    assert orjson.loads(plain.payload_json) == other


def test_rejected_elements_are_redacted_too():
    bad = {"type": "task-sent", "hostname": "h", "clock": 1, "timestamp": 1.0, "kwargs": {"password": "p"}}
    _, (rejected,) = decode(orjson.dumps([bad]), redact_fields=["password"])
    assert b"\"p\"" not in rejected.raw and REDACTED.encode() in rejected.raw


def test_base64_body_roundtrip_matches_kombu_envelope():
    body = json.dumps(celery_event("worker-online")).encode()
    envelope = orjson.loads(redis_envelope(body, "worker.online", "x"))
    assert base64.b64decode(envelope["body"]) == body


def test_a_decoder_failure_quarantines_the_whole_message_instead_of_raising():
    # Real trigger: kwargs nested deeper than Python's recursion limit; orjson parses it
    # (its limit is 1024) but redaction walks it recursively and hits RecursionError.
    deep = "[" * 1020 + "]" * 1020
    ok = json.dumps(celery_event("task-started", uuid="ok"))
    bad = json.dumps(celery_event("task-sent", uuid="deep"))[:-1] + f', "kwargs": {deep}}}'
    raw = f"[{ok}, {bad}]".encode()
    assert orjson.loads(raw)  # valid JSON
    events, (rejected,) = decode(raw, redact_fields=["password"])
    assert events == []  # the good element of a failed message is not half-stored...
    assert rejected.raw == raw and "capture failed to decode it: RecursionError" in rejected.reason
    # Without redaction only the deep element is refused (jsonb nesting has limits too)
    events, (rejected,) = decode(raw)
    assert [e.task_id for e in events] == ["ok"]
    assert rejected.reason.startswith("element 1 of the list: cannot be stored as JSON")
    assert rejected.raw == raw  # it cannot be re-encoded alone: the whole message is kept
