"""Running a long-lived ledger process until SIGINT or SIGTERM asks it to stop."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable
from typing import Any


def run_until_signalled(main: Callable[[asyncio.Event], Awaitable[Any]]) -> None:
    """Run ``main(stop)`` on an event loop (uvloop when installed, as uvicorn would pick);
    SIGINT and SIGTERM set ``stop``, and each process then finishes its work and returns."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    try:
        import uvloop  # comes with uvicorn[standard]
    except ImportError:  # pragma: no cover
        asyncio.run(runner())
    else:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop_runner:
            loop_runner.run(runner())
