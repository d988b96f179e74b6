"""Rate limits, limit keys and durable steps in offloaded Flask and Starlette routes."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import tenacity
from flask import Flask, request
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reliable import Concurrency, ManualClock, Reliable, step
from reliable.integrations.flask import ReliableFlask
from reliable.integrations.starlette import ReliableMiddleware

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

Post = Callable[..., Any]  # (path, headers=..., json=...) -> response with .status_code


def document(response: Any) -> Any:
    """The JSON body of a Flask (property) or Starlette (method) test response."""
    return response.json() if callable(response.json) else response.json


def flask_app(rel: Reliable, calls: Counter[str]) -> Post:
    app = Flask("limits")

    @app.post("/notify/<int:user>")
    @rel.offload(rate_limit="2/minute")
    def notify(user: int) -> tuple[dict[str, int], int]:
        return {"user": user}, 200

    @app.post("/tenants/sync")
    @rel.offload(concurrency=Concurrency(1, key="header:X-Tenant"))
    def sync() -> tuple[dict[str, bool], int]:
        return {"ok": True}, 200

    @app.post("/checkout/<int:order>")
    @rel.offload(retries=3, backoff=tenacity.wait_fixed(1))
    def checkout(order: int) -> tuple[dict[str, Any], int]:
        charged = step("charge", lambda: calls.update(["charge"]) or f"charge-{order}")
        calls["handler"] += 1
        if calls["handler"] < 3:
            return {"error": "mail server down"}, 503
        return {"charged": charged}, 201

    @app.post("/reindex")
    @rel.offload(debounce="5s", key="json:doc")
    def reindex() -> tuple[dict[str, int], int]:
        version = int(request.get_json()["version"])
        calls[f"version {version}"] += 1
        return {"version": version}, 200

    ReliableFlask(app, rel)
    client = app.test_client()
    return lambda path, **kwargs: client.post(path, **kwargs)


def starlette_app(rel: Reliable, calls: Counter[str]) -> Post:
    @rel.offload(rate_limit="2/minute")
    async def notify(request: Request) -> JSONResponse:
        return JSONResponse({"user": int(request.path_params["user"])})

    @rel.offload(concurrency=Concurrency(1, key="header:X-Tenant"))
    async def sync(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def charge(order: int) -> str:
        calls["charge"] += 1
        return f"charge-{order}"

    @rel.offload(retries=3, backoff=tenacity.wait_fixed(1))
    async def checkout(request: Request) -> JSONResponse:
        charged = await step("charge", charge, int(request.path_params["order"]))
        calls["handler"] += 1
        if calls["handler"] < 3:
            return JSONResponse({"error": "mail server down"}, status_code=503)
        return JSONResponse({"charged": charged}, status_code=201)

    @rel.offload(debounce="5s", key="json:doc")
    async def reindex(request: Request) -> JSONResponse:
        version = int((await request.json())["version"])
        calls[f"version {version}"] += 1
        return JSONResponse({"version": version})

    app = Starlette(
        routes=[
            Route("/reindex", reindex, methods=["POST"]),
            Route("/notify/{user:int}", notify, methods=["POST"]),
            Route("/tenants/sync", sync, methods=["POST"]),
            Route("/checkout/{order:int}", checkout, methods=["POST"]),
        ],
        middleware=[Middleware(ReliableMiddleware, reliable=rel)],
    )
    client = TestClient(app)
    return lambda path, **kwargs: client.post(path, **kwargs)


@pytest.fixture(params=["flask", "starlette"])
def post(request: pytest.FixtureRequest, rel: Reliable) -> tuple[Post, Counter[str]]:
    calls: Counter[str] = Counter()
    build = flask_app if request.param == "flask" else starlette_app
    return build(rel, calls), calls


def test_rate_limited_route_answers_429_with_the_headers(
    post: tuple[Post, Counter[str]], rel: Reliable, clock: ManualClock
) -> None:
    send, _ = post
    first, second = send("/notify/1"), send("/notify/2")
    assert first.status_code == second.status_code == 202
    assert first.headers["RateLimit-Policy"] == '"notify";q=2;w=60'
    assert first.headers["RateLimit"] == '"notify";r=1;t=60'
    assert second.headers["RateLimit"] == '"notify";r=0;t=60'
    clock.advance(20)
    refused = send("/notify/3")
    assert refused.status_code == 429
    assert refused.headers["Content-Type"].startswith("application/problem+json")
    assert refused.headers["Retry-After"] == "40"
    assert refused.headers["RateLimit"] == '"notify";r=0;t=40'
    assert refused.headers["RateLimit-Policy"] == '"notify";q=2;w=60'
    assert document(refused)["status"] == 429
    assert rel.store.count_by_status() == {"queued": 2}  # the refused request stored nothing
    clock.advance(40)
    assert send("/notify/4").status_code == 202  # after Retry-After it is accepted


def test_a_missing_key_is_a_400_problem(post: tuple[Post, Counter[str]], rel: Reliable) -> None:
    send, _ = post
    missing = send("/tenants/sync")
    assert missing.status_code == 400
    assert "header:X-Tenant" in document(missing)["detail"]
    assert send("/tenants/sync", headers={"X-Tenant": "acme"}).status_code == 202
    assert rel.store.count_by_status() == {"queued": 1}


def test_debounced_requests_share_one_job_that_runs_with_the_latest_body(
    post: tuple[Post, Counter[str]], rel: Reliable, clock: ManualClock
) -> None:
    send, calls = post
    first = send("/reindex", json={"doc": "a", "version": 1})
    clock.advance(3)
    second = send("/reindex", json={"doc": "a", "version": 2})
    other = send("/reindex", json={"doc": "b", "version": 7})
    assert first.status_code == second.status_code == other.status_code == 202
    # Each collapsed request's 202 points at the one job that will run.
    assert second.headers["Location"] == first.headers["Location"]
    assert document(second)["id"] == document(first)["id"] != document(other)["id"]
    assert rel.store.count_by_status() == {"queued": 2}
    clock.advance(4)  # 4 s after the last request of "a": not due yet
    assert rel.run_until_idle() == 0
    clock.advance(1)
    assert rel.run_until_idle() == 2
    assert calls == {"version 2": 1, "version 7": 1}
    assert rel.get_job(document(first)["id"]).result["body"] == {"version": 2}


def test_each_idempotency_key_of_debounced_requests_names_the_job_that_carries_them(
    post: tuple[Post, Counter[str]], rel: Reliable, clock: ManualClock
) -> None:
    send, calls = post
    first = send("/reindex", json={"doc": "a", "version": 1}, headers={"Idempotency-Key": "k1"})
    clock.advance(1)
    second = send("/reindex", json={"doc": "a", "version": 2}, headers={"Idempotency-Key": "k2"})
    # The second request's payload joined the pending job: accepted, not a conflict,
    # and not a replay of anything.
    assert first.status_code == second.status_code == 202
    assert "Idempotent-Replayed" not in second.headers
    job_id = document(first)["id"]
    assert document(second)["id"] == job_id
    # A retry of the second request finds the job its key names, which exists.
    retried = send("/reindex", json={"doc": "a", "version": 2}, headers={"Idempotency-Key": "k2"})
    assert retried.status_code == 202
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.headers["Location"] == first.headers["Location"]
    assert rel.get_job(job_id).status == "queued"
    assert rel.store.count_by_status() == {"queued": 1}
    clock.advance(5)
    assert rel.run_until_idle() == 1
    assert calls == {"version 2": 1}


def test_steps_in_an_offloaded_route_run_once_across_retries(
    post: tuple[Post, Counter[str]], rel: Reliable, clock: ManualClock
) -> None:
    send, calls = post
    accepted = send("/checkout/9")
    assert accepted.status_code == 202
    for _ in range(4):
        rel.run_until_idle()
        clock.advance(1)
    info = rel.get_job(document(accepted)["id"])
    assert (info.status, info.attempts) == ("succeeded", 3)
    assert info.result["status_code"] == 201
    assert info.result["body"] == {"charged": "charge-9"}
    assert calls == {"charge": 1, "handler": 3}
