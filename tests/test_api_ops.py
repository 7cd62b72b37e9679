"""/healthz, /readyz, /metrics and /openapi.json."""

from __future__ import annotations

import re

import asyncpg

from ledger.log.recorder import Rejected, append
from tests.support.api import (  # noqa: F401
    ApiServer,
    Loaded,
    api_server,
    loaded_api,
    project,
    record,
    running_api,
    sample_workload,
)


async def test_healthz_needs_no_token(api_server: ApiServer) -> None:
    async with api_server.client(None) as http:
        r = await http.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_readyz_follows_projector_lag(database_url: str, conn: asyncpg.Connection) -> None:
    _, events = sample_workload()
    async with running_api(database_url, ready_max_lag=5) as api, api.client("read") as http:
        r = await http.get("/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True and r.json()["lag"] == 0  # empty log
        last = await record(conn, events)
        r = await http.get("/readyz")
        body = r.json()
        assert r.status_code == 503 and body["ready"] is False and body["database"] is True
        assert body["last_seq"] == last and "checkpoint" in body["reason"]
        await project(database_url)
        r = await http.get("/readyz")
        assert r.status_code == 200 and r.json()["lag"] == 0 and r.json()["checkpoint_seq"] == last
        # the projector falls behind by more than ready_max_lag
        await conn.execute("UPDATE ledger.checkpoints SET seq = $1", last - 6)
        r = await http.get("/readyz")
        assert r.status_code == 503 and r.json()["lag"] == 6 and "exceeds 5" in r.json()["reason"]


async def test_readyz_says_503_when_the_database_is_gone(database_url: str, pg_admin_dsn: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    async with running_api(database_url) as api, api.client("read", token=None) as http:
        # the token is checked (and cached) while the database is up; then it refuses connections
        api.app.state.authenticator.ttl = 60.0
        assert (await http.get("/readyz")).status_code == 200
        admin = await asyncpg.connect(pg_admin_dsn)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
            r = await http.get("/readyz")
            assert r.status_code == 503
            body = r.json()
            assert body["ready"] is False and body["database"] is False and "database" in body["reason"]
            api.app.state.authenticator.ttl = 0.0  # now even checking a token needs the database
            r = await http.get("/v1/tasks")
            assert r.status_code == 503 and r.json()["error"] == "database_unavailable"
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
        assert (await http.get("/readyz")).status_code == 200  # and it recovers


def sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if got == labels:
            return float(m.group(3))
    return None


async def test_metrics(loaded_api: Loaded, conn: asyncpg.Connection) -> None:
    api = loaded_api.api
    await append(conn, [], [Rejected("test", "task.multi", "not JSON", b"\x00")])
    async with api.client("read") as http:
        for _ in range(3):
            assert (await http.get(f"/v1/tasks/{loaded_api.ids.A}")).status_code == 200
        assert (await http.get("/v1/tasks/nope")).status_code == 404
        r = await http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert sample(text, "ledger_events_captured_total") == len(loaded_api.events)
    assert sample(text, "ledger_events_quarantined_total") == 1
    assert sample(text, "ledger_projector_lag_events") == 0
    assert sample(text, "ledger_tasks", state="SUCCESS") == 2
    assert sample(text, "ledger_tasks", state="FAILURE") == 1
    assert sample(text, "ledger_http_requests_total", route="/v1/tasks/{task_id}", method="GET", status="200") == 3
    assert sample(text, "ledger_http_requests_total", route="/v1/tasks/{task_id}", method="GET", status="404") == 1


async def test_openapi_describes_every_route(api_server: ApiServer) -> None:
    async with api_server.client("read") as http:
        doc = (await http.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.1")
    from openapi_spec_validator import validate

    validate(doc)  # a valid OpenAPI 3.1 document
    schemas = doc["components"]["schemas"]
    for route in api_server.app.routes:
        spec = getattr(route, "spec", None)
        path = getattr(route, "path")
        assert path in doc["paths"], path
        if spec is None:
            continue
        op = doc["paths"][path][spec.method.lower()]
        assert op["summary"] and "200" in op["responses"]
        if spec.scope:
            assert op["security"] == [{"bearer": [spec.scope]}] and {"401", "403"} <= set(op["responses"])
        for param in spec.path_params:
            assert {"name": param, "in": "path", "required": True, "schema": {"type": "string"}} in op["parameters"]
        if spec.query is not None:
            names = {p["name"] for p in op["parameters"] if p["in"] == "query"}
            assert names == set(spec.query.model_fields), path
    # every $ref resolves
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', str(doc).replace("'", '"')))
    assert refs and refs <= set(schemas)
    tasks = doc["paths"]["/v1/tasks"]["get"]
    assert {"state", "name", "worker", "queue", "group", "root", "search", "cursor", "limit"} <= {
        p["name"] for p in tasks["parameters"]}
    assert set(schemas["FlowerTaskInfo"]["properties"]) >= {"task-id", "worker", "clock"}


async def test_unknown_paths_and_methods_answer_json(api_server: ApiServer) -> None:
    async with api_server.client("read") as http:
        r = await http.get("/v2/nothing")
        assert r.status_code == 404 and r.json()["error"] == "not_found"
        r = await http.post("/v1/tasks")
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


async def test_ledger_serve_runs_uvicorn_and_stops_on_sigterm(database_url: str) -> None:
    import asyncio
    import os
    import signal
    import sys
    import time

    import httpx

    from tests.support.api import free_socket

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = dict(os.environ, LEDGER_DATABASE_URL=database_url, LEDGER_LOG_LEVEL="warning")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "ledger", "serve", "--port", str(port), env=env)
    try:
        deadline = time.monotonic() + 30
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            while True:
                try:
                    r = await http.get("/healthz")
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline and proc.returncode is None, "ledger serve did not come up"
                    await asyncio.sleep(0.05)
            assert r.status_code == 200
            assert (await http.get("/v1/tasks")).status_code == 401  # auth is on by default
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
