"""Bearer-token authentication and scopes, shared by the HTTP API and the websocket.

Scopes nest: admin implies control implies read. 401 means "who are you?" (no token, or
one we do not know); 403 means "we know you, and you may not do this".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import asyncpg

from ledger.api.tokens import SCOPES, hash_token

# Each scope and everything it implies.
IMPLIED: dict[str, frozenset[str]] = {
    "read": frozenset({"read"}),
    "control": frozenset({"read", "control"}),
    "admin": frozenset({"read", "control", "admin"}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a token's id, its label and every scope it grants (implied ones too)."""

    token_id: str
    label: str
    scopes: frozenset[str]

    def allows(self, scope: str) -> bool:
        return scope in self.scopes


def expand_scopes(granted: list[str] | tuple[str, ...]) -> frozenset[str]:
    out: set[str] = set()
    for scope in granted:
        out |= IMPLIED.get(scope, frozenset())
    return frozenset(out)


def has_scope(principal: Principal | None, scope: str) -> bool:
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    return principal is not None and principal.allows(scope)


def bearer_token(headers: Mapping[str, str]) -> str | None:
    """The token from an ``Authorization: Bearer <token>`` header, or None."""
    value = headers.get("authorization")
    if not value:
        return None
    kind, _, token = value.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


_LOOKUP = """
UPDATE ledger.api_tokens SET last_used_at = now()
WHERE token_hash = $1 AND revoked_at IS NULL
RETURNING token_id, label, scopes
"""


async def authenticate(pool: asyncpg.Pool | asyncpg.Connection, token: str | None) -> Principal | None:
    """The principal a token stands for, or None if it is missing, unknown or revoked."""
    if not token or len(token) > 200:
        return None
    row = await pool.fetchrow(_LOOKUP, hash_token(token))
    if row is None:
        return None
    return Principal(row["token_id"], row["label"], expand_scopes(tuple(row["scopes"])))


class Authenticator:
    """`authenticate` with a short cache, so a hot client costs no query per request.

    A revoked token stops working within `ttl` seconds (0 disables the cache).
    """

    def __init__(self, pool: asyncpg.Pool, ttl: float = 2.0, max_entries: int = 10_000) -> None:
        self.pool, self.ttl, self.max_entries = pool, ttl, max_entries
        self._cache: dict[str, tuple[float, Principal | None]] = {}

    async def __call__(self, token: str | None) -> Principal | None:
        if not token:
            return None
        if self.ttl > 0:
            hit = self._cache.get(token)
            now = time.monotonic()
            if hit is not None and hit[0] > now:
                return hit[1]
        principal = await authenticate(self.pool, token)
        if self.ttl > 0:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[token] = (time.monotonic() + self.ttl, principal)
        return principal
