"""Authentication on every route: the list of routes comes from the app itself, so a route
added later (here or by the stream) is covered without touching this file."""

from __future__ import annotations

import re

import asyncpg

from ledger.api.tokens import hash_token
from tests.support.api import ApiServer, api_server, running_api  # noqa: F401

LOWER = {"read": None, "control": "read", "admin": "control"}


def http_routes(api: ApiServer) -> list[tuple[str, str, str | None]]:
    """(method, concrete path, scope) for every HTTP route the app declares."""
    out = []
    for route in api.app.routes:
        spec = getattr(route, "spec", None)
        if spec is None:
            continue
        path = re.sub(r"\{[^}]+\}", "x", spec.path)
        out.append((spec.method, path, spec.scope))
    return out


async def call(api: ApiServer, method: str, path: str, token: str | None):
    async with api.client(None, token=token) as http:
        # timeout=0: the long-poll route answers at once; other routes ignore it
        return await http.request(method, path, params={"timeout": "0"})


async def zero_scope_token(conn: asyncpg.Connection) -> str:
    token = "ldg_noscope_0123456789abcdef"
    await conn.execute("INSERT INTO ledger.api_tokens (token_id, token_hash, scopes) VALUES ('noscope', $1, '{}')",
                       hash_token(token))
    return token


async def test_every_route_refuses_missing_wrong_revoked_and_too_small_tokens(api_server: ApiServer,
                                                                             conn: asyncpg.Connection) -> None:
    routes = http_routes(api_server)
    assert len(routes) >= 20 and ("GET", "/healthz", None) in routes
    none_token = await zero_scope_token(conn)
    revoked = api_server.tokens["control"]
    revoked_copy = await conn.fetchval("SELECT token_id FROM ledger.api_tokens WHERE token_hash = $1",
                                       hash_token(revoked))
    await conn.execute("UPDATE ledger.api_tokens SET revoked_at = now() WHERE token_id = $1", revoked_copy)

    checked = 0
    for method, path, scope in routes:
        if scope is None:
            r = await call(api_server, method, path, None)
            assert r.status_code not in (401, 403), path
            continue
        r = await call(api_server, method, path, None)
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"] == "unauthenticated" and r.headers["www-authenticate"].startswith("Bearer")
        for bad in ("ldg_made_up_token", "not even a token", revoked):
            r = await call(api_server, method, path, bad)
            assert r.status_code == 401, (path, bad, r.status_code)
            assert r.json()["error"] == "invalid_token" and 'error="invalid_token"' in r.headers["www-authenticate"]
        smaller = api_server.tokens[LOWER[scope]] if LOWER[scope] else none_token
        r = await call(api_server, method, path, smaller)
        assert r.status_code == 403, (path, r.status_code)
        assert r.json()["error"] == "insufficient_scope" and scope in r.json()["detail"]
        for enough in ("read", "control", "admin")[("read", "control", "admin").index(scope):]:
            if api_server.tokens[enough] == revoked:
                continue
            r = await call(api_server, method, path, api_server.tokens[enough])
            assert r.status_code not in (401, 403), (path, enough, r.status_code, r.text)
        checked += 1
    assert checked == len([r for r in routes if r[2] is not None])


async def test_malformed_authorization_headers_are_401(api_server: ApiServer) -> None:
    token = api_server.tokens["read"]
    for header in (f"Basic {token}", "Bearer", token, f"Token {token}", f"Bearer  {token}x"):
        async with api_server.client(None, headers={"Authorization": header}) as http:
            r = await http.get("/v1/tasks")
        assert r.status_code == 401, header
    async with api_server.client(None, headers={"Authorization": f"bearer {token}"}) as http:
        assert (await http.get("/v1/tasks")).status_code == 200  # the scheme is case-insensitive


async def test_auth_off_lets_everyone_in(database_url: str) -> None:
    async with running_api(database_url, auth=False) as api:
        async with api.client(None) as http:
            assert (await http.get("/v1/tasks")).status_code == 200
            assert (await http.get("/metrics")).status_code == 200
            doc = (await http.get("/openapi.json")).json()
    assert doc["paths"]["/v1/tasks"]["get"]["security"] == []


async def test_revocation_takes_effect_within_the_cache_ttl(database_url: str, conn: asyncpg.Connection) -> None:
    from ledger.api.tokens import revoke_token

    async with running_api(database_url, auth_cache_ttl=0.0) as api:
        async with api.client("read") as http:
            assert (await http.get("/v1/tasks")).status_code == 200
            token_id = api.tokens["read"].split("_")[1]
            assert await revoke_token(conn, token_id) == [token_id]
            assert (await http.get("/v1/tasks")).status_code == 401
    used = await conn.fetchval("SELECT last_used_at FROM ledger.api_tokens WHERE token_id = $1", token_id)
    assert used is not None
