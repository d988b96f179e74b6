"""What FastAPI adds to an offloaded Starlette endpoint, for ``ReliableMiddleware``.

FastAPI calls an endpoint with the values it validated; ``reliable`` stores them, except
those that carry credentials (``find_credentials``), renders the endpoint's return value
in the worker as FastAPI would (``render``), refuses at startup parameters that cannot
reach a worker (``check_routes``), and makes the OpenAPI document say what an offloaded
route really answers: ``202 Accepted`` and a status resource (``describe``). FastAPI is
imported only when an app uses it.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable, Iterator
from typing import Any

from starlette.responses import JSONResponse, Response

from reliable import ConfigError
from reliable.web import RouteTask
from reliable.web.snapshot import Credentials, hidden_headers

__all__ = ["check_routes", "describe", "find_credentials", "render", "route_of", "routes"]


def routes(app: Any) -> Iterator[Any]:
    """Every route of ``app``, those of mounted apps included."""
    for route in getattr(app, "routes", None) or ():
        yield route
        yield from routes(route)


def route_of(route: Any) -> RouteTask | None:
    """The offloaded route whose stand-in ``route`` (a Starlette route) calls, if any."""
    found = getattr(getattr(route, "endpoint", None), "reliable_route", None)
    return found if isinstance(found, RouteTask) else None


def find_credentials(dependant: Any, redact: Iterable[str]) -> Credentials:
    """The endpoint's parameters that carry credentials (``Header()`` on a credential
    header, ``Cookie()``, a security scheme), and the headers and query parameters that
    API key schemes read anywhere in its dependencies."""
    from fastapi.security.base import SecurityBase

    hidden = hidden_headers(redact)
    arguments = {field.name for field in dependant.cookie_params}
    arguments |= {field.name for field in dependant.header_params if _header_names(field) & hidden}
    arguments |= {
        sub.name
        for sub in dependant.dependencies
        if sub.name and isinstance(sub.call, SecurityBase)
    }
    headers: set[str] = set()
    query: set[str] = set()
    pending = list(dependant.dependencies)
    while pending:
        sub = pending.pop()
        pending.extend(sub.dependencies)
        model = getattr(sub.call, "model", None) if isinstance(sub.call, SecurityBase) else None
        location = getattr(getattr(model, "in_", None), "value", None)
        name = getattr(model, "name", None)
        if isinstance(name, str) and location == "header":
            headers.add(name.lower())
        elif isinstance(name, str) and location == "query":
            query.add(name)
    return Credentials(frozenset(arguments), frozenset(headers), frozenset(query))


def _header_names(field: Any) -> set[str]:
    """The headers a FastAPI ``Header()`` parameter reads (each field's, for a model)."""
    info = getattr(field, "field_info", None)
    annotation = getattr(info, "annotation", None)
    model_fields = getattr(annotation, "model_fields", None)
    names: list[str] = [field.alias or field.name]
    if isinstance(annotation, type) and isinstance(model_fields, dict):
        names = [value.alias or key for key, value in model_fields.items()]
    converted = {name.replace("_", "-") for name in names}
    if getattr(info, "convert_underscores", True) is False:
        converted = set()
    return {name.lower() for name in {*names, *converted}}


async def render(value: Any, api_route: Any) -> Response:
    """A FastAPI-style return value as FastAPI answers it (response model, status code)."""
    try:
        from fastapi.datastructures import DefaultPlaceholder
        from fastapi.encoders import jsonable_encoder
        from fastapi.routing import APIRoute, serialize_response
    except ImportError:
        return JSONResponse(value)
    if not isinstance(api_route, APIRoute):
        return JSONResponse(jsonable_encoder(value))
    content = await serialize_response(
        field=api_route.response_field,
        response_content=value,
        include=api_route.response_model_include,
        exclude=api_route.response_model_exclude,
        by_alias=api_route.response_model_by_alias,
        exclude_unset=api_route.response_model_exclude_unset,
        exclude_defaults=api_route.response_model_exclude_defaults,
        exclude_none=api_route.response_model_exclude_none,
    )
    response_class: Any = api_route.response_class
    if isinstance(response_class, DefaultPlaceholder):
        response_class = response_class.value
    return response_class(content, status_code=api_route.status_code or 200)  # type: ignore[no-any-return]


def yields(call: Any) -> bool:
    """Whether FastAPI runs ``call`` as a dependency with ``yield``."""
    for candidate in (call, getattr(call, "__call__", None)):  # noqa: B004 - instances too
        while isinstance(candidate, functools.partial):
            candidate = candidate.func
        if candidate is not None and not inspect.isclass(candidate):
            target = inspect.unwrap(candidate)
            if inspect.isgeneratorfunction(target) or inspect.isasyncgenfunction(target):
                return True
    return False


def check_routes(app: Any) -> None:
    """Refuse offloaded FastAPI endpoints with a parameter that cannot reach a worker.

    Raises ``ConfigError`` naming it: an open resource from a ``Depends`` with
    ``yield`` (closed when the request ends), or a ``WebSocket``, ``Response``,
    ``BackgroundTasks`` or ``SecurityScopes`` parameter.
    """
    for api_route in routes(app):
        route, dependant = route_of(api_route), getattr(api_route, "dependant", None)
        if route is None or dependant is None:
            continue
        where = f"offloaded endpoint {route.name} ({api_route.path})"
        for kind in ("websocket", "response", "background_tasks", "security_scopes"):
            if name := getattr(dependant, f"{kind}_param_name", None):
                what = kind.replace("_", " ")
                raise ConfigError(name, f"{where} takes a {what}, which a worker cannot get")
        for sub in dependant.dependencies:
            if sub.name and yields(sub.call):
                call = getattr(sub.call, "__qualname__", type(sub.call).__qualname__)
                raise ConfigError(
                    sub.name,
                    f"{where} gets an open resource from Depends({call}), "
                    "a dependency with yield, closed when the request ends and before a "
                    "worker runs the endpoint; open it in the endpoint, or move it to "
                    "dependencies=[...]",
                )


_PROBLEM = {"$ref": "#/components/schemas/ReliableProblem"}
_SCHEMAS: dict[str, Any] = {
    "ReliableAccepted": {
        "title": "ReliableAccepted",
        "type": "object",
        "required": ["id", "status", "status_url"],
        "properties": {
            "id": {"type": "string", "description": "The job's id (122 random bits)."},
            "status": {"type": "string", "description": "The job's status at this moment."},
            "status_url": {"type": "string", "description": "The job's status resource."},
        },
    },
    "ReliableJob": {
        "title": "ReliableJob",
        "type": "object",
        "required": ["id", "task", "status", "attempts", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "task": {"type": "string"},
            "status": {
                "type": "string",
                "enum": ["queued", "running", "sleeping", "succeeded", "failed", "cancelled"],
            },
            "attempts": {"type": "integer"},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": "string", "format": "date-time", "nullable": True},
            "finished_at": {"type": "string", "format": "date-time", "nullable": True},
            "result": {
                "nullable": True,
                "description": "Once the job succeeded: the handler's answer (status_code, "
                "headers and body) for an offloaded request, the function's return value "
                "(any JSON) for a task.",
            },
            "error": {
                "type": "object",
                "nullable": True,
                "description": "The last failed attempt's error: type and message.",
            },
        },
    },
    "ReliableProblem": {
        "title": "ReliableProblem",
        "type": "object",
        "description": "RFC 9457 problem details.",
        "properties": {
            "type": {"type": "string"},
            "title": {"type": "string"},
            "status": {"type": "integer"},
            "detail": {"type": "string"},
        },
    },
}
_FASTAPI_ERROR = {
    "type": "object",
    "description": "FastAPI's own error: a body it could not parse.",
    "properties": {"detail": {}},
}
_ACCEPTED = {
    "description": "Accepted: the request is committed as a job before this answer; the "
    "handler runs in a worker, and its answer becomes the job's result at the status "
    "resource.",
    "headers": {
        "Location": {"description": "The job's status resource.", "schema": {"type": "string"}},
        "Retry-After": {
            "description": "Seconds to wait before polling it.",
            "schema": {"type": "integer"},
        },
        "Idempotent-Replayed": {
            "description": "true when an Idempotency-Key named an existing job.",
            "schema": {"type": "string"},
        },
    },
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReliableAccepted"}}},
}
_REFUSALS = {
    "400": "A malformed or missing (where required) Idempotency-Key, or no value for a "
    "limit key; nothing was stored.",
    "413": "The body is larger than RELIABLE_MAX_PAYLOAD; nothing was stored.",
    "422": "The Idempotency-Key was used with another request; nothing was stored.",
    "429": "A rate limit refused the request (see Retry-After and RateLimit); nothing was stored.",
    "503": "The job store is unavailable (down, read-only, full): the request was not "
    "accepted; try again after Retry-After.",
}
# From an accepted request to its job: its id is the status resource's job_id.
_LINKS = {
    "GetJobStatus": {
        "operationId": "reliable_job_status",
        "parameters": {"job_id": "$response.body#/id"},
    },
    "CancelJob": {
        "operationId": "reliable_cancel_job",
        "parameters": {"job_id": "$response.body#/id"},
    },
}


def _problem_response(why: str) -> dict[str, Any]:
    return {"description": why, "content": {"application/problem+json": {"schema": _PROBLEM}}}


def describe(app: Any, prefix: str) -> None:
    """Make the OpenAPI document of a FastAPI ``app`` say what its offloaded routes
    answer (``202`` with the job, and their refusals) and document the status resource
    at ``{prefix}/jobs/{job_id}``; other apps are left as they are."""
    try:
        from fastapi import FastAPI
    except ImportError:
        return
    if not isinstance(app, FastAPI) or getattr(app.openapi, "reliable", False):
        return
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # built once, then FastAPI serves it as it is
            _describe(build(), app, prefix)
        return app.openapi_schema or build()

    openapi.reliable = True  # type: ignore[attr-defined]
    app.openapi = openapi  # type: ignore[method-assign]


def _describe(schema: dict[str, Any], app: Any, prefix: str) -> None:
    paths = schema.setdefault("paths", {})
    for route in routes(app):
        task = route_of(route)
        if task is None or not hasattr(route, "path_format"):
            continue
        for method in getattr(route, "methods", None) or ():
            operation = paths.get(route.path_format, {}).get(method.lower())
            if operation is None:
                continue
            responses = operation.setdefault("responses", {})
            answer = str(getattr(route, "status_code", None) or 200)
            responses.pop(answer, None)
            responses["202"] = {**_ACCEPTED, "links": _LINKS}
            for code, why in _REFUSALS.items():
                refusal = responses.setdefault(code, {"description": why, "content": {}})
                if code == "422":
                    refusal["description"] = f"{refusal['description']} Or: {why}"
                content = refusal.setdefault("content", {})
                content["application/problem+json"] = {"schema": _PROBLEM}
                if code == "400":  # FastAPI's own, for a body it cannot parse
                    content.setdefault("application/json", {"schema": _FASTAPI_ERROR})
    job = {"application/json": {"schema": {"$ref": "#/components/schemas/ReliableJob"}}}
    missing = _problem_response("No job has this id.")
    refused = _problem_response("The application's status_access hook refused the caller.")
    unavailable = _problem_response("The job store is unavailable; try again after Retry-After.")
    parameters = [{"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths[f"{prefix}/jobs/{{job_id}}"] = {
        "get": {
            "summary": "A job's status",
            "description": "The job of an offloaded request. wait=N holds the request up to "
            "N seconds (60 at most) for the job to finish. The URL is a capability: "
            "whoever holds it may read the job, unless the app set a status_access hook.",
            "operationId": "reliable_job_status",
            "parameters": [
                *parameters,
                {
                    "name": "wait",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "number", "minimum": 0},
                },
            ],
            "responses": {
                "200": {"description": "The job.", "content": job},
                "400": _problem_response("wait is not a number of seconds >= 0."),
                "403": refused,
                "404": missing,
                "503": unavailable,
            },
        },
        "delete": {
            "summary": "Cancel a job",
            "description": "Cancels a job that has not finished: it never starts, or a "
            "running attempt stops at its next step.",
            "operationId": "reliable_cancel_job",
            "parameters": parameters,
            "responses": {
                "200": {"description": "The job, cancelled.", "content": job},
                "403": refused,
                "404": missing,
                "409": _problem_response("The job had already finished."),
                "503": unavailable,
            },
        },
    }
    schema.setdefault("components", {}).setdefault("schemas", {}).update(_SCHEMAS)
