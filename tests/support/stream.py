"""Websocket clients, replicas and an in-process projector for the stream tests.

    async with running_api(database_url, stream_heartbeat=1.0) as api:   # a real uvicorn replica
        async with StreamClient.connect(api) as client:                   # real `websockets` client
            await client.subscribe("t", "task", task_id=tid)
            await client.wait_for(lambda m: m["type"] == "live" and m["sub"] == "t")

Changes are produced for real: events appended with the recorder (or published by a real
worker and captured) and folded by the projector, running in-process (`running_projector`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets

from ledger import db
from ledger.config import Settings
from ledger.projections.projector import Projector
from tests.support.api import ApiServer
from tests.support.events import celery_event, project, record, task_events  # noqa: F401 - re-exported
from tests.support.waiting import wait_until

DEADLINE = 20.0


def ws_url(api: ApiServer) -> str:
    return api.url.replace("http://", "ws://") + "/v1/stream"


@dataclass
class StreamClient:
    """A websocket client that reads everything in the background into `messages`."""

    ws: Any
    name: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    _arrived: asyncio.Condition = field(default_factory=asyncio.Condition)
    _reader: asyncio.Task | None = None
    answer_pings: bool = True

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, api: ApiServer, scope: str | None = "read", *, token: str | None = None,
                      header: bool = True, name: str = "", read: bool = True, **kw: Any) -> AsyncIterator[StreamClient]:
        token = token if token is not None else (api.tokens[scope] if scope else None)
        headers = {"Authorization": f"Bearer {token}"} if token and header else None
        async with websockets.connect(ws_url(api), additional_headers=headers, open_timeout=10, **kw) as ws:
            client = cls(ws, name)
            if token and not header:
                await client.send({"type": "auth", "token": token})
            if read:
                client._reader = asyncio.create_task(client._read())
            try:
                yield client
            finally:
                if client._reader is not None:
                    client._reader.cancel()
                    await asyncio.gather(client._reader, return_exceptions=True)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                message = orjson.loads(frame)
                if message.get("type") == "ping" and self.answer_pings:
                    await self.send({"type": "pong"})
                async with self._arrived:
                    self.messages.append(message)
                    self._arrived.notify_all()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed.set()
            async with self._arrived:
                self._arrived.notify_all()

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(message if isinstance(message, (str, bytes)) else orjson.dumps(message).decode())

    async def subscribe(self, sub: str, topic: str, since: int | None = None, **fields: Any) -> None:
        message = {"type": "subscribe", "sub": sub, "topic": topic, **fields}
        if since is not None:
            message["since"] = since
        await self.send(message)

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = DEADLINE,
                       start: int = 0) -> dict[str, Any]:
        """The first message (from index `start`) satisfying `predicate`, waiting for it."""
        async def find() -> dict[str, Any]:
            async with self._arrived:
                i = start
                while True:
                    for message in self.messages[i:]:
                        if predicate(message):
                            return message
                    i = len(self.messages)
                    if self.closed.is_set():
                        raise AssertionError(f"{self.name}: socket closed ({self.ws.close_code}) before a match;"
                                             f" last messages {self.messages[-3:]}")
                    await self._arrived.wait()
        return await asyncio.wait_for(find(), timeout)

    async def live(self, sub: str, timeout: float = DEADLINE) -> dict[str, Any]:
        return await self.wait_for(lambda m: m.get("type") == "live" and m.get("sub") == sub, timeout)

    def of(self, sub: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m.get("sub") == sub]

    def changes(self, sub: str) -> list[tuple[int, str, str, str | None]]:
        """(seq, kind, key, state) of every change pushed for `sub`, in order received."""
        out = []
        for m in self.of(sub):
            if m["type"] == "changes":
                out.extend((m["seq"], c["kind"], c["key"], c["data"].get("state")) for c in m["changes"])
        return out

    def last_seq(self, sub: str) -> int | None:
        """The position to resume `sub` from: the seq of its last snapshot, changes or live message."""
        seqs = [m["seq"] for m in self.of(sub) if m["type"] in ("snapshot", "changes", "event", "live")]
        return seqs[-1] if seqs else None


async def recv_json(ws: Any, timeout: float = DEADLINE) -> dict[str, Any]:
    return orjson.loads(await asyncio.wait_for(ws.recv(), timeout))


@contextlib.asynccontextmanager
async def running_projector(database_url: str, **settings: Any) -> AsyncIterator[Projector]:
    """The real projector service (`ledger projector`) as a task on this loop: wakes on the
    recorder's NOTIFY, polls every second, writes rows + ledger.changes + NOTIFY."""
    projector = Projector(Settings(database_url=database_url, **settings))
    stop = asyncio.Event()
    task = asyncio.create_task(projector.run(stop))
    try:
        await asyncio.wait_for(projector.leading.wait(), DEADLINE)
        yield projector
    finally:
        stop.set()
        await asyncio.wait_for(task, DEADLINE)


async def settle(apis: list[ApiServer], database_url: str, upto: int | None = None) -> int:
    """Wait until the projector has applied the log up to ``upto`` (default: its end now) and
    every replica's hub has dispatched the end of the change feed; return that position."""
    conn = await db.connect(database_url)
    try:
        if upto is None:
            upto = await conn.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.events")

        async def projected() -> bool:
            return await conn.fetchval("SELECT coalesce(min(seq), 0) FROM ledger.checkpoints") >= upto

        await wait_until(projected, DEADLINE, f"the projector to apply the log up to {upto}")
    finally:
        await conn.close()
    end = await changes_position(database_url)
    for api in apis:
        hub = api.app.state.stream_hub
        await wait_until(lambda: hub.position() >= end, DEADLINE, f"a replica's hub to reach {end}")
    return end


async def changes_position(database_url: str) -> int:
    conn = await db.connect(database_url)
    try:
        return await conn.fetchval("SELECT coalesce(max(seq), 0) FROM ledger.changes")
    finally:
        await conn.close()


# --- real-format Celery events ----------------------------------------------------------


def lifecycle(task_id: str, *, name: str = "tests.add", worker: str = "celery@a",
              group: tuple[str, int] | None = None, fail: bool = False, args: str = "(2, 2)") -> list[dict[str, Any]]:
    """One task's events as a worker sends them (instrumented: group membership on each)."""
    events = task_events(task_id, name=name, hostname=worker)
    events[0]["args"] = events[1]["args"] = args
    if fail:
        events[-1] = celery_event("task-failed", worker, uuid=task_id, exception="ValueError('boom')",
                                  traceback="Traceback (most recent call last):\nValueError: boom")
    if group is not None:
        for event in events:
            event["group_id"], event["group_index"] = group
    return events


def worker_online(hostname: str = "celery@a") -> dict[str, Any]:
    return celery_event("worker-online", hostname, freq=2.0, sw_ident="py-celery", sw_ver="5.7.0",
                        sw_sys="Linux", active=0, processed=0, loadavg=[0.1, 0.2, 0.3])


def worker_heartbeat(hostname: str = "celery@a", processed: int = 1) -> dict[str, Any]:
    return celery_event("worker-heartbeat", hostname, freq=2.0, sw_ident="py-celery", sw_ver="5.7.0",
                        sw_sys="Linux", active=0, processed=processed, loadavg=[0.1, 0.2, 0.3])


