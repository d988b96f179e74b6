"""Credentials never at rest, and idempotency keys that never meet across callers (SPEC §4).

FastAPI parameters that carry credentials are withheld from the stored job and filled
in the worker from the capture hook; a handler's ``Set-Cookie`` (and credential headers)
reach neither the stored result nor the status document; callers with different
credentials reusing one ``Idempotency-Key`` each get their own job.
"""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import pytest
from fastapi import Cookie, Depends, FastAPI, Header, Security
from fastapi.security import (
    APIKeyCookie,
    APIKeyHeader,
    APIKeyQuery,
    HTTPBasic,
    HTTPBearer,
    OAuth2PasswordBearer,
)
from flask import Flask, make_response, request
from pydantic import BaseModel
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from reliable import Concurrency, ManualClock, Reliable, current_job
from reliable.integrations.flask import ReliableFlask
from reliable.integrations.starlette import ReliableMiddleware
from reliable.web import RequestSnapshot

with warnings.catch_warnings():  # starlette asks for httpx2; httpx works the same here
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

BEARER = "tok-3f9a1c7e5d2b8a64"
OTHER_BEARER = "tok-77c2e0a95b1d3f08"
SESSION = "sess-91ad44e0b7c35f12"
API_KEY = "key-5c0ffee7d00dfa11"
SERVICE_KEY = "svc-0b4e6d2f9a3c7158"
PASSWORD = "pw-e8d1c4b7a2f09356"
USERS = {BEARER: "user-7", OTHER_BEARER: "user-8"}
SECRETS = (BEARER, OTHER_BEARER, SESSION, API_KEY, SERVICE_KEY, PASSWORD)


@pytest.fixture
def rel(db_url: str, clock: ManualClock) -> Iterator[Reliable]:
    """The conftest's ``rel``, with ``X-Api-Key`` in ``RELIABLE_REDACT_HEADERS``."""
    app = Reliable(db_url, clock=clock, embedded_worker=False, redact_headers="X-Api-Key")
    yield app
    app.close()


def stored(rel: Reliable, job_id: str) -> str:
    """The job's row as written: its request payload, limit keys and result."""
    row = rel.store.get_job(job_id)
    assert row is not None
    return f"{row.payload}\n{row.limits or ''}\n{row.result or ''}"


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
    encoded = base64.b64encode(f"ada:{PASSWORD}".encode()).decode()
    assert encoded not in text


def stored_request(rel: Reliable, job_id: str) -> dict[str, Any]:
    row = rel.store.get_job(job_id)
    assert row is not None
    request_json: dict[str, Any] = json.loads(row.payload)["request"]
    return request_json


def offloaded_fastapi(rel: Reliable) -> FastAPI:
    return FastAPI(middleware=[Middleware(ReliableMiddleware, reliable=rel)])


# -- FastAPI parameters carrying credentials ---------------------------------------------


def test_fastapi_credential_headers_and_cookies_are_withheld_and_come_from_the_capture(
    rel: Reliable,
) -> None:
    app = offloaded_fastapi(rel)

    @rel.capture
    def caller(request: Request) -> dict[str, str]:
        user = USERS[request.headers["authorization"].removeprefix("Bearer ")]
        return {"user_id": user, "authorization": f"user:{user}"}

    @app.post("/profiles/{name}")
    @rel.offload
    async def update_profile(
        name: str,
        request_id: Annotated[str, Header(alias="X-Request-Id")],
        authorization: Annotated[str, Header()],
        api_key: Annotated[str, Header(alias="X-Api-Key")],
        session: Annotated[str, Cookie()],
    ) -> dict[str, Any]:
        return {
            "name": name,
            "request_id": request_id,
            "authorization": authorization,
            "api_key": api_key,
            "session": session,
            "captured": current_job().captured,
        }

    client = TestClient(app)
    accepted = client.post(
        "/profiles/ada",
        headers={
            "Authorization": f"Bearer {BEARER}",
            "X-Api-Key": API_KEY,
            "Cookie": f"session={SESSION}",
            "X-Request-Id": "req-1",
        },
    )

    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    assert_no_secret(stored(rel, job_id))
    assert stored_request(rel, job_id)["withheld"] == ["api_key", "authorization", "session"]
    rel.run_until_idle()
    assert_no_secret(stored(rel, job_id))
    body = client.get(accepted.headers["location"]).json()["result"]["body"]
    assert body == {
        "name": "ada",
        "request_id": "req-1",
        "authorization": "user:user-7",  # from the capture hook, under the parameter's name
        "api_key": None,
        "session": None,
        "captured": {"user_id": "user-7", "authorization": "user:user-7"},
    }


SCHEMES: dict[str, tuple[Any, dict[str, str], str]] = {
    "http-bearer": (HTTPBearer(), {"Authorization": f"Bearer {BEARER}"}, ""),
    "http-basic": (
        HTTPBasic(),
        {"Authorization": "Basic " + base64.b64encode(f"ada:{PASSWORD}".encode()).decode()},
        "",
    ),
    "oauth2": (OAuth2PasswordBearer(tokenUrl="token"), {"Authorization": f"Bearer {BEARER}"}, ""),
    "api-key-header": (APIKeyHeader(name="X-Service-Key"), {"X-Service-Key": SERVICE_KEY}, ""),
    "api-key-cookie": (APIKeyCookie(name="service"), {"Cookie": f"service={SERVICE_KEY}"}, ""),
    "api-key-query": (APIKeyQuery(name="api_key"), {}, f"&api_key={SERVICE_KEY}"),
}


@pytest.mark.parametrize("how", ["Security", "Depends"])
@pytest.mark.parametrize("kind", list(SCHEMES))
def test_fastapi_security_dependencies_are_withheld(rel: Reliable, kind: str, how: str) -> None:
    scheme, headers, query = SCHEMES[kind]
    marker = Security(scheme) if how == "Security" else Depends(scheme)
    app = offloaded_fastapi(rel)

    @app.post("/reports")
    @rel.offload(capture=lambda request: {"user_id": "user-7"})
    async def build_report(tone: str, credentials: Any = marker) -> dict[str, Any]:
        return {"credentials": credentials, "tone": tone, "captured": current_job().captured}

    client = TestClient(app)
    accepted = client.post(f"/reports?tone=warm{query}", headers=headers)

    assert accepted.status_code == 202  # the scheme accepted the request's credentials
    job_id = accepted.json()["id"]
    assert_no_secret(stored(rel, job_id))
    snapshot = stored_request(rel, job_id)
    assert snapshot["withheld"] == ["credentials"]
    assert snapshot["query_string"] == "tone=warm"
    rel.run_until_idle()
    assert_no_secret(stored(rel, job_id))
    body = client.get(accepted.headers["location"]).json()["result"]["body"]
    assert body == {"credentials": None, "tone": "warm", "captured": {"user_id": "user-7"}}


BEARER_SCHEME = HTTPBearer()


class AuthHeaders(BaseModel):
    authorization: str
    x_request_id: str


def test_fastapi_a_header_model_with_a_credential_is_withheld_whole(rel: Reliable) -> None:
    app = offloaded_fastapi(rel)

    @app.post("/exports")
    @rel.offload
    async def export(headers: Annotated[AuthHeaders, Header()]) -> dict[str, Any]:
        return {"headers": headers}

    client = TestClient(app)
    accepted = client.post(
        "/exports", headers={"Authorization": f"Bearer {BEARER}", "X-Request-Id": "req-1"}
    )

    assert accepted.status_code == 202
    job_id = accepted.json()["id"]
    assert_no_secret(stored(rel, job_id))
    assert stored_request(rel, job_id)["withheld"] == ["headers"]
    rel.run_until_idle()
    assert client.get(accepted.headers["location"]).json()["result"]["body"] == {"headers": None}


def test_fastapi_a_limit_key_on_a_credential_parameter_is_stored_as_a_digest(
    rel: Reliable,
) -> None:
    app = offloaded_fastapi(rel)

    @app.post("/imports")
    @rel.offload(concurrency=Concurrency(1, key="arg:credentials"))
    async def run_import(credentials: Annotated[Any, Security(BEARER_SCHEME)]) -> dict[str, Any]:
        return {"keys": current_job().keys}

    client = TestClient(app)
    accepted = client.post("/imports", headers={"Authorization": f"Bearer {BEARER}"})
    other = client.post("/imports", headers={"Authorization": f"Bearer {OTHER_BEARER}"})

    assert accepted.status_code == other.status_code == 202
    rel.run_until_idle()
    keys = [
        client.get(response.headers["location"]).json()["result"]["body"]["keys"]
        for response in (accepted, other)
    ]
    assert keys[0] != keys[1]  # one key value per caller, kept as a digest
    for response in (accepted, other):
        assert_no_secret(stored(rel, response.json()["id"]))


def test_a_snapshot_records_what_was_withheld_and_older_ones_still_load() -> None:
    snapshot = RequestSnapshot("POST", "/reports", arguments={"tone": "warm"})
    withheld = RequestSnapshot.from_json({**snapshot.to_json(), "withheld": ["token"]})
    older = {key: value for key, value in snapshot.to_json().items() if key != "withheld"}

    assert withheld.withheld == ("token",)
    assert RequestSnapshot.from_json(withheld.to_json()) == withheld
    assert RequestSnapshot.from_json(older) == snapshot
    assert snapshot.withheld == ()


# -- stored results ----------------------------------------------------------------------

RESPONSE_SECRETS = {
    "authorization": f"Bearer {BEARER}",
    "x-api-key": API_KEY,
    "x-trace": "trace-1",
}


def forge_older_result(rel: Reliable, job_id: str) -> None:
    """Put the handler's credentials back into the stored result, as older versions
    stored it, to check the status document does not serve them either."""
    row = rel.store.get_job(job_id)
    assert row is not None and row.result is not None
    result = json.loads(row.result)
    result["headers"].update({"set-cookie": f"session={SESSION}; Path=/", **RESPONSE_SECRETS})
    with rel.store.engine.begin() as connection:
        connection.execute(
            text("UPDATE reliable_jobs SET result = :result WHERE id = :id"),
            {"result": json.dumps(result), "id": job_id},
        )


def assert_result_has_no_credentials(document: dict[str, Any]) -> None:
    headers = document["result"]["headers"]
    assert not {"set-cookie", "authorization", "x-api-key"} & set(headers)
    assert headers["x-trace"] == "trace-1"
    assert_no_secret(json.dumps(document))


def test_flask_a_handlers_cookie_is_neither_stored_nor_served(rel: Reliable) -> None:
    app = Flask("login")

    @app.post("/login")
    @rel.offload
    def login() -> Any:
        response = make_response({"user": "ada"})
        response.set_cookie("session", SESSION)
        response.headers.update(RESPONSE_SECRETS)
        return response

    ReliableFlask(app, rel)
    client = app.test_client()
    accepted = client.post("/login")
    job_id = accepted.get_json()["id"]
    rel.run_until_idle()

    assert_no_secret(stored(rel, job_id))
    document = client.get(accepted.headers["location"]).get_json()
    assert document["result"]["body"] == {"user": "ada"}
    assert_result_has_no_credentials(document)
    forge_older_result(rel, job_id)
    assert_result_has_no_credentials(client.get(accepted.headers["location"]).get_json())


def test_starlette_a_handlers_cookie_is_neither_stored_nor_served(rel: Reliable) -> None:
    async def login(request: Request) -> Response:
        response = JSONResponse({"user": "ada"}, headers=RESPONSE_SECRETS)
        response.set_cookie("session", SESSION)
        return response

    app = Starlette(
        routes=[Route("/login", rel.offload(login), methods=["POST"])],
        middleware=[Middleware(ReliableMiddleware, reliable=rel)],
    )
    client = TestClient(app)
    accepted = client.post("/login")
    job_id = accepted.json()["id"]
    rel.run_until_idle()

    assert_no_secret(stored(rel, job_id))
    document = client.get(accepted.headers["location"]).json()
    assert document["result"]["body"] == {"user": "ada"}
    assert_result_has_no_credentials(document)
    forge_older_result(rel, job_id)
    assert_result_has_no_credentials(client.get(accepted.headers["location"]).json())


# -- idempotency keys per caller -----------------------------------------------------------


class Answer:
    """A response from either framework's test client."""

    def __init__(self, status: int, headers: Any, document: Any) -> None:
        self.status = status
        self.replayed = headers.get("idempotent-replayed") == "true"
        self.document = document

    @property
    def id(self) -> str:
        assert self.status == 202, self.document
        job_id: str = self.document["id"]
        return job_id


Post = Callable[..., Answer]
Scope = Callable[[Any], Any] | None


def flask_orders(rel: Reliable, scope: Scope) -> Post:
    app = Flask("orders")

    @app.post("/orders")
    @rel.offload(idempotency_scope=scope)
    def create_order() -> Any:
        return {"order": request.get_json()}

    ReliableFlask(app, rel)
    client = app.test_client(use_cookies=False)  # else it replaces the Cookie header

    def post(body: Any, key: str, **headers: str) -> Answer:
        headers = {"Idempotency-Key": key, **headers}
        response = client.post("/orders", json=body, headers=headers)
        return Answer(response.status_code, response.headers, response.get_json())

    return post


def starlette_orders(rel: Reliable, scope: Scope) -> Post:
    async def create_order(request: Request) -> Response:
        return JSONResponse({"order": await request.json()})

    endpoint = rel.offload(idempotency_scope=scope)(create_order)
    app = Starlette(
        routes=[Route("/orders", endpoint, methods=["POST"])],
        middleware=[Middleware(ReliableMiddleware, reliable=rel)],
    )
    client = TestClient(app)

    def post(body: Any, key: str, **headers: str) -> Answer:
        headers = {"Idempotency-Key": key, **headers}
        response = client.post("/orders", json=body, headers=headers)
        return Answer(response.status_code, response.headers, response.json())

    return post


FRAMEWORKS = {"flask": flask_orders, "starlette": starlette_orders}


@pytest.fixture(params=list(FRAMEWORKS))
def orders(request: pytest.FixtureRequest, rel: Reliable) -> Callable[[Scope], Post]:
    """``orders(scope)``: a route creating orders, in Flask or Starlette; ``post`` to it."""
    build = FRAMEWORKS[request.param]

    def orders(scope: Scope) -> Post:
        return build(rel, scope)

    return orders


def result_body(rel: Reliable, job_id: str) -> Any:
    return rel.get_job(job_id).result["body"]


def idempotency_scopes(rel: Reliable) -> list[str]:
    with rel.store.engine.connect() as connection:
        rows = connection.execute(text("SELECT scope FROM reliable_idempotency_keys"))
        return [str(row[0]) for row in rows]


@pytest.mark.parametrize(
    ("ada", "bob"),
    [
        ({"Authorization": f"Bearer {BEARER}"}, {"Authorization": f"Bearer {OTHER_BEARER}"}),
        ({"Cookie": f"session={SESSION}"}, {"Cookie": "session=another"}),
        ({"X-Api-Key": API_KEY}, {"X-Api-Key": "another"}),  # in RELIABLE_REDACT_HEADERS
        ({"Authorization": f"Bearer {BEARER}"}, {}),
    ],
    ids=["authorization", "cookie", "redacted-header", "anonymous"],
)
def test_callers_with_different_credentials_never_share_a_key(
    rel: Reliable, orders: Callable[[Scope], Post], ada: dict[str, str], bob: dict[str, str]
) -> None:
    post = orders(None)

    first = post({"item": "pen"}, "order-1", **ada)
    other = post({"item": "ink"}, "order-1", **bob)
    again = post({"item": "pen"}, "order-1", **ada)
    conflict = post({"item": "cap"}, "order-1", **ada)

    assert first.status == other.status == 202
    assert first.id != other.id
    assert not first.replayed and not other.replayed
    assert again.id == first.id and again.replayed
    assert conflict.status == 422  # the same caller, a different request
    rel.run_until_idle()
    assert result_body(rel, first.id) == {"order": {"item": "pen"}}
    assert result_body(rel, other.id) == {"order": {"item": "ink"}}
    scopes = idempotency_scopes(rel)
    assert len(scopes) == 2
    for scope in scopes:
        assert_no_secret(scope)


def test_requests_without_credentials_share_the_key_as_before(
    rel: Reliable, orders: Callable[[Scope], Post]
) -> None:
    post = orders(None)

    first = post({"item": "pen"}, "order-1", **{"X-Request-Id": "a"})
    again = post({"item": "pen"}, "order-1", **{"X-Request-Id": "b"})
    conflict = post({"item": "ink"}, "order-1")

    assert first.status == 202 and not first.replayed
    assert again.id == first.id and again.replayed
    assert conflict.status == 422


def test_a_scope_function_alone_defines_the_caller(
    rel: Reliable, orders: Callable[[Scope], Post]
) -> None:
    post = orders(lambda request: request.headers.get("x-account"))
    ada = {"X-Account": "acme", "Authorization": f"Bearer {BEARER}", "Cookie": "session=1"}
    ada_later = {**ada, "Cookie": "session=2"}  # the session cookie rotated
    colleague = {"X-Account": "acme", "Authorization": f"Bearer {OTHER_BEARER}"}

    first = post({"item": "pen"}, "order-1", **ada)
    again = post({"item": "pen"}, "order-1", **ada_later)
    conflict = post({"item": "ink"}, "order-1", **colleague)
    elsewhere = post({"item": "ink"}, "order-1", **{"X-Account": "globex"})

    assert again.id == first.id and again.replayed
    assert conflict.status == 422
    assert elsewhere.status == 202 and elsewhere.id != first.id
