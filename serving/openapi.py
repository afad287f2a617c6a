"""The OpenAPI schema as the app really answers: errors in OpenAI's shape with their statuses, never FastAPI's 422."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel

from serving import auth


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error the app answers: OpenAI's error object."""

    error: ErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    adapter: str | None = None  # the adapter version (NAME@vN) the name applies; None: the bare base


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


WHY = {
    400: "The request is invalid: a field, a query parameter or the body (named in error.param).",
    401: "No key, or a key the server does not know.",
    403: "The key's role may not use this route, or no admin key is configured beyond loopback.",
    404: "The model, adapter, job or file does not exist.",
    409: "The store's state forbids it: a damaged or foreign adapter, the live version, a finished job.",
    413: "The request body exceeds the server's limit.",
    429: "The waiting line or this key's limit (queued jobs, uploaded bytes) is full; retry later.",
    503: "The server is shutting down.",
}
INFERENCE = {"/v1/chat/completions", "/v1/completions", "/v1/responses"}
SUBMITS = {"/api/training/start", "/api/adapters/{name}/update", "/v1/files", "/v1/fine_tuning/jobs"}


def _guards(routers: Sequence[APIRouter]) -> dict[str, str | None]:
    """Each path's key check ("admin", "client" or None), from its router's and its own dependencies."""
    found: dict[str, str | None] = {}
    for router in routers:
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            calls = {d.dependency for d in [*router.dependencies, *route.dependencies]}
            guard = "admin" if auth.admin_key in calls else "client" if auth.client_key in calls else None
            found[route.path] = found.get(route.path) or guard
    return found


def error_statuses(path: str, method: str, guard: str | None) -> list[int]:
    """The statuses a route can answer besides its success, from what it is (its guard, body, parameters)."""
    statuses = {400}
    if guard:
        statuses.add(401)
    if guard == "admin":
        statuses.add(403)
    if method in ("post", "put", "patch"):
        statuses |= {413, 404, 409}
    if "{" in path or method == "delete":
        statuses |= {404, 409}
    if path in INFERENCE:
        statuses |= {404, 409, 429, 503}
    if path in SUBMITS and method == "post":
        statuses.add(429)
    return sorted(statuses)


def install_openapi(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Replace app.openapi with one that documents each operation's real error responses."""
    guards = _guards(routers)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")["$defs"])
        components["ErrorResponse"] = {
            k: v
            for k, v in ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}").items()
            if k != "$defs"
        }
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status in error_statuses(path, method, guards.get(path)):
                    responses[str(status)] = {
                        "description": WHY[status],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
