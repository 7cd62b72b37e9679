"""Backpressure: a client that stops reading is cut off with where to resume (and can resume
from there without a gap), while a fast client on the same replica keeps receiving every
change promptly."""

from __future__ import annotations

import secrets
import socket
import statistics
import time
import uuid
from urllib.parse import urlsplit

import asyncpg
import orjson
import websockets

from tests.support.api import running_api
from tests.support.stream import StreamClient, lifecycle, project, record, ws_url

QUEUE = 50
BIG_BYTES = 12000  # big, incompressible rows (permessage-deflate is on) fill socket buffers sooner
TASKS_PER_ROUND = 20


async def _slow_client(api) -> websockets.ClientConnection:
    """A real client with a tiny receive buffer that will not read until told."""
    host, port = urlsplit(api.url).hostname, urlsplit(api.url).port
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.setblocking(False)
    return await websockets.connect(ws_url(api), sock=sock, max_queue=1,
                                    additional_headers={"Authorization": f"Bearer {api.tokens['read']}"})


def _overflowed(api) -> bool:
    return any(s.closing and s.closing[0] == 4429 for s in api.app.state.stream_hub.sessions)


async def test_a_client_that_stops_reading_is_cut_off_and_others_are_not_delayed(
    database_url: str, conn: asyncpg.Connection
) -> None:
    async with running_api(database_url, stream_queue_size=QUEUE, stream_heartbeat=30.0) as api:
        async with StreamClient.connect(api, name="fast") as fast:
            await fast.subscribe("all", "tasks", limit=0)
            await fast.live("all")

            async def round_() -> float:
                """Move 20 tasks one step; seconds from projecting it to the fast client having it."""
                nonlocal ids, step
                if step == 0:
                    ids = [str(uuid.uuid4()) for _ in range(TASKS_PER_ROUND)]
                last = await record(conn, [lifecycle(t, args=secrets.token_urlsafe(BIG_BYTES))[step] for t in ids])
                step = (step + 1) % 4
                started = time.perf_counter()
                await project(database_url)
                await fast.wait_for(lambda m: m["type"] == "changes" and m["seq"] >= last, timeout=10)
                return time.perf_counter() - started

            ids: list[str] = []
            step = 0
            baseline = [await round_() for _ in range(8)]

            slow = await _slow_client(api)
            await slow.send(orjson.dumps({"type": "subscribe", "sub": "all", "topic": "tasks", "limit": 0}).decode())
            # the slow client reads nothing from here on
            stuck: list[float] = []
            rounds = 0
            while not _overflowed(api):
                stuck.append(await round_())
                rounds += 1
                assert rounds < 400, "the slow client was never cut off"
            for _ in range(4):  # and the fast one carries on after the cut
                stuck.append(await round_())

            # now the slow client reads what reached it: its data, then where to resume, then the close
            received = []
            try:
                async for frame in slow:
                    received.append(orjson.loads(frame))
            except websockets.ConnectionClosed:
                pass
            assert slow.close_code == 4429, (slow.close_code, slow.close_reason)
            overflow = received[-1]
            assert overflow["type"] == "overflow", received[-3:]
            seen = [c for m in received if m["type"] == "changes" for c in m["changes"]]
            seen_items = [(m["seq"], c["key"]) for m in received if m["type"] == "changes" for c in m["changes"]]
            resume = overflow["subs"]["all"]
            assert overflow["resume_from"] == resume
            assert seen and seen_items[-1][0] <= resume < fast.last_seq("all")

            # resuming from there gives exactly the rest
            async with StreamClient.connect(api, name="resumed") as again:
                await again.subscribe("all", "tasks", since=resume)
                await again.live("all")
                await fast.send({"type": "ping", "id": "end"})
                await fast.wait_for(lambda m: m["type"] == "pong" and m.get("id") == "end")
                rest = [(seq, key) for seq, _, key, _ in again.changes("all")]
            everything = [(seq, key) for seq, _, key, _ in fast.changes("all")]
            [snapshot] = [m for m in received if m["type"] == "snapshot"]
            since_slow = [x for x in everything if x[0] > snapshot["seq"]]
            assert seen_items + [x for x in rest if x[0] <= everything[-1][0]] == since_slow
            assert len(seen) < len(everything)

    # the fast client got the whole change feed, in order...
    feed = await conn.fetch("SELECT seq, key FROM ledger.changes WHERE kind = 'task' ORDER BY seq, key")
    assert sorted(everything) == [(r["seq"], r["key"]) for r in feed]
    assert [s for s, _ in everything] == sorted(s for s, _ in everything)
    # ...and promptly, while the slow one was stuck and after it was cut
    assert max(stuck) < 2.0, stuck
    assert statistics.median(stuck) < max(0.1, 3 * statistics.median(baseline)), (baseline, stuck)
