"""Offloaded FastAPI endpoints: validated values carried to the worker, FastAPI's own
422 at once, dependencies that cannot be carried refused at startup, and the example.
"""

from __future__ import annotations

import importlib
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import anyio.from_thread
import anyio.to_thread
import pytest
from fastapi import BackgroundTasks, Depends, FastAPI, HTTPException, Request, Response
from pydantic import BaseModel
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from support import watch_unfinished_reads

from reliable import ConfigError, ManualClock, Reliable, current_job
from reliable.integrations.starlette import ReliableMiddleware

with warnings.catch_warnings():  # starlette asks for httpx2; httpx works the same here
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

REPO_ROOT = Path(__file__).resolve().parent.parent


def import_example(name: str) -> ModuleType:
    """An example app, imported as ``reliable worker`` imports it (its ``rel`` stays unused)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT))
        return importlib.import_module(f"examples.{name}")


example = import_example("fastapi_app")

WAIT = 10.0
RECEIPT = "/orders/42/receipt?template=short"


class GatedEmails(example.EmailProvider):
    """The example's provider, reliable unless told to fail, and able to hold a send."""

    def __init__(self) -> None:
        super().__init__(failure_rate=0.0)
        self.failures = 0
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    async def send(self, to: str, subject: str, text: str) -> str:
        self.entered.set()
        await anyio.to_thread.run_sync(self.gate.wait, WAIT)
        if self.failures > 0:
            self.failures -= 1
            raise example.ProviderUnavailable("the email provider answered 503")
        return await super().send(to, subject, text)


def stored_jobs(rel: Reliable) -> int:
    return sum(rel.store.count_by_status().values())


def offloaded(rel: Reliable) -> FastAPI:
    return FastAPI(middleware=[Middleware(ReliableMiddleware, reliable=rel)])


@pytest.fixture
def emails() -> GatedEmails:
    return GatedEmails()


@pytest.fixture
def client(rel: Reliable, emails: GatedEmails) -> Iterator[TestClient]:
    with TestClient(example.create_app(rel, emails)) as test_client:
        yield test_client


def post_receipt(client: TestClient, body: Any = None) -> Any:
    return client.post(
        RECEIPT,
        json={"email": "ada@example.com"} if body is None else body,
        headers={"X-Request-Id": "req-1"},
    )


# -- the example ------------------------------------------------------------------------


def test_the_validated_body_path_query_and_header_reach_the_worker(
    rel: Reliable,
    client: TestClient,
    emails: GatedEmails,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    accepted = post_receipt(client)

    assert accepted.status_code == 202
    location = accepted.headers["location"]
    assert accepted.json() == {"id": location.rsplit("/", 1)[1], "status": "queued",
                               "status_url": location}  # fmt: skip
    assert accepted.headers["retry-after"] == "1"
    assert client.get(location).json()["status"] == "queued"
    row = rel.store.get_job(accepted.json()["id"])
    assert row is not None and '"$reliable":"pydantic"' in row.payload  # the Receipt model

    emails.gate.clear()
    runner = threading.Thread(target=rel.run_until_idle)
    runner.start()
    try:
        assert emails.entered.wait(WAIT)
        assert client.get(location).json()["status"] == "running"
        read = watch_unfinished_reads(rel, monkeypatch)
        with ThreadPoolExecutor(1) as pool:
            # The longest wait there is: an answer within 20 s comes from the job ending.
            held = pool.submit(client.get, location, params={"wait": "60"})
            assert read.wait(WAIT), "the status request never read the running job"
            emails.gate.set()
            done = held.result(timeout=2 * WAIT).json()
    finally:
        emails.gate.set()
        runner.join(WAIT)

    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["result"]["status_code"] == 201  # the route's status_code
    assert done["result"]["body"] == {
        "order_id": 42,
        "email": "ada@example.com",
        "template": "short",
        "request_id": "req-1",
        "message_id": emails.sent[0]["id"],
        "attempt": 1,
    }


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (RECEIPT, {"email": "not an address"}),
        (RECEIPT, {}),
        (RECEIPT, "not json"),
        ("/orders/forty-two/receipt", {"email": "ada@example.com"}),
    ],
)
def test_an_invalid_request_gets_fastapis_422_and_nothing_is_stored(
    rel: Reliable, client: TestClient, path: str, body: Any
) -> None:
    response = client.post(path, json=body)

    assert response.status_code == 422
    assert "detail" in response.json()
    assert stored_jobs(rel) == 0


def test_a_failing_provider_is_retried_and_delete_cancels(
    rel: Reliable, clock: ManualClock, client: TestClient, emails: GatedEmails
) -> None:
    emails.failures = 1
    retried = post_receipt(client).headers["location"]
    rel.run_until_idle()
    cancelled = post_receipt(client, {"email": "bob@example.com"}).headers["location"]

    assert client.delete(cancelled).json()["status"] == "cancelled"
    clock.advance(60)
    assert rel.run_until_idle() == 1

    done = client.get(retried).json()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert client.get(cancelled).json()["status"] == "cancelled"
    assert [message["to"] for message in emails.sent] == ["ada@example.com"]
    missing = client.get("/_reliable/jobs/" + "f" * 32)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"


def test_refunds_need_an_idempotency_key_and_replay(rel: Reliable, client: TestClient) -> None:
    def refund(key: str | None, amount: int = 250) -> Any:
        headers = {} if key is None else {"Idempotency-Key": key}
        return client.post("/orders/7/refunds", json={"amount_cents": amount}, headers=headers)

    first, again = refund("r-1"), refund("r-1")

    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert refund("r-1", amount=300).status_code == 422
    assert refund(None).status_code == 400
    assert refund("").status_code == 400
    rel.run_until_idle()
    assert client.get(first.headers["location"]).json()["result"]["body"]["amount_cents"] == 250


def test_an_oversized_body_is_413_before_fastapi_reads_it(db_url: str, clock: ManualClock) -> None:
    rel = Reliable(db_url, clock=clock, embedded_worker=False, max_payload=256)
    try:
        client = TestClient(example.create_app(rel, GatedEmails()))
        declared = post_receipt(client, {"email": "ada@example.com", "pad": "x" * 500})

        def chunks() -> Iterator[bytes]:
            yield b'{"email": "ada@example.com", "pad": "'
            yield b"x" * 500
            yield b'"}'

        chunked = client.post(
            RECEIPT, content=chunks(), headers={"content-type": "application/json"}
        )

        for response in (declared, chunked):
            assert response.status_code == 413
            assert response.headers["content-type"] == "application/problem+json"
        assert stored_jobs(rel) == 0
    finally:
        rel.close()


def test_fastapi_reads_an_offloaded_body_no_further_than_the_limit(
    db_url: str, clock: ManualClock
) -> None:
    rel = Reliable(db_url, clock=clock, embedded_worker=False, max_payload=256)
    app = example.create_app(rel, GatedEmails())
    received: list[int] = []
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        received.append(1)
        return {"type": "http.request", "body": b"y" * 100, "more_body": True}  # endless

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/orders/42/receipt",
        "raw_path": b"/orders/42/receipt",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    try:
        with anyio.from_thread.start_blocking_portal() as portal:
            portal.call(app, scope, receive, send)
        assert sent[0]["status"] == 413
        assert b"problem" in dict(sent[0]["headers"])[b"content-type"]
        assert len(received) == 3  # 300 bytes: the first chunk past the 256-byte limit
        assert stored_jobs(rel) == 0
    finally:
        rel.close()


# -- endpoints of every shape -----------------------------------------------------------


class Item(BaseModel):
    name: str
    quantity: int = 1


class User(BaseModel):
    id: int


def current_user(request: Request) -> User:
    return User(id=int(request.headers.get("x-user", "0")))


def test_values_dependencies_and_exceptions_as_fastapi_gives_them(
    rel: Reliable, clock: ManualClock
) -> None:
    seen: list[Any] = []
    app = offloaded(rel)

    @app.put("/items/{item_id}", status_code=200)
    @rel.offload
    def put_item(  # a plain def: FastAPI runs it in its thread pool
        item_id: int,
        item: Item,
        request: Request,
        user: Annotated[User, Depends(current_user)],
    ) -> dict[str, Any]:
        seen.append((item_id, item, user, request.url.path, request.headers["x-user"]))
        if item.quantity > 10:
            raise HTTPException(status_code=409, detail="too many")
        if current_job().attempt == 1 and item.name == "flaky":
            raise HTTPException(status_code=503, detail="try later")
        return {"item_id": item_id, "name": item.name, "by": user.id}

    client = TestClient(app)
    headers = {"x-user": "7"}
    ok = client.put("/items/3", json={"name": "pen"}, headers=headers).headers["location"]
    conflict = client.put("/items/4", json={"name": "ink", "quantity": 11}, headers=headers)
    flaky = client.put("/items/5", json={"name": "flaky"}, headers=headers).headers["location"]
    for _ in range(3):
        rel.run_until_idle()
        clock.advance(60)

    assert client.get(ok).json()["result"]["body"] == {"item_id": 3, "name": "pen", "by": 7}
    assert seen[0] == (3, Item(name="pen"), User(id=7), "/items/3", "7")
    refused = client.get(conflict.headers["location"]).json()
    assert refused["attempts"] == 1
    assert refused["result"]["status_code"] == 409  # final: the handler's own answer
    assert refused["result"]["body"] == {"detail": "too many"}
    retried = client.get(flaky).json()
    assert retried["status"] == "succeeded" and retried["attempts"] == 2


def get_session() -> Iterator[dict[str, str]]:
    session = {"connection": "open"}
    yield session
    session["connection"] = "closed"


def test_an_open_resource_from_depends_is_refused_at_startup(rel: Reliable) -> None:
    app = offloaded(rel)

    @app.post("/reports")
    @rel.offload
    async def build_report(db: Annotated[dict[str, str], Depends(get_session)]) -> None: ...

    refused = r"^db: .*build_report.*Depends\(get_session\)"
    with pytest.raises(ConfigError, match=refused), TestClient(app):
        pass


@pytest.mark.parametrize("kind", ["response", "tasks"])
def test_other_parameters_that_cannot_be_carried_are_refused(rel: Reliable, kind: str) -> None:
    app = offloaded(rel)
    if kind == "response":

        @app.post("/a")
        @rel.offload
        async def with_response(response: Response) -> None: ...

    else:

        @app.post("/a")
        @rel.offload
        async def with_tasks(tasks: BackgroundTasks) -> None: ...

    with pytest.raises(ConfigError, match=r"^(response|tasks): "), TestClient(app):
        pass


def test_a_resource_used_only_in_the_request_is_fine(rel: Reliable) -> None:
    app = offloaded(rel)

    @app.post("/reports", dependencies=[Depends(get_session)])
    @rel.offload
    async def build_report() -> dict[str, str]:
        return {"report": "ready"}

    with TestClient(app) as client:
        location = client.post("/reports").headers["location"]
        rel.run_until_idle()
        assert client.get(location).json()["result"]["body"] == {"report": "ready"}


def test_the_lifespan_runs_the_embedded_worker(db_url: str) -> None:
    rel = Reliable(db_url, worker_threads=2)
    try:
        with TestClient(example.create_app(rel, GatedEmails())) as client:
            location = post_receipt(client).headers["location"]
            done = client.get(location, params={"wait": str(WAIT)}).json()
            assert done["status"] == "succeeded"
            assert done["result"]["body"]["email"] == "ada@example.com"
        assert rel.worker is None
    finally:
        rel.close()
