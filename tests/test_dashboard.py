"""The dashboard over HTTP, through Flask's and Starlette's test clients, on SQLite and
PostgreSQL: who may see and act, forged actions refused, values escaped, credentials
hidden, and each action doing what the operator asked."""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from starlette.applications import Starlette
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware

from reliable import Reliable, step
from reliable.clock import ManualClock
from reliable.dashboard import make_dashboard_server
from reliable.integrations.flask import ReliableFlask
from reliable.integrations.starlette import ReliableMiddleware

with warnings.catch_warnings():  # starlette asks for httpx2; httpx works the same here
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient

PREFIX = "/_reliable"
XSS = '<script>alert("owned")</script>'


class Client:
    """One framework's test client, speaking as a browser on ``remote``."""

    def __init__(self, framework: str, rel: Reliable, remote: str = "127.0.0.1") -> None:
        self.framework = framework
        self.remote = remote
        if framework == "flask":
            app = Flask(__name__)
            app.config["RELIABLE_EMBEDDED_WORKER"] = False
            ReliableFlask(app, rel)
            self.flask = app.test_client()
        else:
            app = Starlette(middleware=[Middleware(ReliableMiddleware, reliable=rel)])
            self.starlette = TestClient(app, client=(remote, 50000), follow_redirects=False)

    def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        if self.framework == "flask":
            answer = self.flask.get(
                PREFIX + path, headers=headers or {}, environ_base={"REMOTE_ADDR": self.remote}
            )
            return Response(
                answer.status_code,
                dict(answer.headers),
                answer.text,
                answer.headers.getlist("Set-Cookie"),
            )
        got = self.starlette.get(PREFIX + path, headers=headers or {})
        return Response(
            got.status_code, dict(got.headers), got.text, got.headers.get_list("set-cookie")
        )

    def post(
        self, path: str, data: dict[str, Any], headers: dict[str, str] | None = None
    ) -> Response:
        if self.framework == "flask":
            answer = self.flask.post(
                PREFIX + path,
                data=data,
                headers=headers or {},
                environ_base={"REMOTE_ADDR": self.remote},
            )
            return Response(
                answer.status_code,
                dict(answer.headers),
                answer.text,
                answer.headers.getlist("Set-Cookie"),
            )
        got = self.starlette.post(PREFIX + path, data=data, headers=headers or {})
        return Response(
            got.status_code, dict(got.headers), got.text, got.headers.get_list("set-cookie")
        )

    def csrf(self, path: str = "/list") -> str:
        page = self.get(path)
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, page.text
        return found.group(1)


class Response:
    def __init__(self, status: int, headers: dict[str, str], text: str, cookies: list[str]) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self.text = text
        self.cookies = cookies

    def notice(self) -> str:
        found = re.search(r'class="notice"[^>]*>([^<]*)<', self.text)
        return found.group(1) if found else ""


@pytest.fixture(params=["flask", "starlette"])
def framework(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def client(framework: str, rel: Reliable) -> Client:
    return Client(framework, rel)


@pytest.fixture
def guarded(db_url: str, clock: ManualClock) -> Iterator[Reliable]:
    """A Reliable whose dashboard needs a token (and has a read-only one)."""
    app = Reliable(
        db_url,
        clock=clock,
        embedded_worker=False,
        dashboard_token="operator-secret-1",
        dashboard_read_token="viewer-secret-2",
    )
    yield app
    app.close()


def failed_job(rel: Reliable, message: str = "payment gateway said no") -> str:
    @rel.task(retries=0, name=f"charge_{len(rel.tasks)}")
    def charge(order: Any) -> None:
        raise RuntimeError(message)

    handle = charge.enqueue({"order": 7})
    rel.run_until_idle()
    assert rel.get_job(handle.id).status == "failed"
    return handle.id


def test_every_page_answers_with_a_strict_policy(client: Client, rel: Reliable) -> None:
    job_id = failed_job(rel)
    for path in ("/", "/list", f"/job/{job_id}", "/flow", "/schedules", "/workers"):
        page = client.get(path)
        assert page.status == 200, (path, page.text[:300])
        policy = page.headers["content-security-policy"]
        assert "script-src 'self'" in policy and "unsafe-inline" not in policy
        assert "frame-ancestors 'none'" in policy
        assert page.headers["x-content-type-options"] == "nosniff"
    style = client.get("/static/dashboard.css")
    assert style.status == 200 and style.headers["content-type"].startswith("text/css")
    assert client.get("/static/../console.py").status == 404


def test_the_status_resource_is_still_served_under_the_prefix(
    client: Client, rel: Reliable
) -> None:
    job_id = failed_job(rel)
    answer = client.get(f"/jobs/{job_id}")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("application/json")
    assert '"status":"failed"' in answer.text


def test_off_loopback_without_a_token_nobody_gets_in(framework: str, rel: Reliable) -> None:
    job_id = failed_job(rel)
    outsider = Client(framework, rel, remote="203.0.113.9")
    page = outsider.get("/")
    assert page.status == 401
    assert "RELIABLE_DASHBOARD_TOKEN" in page.text
    assert outsider.get(f"/job/{job_id}").status == 401
    assert outsider.get("/metrics").status == 401
    assert outsider.post(f"/job/{job_id}/retry", {"csrf": "x" * 43}).status == 401
    assert rel.get_job(job_id).status == "failed"


def test_the_login_form_sets_an_httponly_strict_cookie(framework: str, guarded: Reliable) -> None:
    outsider = Client(framework, guarded, remote="203.0.113.9")
    assert outsider.get("/").status == 401
    token = outsider.csrf("/login")
    wrong = outsider.post("/login", {"csrf": token, "token": "guess"})
    assert wrong.status == 401
    signed = outsider.post("/login", {"csrf": token, "token": "operator-secret-1"})
    assert signed.status == 303
    session = next(c for c in signed.cookies if c.startswith("reliable_session="))
    assert "HttpOnly" in session and "SameSite=Strict" in session
    assert "operator-secret-1" not in session  # an HMAC of the token, never the token
    assert outsider.get("/").status == 200


def test_a_bearer_token_lets_in_and_a_loopback_client_needs_it_too(
    framework: str, guarded: Reliable
) -> None:
    local = Client(framework, guarded)
    assert local.get("/").status == 401  # a token is set: loopback needs it as well
    bearer = {"authorization": "Bearer operator-secret-1"}
    assert local.get("/", headers=bearer).status == 200
    assert local.get("/", headers={"authorization": "Bearer nope"}).status == 401


def test_the_read_only_token_sees_but_cannot_act(framework: str, guarded: Reliable) -> None:
    job_id = failed_job(guarded)
    viewer = Client(framework, guarded, remote="203.0.113.9")
    token = viewer.csrf("/login")
    assert viewer.post("/login", {"csrf": token, "token": "viewer-secret-2"}).status == 303
    page = viewer.get(f"/job/{job_id}")
    assert page.status == 200 and "Retry now" not in page.text
    refused = viewer.post(f"/job/{job_id}/retry", {"csrf": token})
    assert refused.status == 403
    assert guarded.get_job(job_id).status == "failed"
    metrics = viewer.get("/metrics")
    assert metrics.status == 200 and metrics.headers["content-type"].startswith("text/plain")


def test_an_action_without_its_csrf_token_is_refused(client: Client, rel: Reliable) -> None:
    job_id = failed_job(rel)
    token = client.csrf(f"/job/{job_id}")
    assert client.post(f"/job/{job_id}/retry", {}).status == 403
    assert client.post(f"/job/{job_id}/retry", {"csrf": "0" * len(token)}).status == 403
    cross_site = {"sec-fetch-site": "cross-site"}
    assert client.post(f"/job/{job_id}/retry", {"csrf": token}, cross_site).status == 403
    other_origin = {"origin": "https://evil.example"}
    assert client.post(f"/job/{job_id}/retry", {"csrf": token}, other_origin).status == 403
    assert rel.get_job(job_id).status == "failed"
    same_site = {"sec-fetch-site": "same-origin"}
    assert client.post(f"/job/{job_id}/retry", {"csrf": token}, same_site).status == 303
    assert rel.get_job(job_id).status == "queued"


def test_every_value_shows_as_text(client: Client, rel: Reliable) -> None:
    @rel.task(retries=0)
    def render_note(note: str) -> None:
        raise ValueError(XSS)

    handle = render_note.enqueue(XSS)
    rel.run_until_idle()
    for path in (f"/job/{handle.id}", "/list", f"/list?error={XSS}", f"/list?task={XSS}"):
        page = client.get(path)
        assert page.status == 200
        assert XSS not in page.text
        assert "&lt;script&gt;alert(" in page.text


def test_credentials_in_arguments_are_redacted(client: Client, rel: Reliable) -> None:
    @rel.task
    def sign_up(email: str, password: str, profile: dict[str, str]) -> None: ...

    handle = sign_up.enqueue(
        "ada@example.com",
        password="hunter2-hunter2",
        profile={"api_token": "tok-123456789", "city": "Paris"},
    )
    page = client.get(f"/job/{handle.id}")
    assert "ada@example.com" in page.text and "Paris" in page.text
    assert "tok-123456789" not in page.text
    assert "hunter2-hunter2" not in page.text
    assert "[redacted]" in page.text


def test_a_failed_job_shows_each_attempt_with_its_traceback(
    client: Client, rel: Reliable, clock: ManualClock
) -> None:
    @rel.task(retries=1)
    def flaky() -> None:
        raise ConnectionError("upstream timed out")

    handle = flaky.enqueue()
    rel.run_until_idle()
    clock.advance(3600)
    rel.run_until_idle()
    assert rel.get_job(handle.id).status == "failed"
    page = client.get(f"/job/{handle.id}")
    assert page.text.count("Traceback (most recent call last)") >= 2
    assert "upstream timed out" in page.text and "in flaky" in page.text


def test_buttons_only_where_the_state_allows_them(client: Client, rel: Reliable) -> None:
    @rel.task
    def fine() -> int:
        return 1

    failed = failed_job(rel)
    done = fine.enqueue().id
    rel.run_until_idle()
    queued = fine.enqueue().id
    pages = {job: client.get(f"/job/{job}").text for job in (queued, done, failed)}
    assert "Cancel</button>" in pages[queued] and "Retry now" not in pages[queued]
    assert "Cancel</button>" not in pages[done] and "Retry now" not in pages[done]
    assert "Replay as a new job" in pages[done]
    assert "Retry now" in pages[failed] and "Cancel</button>" not in pages[failed]


def test_retry_cancel_and_replay_one_job(client: Client, rel: Reliable) -> None:
    failed = failed_job(rel)
    token = client.csrf()
    retried = client.post(f"/job/{failed}/retry", {"csrf": token})
    assert retried.status == 303 and "done=retry" in retried.headers["location"]
    assert rel.get_job(failed).status == "queued"
    assert client.get(retried.headers["location"].removeprefix(PREFIX)).notice() == (
        "1 job retried."
    )
    cancelled = client.post(f"/job/{failed}/cancel", {"csrf": token})
    assert cancelled.status == 303
    assert rel.get_job(failed).status == "cancelled"
    replayed = client.post(f"/job/{failed}/replay", {"csrf": token})
    new_id = replayed.headers["location"].removeprefix(f"{PREFIX}/job/").split("?")[0]
    assert new_id != failed
    assert rel.get_job(new_id).replay_of == failed
    assert rel.get_job(new_id).status == "queued"


def test_replay_from_a_chosen_step(client: Client, rel: Reliable) -> None:
    calls: list[str] = []

    @rel.task(retries=0)
    def onboard() -> None:
        step("create-account", lambda: calls.append("create") or 1)
        step("send-welcome", lambda: calls.append("send") or 2)
        raise RuntimeError("after the steps")

    handle = onboard.enqueue()
    rel.run_until_idle()
    page = client.get(f"/job/{handle.id}")
    assert "create-account" in page.text and "<svg" in page.text
    token = client.csrf()
    replayed = client.post(f"/job/{handle.id}/replay", {"csrf": token, "from_step": "send-welcome"})
    new_id = replayed.headers["location"].removeprefix(f"{PREFIX}/job/").split("?")[0]
    calls.clear()
    rel.run_until_idle()
    assert calls == ["send"]  # the step before the chosen one was not run again
    assert rel.get_job(new_id).replay_of == handle.id


def test_selected_jobs_and_every_matching_job_after_a_confirmation(
    client: Client, rel: Reliable
) -> None:
    failed = [failed_job(rel, f"failure {i}") for i in range(4)]
    token = client.csrf()
    chosen = client.post("/act", {"csrf": token, "action": "retry", "id": failed[:2]})
    assert chosen.status == 303
    assert client.get(chosen.headers["location"].removeprefix(PREFIX)).notice() == (
        "2 jobs retried."
    )
    assert [rel.get_job(i).status for i in failed] == ["queued", "queued", "failed", "failed"]
    confirm = client.post("/bulk", {"csrf": token, "action": "retry", "status": "failed"})
    assert confirm.status == 200
    assert re.search(r'id="confirm-count">2<', confirm.text)
    assert [rel.get_job(i).status for i in failed[2:]] == ["failed", "failed"]  # not yet
    done = client.post(
        "/bulk", {"csrf": token, "action": "retry", "status": "failed", "confirm": "yes"}
    )
    assert done.status == 303
    assert all(rel.get_job(i).status == "queued" for i in failed)
    cancel = client.post(
        "/bulk", {"csrf": token, "action": "cancel", "status": "queued", "confirm": "yes"}
    )
    assert cancel.status == 303
    assert all(rel.get_job(i).status == "cancelled" for i in failed)


def test_list_filters_and_pages_by_keyset(
    client: Client, rel: Reliable, clock: ManualClock
) -> None:
    @rel.task
    def export(n: int) -> None: ...

    @rel.task
    def other() -> None: ...

    for n in range(60):
        export.enqueue(n)
        clock.advance(1)
    other.enqueue()
    first = client.get("/list?task=export")
    assert first.text.count('class="queued"') == 50
    assert "<td>other" not in first.text and "<td>export" in first.text
    older = re.search(r'href="([^"]+)" rel="next"', first.text)
    assert older, "a full page links to the next"
    second = client.get(older.group(1).replace("&amp;", "&").removeprefix(PREFIX))
    assert second.text.count('class="queued"') == 10
    assert 'rel="next"' not in second.text
    assert re.search(r'id="match-count">60<', first.text)
    bad = client.get("/list?since=yesterday")
    assert bad.status == 200 and "since" in bad.text and "2026-01-31T12:00" in bad.text


def test_pause_and_resume_a_task(client: Client, rel: Reliable) -> None:
    token = client.csrf("/flow")
    paused = client.post("/pause", {"csrf": token, "kind": "task", "name": "billing"})
    assert paused.status == 303
    assert rel.paused()["tasks"] == ["billing"]
    page = client.get("/flow")
    assert "billing" in page.text and "Resume</button>" in page.text
    resumed = client.post("/resume", {"csrf": token, "kind": "task", "name": "billing"})
    assert resumed.status == 303
    assert rel.paused()["tasks"] == []


def test_flow_page_shows_rate_limit_windows(client: Client, rel: Reliable) -> None:
    @rel.task(rate_limit="5/minute")
    def notify() -> None: ...

    notify.enqueue()
    notify.enqueue()
    page = client.get("/flow")
    row = re.search(r"<tr><td>notify</td>.*?</tr>", page.text, flags=re.S)
    assert row, page.text
    assert '<td class="num">2</td><td class="num">5</td>' in row.group(0)


def test_overview_counts_and_plot(client: Client, rel: Reliable) -> None:
    failed_job(rel)

    @rel.task
    def fine() -> None: ...

    for _ in range(3):
        fine.enqueue()
    rel.run_until_idle()
    fine.enqueue()
    page = client.get("/")
    found = re.findall(r'<span class="n">([^<]+)</span><span class="label">(\w+)', page.text)
    by_status = {label: n for n, label in found}
    assert by_status["succeeded"] == "3" and by_status["failed"] == "1"
    assert by_status["queued"] == "1"
    assert page.text.count('<rect class="ok"') >= 1 and '<rect class="bad"' in page.text


def test_the_standalone_server_serves_the_dashboard(rel: Reliable, tmp_path: Path) -> None:
    job_id = failed_job(rel)
    server = make_dashboard_server(rel, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with httpx.Client(base_url=base) as http:
            page = http.get(f"/job/{job_id}")
            assert page.status_code == 200 and "payment gateway said no" in page.text
            token = re.search(r'name="csrf" value="([^"]+)"', page.text)
            assert token
            done = http.post(f"/job/{job_id}/retry", data={"csrf": token.group(1)})
            assert done.status_code == 303
        assert rel.get_job(job_id).status == "queued"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
