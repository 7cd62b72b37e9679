"""Waiting for progress made elsewhere (another process, thread or task) that offers nothing
to await: poll a condition against a deadline, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
                     interval: float = 0.02) -> Any:
    """Poll ``condition`` (plain or async) until it returns something truthy; return that.
    Raises TimeoutError naming ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)
