"""Offloaded Starlette routes: 202 and the status resource, outcomes, idempotency, 413,
credentials, and the embedded worker in the app's lifespan.

Jobs are stepped with ``rel.run_until_idle()`` and the injected clock, except where the
embedded worker itself is under test.
"""

from __future__ import annotations

import importlib
import json
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio.from_thread
import anyio.to_thread
import pytest
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from support import watch_unfinished_reads

from reliable import ManualClock, Reliable, ReliableError, current_job
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


example = import_example("starlette_app")

RECEIPT = "/orders/42/receipt?template=short"
WAIT = 10.0


class GatedEmails(example.EmailProvider):
    """The example's provider, reliable unless told to fail, and able to hold a send."""

    def __init__(self, failures: int = 0) -> None:
        super().__init__(failure_rate=0.0)
        self.failures = failures
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


def wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def stored_jobs(rel: Reliable) -> int:
    return sum(rel.store.count_by_status().values())


def post_receipt(client: TestClient, **headers: str) -> Any:
    return client.post(
        RECEIPT,
        json={"email": "ada@example.com"},
        headers={"X-Request-Id": "req-1", **headers},
    )


@pytest.fixture
def emails() -> GatedEmails:
    return GatedEmails()


@pytest.fixture
def payments() -> example.PaymentProvider:
    return example.PaymentProvider()


@pytest.fixture
def client(
    rel: Reliable, emails: GatedEmails, payments: example.PaymentProvider
) -> Iterator[TestClient]:
    with TestClient(example.create_app(rel, emails, payments)) as test_client:
        yield test_client


# -- the example: 202, status resource, rebuilt request ----------------------------------


def test_receipt_is_accepted_then_runs_with_the_rebuilt_request(
    rel: Reliable,
    client: TestClient,
    emails: GatedEmails,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    response = post_receipt(client)

    assert response.status_code == 202
    job_id = response.json()["id"]
    location = f"/_reliable/jobs/{job_id}"
    assert response.headers["location"] == location
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"id": job_id, "status": "queued", "status_url": location}
    assert len(job_id) == 32
    assert client.get(location).json()["status"] == "queued"

    emails.gate.clear()
    runner = threading.Thread(target=rel.run_until_idle)
    runner.start()
    try:
        assert emails.entered.wait(WAIT)
        running = client.get(location, params={"wait": "0.05"}).json()
        assert running["status"] == "running"
        assert running["started_at"] is not None and running["result"] is None
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

    assert done["status"] == "succeeded"
    assert done["attempts"] == 1 and done["error"] is None
    result = done["result"]
    assert result["status_code"] == 201
    assert result["headers"]["content-type"] == "application/json"
    assert result["body"] == {
        "order_id": 42,
        "email": "ada@example.com",
        "template": "short",
        "request_id": "req-1",
        "message_id": emails.sent[0]["id"],
        "attempt": 1,
    }
    assert emails.sent[0]["to"] == "ada@example.com"
    assert emails.sent[0]["subject"] == "Receipt for order 42"


def test_a_failing_provider_is_retried_after_the_backoff(
    rel: Reliable, clock: ManualClock, client: TestClient, emails: GatedEmails
) -> None:
    emails.failures = 2
    location = post_receipt(client).headers["location"]

    assert rel.run_until_idle() == 1
    assert client.get(location).json()["status"] == "queued"
    assert rel.run_until_idle() == 0  # the retry waits for its backoff
    for _ in range(2):
        clock.advance(60)
        assert rel.run_until_idle() == 1

    done = client.get(location).json()
    assert done["status"] == "succeeded" and done["attempts"] == 3
    assert done["result"]["body"]["attempt"] == 3
    errors = [attempt.error for attempt in rel.get_attempts(done["id"])]
    assert [error["type"] for error in errors if error] == [
        "examples.starlette_app.ProviderUnavailable"
    ] * 2


def test_delete_cancels_a_queued_job_which_never_runs(
    rel: Reliable, client: TestClient, emails: GatedEmails
) -> None:
    location = post_receipt(client).headers["location"]

    cancelled = client.delete(location)

    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert rel.run_until_idle() == 0
    assert emails.sent == []
    assert client.get(location).json()["status"] == "cancelled"
    again = client.delete(location)
    assert again.status_code == 409
    assert again.headers["content-type"] == "application/problem+json"


def test_unknown_or_malformed_job_ids_are_404_problems(client: TestClient) -> None:
    for job_id in ("0" * 32, "not-a-job", "A" * 32, "0" * 31 + "/x"):
        for method in ("GET", "DELETE"):
            response = client.request(method, f"/_reliable/jobs/{job_id}")
            assert response.status_code == 404
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["status"] == 404


def test_status_resource_refuses_other_methods_and_bad_waits(client: TestClient) -> None:
    location = post_receipt(client).headers["location"]
    assert client.post(location).status_code == 405
    bad_wait = client.get(location, params={"wait": "soon"})
    assert bad_wait.status_code == 400
    assert bad_wait.headers["content-type"] == "application/problem+json"


# -- the handler's outcome --------------------------------------------------------------


def outcome_app(rel: Reliable, calls: dict[str, int]) -> Starlette:
    def count(name: str) -> int:
        calls[name] = calls.get(name, 0) + 1
        return calls[name]

    def flaky(request: Request) -> Response:  # a plain def: run in the thread pool
        if count("flaky") < 3:
            return PlainTextResponse("upstream down", status_code=500)
        return JSONResponse({"ok": True, "attempt": current_job().attempt})

    async def missing(request: Request) -> Response:
        count("missing")
        return JSONResponse({"error": "no such order"}, status_code=404)

    async def crash(request: Request) -> Response:
        if count("crash") < 2:
            raise RuntimeError("the handler crashed")
        return Response(b"\x00\xff", media_type="application/octet-stream")

    routes = [
        Route(f"/{fn.__name__}", rel.offload(fn), methods=["POST"])
        for fn in (flaky, missing, crash)
    ]
    return Starlette(routes=routes, middleware=[Middleware(ReliableMiddleware, reliable=rel)])


def run_to_the_end(rel: Reliable, clock: ManualClock, rounds: int = 5) -> None:
    for _ in range(rounds):
        rel.run_until_idle()
        clock.advance(600)


def test_5xx_is_retried_4xx_is_final_and_exceptions_are_retried(
    rel: Reliable, clock: ManualClock
) -> None:
    calls: dict[str, int] = {}
    client = TestClient(outcome_app(rel, calls))
    locations = {
        name: client.post(f"/{name}").headers["location"] for name in ("flaky", "missing", "crash")
    }

    run_to_the_end(rel, clock)

    flaky, missing, crash = (client.get(locations[name]).json() for name in locations)
    assert flaky["status"] == "succeeded" and flaky["attempts"] == 3
    assert flaky["result"]["status_code"] == 200
    assert flaky["result"]["body"] == {"ok": True, "attempt": 3}
    assert missing["status"] == "succeeded" and missing["attempts"] == 1
    assert missing["result"]["status_code"] == 404
    assert missing["result"]["body"] == {"error": "no such order"}
    assert crash["status"] == "succeeded" and crash["attempts"] == 2
    assert crash["result"]["body_encoding"] == "base64"
    assert calls == {"flaky": 3, "missing": 1, "crash": 2}
    [first] = rel.get_attempts(crash["id"])
    assert first.error is not None and first.error["message"] == "the handler crashed"


def test_a_route_called_outside_the_middleware_is_an_error(rel: Reliable) -> None:
    async def view(request: Request) -> Response:
        return Response()

    app = Starlette(routes=[Route("/", rel.offload(view), methods=["POST"])])
    with pytest.raises(ReliableError, match="ReliableMiddleware"):
        TestClient(app).post("/")


# -- idempotency ------------------------------------------------------------------------


def refund(client: TestClient, key: str | bytes | None, amount: int = 500) -> Any:
    headers = {} if key is None else {"Idempotency-Key": key}
    return client.post("/orders/7/refunds", json={"amount_cents": amount}, headers=headers)


def test_a_replayed_request_gets_the_same_job(
    rel: Reliable, client: TestClient, payments: example.PaymentProvider
) -> None:
    first = refund(client, "refund-7-a")
    second = refund(client, "refund-7-a")
    quoted = refund(client, '"refund-7-a"')  # the structured-field form of the same key

    assert first.status_code == second.status_code == quoted.status_code == 202
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert first.json()["id"] == second.json()["id"] == quoted.json()["id"]
    assert second.headers["location"] == first.headers["location"]
    assert rel.run_until_idle() == 1
    assert len(payments.refunds) == 1


def test_a_reused_key_with_another_body_is_422(rel: Reliable, client: TestClient) -> None:
    refund(client, "refund-7-b", amount=500)

    conflict = refund(client, "refund-7-b", amount=900)

    assert conflict.status_code == 422
    assert conflict.headers["content-type"] == "application/problem+json"
    assert conflict.json()["status"] == 422
    assert stored_jobs(rel) == 1


def test_a_missing_or_malformed_key_is_400(rel: Reliable, client: TestClient) -> None:
    for key in (None, "", "   ", "k" * 256, "a\x7fb", "café".encode(), '"unterminated'):
        response = refund(client, key)

        assert response.status_code == 400, key
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["title"] == "Bad Request"
    assert stored_jobs(rel) == 0


def test_a_key_of_255_characters_is_accepted(client: TestClient) -> None:
    assert refund(client, "k" * 255).status_code == 202


def test_a_key_expires_after_the_ttl(clock: ManualClock, client: TestClient) -> None:
    first = refund(client, "refund-7-c").json()["id"]
    clock.advance(24 * 3600 + 1)
    assert refund(client, "refund-7-c").json()["id"] != first


# -- request size -------------------------------------------------------------------------


@pytest.fixture
def small(db_url: str, clock: ManualClock) -> Iterator[Reliable]:
    app = Reliable(db_url, clock=clock, embedded_worker=False, max_payload=1024)
    yield app
    app.close()


def test_an_oversized_body_is_413_and_nothing_is_stored(small: Reliable) -> None:
    client = TestClient(example.create_app(small, GatedEmails()))
    padding = "x" * 2000

    declared = client.post(RECEIPT, json={"email": "ada@example.com", "pad": padding})

    def chunks() -> Iterator[bytes]:
        yield b'{"email": "ada@example.com", "pad": "'
        for _ in range(20):
            yield b"x" * 100
        yield b'"}'

    chunked = client.post(RECEIPT, content=chunks(), headers={"content-type": "application/json"})

    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.headers["content-type"] == "application/problem+json"
    assert stored_jobs(small) == 0
    fits = client.post(RECEIPT, content=b"x" * 1024)
    assert fits.status_code == 202


def test_a_streamed_body_is_read_no_further_than_the_limit(small: Reliable) -> None:
    app = example.create_app(small, GatedEmails())
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
        "headers": [(b"host", b"testserver"), (b"transfer-encoding", b"chunked")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }
    with anyio.from_thread.start_blocking_portal() as portal:
        portal.call(app, scope, receive, send)

    assert sent[0]["status"] == 413
    assert len(received) == 11  # 1100 bytes: the first chunk past the 1024-byte limit
    assert stored_jobs(small) == 0


# -- credentials ------------------------------------------------------------------------


def test_credentials_are_not_stored_but_the_capture_reaches_the_handler(rel: Reliable) -> None:
    secret = "s3cr3t-token-4f1d"
    seen: dict[str, Any] = {}

    @rel.capture
    def caller(request: Request) -> dict[str, str]:
        return {"user": request.headers["authorization"].removeprefix("Bearer ")[:6]}

    async def export(request: Request) -> Response:
        seen["captured"] = current_job().captured
        seen["authorization"] = request.headers.get("authorization")
        seen["cookie"] = request.headers.get("cookie")
        return Response(status_code=204)

    app = Starlette(
        routes=[Route("/export", rel.offload(export), methods=["POST"])],
        middleware=[Middleware(ReliableMiddleware, reliable=rel)],
    )
    client = TestClient(app)
    job_id = client.post(
        "/export", headers={"Authorization": f"Bearer {secret}", "Cookie": f"session={secret}"}
    ).json()["id"]

    row = rel.store.get_job(job_id)
    assert row is not None and secret not in row.payload
    assert json.loads(row.payload)["captured"] == {"user": "s3cr3t"}
    rel.run_until_idle()
    assert seen == {"captured": {"user": "s3cr3t"}, "authorization": None, "cookie": None}


# -- the embedded worker ------------------------------------------------------------------


def test_the_lifespan_starts_and_stops_the_embedded_worker(db_url: str) -> None:
    rel = Reliable(db_url, worker_threads=2)
    app = example.create_app(rel, GatedEmails())
    try:
        with TestClient(app) as client:
            assert rel.worker is not None and rel.worker.running
            assert app.state.reliable is rel
            location = post_receipt(client).headers["location"]
            done = client.get(location, params={"wait": str(WAIT)}).json()
            assert done["status"] == "succeeded"
            assert done["result"]["status_code"] == 201
        assert rel.worker is None
    finally:
        rel.close()


def test_a_job_running_at_shutdown_is_cancelled_given_back_and_runs_again(db_url: str) -> None:
    rel = Reliable(db_url, worker_threads=1, shutdown_grace=0.05)
    emails = GatedEmails()
    emails.gate.clear()
    try:
        with TestClient(example.create_app(rel, emails)) as client:
            job_id = post_receipt(client).json()["id"]
            assert emails.entered.wait(WAIT)
            assert rel.get_job(job_id).status == "running"
        assert rel.worker is None
        # The attempt outlived the grace period: its coroutine is cancelled where it
        # awaits, and once it has ended the job is given back, uncounted.
        deadline = time.monotonic() + WAIT
        while rel.get_job(job_id).status != "queued":
            assert time.monotonic() < deadline, "the job was not given back"
            time.sleep(0.01)
        assert rel.get_job(job_id).attempts == 0
        emails.gate.set()

        assert rel.run_until_idle() == 1
        info = rel.get_job(job_id)
        assert info.status == "succeeded"
        assert info.result["status_code"] == 201
    finally:
        emails.gate.set()
        rel.close()


def test_no_worker_when_the_embedded_worker_is_off(rel: Reliable) -> None:
    with TestClient(example.create_app(rel, GatedEmails())):
        assert rel.worker is None
