"""A job's status URL is a capability, unless the app decides who may read and cancel it:
``rel.status_access`` asks the app, in Flask and in Starlette alike."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reliable import JobInfo, Reliable
from reliable.integrations.flask import ReliableFlask
from reliable.integrations.starlette import ReliableMiddleware

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

Call = Callable[..., Any]  # (method, path, headers=...) -> response


def flask_client(rel: Reliable) -> Call:
    app = Flask("access")

    @app.post("/reports")
    @rel.offload
    def report() -> Any:
        return {"ok": True}, 200

    ReliableFlask(app, rel)
    client = app.test_client()
    return lambda method, path, **kwargs: client.open(path, method=method, **kwargs)


def starlette_client(rel: Reliable) -> Call:
    @rel.offload
    async def report(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app = Starlette(
        routes=[Route("/reports", report, methods=["POST"])],
        middleware=[Middleware(ReliableMiddleware, reliable=rel)],
    )
    client = TestClient(app)
    return lambda method, path, **kwargs: client.request(method, path, **kwargs)


@pytest.fixture(params=["flask", "starlette"])
def call(request: pytest.FixtureRequest, rel: Reliable) -> Call:
    build = flask_client if request.param == "flask" else starlette_client
    return build(rel)


def job_of(call: Call, user: str) -> str:
    accepted = call("POST", "/reports", headers={"X-User": user})
    assert accepted.status_code == 202
    job_id: str = _json(accepted)["id"]
    return job_id


def _json(response: Any) -> Any:
    return response.json() if callable(response.json) else response.json


def test_without_a_hook_whoever_holds_the_url_may_read_and_cancel(
    call: Call, rel: Reliable
) -> None:
    job_id = job_of(call, "ada")
    assert call("GET", f"/_reliable/jobs/{job_id}").status_code == 200
    assert call("DELETE", f"/_reliable/jobs/{job_id}").status_code == 200


def test_the_hook_decides_who_may_read_and_who_may_cancel(call: Call, rel: Reliable) -> None:
    asked: list[tuple[str, str]] = []

    @rel.status_access
    def only_staff_cancel(request: Any, job: JobInfo, action: str) -> bool:
        asked.append((job.task, action))
        user = request.headers.get("X-User")
        return user is not None and (action == "read" or user == "staff")

    job_id = job_of(call, "ada")
    url = f"/_reliable/jobs/{job_id}"
    assert call("GET", url, headers={"X-User": "ada"}).status_code == 200
    refused = call("GET", url)
    assert refused.status_code == 403
    assert refused.headers["Content-Type"].startswith("application/problem+json")
    assert call("DELETE", url, headers={"X-User": "ada"}).status_code == 403
    assert rel.get_job(job_id).status == "queued"  # the refused cancel changed nothing
    assert call("DELETE", url, headers={"X-User": "staff"}).status_code == 200
    assert rel.get_job(job_id).status == "cancelled"
    assert ("report", "read") in asked and ("report", "cancel") in asked
    assert call("GET", "/_reliable/jobs/" + "0" * 32).status_code == 404
