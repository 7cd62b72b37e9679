"""Broker message -> events to append, or rejects to quarantine.

The payload is stored as sent: never through ``event_from_message`` (which localises
timestamps and rewrites ``task-sent`` clocks). A worker's ``task.multi`` message carries a
*list* of events; each element is validated on its own, so a mixed list lands its good
events and quarantines the bad ones.

Idempotency: an event's key is a hash of the element as stored (orjson's serialisation of
the element as parsed, after redaction). The same message delivered twice parses to the same
element and so to the same key, and the log skips it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from collections.abc import Iterable
from hashlib import blake2b

import orjson

from ledger.capture.redact import Redactor
from ledger.log.recorder import Event, Rejected

log = logging.getLogger(__name__)
_MAX_CLOCK = 2**63 - 1
_NUMBER = (int, float)
# Optional fields Celery sends, with the types it sends them as; present -> must match.
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "utcoffset": _NUMBER,
    "pid": (int,),
    "freq": _NUMBER,
    "active": (int,),
    "processed": (int,),
    "retries": (int,),
    "name": (str, type(None)),
    "root_id": (str, type(None)),
    "parent_id": (str, type(None)),
    "runtime": (int, float, type(None)),
}
_JSON_TYPES = {None, "", "application/json", "json"}


_NAMES = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null", int: "integer", float: "number"}


def _typename(value: object) -> str:
    """JSON name of a value's type (or of a type)."""
    kind = value if isinstance(value, type) else type(value)
    return _NAMES.get(kind, kind.__name__)


def check(event: object) -> str | None:
    """Why this element is not a storable Celery event, or None if it is."""
    if not isinstance(event, dict):
        return f"not a JSON object (got {_typename(event)})"
    etype = event.get("type")
    if etype is None:
        return "missing field 'type'"
    if not isinstance(etype, str) or not etype:
        return f"field 'type' must be a non-empty string, got {_typename(etype)}"
    hostname = event.get("hostname")
    if not isinstance(hostname, str):
        return "missing field 'hostname'" if hostname is None else f"field 'hostname' must be a string, got {_typename(hostname)}"
    ts = event.get("timestamp")
    if type(ts) not in _NUMBER or not math.isfinite(ts):
        return "missing field 'timestamp'" if ts is None else f"field 'timestamp' must be a finite number, got {_typename(ts)}"
    clock = event.get("clock")
    if type(clock) is not int or not 0 <= clock <= _MAX_CLOCK:
        return "missing field 'clock'" if clock is None else f"field 'clock' must be a non-negative 64-bit integer, got {clock!r:.40}"
    if etype.startswith("task-"):
        uuid = event.get("uuid")
        if not isinstance(uuid, str) or not uuid:
            return "task event without field 'uuid'" if uuid is None else f"field 'uuid' must be a non-empty string, got {_typename(uuid)}"
    for field, types in _OPTIONAL.items():
        if field in event and type(event[field]) not in types:
            expected = "/".join(_typename(t) for t in types)
            return f"field {field!r} must be {expected}, got {_typename(event[field])}"
    return None


_INF = math.inf
_OPTIONAL_ITEMS = tuple(_OPTIONAL.items())
_MISSING = object()


def _looks_valid(event: object) -> bool:
    """The fast path of ``check`` for well-formed events (the vast majority): same rules,
    fewer calls. Anything it does not accept goes through ``check`` for the reason."""
    if type(event) is not dict:
        return False
    get = event.get
    etype, hostname, ts, clock = get("type"), get("hostname"), get("timestamp"), get("clock")
    if type(etype) is not str or not etype or type(hostname) is not str:
        return False
    tt = type(ts)
    if (tt is not float and tt is not int) or not -_INF < ts < _INF:
        return False
    if type(clock) is not int or clock < 0 or clock > _MAX_CLOCK:
        return False
    if etype.startswith("task-"):
        uuid = get("uuid")
        if type(uuid) is not str or not uuid:
            return False
    for field, types in _OPTIONAL_ITEMS:
        value = get(field, _MISSING)
        if value is not _MISSING and type(value) not in types:
            return False
    return True


class _NonFinite(str):
    """NaN/Infinity as parsed by the stdlib fallback: JSON (and jsonb) cannot store them."""


def _loads(body: bytes) -> object:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        # Celery's stdlib json may send NaN/Infinity; parse them as markers so that one such
        # element is quarantined and the rest of its list still lands.
        return json.loads(body, parse_constant=_NonFinite)


def _dumps(event: object) -> bytes | None:
    try:
        return orjson.dumps(event, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
    except TypeError:  # orjson.JSONEncodeError: a NaN/Infinity marker
        return None


def _raw(event: object, message: bytes) -> bytes:
    """Bytes to quarantine for one element: the element re-encoded, else the whole message."""
    try:
        return _dumps(event) or json.dumps(event, default=repr).encode()
    except (ValueError, TypeError, RecursionError):
        return message


def _clean(text: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL; routing keys and reasons are ours to make storable.
    return text.replace("\x00", "\\x00") if text and "\x00" in text else text


class Decoder:
    """Turns message bodies into ``Event``/``Rejected`` rows, appending to caller's lists."""

    def __init__(self, source: str, *, max_event_bytes: int = 1_048_576, redact_fields: Iterable[str] = ()) -> None:
        self.source = source
        self.max_event_bytes = max_event_bytes
        self.redactor = Redactor(redact_fields)
        self._redact = bool(self.redactor)

    def reject(self, rejects: list[Rejected], routing_key: str | None, reason: str, raw: bytes) -> None:
        rejects.append(Rejected(self.source, _clean(routing_key), _clean(reason), raw))

    def body(
        self,
        body: bytes,
        routing_key: str | None,
        events: list[Event],
        rejects: list[Rejected],
        content_type: str | None = None,
    ) -> None:
        """Decode one message body (a JSON event or a JSON list of events)."""
        n_events, n_rejects = len(events), len(rejects)
        try:
            self._body(body, routing_key, events, rejects, content_type)
        except Exception as exc:  # noqa: BLE001 - never die on bad input
            self._failed(exc, body, routing_key, events, rejects, n_events, n_rejects)

    def redis_message(self, data: bytes, channel: bytes, events: list[Event], rejects: list[Rejected]) -> None:
        """Decode a kombu Redis fan-out envelope: JSON with a (usually base64) ``body``."""
        n_events, n_rejects = len(events), len(rejects)
        try:
            self._redis_message(data, channel, events, rejects)
        except Exception as exc:  # noqa: BLE001 - never die on bad input
            rk = channel.rpartition(b"/")[2].decode("utf-8", "replace") or None
            self._failed(exc, data, rk, events, rejects, n_events, n_rejects)

    def _failed(self, exc: Exception, raw: bytes, routing_key: str | None, events: list[Event],
                rejects: list[Rejected], n_events: int, n_rejects: int) -> None:
        # A decoder bug must not stop capture nor half-store a message: drop what this
        # message added and quarantine it whole, raw.
        log.exception("capture: decoding a message failed; quarantining it")
        del events[n_events:], rejects[n_rejects:]
        self.reject(rejects, routing_key, f"capture failed to decode it: {type(exc).__name__}: {exc}", raw)

    def _body(
        self,
        body: bytes,
        routing_key: str | None,
        events: list[Event],
        rejects: list[Rejected],
        content_type: str | None = None,
    ) -> None:
        """Decode one message body (a JSON event or a JSON list of events)."""
        if content_type not in _JSON_TYPES:
            self.reject(rejects, routing_key, f"unsupported content-type {content_type!r}: capture accepts JSON events", body)
            return
        if len(body) > self.max_event_bytes * 64:
            # Too big to be even a batch of events; do not spend time parsing it.
            self.reject(rejects, routing_key, f"message of {len(body)} bytes exceeds the size limit", body)
            return
        try:
            parsed = _loads(body)
        except (ValueError, RecursionError) as exc:
            self.reject(rejects, routing_key, f"not JSON: {exc}", body)
            return
        if isinstance(parsed, list):
            if not parsed:
                self.reject(rejects, routing_key, "empty list of events", body)
            for index, element in enumerate(parsed):
                self._element(element, routing_key, events, rejects, f"element {index} of the list: ", body)
        else:
            self._element(parsed, routing_key, events, rejects, "", body, body)

    def _element(
        self,
        event: object,
        routing_key: str | None,
        events: list[Event],
        rejects: list[Rejected],
        where: str,
        message: bytes,
        raw: bytes | None = None,
    ) -> None:
        """One event: ``raw`` is its exact bytes when it was the whole message."""
        reason = None if _looks_valid(event) else check(event)
        if reason is not None:
            if self.redactor and isinstance(event, dict):
                raw = None  # quarantine keeps secrets out too: store the redacted element
                event = self.redactor.event(event)
            self.reject(rejects, routing_key, where + reason, raw if raw is not None else _raw(event, message))
            return
        if self._redact:
            event = self.redactor.event(event)  # type: ignore[arg-type]
        try:
            payload = orjson.dumps(event, option=orjson.OPT_PASSTHROUGH_SUBCLASS)
        except orjson.JSONEncodeError as exc:  # a NaN/Infinity marker, or nesting too deep
            why = "contains NaN or Infinity, which JSON cannot store" if "_NonFinite" in str(exc) else f"cannot be stored as JSON: {exc}"
            self.reject(rejects, routing_key, where + why, raw or _raw(event, message))
            return
        if len(payload) > self.max_event_bytes:
            self.reject(
                rejects, routing_key, f"{where}event of {len(payload)} bytes exceeds capture_max_event_bytes={self.max_event_bytes}", payload
            )
            return
        if b"\\u0000" in payload:
            self.reject(rejects, routing_key, f"{where}contains a NUL character, which PostgreSQL jsonb cannot store", payload)
            return
        etype = event["type"]  # type: ignore[index]
        uuid = event.get("uuid")  # type: ignore[union-attr]
        events.append(
            Event(
                blake2b(payload, digest_size=16).digest(),
                etype,
                uuid if isinstance(uuid, str) else None,
                event["hostname"],  # type: ignore[index]
                float(event["timestamp"]),  # type: ignore[index]
                event["clock"],  # type: ignore[index]
                routing_key,
                payload.decode(),
            )
        )

    def _redis_message(self, data: bytes, channel: bytes, events: list[Event], rejects: list[Rejected]) -> None:
        """Decode a kombu Redis fan-out envelope: JSON with a (usually base64) ``body``."""
        fallback_rk = _clean(channel.rpartition(b"/")[2].decode("utf-8", "replace")) or None
        try:
            envelope = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            self.reject(rejects, fallback_rk, f"kombu envelope is not JSON: {exc}", data)
            return
        if not isinstance(envelope, dict) or "body" not in envelope:
            self.reject(rejects, fallback_rk, "kombu envelope is not an object with a 'body'", data)
            return
        props = envelope.get("properties")
        props = props if isinstance(props, dict) else {}
        info = props.get("delivery_info")
        routing_key = info.get("routing_key") if isinstance(info, dict) else None
        routing_key = _clean(routing_key) if isinstance(routing_key, str) else fallback_rk
        body = envelope["body"]
        if not isinstance(body, str):
            self.reject(rejects, routing_key, "kombu envelope 'body' is not a string", data)
            return
        if props.get("body_encoding") == "base64":
            try:
                raw = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError) as exc:
                self.reject(rejects, routing_key, f"body is not valid base64: {exc}", data)
                return
        else:
            raw = body.encode()
        content_type = envelope.get("content-type")
        self._body(raw, routing_key, events, rejects, content_type if isinstance(content_type, str) or content_type is None else repr(content_type))
