"""JSON responses and errors: every error is ``{"error": <stable code>, "detail": <text>}``."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ledger.db import TRANSIENT_ERRORS

log = logging.getLogger(__name__)


class ORJSONResponse(JSONResponse):
    """JSON serialised by orjson (several times faster than json.dumps for rows)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


class ApiError(Exception):
    """An error answered to the client as JSON; `code` is stable, `detail` is for humans."""

    def __init__(self, status: int, code: str, detail: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.field, self.headers = status, code, detail, field, headers

    def response(self) -> ORJSONResponse:
        body: dict[str, Any] = {"error": self.code, "detail": self.detail}
        if self.field is not None:
            body["field"] = self.field
        return ORJSONResponse(body, status_code=self.status, headers=self.headers)


def not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"{what}_not_found", f"unknown {what} {ident!r}")


def bad_param(field: str, detail: str, status: int = 422) -> ApiError:
    return ApiError(status, "invalid_parameter", f"{field}: {detail}", field=field)


def from_validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, naming the query parameter."""
    first = exc.errors(include_url=False)[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or "query"
    return bad_param(field, first.get("msg", "invalid value"))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    return ORJSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ValidationError)
    return from_validation_error(exc).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, TRANSIENT_ERRORS):
        log.warning("database unavailable for %s: %s", request.url.path, exc)
        return ORJSONResponse({"error": "database_unavailable", "detail": "the database is not reachable"},
                              status_code=503, headers={"Retry-After": "1"})
    log.exception("unhandled error on %s", request.url.path)
    return ORJSONResponse({"error": "internal", "detail": "internal server error"}, status_code=500)


EXCEPTION_HANDLERS = {
    ApiError: _api_error,
    HTTPException: _http_error,
    ValidationError: _validation_error,
    Exception: _server_error,
}
