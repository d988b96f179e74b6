"""Flask integration: ``ReliableFlask(app, rel)`` and the adapter behind ``@rel.offload``.

During a request, ``FlaskAdapter.offload`` reads the body up to ``RELIABLE_MAX_PAYLOAD``,
snapshots the request and lets ``admit`` commit the job and decide the answer. In the
worker, ``FlaskAdapter.run`` rebuilds the request in the app that serves the route and
calls the original handler: ``before_request`` hooks and decorators above
``@rel.offload`` ran in the request and do not run again.
"""

from __future__ import annotations

import atexit
import inspect
import signal
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any
from urllib.parse import quote

import click
from flask import Blueprint, Flask, Response, current_app, g, has_request_context, request
from flask.cli import AppGroup, FlaskGroup
from flask.helpers import get_debug_flag
from flask.testing import EnvironBuilder
from werkzeug.exceptions import HTTPException
from werkzeug.serving import is_running_from_reloader

from reliable import ConfigError, Reliable, ReliableError, current_job
from reliable.dashboard import Console
from reliable.dashboard.wsgi import console_request
from reliable.runtime import Runtime
from reliable.web import (
    HttpResponse,
    RequestSnapshot,
    RouteTask,
    admit,
    cancel_job,
    job_status,
    parse_wait,
    problem,
    too_large,
)
from reliable.web.routes import register_adapter
from reliable.web.status import Allow

__all__ = ["FlaskAdapter", "FlaskState", "ReliableFlask"]

EXTENSION = "reliable"
READ_CHUNK = 64 * 1024
# How much of a body refused as too large is still read (and dropped): see drain_body.
DRAIN_BYTES = 1024 * 1024
# Headers describing the body as it came over the wire; the rebuilt request has it whole.
_FRAMING_HEADERS = frozenset({"content-length", "transfer-encoding"})
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


@dataclass
class FlaskState:
    """What ``ReliableFlask`` keeps per Flask app, in ``app.extensions["reliable"]``.

    ``reliable`` is the ``Reliable`` whose routes the app serves (``reliable worker
    module:app`` finds it here); ``started_worker`` says whether ``init_app`` started the
    embedded worker.
    """

    reliable: Reliable
    started_worker: bool = False


class ReliableFlask:
    """The Flask extension: ``ReliableFlask(app, rel)`` or ``ReliableFlask(rel).init_app(app)``.

    Without ``rel`` it makes ``Reliable()`` from the ``RELIABLE_*`` environment, so
    ``reliable = ReliableFlask(app)`` and ``@reliable.offload(...)`` is all an app
    needs. One instance may serve several apps; each app's state lives in its
    ``app.extensions["reliable"]``.
    """

    def __init__(self, app: Flask | Reliable | None = None, rel: Reliable | None = None) -> None:
        if isinstance(app, Reliable):
            app, rel = None, app
        self.reliable = rel if rel is not None else Reliable()
        self.offload = self.reliable.offload
        self.task = self.reliable.task
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Serve the job status resource and the dashboard, start the embedded worker, add
        ``flask reliable``.

        The status resource is ``GET`` (``?wait=N``) and ``DELETE`` on
        ``{RELIABLE_URL_PREFIX}/jobs/<id>``; every other path under the prefix is the
        dashboard (``reliable.dashboard``). The embedded worker starts here and stops
        gracefully at interpreter exit; it does not start when the Reliable's
        ``embedded_worker`` setting is off (``RELIABLE_EMBEDDED_WORKER=0``), under the
        ``flask`` command other than ``flask run`` (``flask shell``, ``flask reliable
        worker``...), or in the reloader's watcher process. Routes may be registered
        before or after.

        Config keys, read once here:

        - ``RELIABLE_EMBEDDED_WORKER`` (default ``True``): ``False`` keeps this app from
          starting the embedded worker (say, in a test configuration).
        - ``RELIABLE_WORKER_THREADS`` (default: the Reliable's ``worker_threads``):
          threads of the embedded worker.
        - ``RELIABLE_SHARE_SQLALCHEMY_ENGINE`` (default ``False``): ``True`` puts the job
          store in Flask-SQLAlchemy's database and pool (its default engine;
          ``SQLAlchemy(app)`` must come first), so that
          ``task.options(session=db.session)`` writes jobs in the request's
          transaction (docs/transactions.md).

        Every other setting (database, URL prefix, payload limit, TTLs) belongs to the
        ``Reliable``. Raises ``RuntimeError`` when the app already has the extension and
        ``ConfigError`` naming a bad config key.
        """
        if EXTENSION in app.extensions:
            raise RuntimeError(f"reliable is already registered on the Flask app {app.name!r}")
        rel = self.reliable
        embedded = _config_flag(app.config, "RELIABLE_EMBEDDED_WORKER", default=True)
        threads = _config_threads(app.config, rel.settings.worker_threads)
        if _config_flag(app.config, "RELIABLE_SHARE_SQLALCHEMY_ENGINE", default=False):
            rel.use_engine(_sqlalchemy_engine(app))
        state = FlaskState(rel)
        app.extensions[EXTENSION] = state
        app.register_blueprint(status_blueprint, url_prefix=rel.settings.url_prefix)
        app.cli.add_command(reliable_cli)
        ADAPTER.add_app(rel, app)
        if embedded and rel.settings.embedded_worker and _serves_requests_here():
            state.started_worker = _start_embedded_worker(rel, threads)


def _state(app: Flask) -> FlaskState:
    state = app.extensions.get(EXTENSION)
    if not isinstance(state, FlaskState):
        raise ReliableError(f"the Flask app {app.name!r} has no ReliableFlask(app, rel)")
    return state


def _sqlalchemy_engine(app: Flask) -> Any:
    """Flask-SQLAlchemy's default engine of ``app``."""
    extension = app.extensions.get("sqlalchemy")
    if extension is None:
        raise ConfigError(
            "RELIABLE_SHARE_SQLALCHEMY_ENGINE",
            "the app has no Flask-SQLAlchemy: call SQLAlchemy(app) (or db.init_app(app)) "
            "before ReliableFlask(app, rel)",
        )
    with app.app_context():
        return extension.engine


def _config_flag(config: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = config.get(key, default)
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _config_threads(config: Mapping[str, Any], default: int) -> int:
    value = config.get("RELIABLE_WORKER_THREADS", default)
    if isinstance(value, int | str) and str(value).strip().isdigit() and int(value) >= 1:
        return int(value)
    raise ConfigError("RELIABLE_WORKER_THREADS", f"expected a whole number >= 1, got {value!r}")


def _serves_requests_here() -> bool:
    """False where the app is loaded but serves no requests.

    Under the ``flask`` command only ``flask run`` serves; with the reloader, only in
    the child process that it restarts on every change (so new code runs the jobs).
    """
    ctx = click.get_current_context(silent=True)
    if ctx is None or not isinstance(ctx.find_root().command, FlaskGroup):
        return True
    if ctx.command.name != "run":
        return False
    reload = ctx.params.get("reload")
    if reload is None:
        reload = get_debug_flag()
    return not reload or is_running_from_reloader()


def _start_embedded_worker(rel: Reliable, threads: int) -> bool:
    if rel.worker is not None and rel.worker.running:
        return False  # another app of this process shares the Reliable and started it
    rel.start_worker(threads=threads)
    atexit.register(_stop_at_exit, weakref.ref(rel))
    _exit_on_sigterm()
    return True


def _exit_on_sigterm() -> None:
    """Make SIGTERM end the process through ``atexit``, where the worker stops gracefully.

    Only where SIGTERM still has Python's default action, which kills the process on
    the spot (Flask's own server, a plain script); a server that handles SIGTERM
    (gunicorn, uvicorn) exits through ``atexit`` already, and its handler is kept.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    if in_main_thread and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit)


def _exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _stop_at_exit(ref: weakref.ref[Reliable]) -> None:
    rel = ref()
    if rel is not None:
        rel.stop_worker(exiting=True)


# -- HTTP ------------------------------------------------------------------------------


def to_flask(response: HttpResponse) -> Response:
    """A core ``HttpResponse`` as a Flask ``Response``."""
    return Response(response.body, status=response.status, headers=response.headers)


status_blueprint = Blueprint("reliable", __name__)


@status_blueprint.get("/jobs/<job_id>")
def job_status_view(job_id: str) -> Response:
    """The job's status document; ``?wait=N`` holds the request up to N seconds."""
    wait = parse_wait(request.args.get("wait"))
    if isinstance(wait, HttpResponse):
        return to_flask(wait)
    rel = _state(current_app).reliable
    return to_flask(job_status(rel.runtime, job_id, wait, _allow(rel)))


@status_blueprint.delete("/jobs/<job_id>")
def cancel_job_view(job_id: str) -> Response:
    """Cancel a job that has not finished; 409 when it already had."""
    rel = _state(current_app).reliable
    return to_flask(cancel_job(rel.runtime, job_id, _allow(rel)))


@status_blueprint.route("/", defaults={"path": ""}, methods=["GET", "POST"])
@status_blueprint.route("/<path:path>", methods=["GET", "POST"])
def dashboard_view(path: str) -> Response:
    """The dashboard (``reliable.dashboard``): every page under the prefix but the
    status resource."""
    rel = _state(current_app).reliable
    prefix = rel.settings.url_prefix
    console = Console(rel, request.root_path + prefix)
    return to_flask(console.handle(console_request(request.environ, prefix)))


def _allow(rel: Reliable) -> Allow | None:
    """The application's ``status_access`` hook, asked about the current request."""
    hook = rel.status_hook
    if hook is None:
        return None
    caller = request._get_current_object()  # type: ignore[attr-defined]
    return lambda info, action: bool(hook(caller, info, action))


class BodyBrokeOff(Exception):
    """The request's body could not be read to its end: the client stopped sending."""


def read_body(limit: int) -> bytes | None:
    """The current request's body, or ``None`` when it is larger than ``limit`` bytes.

    ``Content-Length`` is checked first; a body without one (chunked) is read no
    further than ``limit + 1`` bytes. Raises ``BodyBrokeOff`` when the body ends early
    (the connection closed, a chunk cut short).
    """
    length = request.content_length
    if length is not None and length > limit:
        return None
    # A hook or decorator may have read it already (get_data, get_json cache it).
    cached: bytes | None = getattr(request, "_cached_data", None)
    if cached is not None:
        return cached if len(cached) <= limit else None
    stream = request.stream
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        try:
            chunk = stream.read(min(READ_CHUNK, limit + 1 - size))
        except Exception as exc:  # each server has its own: werkzeug's, gunicorn's, OSError
            raise BodyBrokeOff(f"{type(exc).__name__}: {exc}") from exc
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        return None
    body = b"".join(chunks)
    # The stream is spent: let get_data() and get_json() (in a capture hook) see the body.
    request._cached_data = body
    return body


def drain_body(limit: int) -> None:
    """Read and drop the rest of a body refused as too large, when its ``Content-Length``
    is at most ``DRAIN_BYTES`` over ``limit``.

    A server that closes a connection with unread data in it resets it, and a client
    still sending then gets the reset instead of the 413 (gunicorn answers, then closes).
    A larger body, or one of unknown length (chunked), is not read: the reset is the
    lesser cost.
    """
    length = request.content_length
    if length is None or length > limit + DRAIN_BYTES:
        return
    stream = request.stream
    left = DRAIN_BYTES
    try:
        while left > 0 and (chunk := stream.read(min(READ_CHUNK, left))):
            left -= len(chunk)
    except HTTPException:  # the client went away (werkzeug's ClientDisconnected)
        return


def snapshot_request(body: bytes) -> RequestSnapshot:
    """The current Flask request as a ``RequestSnapshot`` (credentials still in it)."""
    environ = request.environ
    client = None
    if request.remote_addr:
        remote_port = str(environ.get("REMOTE_PORT", ""))
        client = (request.remote_addr, int(remote_port) if remote_port.isdigit() else 0)
    server = None
    if request.server is not None:
        host, port = request.server
        server = (host, port if port is not None else (443 if request.scheme == "https" else 80))
    return RequestSnapshot(
        method=request.method,
        path=request.path,
        query_string=environ.get("QUERY_STRING", ""),
        headers=tuple((name.lower(), value) for name, value in request.headers.items()),
        body=body,
        path_params=dict(request.view_args or {}),
        client=client,
        scheme=request.scheme,
        server=server,
        root_path=request.root_path,
    )


def rebuild_environ(app: Flask, snapshot: RequestSnapshot) -> dict[str, Any]:
    """A WSGI environ equivalent to the snapshotted request."""
    server = snapshot.server or ("localhost", 80)
    host = snapshot.header("host") or f"{server[0]}:{server[1]}"
    overrides: dict[str, Any] = {"SERVER_NAME": server[0], "SERVER_PORT": str(server[1])}
    if snapshot.client is not None:
        overrides["REMOTE_ADDR"] = snapshot.client[0]
        overrides["REMOTE_PORT"] = str(snapshot.client[1])
    builder = EnvironBuilder(
        app,
        path=quote(snapshot.path),
        base_url=f"{snapshot.scheme}://{host}{quote(snapshot.root_path)}",
        query_string=snapshot.query_string,
        method=snapshot.method,
        headers=[(k, v) for k, v in snapshot.headers if k not in _FRAMING_HEADERS],
        data=snapshot.body,
        environ_overrides=overrides,
    )
    try:
        return builder.get_environ()
    finally:
        builder.close()


def _serves(view: Callable[..., Any] | None, route: RouteTask) -> bool:
    """Whether ``view`` (perhaps under other decorators) is the stand-in of ``route``."""
    while view is not None:
        if getattr(view, "reliable_route", None) is route:
            return True
        view = getattr(view, "__wrapped__", None)
    return False


async def _already(response: Response) -> Response:
    return response


class FlaskAdapter:
    """The ``Adapter`` (``reliable.web.routes``) for Flask, registered as ``"flask"``.

    It remembers, weakly, which Flask apps ``init_app`` installed for each ``Reliable``
    (by its runtime, which its routes know): a worker has no request to find the app
    from.
    """

    name = "flask"

    def __init__(self) -> None:
        self._apps: weakref.WeakKeyDictionary[Runtime, list[weakref.ref[Flask]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def add_app(self, rel: Reliable, app: Flask) -> None:
        """Record that ``app`` serves the routes of ``rel``."""
        with self._lock:
            refs = [ref for ref in self._apps.get(rel.runtime, []) if ref() is not None]
            self._apps[rel.runtime] = [*refs, weakref.ref(app)]

    def app_for(self, route: RouteTask) -> Flask:
        """The Flask app that serves ``route``: the one routing to it, else the first.

        Raises ``ReliableError`` when no app was installed for the route's ``Reliable``.
        """
        with self._lock:
            found = self._apps.get(route.runtime, [])
            apps = [app for ref in found if (app := ref()) is not None]
        if not apps:
            raise ReliableError(
                f"no Flask app serves {route.name} in this process: the module that calls "
                "ReliableFlask(app, rel) must be imported (reliable worker module:app)"
            )
        for app in apps:
            if any(_serves(view, route) for view in app.view_functions.values()):
                return app
        return apps[0]

    def offload(self, route: RouteTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Answer the current Flask request: 202 with the job, or 400/413/422/429/503.

        Returns ``NotImplemented`` outside a Flask request.
        """
        if not has_request_context():
            return NotImplemented
        state = _state(current_app)
        if state.reliable.runtime is not route.runtime:
            raise ReliableError(
                f"{route.name} belongs to another Reliable than this app's "
                f"ReliableFlask(app, {state.reliable!r})"
            )
        response = to_flask(self._decide(route, state.reliable))
        if inspect.iscoroutinefunction(route.fn):
            return _already(response)  # the stand-in of an async view awaits its answer
        return response

    def _decide(self, route: RouteTask, rel: Reliable) -> HttpResponse:
        limit = rel.settings.max_payload
        try:
            body = read_body(limit)
        except BodyBrokeOff:
            return problem(400, "the request body broke off before its end")
        if body is None:
            drain_body(limit)
            return too_large(limit)
        snapshot = snapshot_request(body)
        capture = route.route.capture or rel.capture_hook
        captured = capture(request) if capture is not None else None
        scope = None
        if route.route.idempotency_scope is not None:
            value = route.route.idempotency_scope(request)
            scope = None if value is None else str(value)
        return admit(route, snapshot, framework="flask", captured=captured, scope=scope)

    def run(self, route: RouteTask, snapshot: RequestSnapshot) -> HttpResponse:
        """In the worker: call the handler on the rebuilt request, in its app's context.

        What the capture hook returned is in ``g.reliable_captured`` (and, for a dict,
        each key on ``g``). An ``HTTPException`` (``abort(404)``) is the handler's answer;
        other exceptions propagate, so the attempt is retried.
        """
        app = self.app_for(route)
        with app.request_context(rebuild_environ(app, snapshot)):
            captured = current_job().captured
            if isinstance(captured, dict):
                for key, value in captured.items():
                    setattr(g, str(key), value)
            g.reliable_captured = captured
            try:
                rv = app.ensure_sync(route.fn)(**snapshot.path_params)
            except HTTPException as exc:
                rv = app.handle_user_exception(exc)
            response = app.make_response(rv)
            try:
                body = response.get_data()
            finally:
                response.close()
            return HttpResponse(response.status_code, list(response.headers.items()), body)


ADAPTER = FlaskAdapter()
register_adapter(ADAPTER)


# -- flask reliable ... ------------------------------------------------------------------

reliable_cli = AppGroup("reliable", help="Durable background jobs (reliable).")


@reliable_cli.command("worker")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="default: settings")
@click.option("--queues", default=None, help="comma-separated; default: every queue")
@click.option(
    "--grace", type=click.FloatRange(min=0), default=None, help="seconds to finish on SIGTERM"
)
def worker_command(threads: int | None, queues: str | None, grace: float | None) -> None:
    """Run jobs in this process until SIGTERM or Ctrl-C, like ``reliable worker``."""
    rel = _state(current_app).reliable
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    stop = threading.Event()

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        click.echo(f"received signal {signum}: stopping", err=True)
        stop.set()

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        rel.stop_worker(timeout=grace)  # an embedded one, if the app was loaded elsewhere
        rel.start_worker(threads=threads, queues=names)
        click.echo(f"reliable worker running on {rel.store.describe()}", err=True)
        stop.wait()
    finally:
        rel.stop_worker(timeout=grace)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
