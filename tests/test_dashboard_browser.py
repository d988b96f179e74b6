"""The dashboard in a real browser: Debian's chromium driven by Playwright, against a
Flask app served by a real HTTP server in a thread.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``playwright``
package (the dev extra); Playwright's own browser download is never used. Without them
these tests are skipped, except under ``CI=true``, where they fail.

``DASHBOARD_SCREENSHOTS=1`` also writes the screenshots of docs/images/.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.serving import make_server

from reliable import Reliable, step
from reliable.integrations.flask import ReliableFlask

CHROMIUM = Path("/usr/bin/chromium")
REPO_ROOT = Path(__file__).resolve().parent.parent
IMAGES = REPO_ROOT / "docs" / "images"
XSS = "<img src=x onerror=\"document.title='owned'\"><script>alert('owned')</script>"
TIMEOUT_MS = 15_000


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return "chromium is missing: apt-get install chromium"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is missing: pip install -e '.[dev]' (never `playwright install`)"
    return None


_WHY = _missing()
if _WHY is not None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run under CI: {_WHY}", pytrace=False)
    pytest.skip(f"browser tests skipped: {_WHY}", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=args)
        yield launched
        launched.close()


class Site:
    """A Flask app with jobs in every state, served on a free port."""

    def __init__(self, rel: Reliable) -> None:
        self.rel = rel

        @rel.task(retries=0)
        def charge(order: int) -> None:
            raise RuntimeError(f"card declined for order {order}")

        @rel.task
        def deliver(order: int) -> dict[str, Any]:
            step("pack", lambda: order)
            step("ship", lambda: f"parcel-{order}")
            return {"order": order, "tracking": f"TRK{order}"}

        @rel.task(retries=0)
        def render_note(note: str) -> None:
            raise ValueError(note)

        self.failed = [charge.enqueue(order).id for order in (101, 102, 103)]
        self.succeeded = [deliver.enqueue(order).id for order in range(5)]
        self.xss = render_note.enqueue(XSS).id
        rel.run_until_idle()
        self.queued = [deliver.enqueue(order).id for order in (201, 202)]
        app = Flask(__name__)
        app.config["RELIABLE_EMBEDDED_WORKER"] = False
        ReliableFlask(app, rel)
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.base = f"http://127.0.0.1:{self.server.server_port}/_reliable"

    def __enter__(self) -> Site:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def site(db_url: str) -> Iterator[Site]:
    rel = Reliable(db_url, embedded_worker=False)
    with Site(rel) as started:
        yield started
    rel.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    opened.set_default_timeout(TIMEOUT_MS)
    yield opened
    context.close()


def shoot(page: Page, name: str) -> None:
    if os.environ.get("DASHBOARD_SCREENSHOTS") == "1":
        IMAGES.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(IMAGES / f"{name}.png"), full_page=True)


def test_list_filter_open_a_failed_job_see_its_traceback_and_retry_it(
    site: Site, page: Page
) -> None:
    page.goto(f"{site.base}/")
    expect(page.locator(".card.failed .n")).to_have_text("4")
    shoot(page, "dashboard-overview")
    page.get_by_role("link", name="Jobs").click()
    expect(page.locator("table.jobs tbody tr")).to_have_count(11)
    page.get_by_label("Task").fill("charge")
    page.get_by_label("State").select_option("failed")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("table.jobs tbody tr")
    expect(rows).to_have_count(3)
    expect(page.locator("#match-count")).to_have_text("3")
    shoot(page, "dashboard-list")
    rows.first.locator("a.id").click()
    expect(page.locator("#job-status")).to_have_text("failed")
    traceback = page.locator("pre.traceback").first
    expect(traceback).to_contain_text("Traceback (most recent call last)")
    expect(traceback).to_contain_text("RuntimeError: card declined")
    job_id = page.url.rsplit("/", 1)[-1]
    page.get_by_role("button", name="Retry now").click()
    expect(page.locator(".notice")).to_have_text("1 job retried.")
    expect(page.locator("#job-status")).to_have_text("queued")
    assert site.rel.get_job(job_id).status == "queued"
    page.goto(f"{site.base}/job/{site.succeeded[0]}")
    expect(page.locator("svg.timeline rect")).to_have_count(2)
    expect(page.locator("pre.result")).to_contain_text("TRK0")
    shoot(page, "dashboard-job")


def test_cancel_a_queued_job(site: Site, page: Page) -> None:
    page.goto(f"{site.base}/job/{site.queued[0]}")
    expect(page.locator("#job-status")).to_have_text("queued")
    expect(page.get_by_role("button", name="Retry now")).to_have_count(0)
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#job-status")).to_have_text("cancelled")
    assert site.rel.get_job(site.queued[0]).status == "cancelled"
    assert site.rel.get_job(site.queued[1]).status == "queued"


def test_bulk_retry_shows_the_count_first(site: Site, page: Page) -> None:
    page.goto(f"{site.base}/list?status=failed")
    page.get_by_role("button", name="Retry all…").click()
    expect(page.locator("#confirm-count")).to_have_text("4")
    shoot(page, "dashboard-confirm")
    assert all(site.rel.get_job(i).status == "failed" for i in site.failed)
    page.get_by_role("button", name="Retry 4 jobs").click()
    expect(page.locator(".notice")).to_have_text("4 jobs retried.")
    assert all(site.rel.get_job(i).status == "queued" for i in [*site.failed, site.xss])


def test_a_script_in_the_arguments_stays_text(site: Site, page: Page) -> None:
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(f"{site.base}/job/{site.xss}")
    expect(page.locator("pre.payload")).to_contain_text("<script>alert('owned')</script>")
    expect(page.locator("p.problem")).to_contain_text("onerror=")
    page.goto(f"{site.base}/list?status=failed")
    expect(page.locator("table.jobs")).to_contain_text("<script>")
    assert dialogs == []
    assert page.title() != "owned"
    assert page.locator("main script, main img").count() == 0


def test_an_action_without_its_csrf_token_is_refused(site: Site, page: Page) -> None:
    job_id = site.failed[0]
    page.goto(f"{site.base}/job/{job_id}")
    page.evaluate("document.querySelectorAll('input[name=csrf]').forEach(e => e.value = '')")
    page.get_by_role("button", name="Retry now").click()
    expect(page.locator("h1")).to_have_text("Refused")
    expect(page.locator("p.problem")).to_contain_text(re.compile("CSRF"))
    assert site.rel.get_job(job_id).status == "failed"
