"""Flask: offloaded routes answer 202, run in the worker on the rebuilt request, and keep
SPEC §4 (status resource, retries, idempotency, credentials, payload limit)."""

from __future__ import annotations

import functools
import importlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
import tenacity
from click.testing import CliRunner
from flask import Flask, abort, current_app, g, request
from flask.cli import FlaskGroup
from flask.testing import FlaskClient
from sqlalchemy import text
from support import watch_unfinished_reads

from reliable import ConfigError, ManualClock, Reliable, current_job
from reliable.cli import locate
from reliable.integrations.flask import FlaskState, ReliableFlask

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PROBLEM = "application/problem+json"


class Mailer:
    """The example's email provider for tests: never fails; can hold a send until told."""

    def __init__(self, *, gated: bool = False) -> None:
        self.sent: list[dict[str, str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        if not gated:
            self.release.set()

    def send(self, to: str, subject: str, text: str) -> str:
        self.entered.set()
        assert self.release.wait(10), "the test never released the send"
        message_id = f"msg-{len(self.sent) + 1}"
        self.sent.append({"id": message_id, "to": to, "subject": subject, "text": text})
        return message_id


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """``examples/flask_app.py``, imported as ``reliable worker`` would import it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(REPO_ROOT))
        # Its module-level app must not start a worker or touch demo.db in this process.
        patch.setenv("RELIABLE_EMBEDDED_WORKER", "0")
        patch.setenv("RELIABLE_DATABASE_URL", f"sqlite:///{tmp_path_factory.mktemp('ex')}/x.db")
        module = importlib.import_module("examples.flask_app")
    yield module
    module.rel.close()


@pytest.fixture
def mailer() -> Mailer:
    return Mailer()


@pytest.fixture
def shop(example: ModuleType, rel: Reliable, mailer: Mailer) -> Flask:
    app: Flask = example.create_app(rel, emails=mailer, payments=example.PaymentProvider())
    return app


def job_status(client: FlaskClient, job_id: str, wait: float | None = None) -> dict[str, Any]:
    query = "" if wait is None else f"?wait={wait}"
    response = client.get(f"/_reliable/jobs/{job_id}{query}")
    assert response.status_code == 200, response.data
    document: dict[str, Any] = response.get_json()
    return document


def post_receipt(client: FlaskClient, order_id: int = 42) -> str:
    response = client.post(
        f"/orders/{order_id}/receipt?template=short",
        json={"email": "ada@example.com"},
        headers={"X-Request-Id": "req-1"},
    )
    assert response.status_code == 202, response.data
    job_id: str = response.get_json()["id"]
    return job_id


# -- the example app ---------------------------------------------------------------------


def test_receipt_is_accepted_then_runs_on_the_rebuilt_request(
    example: ModuleType, rel: Reliable
) -> None:
    mailer = Mailer(gated=True)
    client = example.create_app(rel, emails=mailer).test_client()
    response = client.post(
        "/orders/42/receipt?template=short",
        json={"email": "ada@example.com"},
        headers={"X-Request-Id": "req-1"},
    )
    assert response.status_code == 202
    job_id = response.get_json()["id"]
    location = f"/_reliable/jobs/{job_id}"
    assert response.headers["Location"] == location
    assert response.headers["Retry-After"] == "1"
    assert response.get_json() == {"id": job_id, "status": "queued", "status_url": location}
    assert len(job_id) == 32 and uuid.UUID(job_id).version == 4
    assert job_status(client, job_id)["status"] == "queued"

    runner = threading.Thread(target=rel.run_until_idle)
    runner.start()
    try:
        assert mailer.entered.wait(10)
        assert job_status(client, job_id)["status"] == "running"
    finally:
        mailer.release.set()
        runner.join(10)
    document = job_status(client, job_id)
    assert document["status"] == "succeeded"
    assert document["attempts"] == 1
    assert document["result"]["status_code"] == 201
    assert document["result"]["body"] == {
        "order_id": 42,
        "email": "ada@example.com",
        "template": "short",
        "request_id": "req-1",
        "message_id": "msg-1",
        "attempt": 1,
    }
    assert mailer.sent[0]["subject"] == "Receipt for order 42"


def test_wait_holds_the_status_request_until_the_job_ends(
    example: ModuleType, rel: Reliable, monkeypatch: pytest.MonkeyPatch
) -> None:
    mailer = Mailer(gated=True)
    client = example.create_app(rel, emails=mailer).test_client()
    job_id = post_receipt(client)
    started = time.monotonic()
    assert job_status(client, job_id, wait=0.2)["status"] == "queued"
    # Held for the whole wait (a lower bound the handler's own deadline guarantees),
    # then answered with the job as it is.
    assert time.monotonic() - started >= 0.2

    runner = threading.Thread(target=rel.run_until_idle)
    runner.start()
    try:
        assert mailer.entered.wait(10)
        read = watch_unfinished_reads(rel, monkeypatch)
        with ThreadPoolExecutor(1) as pool:
            # The longest wait there is: an answer within 20 s comes from the job ending.
            held = pool.submit(job_status, client, job_id, 60)
            assert read.wait(10), "the status request never read the running job"
            mailer.release.set()
            document = held.result(timeout=20)
        # It saw the job running, and answers with its end: it was held until then.
        assert document["status"] == "succeeded"
    finally:
        mailer.release.set()
        runner.join(10)
    bad = client.get(f"/_reliable/jobs/{job_id}?wait=soon")
    assert bad.status_code == 400 and bad.mimetype == PROBLEM


def test_delete_cancels_a_queued_job_and_it_never_runs(
    shop: Flask, rel: Reliable, mailer: Mailer
) -> None:
    client = shop.test_client()
    job_id = post_receipt(client)
    response = client.delete(f"/_reliable/jobs/{job_id}")
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    assert rel.run_until_idle() == 0
    assert mailer.sent == []
    assert job_status(client, job_id)["status"] == "cancelled"
    again = client.delete(f"/_reliable/jobs/{job_id}")
    assert again.status_code == 409 and again.mimetype == PROBLEM


@pytest.mark.parametrize(
    "job_id", ["5" * 32, "not-a-job", "A" * 32], ids=["unknown", "bad", "upper"]
)
def test_unknown_or_malformed_job_id_is_a_404_problem(shop: Flask, job_id: str) -> None:
    client = shop.test_client()
    for response in (
        client.get(f"/_reliable/jobs/{job_id}"),
        client.delete(f"/_reliable/jobs/{job_id}"),
    ):
        assert response.status_code == 404
        assert response.mimetype == PROBLEM
        assert response.get_json()["status"] == 404


def test_the_worker_cli_finds_the_example_through_its_app(example: ModuleType) -> None:
    state = example.app.extensions["reliable"]
    assert isinstance(state, FlaskState) and state.reliable is example.rel
    assert locate("examples.flask_app:app") is example.rel
    result = example.app.test_cli_runner().invoke(args=["reliable", "worker", "--help"])
    assert result.exit_code == 0, result.output
    assert "--threads" in result.output and "--queues" in result.output


# -- outcomes and retries ----------------------------------------------------------------


def outcomes_app(rel: Reliable) -> Flask:
    app = Flask("outcomes")
    calls: dict[str, int] = {}

    def count(name: str) -> int:
        calls[name] = calls.get(name, 0) + 1
        return calls[name]

    retried = rel.offload(retries=3, backoff=tenacity.wait_fixed(5))

    @app.post("/flaky")
    @retried
    def flaky() -> Any:
        if count("flaky") <= 2:
            return {"error": "upstream down"}, 500
        return {"ok": True}

    @app.post("/missing")
    @retried
    def missing() -> Any:
        count("missing")
        return {"error": "no such order"}, 404

    @app.post("/gone")
    @retried
    def gone() -> Any:
        count("gone")
        abort(410)

    @app.post("/boom")
    @retried
    def boom() -> Any:
        if count("boom") == 1:
            raise ConnectionError("the provider hung up")
        return "done", 200, {"Content-Type": "text/plain"}

    ReliableFlask(app, rel)
    return app


def run_with_backoff(rel: Reliable, clock: ManualClock, rounds: int = 4) -> None:
    for _ in range(rounds):
        rel.run_until_idle()
        clock.advance(5)


def test_5xx_is_retried_until_it_succeeds(rel: Reliable, clock: ManualClock) -> None:
    client = outcomes_app(rel).test_client()
    job_id = client.post("/flaky").get_json()["id"]
    rel.run_until_idle()
    assert job_status(client, job_id)["status"] == "queued"  # waiting out the backoff
    run_with_backoff(rel, clock)
    document = job_status(client, job_id)
    assert document["status"] == "succeeded"
    assert document["attempts"] == 3
    assert document["result"]["status_code"] == 200
    assert document["result"]["body"] == {"ok": True}
    assert ["500" in (a.error or {}).get("message", "") for a in rel.get_attempts(job_id)] == [
        True,
        True,
    ]


@pytest.mark.parametrize(("path", "status"), [("/missing", 404), ("/gone", 410)])
def test_4xx_is_the_final_answer(rel: Reliable, clock: ManualClock, path: str, status: int) -> None:
    client = outcomes_app(rel).test_client()
    job_id = client.post(path).get_json()["id"]
    run_with_backoff(rel, clock)
    document = job_status(client, job_id)
    assert document["status"] == "succeeded"
    assert document["attempts"] == 1
    assert document["result"]["status_code"] == status


def test_an_exception_is_retried(rel: Reliable, clock: ManualClock) -> None:
    client = outcomes_app(rel).test_client()
    job_id = client.post("/boom").get_json()["id"]
    run_with_backoff(rel, clock)
    document = job_status(client, job_id)
    assert document["status"] == "succeeded"
    assert document["attempts"] == 2
    assert document["result"]["body"] == "done"
    [attempt] = rel.get_attempts(job_id)
    assert attempt.error is not None and "provider hung up" in attempt.error["message"]


# -- idempotency -------------------------------------------------------------------------


def refund(client: FlaskClient, key: str | None, amount: int = 500, user: str = "") -> Any:
    headers = {"X-User": user} if user else {}
    if key is not None:
        headers["Idempotency-Key"] = key
    return client.post("/orders/7/refunds", json={"amount_cents": amount}, headers=headers)


def test_a_replay_answers_the_same_job_and_refunds_once(
    shop: Flask, rel: Reliable, example: ModuleType
) -> None:
    client = shop.test_client()
    first = refund(client, "refund-7-a")
    second = refund(client, '"refund-7-a"')  # the structured-field form of the same key
    assert first.status_code == second.status_code == 202
    assert first.get_json()["id"] == second.get_json()["id"]
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.headers["Location"] == first.headers["Location"]
    assert rel.store.count_by_status() == {"queued": 1}
    rel.run_until_idle()
    assert job_status(client, first.get_json()["id"])["result"]["status_code"] == 201


def test_key_reuse_with_another_body_is_422(shop: Flask, rel: Reliable) -> None:
    client = shop.test_client()
    assert refund(client, "refund-7-b", amount=500).status_code == 202
    conflict = refund(client, "refund-7-b", amount=900)
    assert conflict.status_code == 422
    assert conflict.mimetype == PROBLEM
    assert rel.store.count_by_status() == {"queued": 1}


@pytest.mark.parametrize("key", [None, "", "k" * 256, "abc\x01def", '"unterminated'])
def test_missing_or_malformed_key_is_400(shop: Flask, rel: Reliable, key: str | None) -> None:
    response = refund(shop.test_client(), key)
    assert response.status_code == 400
    assert response.mimetype == PROBLEM
    assert rel.store.count_by_status() == {}


def test_an_expired_key_makes_a_new_job(
    example: ModuleType, db_url: str, clock: ManualClock
) -> None:
    rel = Reliable(db_url, clock=clock, embedded_worker=False, idempotency_ttl=60)
    try:
        client = example.create_app(rel).test_client()
        first = refund(client, "refund-7-c").get_json()["id"]
        clock.advance(59)
        assert refund(client, "refund-7-c").get_json()["id"] == first
        clock.advance(2)
        later = refund(client, "refund-7-c")
        assert later.status_code == 202
        assert later.get_json()["id"] != first
        assert "Idempotent-Replayed" not in later.headers
    finally:
        rel.close()


def test_keys_are_scoped_per_caller(rel: Reliable) -> None:
    app = Flask("scoped")

    @app.post("/orders/7/refunds")
    @rel.offload(idempotency="required", idempotency_scope=lambda req: req.headers["X-User"])
    def scoped_refund() -> Any:
        return {"ok": True}

    ReliableFlask(app, rel)
    client = app.test_client()
    alice = refund(client, "same-key", user="alice").get_json()["id"]
    bob = refund(client, "same-key", user="bob").get_json()["id"]
    assert alice != bob
    again = refund(client, "same-key", user="alice")
    assert again.get_json()["id"] == alice
    assert again.headers["Idempotent-Replayed"] == "true"


# -- credentials -------------------------------------------------------------------------

BEARER = "tok-3f9a1c7e5d2b8a64"
SESSION = "sess-91ad44e0b7c35f12"
API_KEY = "key-5c0ffee7d00dfa11"


def stored_text(rel: Reliable, db_url: str) -> bytes:
    """Every byte the database holds: the SQLite files (WAL included), or every row."""
    if db_url.startswith("sqlite"):
        database = Path(db_url.removeprefix("sqlite:///"))
        files = [database, Path(f"{database}-wal")]
        assert database.exists()
        return b"".join(path.read_bytes() for path in files if path.exists())
    with rel.store.engine.connect() as connection:
        tables = connection.execute(
            text("SELECT tablename FROM pg_tables WHERE tablename LIKE 'reliable%'")
        ).scalars()
        rows = [
            row
            for table in list(tables)
            for row in connection.execute(text(f'SELECT CAST(t AS text) FROM "{table}" t'))
        ]
    assert rows
    return "\n".join(str(row[0]) for row in rows).encode()


def test_credentials_are_not_stored_and_the_capture_reaches_the_handler(
    db_url: str, clock: ManualClock
) -> None:
    rel = Reliable(db_url, clock=clock, embedded_worker=False, redact_headers="X-Api-Key")
    users = {BEARER: "user-7"}

    @rel.capture
    def caller(req: Any) -> dict[str, str]:
        return {"user_id": users[req.headers["Authorization"].removeprefix("Bearer ")]}

    app = Flask("credentials")

    @app.post("/profiles/<name>")
    @rel.offload(idempotency="required")
    def update_profile(name: str) -> Any:
        return {
            "name": name,
            "user_id": g.user_id,
            "g_captured": g.reliable_captured,
            "job_captured": current_job().captured,
            "headers": sorted(request.headers.keys()),
        }

    ReliableFlask(app, rel)
    try:
        client = app.test_client()
        response = client.post(
            "/profiles/ada",
            json={"bio": "hi"},
            headers={
                "Authorization": f"Bearer {BEARER}",
                "Cookie": f"session={SESSION}",
                "X-Api-Key": API_KEY,
                "Idempotency-Key": "profile-1",
            },
        )
        assert response.status_code == 202
        rel.run_until_idle()
        document = job_status(client, response.get_json()["id"])
        body = document["result"]["body"]
        assert body["name"] == "ada"
        assert body["user_id"] == "user-7"
        assert body["g_captured"] == body["job_captured"] == {"user_id": "user-7"}
        assert not {"Authorization", "Cookie", "X-Api-Key"} & set(body["headers"])
        stored = stored_text(rel, db_url)
        assert b"user-7" in stored  # the capture is there, so the search does see the data
        for secret in (BEARER, SESSION, API_KEY):
            assert secret.encode() not in stored
    finally:
        rel.close()


def test_a_route_capture_overrides_the_global_hook(rel: Reliable) -> None:
    rel.capture(lambda req: "global")
    app = Flask("capture")

    @app.post("/own")
    @rel.offload(capture=lambda req: {"tenant": req.args["tenant"]})
    def own() -> Any:
        return {"tenant": g.tenant}

    ReliableFlask(app, rel)
    client = app.test_client()
    job_id = client.post("/own?tenant=acme").get_json()["id"]
    rel.run_until_idle()
    assert job_status(client, job_id)["result"]["body"] == {"tenant": "acme"}


# -- payload limit -----------------------------------------------------------------------

LIMIT = 1024


class EndlessBody(io.RawIOBase):
    """A request body that never ends; counts the bytes read from it."""

    def __init__(self) -> None:
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        size = len(buffer)
        buffer[:size] = b"x" * size
        self.bytes_read += size
        return size


@pytest.fixture
def small(db_url: str, clock: ManualClock) -> Iterator[tuple[Reliable, FlaskClient]]:
    rel = Reliable(db_url, clock=clock, embedded_worker=False, max_payload=LIMIT)
    app = Flask("small")

    @app.post("/upload")
    @rel.offload
    def upload() -> Any:
        return {"size": len(request.get_data()), "json": request.get_json(silent=True)}

    ReliableFlask(app, rel)
    yield rel, app.test_client()
    rel.close()


def chunked(client: FlaskClient, stream: Any) -> Any:
    """POST a body without Content-Length, as a server passes a chunked request on."""
    return client.post(
        "/upload",
        headers={"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
        environ_overrides={"wsgi.input": stream, "wsgi.input_terminated": True},
    )


def test_an_oversized_body_is_413_and_nothing_is_stored(
    small: tuple[Reliable, FlaskClient],
) -> None:
    rel, client = small
    response = client.post("/upload", data=b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.mimetype == PROBLEM
    endless = EndlessBody()
    response = chunked(client, endless)
    assert response.status_code == 413
    assert response.mimetype == PROBLEM
    assert endless.bytes_read <= LIMIT + 1  # refused without buffering the rest
    assert rel.store.count_by_status() == {}


def test_bodies_up_to_the_limit_are_accepted_chunked_or_not(
    small: tuple[Reliable, FlaskClient],
) -> None:
    rel, client = small
    whole = client.post("/upload", data=b"x" * LIMIT).get_json()["id"]
    streamed = chunked(client, io.BytesIO(b'{"n": 1}')).get_json()["id"]
    rel.run_until_idle()
    assert job_status(client, whole)["result"]["body"] == {"size": LIMIT, "json": None}
    assert job_status(client, streamed)["result"]["body"] == {"size": 8, "json": {"n": 1}}


# -- what runs in the request ------------------------------------------------------------


def test_a_before_request_hook_answers_at_once_and_nothing_is_stored(rel: Reliable) -> None:
    app = Flask("guarded")

    @app.before_request
    def require_key() -> None:
        if request.headers.get("X-Api-Key") != "let-me-in":
            abort(401)

    @app.post("/reports")
    @rel.offload
    def build_report() -> Any:
        return {"ok": True}

    ReliableFlask(app, rel)
    client = app.test_client()
    assert client.post("/reports").status_code == 401
    assert rel.store.count_by_status() == {}
    assert client.post("/reports", headers={"X-Api-Key": "let-me-in"}).status_code == 202


def test_a_decorator_above_offload_runs_in_the_request_only(rel: Reliable) -> None:
    app = Flask("validated")
    checks: list[str] = []

    def require_title(view: Any) -> Any:
        @functools.wraps(view)
        def check(*args: Any, **kwargs: Any) -> Any:
            checks.append("checked")
            if "title" not in (request.get_json(silent=True) or {}):  # reads the body first
                return {"error": "title is required"}, 422
            return view(*args, **kwargs)

        return check

    @app.post("/notes/<int:note_id>")
    @require_title
    @rel.offload
    def save_note(note_id: int) -> Any:
        return {"note_id": note_id, "title": request.get_json()["title"]}

    ReliableFlask(app, rel)
    client = app.test_client()
    assert client.post("/notes/3", json={}).status_code == 422
    assert rel.store.count_by_status() == {}
    job_id = client.post("/notes/3", json={"title": "groceries"}).get_json()["id"]
    rel.run_until_idle()
    assert rel.get_job(job_id).result["body"] == {"note_id": 3, "title": "groceries"}
    assert checks == ["checked", "checked"]  # not again in the worker


# -- the extension -----------------------------------------------------------------------


def test_one_registration_per_app(rel: Reliable) -> None:
    app = Flask("once")
    extension = ReliableFlask(rel)
    extension.init_app(app)
    assert app.extensions["reliable"].reliable is rel
    with pytest.raises(RuntimeError, match="already registered"):
        ReliableFlask(app, rel)


def test_without_a_reliable_the_extension_makes_one_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, db_url: str
) -> None:
    monkeypatch.setenv("RELIABLE_DATABASE_URL", db_url)
    monkeypatch.setenv("RELIABLE_EMBEDDED_WORKER", "0")
    app = Flask("three_lines")
    reliable = ReliableFlask(app)

    @app.post("/reports/<int:report_id>")
    @reliable.offload(retries=2)
    def build(report_id: int) -> tuple[dict[str, int], int]:
        return {"report": report_id}, 201

    response = app.test_client().post("/reports/5")
    assert response.status_code == 202
    reliable.reliable.run_until_idle()
    status = app.test_client().get(response.headers["Location"]).get_json()
    assert (status["status"], status["result"]["body"]) == ("succeeded", {"report": 5})
    reliable.reliable.close()


def test_several_apps_in_one_process_each_run_their_own_routes(rel: Reliable) -> None:
    apps = []
    for name in ("shop_a", "shop_b"):
        app = Flask(name)
        app.config["SHOP"] = name.upper()

        @app.post(f"/{name}")
        @rel.offload(name=f"{name}_route")
        def route() -> Any:
            return {"app": current_app.name, "shop": current_app.config["SHOP"]}

        ReliableFlask(app, rel)
        apps.append(app)
    ids = [app.test_client().post(f"/{app.name}").get_json()["id"] for app in apps]
    rel.run_until_idle()
    bodies = [rel.get_job(job_id).result["body"] for job_id in ids]
    assert bodies == [{"app": "shop_a", "shop": "SHOP_A"}, {"app": "shop_b", "shop": "SHOP_B"}]


def test_a_bad_config_value_names_its_key(rel: Reliable) -> None:
    app = Flask("config")
    app.config["RELIABLE_WORKER_THREADS"] = "many"
    with pytest.raises(ConfigError, match="RELIABLE_WORKER_THREADS"):
        ReliableFlask(app, rel)


# -- the embedded worker -----------------------------------------------------------------


def embedded_app(rel: Reliable, handler: Any) -> Flask:
    app = Flask("embedded")
    app.post("/work")(rel.offload(retries=3, backoff=tenacity.wait_fixed(0))(handler))
    ReliableFlask(app, rel)
    return app


def test_init_app_starts_the_embedded_worker(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELIABLE_EMBEDDED_WORKER", raising=False)
    rel = Reliable(db_url, poll_interval=0.2)
    try:
        app = embedded_app(rel, lambda: {"pid": os.getpid()})
        assert app.extensions["reliable"].started_worker
        assert rel.worker is not None and rel.worker.running
        client = app.test_client()
        job_id = client.post("/work").get_json()["id"]
        document = job_status(client, job_id, wait=10)
        assert document["status"] == "succeeded"
        assert document["result"]["body"] == {"pid": os.getpid()}
    finally:
        rel.close()


def test_the_embedded_worker_can_be_turned_off(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELIABLE_EMBEDDED_WORKER", "0")
    rel = Reliable(db_url)
    try:
        app = embedded_app(rel, lambda: {"ok": True})
        assert rel.worker is None
        assert not app.extensions["reliable"].started_worker
        client = app.test_client()
        job_id = client.post("/work").get_json()["id"]
        assert job_status(client, job_id, wait=0.3)["status"] == "queued"
    finally:
        rel.close()
    monkeypatch.delenv("RELIABLE_EMBEDDED_WORKER")
    rel = Reliable(db_url)
    try:
        app = Flask("configured")
        app.config["RELIABLE_EMBEDDED_WORKER"] = False
        ReliableFlask(app, rel)
        assert rel.worker is None
    finally:
        rel.close()


def test_stopping_the_worker_leaves_a_running_job_to_its_attempt_until_it_returns(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELIABLE_EMBEDDED_WORKER", raising=False)
    rel = Reliable(db_url, poll_interval=0.2)
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def work() -> Any:
        calls.append(current_job().attempt)
        if len(calls) == 1:
            entered.set()
            release.wait(10)
        return {"calls": len(calls)}

    try:
        client = embedded_app(rel, work).test_client()
        job_id = client.post("/work").get_json()["id"]
        assert entered.wait(10)
        assert job_status(client, job_id)["status"] == "running"
        rel.stop_worker(timeout=0.1)
        # Its thread still runs it: the job is not given to anyone else meanwhile.
        assert job_status(client, job_id)["status"] == "running"
        assert rel.run_until_idle() == 0
        release.set()  # the attempt ends after the grace period, and its answer counts
        document = job_status(client, job_id, wait=10)
        assert document["status"] == "succeeded"
        assert document["result"]["body"] == {"calls": 1}
        assert document["attempts"] == 1
        assert calls == [1]
    finally:
        release.set()
        rel.close()


def test_flask_commands_other_than_run_start_no_worker(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RELIABLE_EMBEDDED_WORKER", raising=False)
    monkeypatch.setenv("FLASK_RUN_FROM_CLI", "")  # FlaskGroup sets it; restored after
    rel = Reliable(db_url)
    try:
        cli = FlaskGroup(create_app=lambda: embedded_app(rel, lambda: {}), load_dotenv=False)
        result = CliRunner().invoke(cli, ["routes"])
        assert result.exit_code == 0, result.output
        assert "/_reliable/jobs/<job_id>" in result.output
        assert rel.worker is None
    finally:
        rel.close()


# -- worker processes --------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        [str(BIN / "reliable"), "worker", "examples.flask_app:app", "--threads", "2"],
        [str(BIN / "flask"), "--app", "examples.flask_app", "reliable", "worker"],
    ],
    ids=["reliable-worker", "flask-reliable-worker"],
)
def test_a_worker_process_runs_the_example_jobs(
    example: ModuleType, db_url: str, command: list[str]
) -> None:
    rel = Reliable(db_url, embedded_worker=False)
    client = example.create_app(rel).test_client()
    job_id = post_receipt(client, order_id=9)
    rel.store.count_by_status()  # the schema exists before the worker starts
    env = {**os.environ, "RELIABLE_DATABASE_URL": db_url, "DEMO_EMAIL_FAILURE_RATE": "0"}
    with subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    ) as worker:
        try:
            document = job_status(client, job_id, wait=30)
            assert document["status"] == "succeeded", document
            assert document["result"]["body"]["order_id"] == 9
            worker.send_signal(signal.SIGTERM)
            output, _ = worker.communicate(timeout=30)
            assert worker.returncode == 0, output.decode()
        finally:
            if worker.poll() is None:
                worker.kill()
            rel.close()


@contextmanager
def gunicorn(db_url: str, workers: int) -> Iterator[tuple[str, list[str]]]:
    """Serve the example under gunicorn; once every worker is up, yield its URL and log."""
    env = {**os.environ, "RELIABLE_DATABASE_URL": db_url, "RELIABLE_EMBEDDED_WORKER": "0"}
    command = [
        str(BIN / "gunicorn"),
        f"--workers={workers}",
        "--preload",  # workers serve as soon as they are forked, so the race spreads
        "--no-control-socket",
        "--bind=127.0.0.1:0",
        "--access-logfile=-",
        "--access-logformat=pid=%(p)s %(s)s",
        "examples.flask_app:app",
    ]
    lines: list[str] = []
    ready = threading.Event()
    with subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as server:
        assert server.stdout is not None
        stdout = server.stdout

        def drain() -> None:
            for line in stdout:
                lines.append(line)
                if sum("Booting worker" in line for line in lines) == workers:
                    ready.set()

        drainer = threading.Thread(target=drain, daemon=True)
        drainer.start()
        try:
            assert ready.wait(30), "gunicorn did not start:\n" + "".join(lines)
            [address] = [line for line in lines if "Listening at: " in line]
            yield address.split("Listening at: ")[1].split()[0], lines
        finally:
            server.terminate()
            server.wait(30)
            drainer.join(10)


@pytest.mark.slow
def test_one_key_sent_at_once_to_several_server_processes_makes_one_job(db_url: str) -> None:
    rel = Reliable(db_url, embedded_worker=False)
    rel.store.count_by_status()  # the schema exists before the servers race
    start = threading.Barrier(50)

    def send(url: str) -> httpx.Response:
        start.wait(10)
        return httpx.post(
            f"{url}/orders/7/refunds",
            json={"amount_cents": 500},
            headers={"Idempotency-Key": "race-7"},
            timeout=30,
        )

    try:
        with gunicorn(db_url, workers=3) as (url, log), ThreadPoolExecutor(50) as pool:
            responses = list(pool.map(send, [url] * 50))
        assert [r.status_code for r in responses] == [202] * 50
        assert len({r.json()["id"] for r in responses}) == 1
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 49
        assert rel.store.count_by_status() == {"queued": 1}
        served_by = {line.split()[0] for line in log if line.startswith("pid=")}
        assert len(served_by) >= 2, served_by  # the duplicates met in the database
    finally:
        rel.close()
