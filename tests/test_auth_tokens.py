"""`ledger token create / list / revoke`, run as the real CLI, and the tokens they make."""

from __future__ import annotations

import asyncio
import sys

import asyncpg

from ledger.api.auth import authenticate, has_scope
from ledger.api.tokens import create_token, hash_token


async def ledger(database_url: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ledger", "token", *args, "--database-url", database_url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_create_prints_the_token_alone_on_its_last_line_and_stores_only_its_hash(
        database_url: str, conn: asyncpg.Connection) -> None:
    code, out = await ledger(database_url, "create", "--scope", "control", "--label", "ci deploys")
    assert code == 0, out
    token = out.strip().splitlines()[-1]
    assert token.startswith("ldg_") and " " not in token
    row = await conn.fetchrow("SELECT * FROM ledger.api_tokens")
    assert row["token_hash"] == hash_token(token) and row["scopes"] == ["control"] and row["label"] == "ci deploys"
    assert token.encode() not in b"".join(str(v).encode() for v in row.values())  # no secret in the table
    principal = await authenticate(conn, token)
    assert principal is not None and principal.label == "ci deploys"
    # control implies read, not admin
    assert has_scope(principal, "read") and has_scope(principal, "control") and not has_scope(principal, "admin")

    code, out = await ledger(database_url, "create")  # default scope: read
    assert code == 0
    reader = await authenticate(conn, out.strip().splitlines()[-1])
    assert reader is not None and reader.scopes == frozenset({"read"})


async def test_list_shows_tokens_without_secrets_and_revoke_disables_one(database_url: str,
                                                                       conn: asyncpg.Connection) -> None:
    admin = await create_token(conn, ["admin"], "ops")
    reader = await create_token(conn, ["read"], "dashboard")
    admin_id, reader_id = admin.split("_")[1], reader.split("_")[1]
    code, out = await ledger(database_url, "list")
    assert code == 0 and admin_id in out and reader_id in out and "dashboard" in out
    assert admin not in out and reader not in out

    code, out = await ledger(database_url, "revoke", reader_id[:6])  # a unique prefix is enough
    assert code == 0 and reader_id in out
    assert await authenticate(conn, reader) is None
    assert await authenticate(conn, admin) is not None
    code, out = await ledger(database_url, "list")
    status = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert " revoked " in status[reader_id] and " active " in status[admin_id]

    code, out = await ledger(database_url, "revoke", reader_id)  # already revoked
    assert code == 1 and "no active token" in out


async def test_authenticate_refuses_unknown_and_oversized_tokens(conn: asyncpg.Connection) -> None:
    assert await authenticate(conn, None) is None
    assert await authenticate(conn, "") is None
    assert await authenticate(conn, "ldg_x_" + "a" * 500) is None
    assert await authenticate(conn, "ldg_unknown_token") is None
