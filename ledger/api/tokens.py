"""API tokens: create, list, revoke (`ledger token ...`).

A token reads ``ldg_<token_id>_<secret>``. Only sha256(token) is stored, so the table
never holds a usable secret; the id in clear lets `list` and `revoke` name a token.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import secrets
from collections.abc import Iterable

import asyncpg

from ledger import db
from ledger.config import Settings

SCOPES = ("read", "control", "admin")
TOKEN_PREFIX = "ldg_"


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def normalise_scopes(scopes: Iterable[str] | None) -> list[str]:
    chosen = sorted(set(scopes or ["read"]), key=SCOPES.index)
    unknown = [s for s in chosen if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope(s) {unknown}; choose from {list(SCOPES)}")
    return chosen


async def create_token(conn: asyncpg.Connection | asyncpg.Pool, scopes: Iterable[str], label: str = "") -> str:
    """Store a new token's hash and return the token itself (shown once, never stored)."""
    scopes = normalise_scopes(scopes)
    token_id = secrets.token_hex(6)
    token = f"{TOKEN_PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
    await conn.execute(
        "INSERT INTO ledger.api_tokens (token_id, token_hash, scopes, label) VALUES ($1, $2, $3, $4)",
        token_id,
        hash_token(token),
        scopes,
        label,
    )
    return token


async def list_tokens(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch(
        "SELECT token_id, scopes, label, created_at, last_used_at, revoked_at"
        " FROM ledger.api_tokens ORDER BY created_at, token_id"
    )


async def revoke_token(conn: asyncpg.Connection, token_id: str) -> list[str]:
    """Revoke the live token whose id is `token_id` or starts with it (must be unambiguous)."""
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT token_id FROM ledger.api_tokens WHERE revoked_at IS NULL AND token_id LIKE $1 || '%'",
            token_id.removeprefix(TOKEN_PREFIX),
        )
        if len(rows) != 1:
            return [r["token_id"] for r in rows]
        await conn.execute("UPDATE ledger.api_tokens SET revoked_at = now() WHERE token_id = $1", rows[0]["token_id"])
        return [rows[0]["token_id"]]


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    conn = await db.retry("connect to PostgreSQL", lambda: db.connect(settings.require_database()))
    try:
        if args.token_command == "create":
            token = await create_token(conn, args.scope or ["read"], args.label or "")
            print(f"created token {token.split('_')[1]} with scopes {','.join(normalise_scopes(args.scope))}")
            print("store it now; it cannot be shown again:")
            print(token)
            return 0
        if args.token_command == "list":
            rows = await list_tokens(conn)
            print(f"{'id':<14}{'scopes':<22}{'created':<22}{'last used':<22}{'status':<10}label")
            for r in rows:
                status = "revoked" if r["revoked_at"] else "active"
                used = r["last_used_at"].strftime("%Y-%m-%d %H:%M:%S") if r["last_used_at"] else "-"
                print(
                    f"{r['token_id']:<14}{','.join(r['scopes']):<22}"
                    f"{r['created_at'].strftime('%Y-%m-%d %H:%M:%S'):<22}{used:<22}{status:<10}{r['label']}"
                )
            return 0
        if args.token_command == "revoke":
            matched = await revoke_token(conn, args.token_id)
            if len(matched) == 1:
                print(f"revoked token {matched[0]}")
                return 0
            if not matched:
                print(f"no active token with id {args.token_id!r}")
            else:
                print(f"{args.token_id!r} is ambiguous: {', '.join(matched)}")
            return 1
        raise SystemExit(f"unknown token command {args.token_command!r}")
    finally:
        await conn.close()


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))


async def authenticate_token(conn: asyncpg.Connection | asyncpg.Pool, token: str | None):  # -> Principal | None
    """The principal `token` stands for, or None (see ledger.api.auth.authenticate)."""
    from ledger.api.auth import authenticate

    return await authenticate(conn, token)
