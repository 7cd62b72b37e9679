"""Redaction of named arguments in ``args``/``kwargs`` before an event is stored.

Celery sends ``args`` and ``kwargs`` as ``saferepr`` *strings* (``"{'password': 'x'}"``,
possibly cut at 1024 characters), while other senders may send real JSON values. Both are
handled: JSON values are walked, repr strings are scanned for ``'name': value`` pairs and the
value is replaced, however it is nested or truncated. Redaction is a pure function of the
event and the configured names, so a redelivered event is redacted identically and its
idempotency key (a hash of the stored payload) stays the same.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

REDACTED = "[redacted]"
_CLOSERS = {"(": ")", "[": "]", "{": "}"}


class Redactor:
    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(n for n in names if n)
        alternatives = "|".join(re.escape(n) for n in sorted(self.names, key=len, reverse=True))
        # 'name': or "name": followed by the value (found by _value_end).
        self._pattern = re.compile(r"""(['"])(?:%s)\1\s*:\s*""" % alternatives) if self.names else None

    def __bool__(self) -> bool:
        return bool(self.names)

    def event(self, event: dict[str, Any]) -> dict[str, Any]:
        """Return the event with redacted args/kwargs (the same object if nothing changed)."""
        changed = None
        for field in ("args", "kwargs"):
            if field in event:
                value = event[field]
                new = self.value(value)
                if new is not value:
                    changed = changed or dict(event)
                    changed[field] = new
        return changed if changed is not None else event

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            out, changed = {}, False
            for key, item in value.items():
                if key in self.names:
                    out[key], changed = REDACTED, True
                else:
                    new = self.value(item)
                    changed = changed or new is not item
                    out[key] = new
            return out if changed else value
        if isinstance(value, list):
            items = [self.value(item) for item in value]
            return items if any(a is not b for a, b in zip(items, value)) else value
        return value

    def text(self, text: str) -> str:
        """Redact ``'name': value`` pairs inside a Python repr string."""
        if self._pattern is None or not self._pattern.search(text):
            return text
        out: list[str] = []
        pos = 0
        while (match := self._pattern.search(text, pos)) is not None:
            start = match.end()
            end = _value_end(text, start)
            out.append(text[pos:start])
            out.append(repr(REDACTED))
            pos = end
        out.append(text[pos:])
        return "".join(out)


def _value_end(text: str, i: int) -> int:
    """Index just past the repr value starting at ``text[i]`` (or len(text) if truncated)."""
    n = len(text)
    depth: list[str] = []
    while i < n:
        ch = text[i]
        if ch in "'\"":
            i = _string_end(text, i)
            if not depth:
                return i
            continue
        if ch in _CLOSERS:
            depth.append(_CLOSERS[ch])
        elif depth and ch == depth[-1]:
            depth.pop()
            if not depth:
                return i + 1
        elif not depth and ch in ",)]}":
            return i
        i += 1
    return n


def _string_end(text: str, i: int) -> int:
    quote = text[i]
    i += 1
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == quote:
            return i + 1
        i += 1
    return n
