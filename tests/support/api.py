"""A real uvicorn server running the API on a free port, for tests (the stream's too).

    async with running_api(database_url) as api:        # or the `api_server` fixture
        async with api.client("read") as http:          # httpx, with a read-scope token
            r = await http.get("/v1/tasks")

Data goes in as real-format Celery events appended to the log with the recorder, then
folded by the projections (`record_and_project`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest

from ledger import db
from ledger.api.app import create_app
from ledger.api.server import serve
from ledger.api.tokens import create_token
from ledger.config import Settings
from tests.support.events import project, record  # noqa: F401 - re-exported for tests


@dataclass
class ApiServer:
    url: str
    settings: Settings
    app: Any
    tokens: dict[str, str] = field(default_factory=dict)  # scope -> token

    def client(self, scope: str | None = "read", *, token: str | None = None, **kw: Any) -> httpx.AsyncClient:
        """An httpx client for this server; `scope` picks a token (None: no token)."""
        token = token if token is not None else (self.tokens[scope] if scope else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        headers.update(kw.pop("headers", {}))
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=10, **kw)


def free_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@contextlib.asynccontextmanager
async def running_api(database_url: str, *, auth_cache_ttl: float = 0.0, **settings: Any) -> AsyncIterator[ApiServer]:
    """Start the app on uvicorn on a free port; one token per scope is created up front."""
    sock = free_socket()
    port = sock.getsockname()[1]
    cfg = Settings(database_url=database_url, host="127.0.0.1", port=port, log_level="warning", **settings)
    app = create_app(cfg, auth_cache_ttl=auth_cache_ttl, pool_size=4)
    conn = await db.connect(database_url)
    try:
        tokens = {scope: await create_token(conn, [scope], f"test {scope}") for scope in ("read", "control", "admin")}
    finally:
        await conn.close()
    stop, started = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(serve(cfg, stop, app=app, sockets=[sock], started=started))
    try:
        await asyncio.wait_for(_started(started, task), timeout=20)
        yield ApiServer(f"http://127.0.0.1:{port}", cfg, app, tokens)
    finally:
        stop.set()
        await task
        sock.close()


async def _started(started: asyncio.Event, task: asyncio.Task) -> None:
    waiter = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait([waiter, task], return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()
        raise RuntimeError("the API server stopped before it started")


@pytest.fixture
async def api_server(database_url: str) -> AsyncIterator[ApiServer]:
    async with running_api(database_url) as api:
        yield api


# --- data -------------------------------------------------------------------------------


async def record_and_project(conn: asyncpg.Connection, database_url: str, payloads: Iterable[dict[str, Any]]) -> int | None:
    seq = await record(conn, payloads)
    await project(database_url)
    return seq


# --- a small, fixed workload ------------------------------------------------------------

T0 = 1_700_000_000.0
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/app/tasks.py", line 12, in fail\n'
    "    raise ValueError('boom')\n"
    "ValueError: boom\n"
)


@dataclass
class Workload:
    """Task ids of `sample_workload`: a chord header group G (A succeeds, B fails) feeding D,
    a child C of A that retried once, a revoked E and a sent-only F on queue `mail`."""

    A: str = "aaaaaaaa-0000-4000-8000-000000000001"
    B: str = "bbbbbbbb-0000-4000-8000-000000000002"
    C: str = "cccccccc-0000-4000-8000-000000000003"
    D: str = "dddddddd-0000-4000-8000-000000000004"
    E: str = "eeeeeeee-0000-4000-8000-000000000005"
    F: str = "ffffffff-0000-4000-8000-000000000006"
    G: str = "group-7777-0000-4000-8000-000000000007"


def sample_workload() -> tuple[Workload, list[dict[str, Any]]]:
    from tests.support.events import celery_event as ev

    w = Workload()
    grp = lambda i: {"group_id": w.G, "group_index": i, "chord_id": w.D}  # noqa: E731
    sent = lambda tid, name, t, args="(2, 2)", kwargs="{}", queue="celery", **kw: ev(  # noqa: E731
        "task-sent", "client@app", uuid=tid, name=name, args=args, kwargs=kwargs, retries=0, eta=None,
        expires=None, queue=queue, exchange="", routing_key=queue, root_id=kw.pop("root_id", tid),
        parent_id=kw.pop("parent_id", None), timestamp=t, **kw)
    received = lambda tid, name, host, t, args="(2, 2)", **kw: ev(  # noqa: E731
        "task-received", host, uuid=tid, name=name, args=args, kwargs="{}", root_id=kw.pop("root_id", tid),
        parent_id=kw.pop("parent_id", None), retries=kw.pop("retries", 0), eta=None, expires=None,
        timestamp=t, **kw)
    events = [
        ev("worker-online", "celery@w1", freq=60.0, active=0, processed=0, loadavg=[0.1, 0.2, 0.3],
           sw_ident="py-celery", sw_ver="5.5.0", sw_sys="Linux", timestamp=T0),
        ev("worker-online", "celery@w2", freq=60.0, active=0, processed=0, loadavg=[0.0, 0.0, 0.0],
           sw_ident="py-celery", sw_ver="5.5.0", sw_sys="Linux", timestamp=T0),
        ev("worker-heartbeat", "celery@w3", freq=0.001, active=0, processed=0, loadavg=[0.0, 0.0, 0.0],
           sw_ident="py-celery", sw_ver="5.5.0", sw_sys="Linux", timestamp=T0),
        sent(w.A, "tests.add", T0 + 1, **grp(0)),
        sent(w.B, "tests.add", T0 + 1.5, args="(1, 'x')", **grp(1)),
        received(w.A, "tests.add", "celery@w1", T0 + 2, **grp(0)),
        received(w.B, "tests.add", "celery@w1", T0 + 3, args="(1, 'x')", **grp(1)),
        ev("task-started", "celery@w1", uuid=w.A, timestamp=T0 + 4, **grp(0)),
        ev("task-succeeded", "celery@w1", uuid=w.A, result="4", runtime=0.5, timestamp=T0 + 5, **grp(0)),
        ev("task-started", "celery@w1", uuid=w.B, timestamp=T0 + 6, **grp(1)),
        ev("task-failed", "celery@w1", uuid=w.B, exception="ValueError('boom')", traceback=TRACEBACK,
           timestamp=T0 + 7, **grp(1)),
        sent(w.D, "tests.sum", T0 + 7.5, args="([4],)"),
        received(w.C, "tests.mul", "celery@w2", T0 + 8, args="(3, 4)", parent_id=w.A, root_id=w.A),
        ev("task-started", "celery@w2", uuid=w.C, timestamp=T0 + 9),
        ev("task-retried", "celery@w2", uuid=w.C, exception="KeyError('x')",
           traceback="Traceback (most recent call last):\nKeyError: 'x'\n", timestamp=T0 + 10),
        received(w.C, "tests.mul", "celery@w2", T0 + 11, args="(3, 4)", parent_id=w.A, root_id=w.A, retries=1),
        ev("task-started", "celery@w2", uuid=w.C, timestamp=T0 + 12),
        ev("task-succeeded", "celery@w2", uuid=w.C, result="{'a': [1, 2], 'b': (3, 'x')}", runtime=0.25,
           timestamp=T0 + 13),
        received(w.E, "tests.sleep", "celery@w1", T0 + 14, args="(60,)"),
        ev("task-revoked", "celery@w1", uuid=w.E, terminated=True, signum=15, expired=False, timestamp=T0 + 15),
        sent(w.F, "tests.mail", T0 + 16, args="()", kwargs="{'user': 'alice', 'n': 3}", queue="mail"),
        ev("worker-offline", "celery@w2", freq=60.0, active=0, processed=2, loadavg=[0.0, 0.0, 0.0],
           sw_ident="py-celery", sw_ver="5.5.0", sw_sys="Linux", timestamp=T0 + 17),
    ]
    return w, events


@dataclass
class Loaded:
    api: ApiServer
    ids: Workload
    events: list[dict[str, Any]]
    last_seq: int


@pytest.fixture
async def loaded_api(database_url: str, conn: asyncpg.Connection) -> AsyncIterator[Loaded]:
    """`sample_workload` in the log and the projections, and the API serving it."""
    ids, events = sample_workload()
    last_seq = await record_and_project(conn, database_url, events)
    async with running_api(database_url) as api:
        yield Loaded(api, ids, events, last_seq or 0)
