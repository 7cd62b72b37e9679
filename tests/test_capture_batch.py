"""The batcher: batches bounded by size, bytes and latency; order and backpressure."""

from __future__ import annotations

import asyncio
import time

from ledger.capture.batch import Batcher
from ledger.log.recorder import Rejected


def _add(batcher: Batcher, n: int = 1, nbytes: int = 10, ack=None) -> None:
    for _ in range(n):
        batcher.current.rejects.append(Rejected("test", None, "r", b"x"))
    batcher.added(nbytes, ack)


async def test_sealed_at_size_and_at_bytes_in_order():
    batcher = Batcher(size=3, max_wait=60.0, max_bytes=100)
    stop = asyncio.Event()
    _add(batcher, 2)
    _add(batcher, 2)  # 4 >= 3: sealed; a message is never split across batches
    _add(batcher, 1, nbytes=150)  # over max_bytes: sealed alone
    first = await asyncio.wait_for(batcher.next_batch(stop), 1)
    second = await asyncio.wait_for(batcher.next_batch(stop), 1)
    assert (len(first), len(second)) == (4, 1)
    assert second.nbytes == 150


async def test_an_open_batch_waits_at_most_max_wait():
    batcher = Batcher(size=1000, max_wait=0.05)
    stop = asyncio.Event()
    _add(batcher, 1)
    start = time.monotonic()
    batch = await asyncio.wait_for(batcher.next_batch(stop), 2)
    waited = time.monotonic() - start
    assert len(batch) == 1
    assert 0.04 <= waited < 0.5


async def test_stop_flushes_the_open_batch_then_ends():
    batcher = Batcher(size=1000, max_wait=60.0)
    stop = asyncio.Event()
    _add(batcher, 2, ack="token")
    stop.set()
    batch = await asyncio.wait_for(batcher.next_batch(stop), 1)
    assert len(batch) == 2 and batch.ack == "token"
    assert await asyncio.wait_for(batcher.next_batch(stop), 1) is None


async def test_backpressure_when_the_writer_falls_behind():
    batcher = Batcher(size=1, max_wait=60.0, max_sealed=2)
    stop = asyncio.Event()
    _add(batcher)
    _add(batcher)  # two sealed batches: no room
    waiter = asyncio.create_task(batcher.room())
    await asyncio.sleep(0)
    assert not waiter.done()
    await batcher.next_batch(stop)  # the writer takes one
    await asyncio.wait_for(waiter, 1)


async def test_next_batch_wakes_when_the_first_message_arrives():
    batcher = Batcher(size=2, max_wait=60.0)
    stop = asyncio.Event()
    getter = asyncio.create_task(batcher.next_batch(stop))
    for _ in range(5):
        await asyncio.sleep(0)  # let it run until it parks
    assert not getter.done()
    _add(batcher, 2)  # full: sealed at once
    assert len(await asyncio.wait_for(getter, 1)) == 2
