"""/openapi.json, assembled from the routes' own declarations (see routing.endpoint) and the
pydantic models' JSON schemas, so the document cannot drift from what is served."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from starlette.routing import BaseRoute, WebSocketRoute

from ledger import __version__
from ledger.api.models import Error
from ledger.api.routing import Spec

REF = "#/components/schemas/{model}"
_ERROR_TEXT = {
    400: "Bad request (a malformed parameter, named in `detail`).",
    401: "No token, or an unknown or revoked one.",
    403: "The token lacks the scope this route needs.",
    404: "Unknown id.",
    422: "A parameter failed validation (named in `field` and `detail`).",
    501: "Not available in this build.",
    503: "The database is not reachable.",
}


def _schema(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = TypeAdapter(tp).json_schema(ref_template=REF, by_alias=True)
    components.update(schema.pop("$defs", {}))
    return schema


def _ref(tp: Any, components: dict[str, Any]) -> dict[str, Any]:
    schema = _schema(tp, components)
    title = schema.get("title")
    if isinstance(title, str) and schema.get("type") == "object" and "properties" in schema and title.isidentifier():
        components[title] = schema
        return {"$ref": REF.format(model=title)}
    return schema


def _operation(spec: Spec, components: dict[str, Any], auth: bool) -> dict[str, Any]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}} for name in spec.path_params
    ]
    if spec.query is not None:
        schema = _schema(spec.query, components)
        required = set(schema.get("required", []))
        for name, prop in schema.get("properties", {}).items():
            param = {"name": name, "in": "query", "required": name in required, "schema": prop}
            if "description" in prop:
                param["description"] = prop["description"]
            params.append(param)
    ok: dict[str, Any] = {"description": "OK"}
    if spec.response is not None:
        ok["content"] = {spec.content_type: {"schema": _ref(spec.response, components)}}
    elif spec.content_type != "application/json":
        ok["content"] = {spec.content_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {"200": ok}
    codes = set(spec.errors) | ({401, 403} if spec.scope and auth else set()) | {503}
    error_ref = _ref(Error, components)
    for code in sorted(codes):
        responses[str(code)] = {"description": _ERROR_TEXT.get(code, "Error."),
                                "content": {"application/json": {"schema": error_ref}}}
    op: dict[str, Any] = {
        "operationId": f"{spec.method.lower()}_{spec.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"
        or "root",
        "summary": spec.summary,
        "tags": [spec.tag],
        "parameters": params,
        "responses": responses,
    }
    if spec.scope and auth:
        op["security"] = [{"bearer": [spec.scope]}]
        op["description"] = f"Needs a token with the `{spec.scope}` scope (admin implies control implies read)."
    else:
        op["security"] = []
    return op


def build(routes: list[BaseRoute], auth: bool = True) -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        spec: Spec | None = getattr(route, "spec", None)
        if spec is not None:
            paths.setdefault(spec.path, {})[spec.method.lower()] = _operation(spec, components, auth)
        elif isinstance(route, WebSocketRoute):
            paths.setdefault(route.path, {})["get"] = {
                "operationId": f"websocket_{route.path.strip('/').replace('/', '_')}",
                "summary": (route.endpoint.__doc__ or "WebSocket endpoint.").strip().splitlines()[0],
                "tags": ["stream"],
                "description": "A WebSocket (upgrade with GET). Authenticate with the same bearer tokens.",
                "responses": {"101": {"description": "Switching protocols to WebSocket."}},
            }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Celery Ledger", "version": __version__,
                 "description": "Celery events in an append-only log, projected into tasks, groups and workers."},
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A token from `ledger token create`."}},
        },
    }
