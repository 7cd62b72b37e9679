"""`endpoint`: one decorator that makes a Starlette Route out of a handler, with the
scope it needs, its query model and its response model. The same declaration drives
authentication, parameter parsing, metrics labels and /openapi.json, so they cannot drift.
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ledger.api.auth import bearer_token
from ledger.api.errors import ApiError, ORJSONResponse, from_validation_error
from ledger.db import TRANSIENT_ERRORS

# Errors that mean the database cannot serve us right now: answered 503, never 500.
DATABASE_DOWN: tuple[type[BaseException], ...] = (
    *TRANSIENT_ERRORS,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,  # e.g. "not currently accepting connections"
    asyncpg.exceptions.InternalClientError,  # a pooled connection whose backend was killed mid-use
)

Handler = Callable[[Request, Any], Awaitable[Any]]


@dataclass(frozen=True)
class Spec:
    path: str
    method: str
    scope: str | None  # None: public (no token needed)
    summary: str
    tag: str
    query: type[BaseModel] | None
    response: Any  # a pydantic model, or any type pydantic can describe
    errors: tuple[int, ...] = ()
    path_params: tuple[str, ...] = field(default=())
    content_type: str = "application/json"


def _list_fields(model: type[BaseModel]) -> frozenset[str]:
    """Fields typed as lists: they take repeated parameters and comma-separated values."""
    names = set()
    for name, info in model.model_fields.items():
        ann = info.annotation
        for candidate in (ann, *typing.get_args(ann)):
            if typing.get_origin(candidate) is list:
                names.add(info.alias or name)
    return frozenset(names)


def parse_query(request: Request, model: type[BaseModel], list_fields: frozenset[str]) -> BaseModel:
    raw: dict[str, Any] = {}
    for key, value in request.query_params.multi_items():
        if key in list_fields:
            raw.setdefault(key, []).extend(v for v in value.split(",") if v)
        else:
            raw[key] = value
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def require(request: Request, scope: str | None) -> None:
    """Raise 401/403 unless the request may use a route needing `scope`."""
    if scope is None or not request.app.state.settings.auth:
        return
    principal = await request.app.state.authenticator(bearer_token(request.headers))
    if principal is None:
        missing = "authorization" not in request.headers
        raise ApiError(
            401,
            "unauthenticated" if missing else "invalid_token",
            "a bearer token is required" if missing else "the bearer token is unknown or revoked",
            headers={"WWW-Authenticate": 'Bearer realm="ledger"' + ("" if missing else ', error="invalid_token"')},
        )
    if not principal.allows(scope):
        raise ApiError(
            403,
            "insufficient_scope",
            f"this route needs the {scope!r} scope",
            headers={"WWW-Authenticate": f'Bearer realm="ledger", error="insufficient_scope", scope="{scope}"'},
        )
    request.state.principal = principal


def endpoint(
    path: str,
    *,
    scope: str | None = "read",
    summary: str,
    tag: str,
    query: type[BaseModel] | None = None,
    response: Any = None,
    errors: tuple[int, ...] = (),
    method: str = "GET",
    content_type: str = "application/json",
) -> Callable[[Handler], Route]:
    """Declare a route. The handler gets (request, params) and returns a Response or JSON data."""

    def decorate(fn: Handler) -> Route:
        list_fields = _list_fields(query) if query else frozenset()

        async def handle(request: Request) -> Response:
            try:
                await require(request, scope)
                params = parse_query(request, query, list_fields) if query else None
                result = await fn(request, params)
            except DATABASE_DOWN:
                raise ApiError(503, "database_unavailable", "the database is not reachable",
                               headers={"Retry-After": "1"}) from None
            return result if isinstance(result, Response) else ORJSONResponse(result)

        route = Route(path, handle, methods=[method], name=fn.__name__)
        route.spec = Spec(  # type: ignore[attr-defined]
            path=path,
            method=method,
            scope=scope,
            summary=summary,
            tag=tag,
            query=query,
            response=response,
            errors=errors,
            path_params=tuple(route.param_convertors),
            content_type=content_type,
        )
        route.endpoint_fn = fn  # type: ignore[attr-defined]
        return route

    return decorate


def specs(routes: list[Any]) -> list[Spec]:
    return [r.spec for r in routes if getattr(r, "spec", None) is not None]
