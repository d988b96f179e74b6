"""The dashboard as one function of a request: ``Console(rel).handle(request)``.

It decides who may see and act (``reliable.web.access``: a token off loopback, a
read-only token, the login form's cookie), refuses forged actions (``security``),
renders the pages and performs the actions through the same calls as the CLI
(``Reliable.retry``, ``cancel``, ``replay``, ``retry_jobs``..., ``pause``). The Flask
and Starlette integrations and the standalone server (``wsgi.serve``) only translate
requests and answers.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from ..app import Reliable
from ..errors import ConfigError, JobNotFound, StoreError
from ..metrics import exposition
from ..operations import STATUSES
from ..web.access import SESSION_COOKIE, Grant, grant, login
from ..web.http import HttpResponse, problem
from . import pages
from .render import STATIC, STATIC_TYPES, render
from .request import MAX_FORM_BYTES, ConsoleRequest, first
from .security import CSRF_COOKIE, SECURITY_HEADERS, csrf_refusal, csrf_token, set_cookie

log = logging.getLogger("reliable.dashboard")

JOB_ID = re.compile(r"^[0-9a-f]{32}$")
JOB_ACTION = re.compile(r"^/job/([0-9a-f]{32})/(retry|cancel|replay)$")
NOTICES = {
    "retry": "retried",
    "cancel": "cancelled",
    "replay": "replayed",
    "pause": "paused",
    "resume": "resumed",
}
BULK = {"retry": "retry_jobs", "cancel": "cancel_jobs", "replay": "replay_jobs"}
MAX_SELECTED = 1000
SESSION_MAX_AGE = 12 * 3600


class Console:
    """The dashboard of ``rel``, mounted at ``root`` (default ``RELIABLE_URL_PREFIX``;
    ``""`` serves it at the site's root)."""

    def __init__(self, rel: Reliable, root: str | None = None) -> None:
        self.rel = rel
        self.root = (rel.settings.url_prefix if root is None else root).rstrip("/")

    # -- dispatch --------------------------------------------------------------------

    def handle(self, request: ConsoleRequest) -> HttpResponse:
        """The answer to ``request``; never raises for a failing job store (503)."""
        try:
            return self._dispatch(request)
        except StoreError as exc:
            log.error("the dashboard cannot read the job store: %s", exc)
            return self._page(
                request,
                "error.html",
                503,
                title="Unavailable",
                message="The job store is unavailable; try again in a moment.",
            )

    def _dispatch(self, request: ConsoleRequest) -> HttpResponse:
        path = request.path or "/"
        method = request.method.upper()
        if path.startswith("/jobs/"):
            return problem(
                405,
                f"{method} not allowed",
                title="Method Not Allowed",
                headers=[("allow", "GET, HEAD, DELETE")],
            )
        if path.startswith("/static/"):
            return self._static(path[len("/static/") :])
        if path == "/login":
            return self._login(request) if method == "POST" else self._login_page(request)
        level = grant(self.rel.settings, request.client_host, request.headers, request.cookies)
        if level == Grant.NONE:
            return self._unauthorized(request)
        if method in ("GET", "HEAD"):
            return self._get(request, path, level)
        if method != "POST":
            return problem(
                405,
                f"{method} not allowed",
                title="Method Not Allowed",
                headers=[("allow", "GET, HEAD, POST")],
            )
        if path == "/logout":
            return self._logout(request)
        if level < Grant.WRITE:
            return self._page(
                request,
                "error.html",
                403,
                title="Read only",
                message="This token may look but not act: sign in with the "
                "dashboard token (RELIABLE_DASHBOARD_TOKEN) to act on jobs.",
            )
        if len(request.body) > MAX_FORM_BYTES:
            return self._page(
                request,
                "error.html",
                413,
                title="Too large",
                message="The form is larger than the dashboard accepts.",
            )
        form = request.form()
        refusal = csrf_refusal(request, form)
        if refusal is not None:
            return self._page(request, "error.html", 403, title="Refused", message=refusal)
        try:
            return self._post(request, path, form)
        except ConfigError as exc:
            return self._page(request, "error.html", 400, title="Bad request", message=str(exc))

    def _get(self, request: ConsoleRequest, path: str, level: Grant) -> HttpResponse:
        args = request.args()
        if path == "/":
            return self._page(
                request,
                "overview.html",
                200,
                level=level,
                nav="overview",
                **pages.overview(self.rel),
            )
        if path == "/list":
            page = pages.listing(self.rel, args)
            return self._page(
                request,
                "list.html",
                200,
                level=level,
                nav="list",
                page=page,
                statuses=STATUSES,
            )
        if path.startswith("/job/") and JOB_ID.match(path[5:]):
            data = pages.job_page(self.rel, path[5:])
            if data is not None:
                return self._page(request, "job.html", 200, level=level, nav="list", **data)
        if path == "/flow":
            return self._page(
                request, "flow.html", 200, level=level, nav="flow", **pages.flow(self.rel)
            )
        if path == "/schedules":
            return self._page(
                request,
                "schedules.html",
                200,
                level=level,
                nav="schedules",
                **pages.schedules(self.rel),
            )
        if path == "/workers":
            return self._page(
                request, "workers.html", 200, level=level, nav="workers", **pages.workers(self.rel)
            )
        if path == "/metrics":
            body, content_type = exposition(self.rel.runtime)
            return HttpResponse(
                200, [("content-type", content_type), ("cache-control", "no-store")], body
            )
        return self._page(
            request, "error.html", 404, title="Not found", message="There is no such page or job."
        )

    # -- actions ---------------------------------------------------------------------

    def _post(
        self, request: ConsoleRequest, path: str, form: Mapping[str, list[str]]
    ) -> HttpResponse:
        matched = JOB_ACTION.match(path)
        if matched:
            return self._job_action(matched.group(1), matched.group(2), form)
        if path == "/act":
            return self._selected(form)
        if path == "/bulk":
            return self._bulk(request, form)
        if path in ("/pause", "/resume"):
            kind, name = first(form, "kind"), first(form, "name")
            if kind not in ("task", "queue"):
                raise ConfigError("kind", f"expected task or queue, got {kind!r}")
            if path == "/pause":
                self.rel.pause(**{kind: name})
                done = 1
            else:
                done = int(self.rel.resume(**{kind: name}))
            return self._redirect("/flow", done=path[1:], n=str(done))
        return self._page(
            request, "error.html", 404, title="Not found", message="There is no such action."
        )

    def _job_action(self, job_id: str, action: str, form: Mapping[str, list[str]]) -> HttpResponse:
        try:
            if action == "retry":
                done = int(self.rel.retry(job_id))
            elif action == "cancel":
                done = int(self.rel.cancel(job_id))
            else:
                handle = self.rel.replay(job_id, first(form, "from_step") or None)
                return self._redirect(f"/job/{handle.id}", done="replay", n="1")
        except JobNotFound:
            return self._redirect("/list")
        return self._redirect(f"/job/{job_id}", done=action, n=str(done))

    def _selected(self, form: Mapping[str, list[str]]) -> HttpResponse:
        action = first(form, "action")
        ids = [i for i in form.get("id", []) if JOB_ID.match(i)][:MAX_SELECTED]
        acts: dict[str, Callable[[str], Any]] = {
            "retry": self.rel.retry,
            "cancel": self.rel.cancel,
            "replay": lambda job_id: self.rel.replay(job_id) is not None,
        }
        if action not in acts:
            raise ConfigError("action", f"expected retry, cancel or replay, got {action!r}")
        done = 0
        for job_id in ids:
            try:
                done += int(bool(acts[action](job_id)))
            except JobNotFound:
                continue
        back = pages.Listing(pages.filter_values(form))
        return self._redirect("/list", query=back.query(done=action, n=str(done)))

    def _bulk(self, request: ConsoleRequest, form: Mapping[str, list[str]]) -> HttpResponse:
        action = first(form, "action")
        if action not in BULK:
            raise ConfigError("action", f"expected retry, cancel or replay, got {action!r}")
        values = pages.filter_values(form)
        chosen = pages.filters(values)
        bulk: Callable[..., int] = getattr(self.rel, BULK[action])
        if first(form, "confirm") != "yes":
            count = bulk(dry_run=True, **chosen)
            return self._page(
                request,
                "confirm.html",
                200,
                level=Grant.WRITE,
                nav="list",
                action=action,
                count=count,
                values=values,
            )
        done = bulk(**chosen)
        back = pages.Listing(values)
        return self._redirect("/list", query=back.query(done=action, n=str(done)))

    # -- access ----------------------------------------------------------------------

    def _login_page(
        self, request: ConsoleRequest, status: int = 200, message: str | None = None
    ) -> HttpResponse:
        settings = self.rel.settings
        configured = (
            settings.dashboard_token is not None or settings.dashboard_read_token is not None
        )
        headers = [("www-authenticate", 'Bearer realm="reliable"')] if status == 401 else []
        answer = self._page(
            request, "login.html", status, configured=configured, message=message, nav="login"
        )
        answer.headers.extend(headers)
        return answer

    def _unauthorized(self, request: ConsoleRequest) -> HttpResponse:
        if request.path == "/metrics":
            return HttpResponse(
                401,
                [
                    ("content-type", "text/plain; charset=utf-8"),
                    ("www-authenticate", 'Bearer realm="reliable"'),
                ],
                b"a dashboard token is required (RELIABLE_DASHBOARD_TOKEN)\n",
            )
        return self._login_page(request, 401)

    def _login(self, request: ConsoleRequest) -> HttpResponse:
        form = request.form()
        refusal = csrf_refusal(request, form)
        if refusal is not None:
            return self._page(request, "error.html", 403, title="Refused", message=refusal)
        value = login(self.rel.settings, first(form, "token"))
        if value is None:
            return self._login_page(request, 401, "That token is not right.")
        answer = self._redirect("/")
        answer.headers.append(
            set_cookie(
                SESSION_COOKIE,
                value,
                self._cookie_path(),
                secure=request.scheme == "https",
                max_age=SESSION_MAX_AGE,
            )
        )
        return answer

    def _logout(self, request: ConsoleRequest) -> HttpResponse:
        if csrf_refusal(request, request.form()) is not None:
            return self._page(
                request,
                "error.html",
                403,
                title="Refused",
                message="the form's CSRF token is missing or does not match",
            )
        answer = self._redirect("/login")
        answer.headers.append(
            set_cookie(
                SESSION_COOKIE, "", self._cookie_path(), secure=request.scheme == "https", max_age=0
            )
        )
        return answer

    # -- answers ---------------------------------------------------------------------

    def _cookie_path(self) -> str:
        return self.root + "/" if self.root else "/"

    def url(self, path: str, **query: str) -> str:
        pairs = {k: v for k, v in query.items() if v}
        return self.root + path + (f"?{urlencode(pairs)}" if pairs else "")

    def _redirect(self, path: str, *, query: str = "", **params: str) -> HttpResponse:
        location = self.url(path, **params)
        if query:
            location += ("&" if "?" in location else "?") + query
        return HttpResponse(303, [("location", location), *SECURITY_HEADERS])

    def _page(
        self, request: ConsoleRequest, template: str, status: int, **context: Any
    ) -> HttpResponse:
        token, new = csrf_token(request)
        level = context.pop("level", Grant.NONE)
        body = render(
            template,
            root=self.root,
            url=self.url,
            csrf=token,
            notice=notice(request.args()),
            can_act=level >= Grant.WRITE,
            signed_in=level > Grant.NONE,
            live=template in ("overview.html", "list.html", "workers.html", "flow.html"),
            **context,
        )
        headers = [("content-type", "text/html; charset=utf-8"), *SECURITY_HEADERS]
        if new:
            headers.append(
                set_cookie(
                    CSRF_COOKIE, token, self._cookie_path(), secure=request.scheme == "https"
                )
            )
        return HttpResponse(status, headers, body)

    def _static(self, name: str) -> HttpResponse:
        path = STATIC / name
        kind = STATIC_TYPES.get(path.suffix)
        if "/" in name or name.startswith(".") or kind is None or not path.is_file():
            return HttpResponse(404, [("content-type", "text/plain")], b"not found\n")
        headers = [
            ("content-type", kind),
            ("cache-control", "public, max-age=3600"),
            ("x-content-type-options", "nosniff"),
        ]
        return HttpResponse(200, headers, path.read_bytes())


def notice(args: Mapping[str, list[str]]) -> str | None:
    """What the action that redirected here did (``?done=retry&n=3``), as a sentence."""
    done, count = first(args, "done"), first(args, "n")
    if done not in NOTICES:
        return None
    count = count if count.isdigit() else "0"
    if done in ("pause", "resume"):
        if count == "0":
            return "It was not paused."
        return "Paused." if done == "pause" else "Resumed."
    return f"{count} job{'' if count == '1' else 's'} {NOTICES[done]}."
