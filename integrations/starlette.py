"""Starlette and FastAPI: ``ReliableMiddleware`` and the adapter behind ``@rel.offload``.

>>> app = Starlette(routes=routes, middleware=[Middleware(ReliableMiddleware, reliable=rel)])

While the app handles a request, the middleware keeps it in a context variable; an
offloaded endpoint's stand-in then has ``StarletteAdapter.offload`` read the body (no
further than the limit), snapshot the request and commit it. In the worker,
``StarletteAdapter.run`` rebuilds a ``Request`` and calls the real endpoint; FastAPI
endpoints get back the values FastAPI validated, stored as JSON, except those that carry
credentials, which are never stored (see ``StarletteAdapter``).
"""

from __future__ import annotations

import functools
import inspect
import signal
import sys
import threading
import typing
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from reliable import Reliable, current_job
from reliable.context import to_the_end
from reliable.dashboard import Console
from reliable.dashboard.asgi import answer as dashboard_answer
from reliable.runtime import Runtime
from reliable.web import (
    HttpResponse,
    RequestSnapshot,
    RouteTask,
    admit,
    cancel_job,
    job_status_async,
    parse_wait,
    problem,
    too_large,
)
from reliable.web.routes import register_adapter
from reliable.web.snapshot import NO_CREDENTIALS, Credentials
from reliable.web.status import Allow

from .fastapi import check_routes, describe, find_credentials, render, route_of, routes

__all__ = ["ReliableMiddleware", "StarletteAdapter"]


class _TooLarge(HTTPException):
    """The app read an offloaded request's body past the limit."""

    def __init__(self) -> None:
        super().__init__(status_code=413)


class _Incoming:
    """The request a middleware is handling: its scope, and its body as far as read.

    The app receives through ``receive``, which keeps the body (up to the limit), so an
    offloaded endpoint finds it even after FastAPI read it; ``read_body`` reads the
    rest, and replays to the app what it read first.
    """

    def __init__(self, scope: Scope, receive: Receive, limit: int) -> None:
        self.scope = scope
        self.limit = limit
        self.complete = self.refused = False
        self._receive = receive
        self._size = 0
        self._chunks: list[bytes] | None = []  # None once the body is over the limit
        self._pending: deque[bytes] = deque()
        length = dict(scope["headers"]).get(b"content-length", b"")
        self._declared = int(length) if length.isdigit() else 0

    @property
    def overflow(self) -> bool:
        return self._chunks is None or self._declared > self.limit

    def _record(self, message: Message) -> bool:
        body: bytes = message.get("body", b"")
        self._size += len(body)
        self.complete = not message.get("more_body", False)
        if self._chunks is not None and self._size > self.limit:
            self._chunks = None
            self._pending.clear()
        elif self._chunks is not None:
            self._chunks.append(body)
        return self._chunks is not None

    async def receive(self) -> Message:
        if self._pending:
            more = len(self._pending) > 1 or not self.complete
            return {"type": "http.request", "body": self._pending.popleft(), "more_body": more}
        offloaded = getattr(self.scope.get("endpoint"), "reliable_route", None) is not None
        if not (offloaded and self.overflow):
            message = await self._receive()
            if message["type"] != "http.request" or self._record(message) or not offloaded:
                return message
        self.refused = True
        raise _TooLarge

    async def read_body(self) -> bytes | None:
        """The whole body, or ``None`` once it is known to be over the limit."""
        while not self.overflow and not self.complete:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect
            if self._record(message):
                self._pending.append(message.get("body", b""))
        return None if self.overflow else b"".join(self._chunks or ())


_current: ContextVar[_Incoming | None] = ContextVar("reliable_starlette_request", default=None)


@dataclass
class _Host:
    """The app serving a Reliable's routes in this process, for ``request.app``."""

    app: Any
    state: dict[str, Any] = field(default_factory=dict)  # what its lifespan yielded


_HOSTS: weakref.WeakKeyDictionary[Runtime, _Host] = weakref.WeakKeyDictionary()


class ReliableMiddleware:
    """Offloaded routes, the status resource and the embedded worker of one app.

    ``Middleware(ReliableMiddleware, reliable=rel)``, in Starlette and FastAPI alike.
    Serves ``GET {RELIABLE_URL_PREFIX}/jobs/<id>`` (``?wait=N``: hold up to N s for a
    terminal state) and ``DELETE`` (cancel). Every other path under the prefix is the
    dashboard (``reliable.dashboard``). Offloaded requests with a body over
    ``RELIABLE_MAX_PAYLOAD`` get 413. At lifespan startup it refuses (``ConfigError``
    naming the parameter) offloaded FastAPI endpoints taking what cannot reach a worker,
    sets ``app.state.reliable``, opens the database and, unless
    ``RELIABLE_EMBEDDED_WORKER`` is off, starts the worker; at shutdown it stops the
    worker gracefully (``RELIABLE_SHUTDOWN_GRACE``), before the app's own shutdown.
    """

    def __init__(self, app: ASGIApp, reliable: Reliable) -> None:
        if not isinstance(reliable, Reliable):
            raise TypeError(f"ReliableMiddleware needs reliable=Reliable(...), got {reliable!r}")
        self.app = app
        self.reliable = reliable
        self._jobs_path = f"{reliable.settings.url_prefix}/jobs/"
        self._seen: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if scope.get("app") is not self._seen:
            self._adopt(scope.get("app"), None)
        path: str = scope["path"]
        path = path.removeprefix(scope.get("root_path", "")) if scope.get("root_path") else path
        if path.startswith(self._jobs_path):
            answer = await self._status(scope, path[len(self._jobs_path) :])
            await _response(answer)(scope, receive, send)
            return
        prefix = self.reliable.settings.url_prefix
        if path == prefix or path.startswith(prefix + "/"):  # the dashboard
            console = Console(self.reliable, scope.get("root_path", "") + prefix)
            await dashboard_answer(console, path[len(prefix) :], scope, receive, send)
            return
        incoming = _Incoming(scope, receive, self.reliable.settings.max_payload)

        async def refuse() -> None:
            await _response(too_large(incoming.limit))(scope, receive, send)

        async def send_unless_refused(message: Message) -> None:
            if not incoming.refused:
                await send(message)
            elif message["type"] == "http.response.start":  # the app's answer to _TooLarge
                await refuse()

        token = _current.set(incoming)
        try:
            await self.app(scope, incoming.receive, send_unless_refused)
        except _TooLarge:  # nothing between the app and this middleware answered it
            await refuse()
        finally:
            _current.reset(token)

    async def _status(self, scope: Scope, job_id: str) -> HttpResponse:
        method = scope["method"]
        hook = self.reliable.status_hook
        allow: Allow | None = None
        if hook is not None:
            caller = Request(scope)
            allow = lambda info, action: bool(hook(caller, info, action))  # noqa: E731
        if method == "DELETE":
            runtime = self.reliable.runtime
            return await anyio.to_thread.run_sync(cancel_job, runtime, job_id, allow)
        if method not in ("GET", "HEAD"):
            methods = [("allow", "GET, HEAD, DELETE")]
            return problem(
                405, f"{method} not allowed", title="Method Not Allowed", headers=methods
            )
        wait = parse_wait(QueryParams(scope["query_string"]).get("wait"))
        if isinstance(wait, HttpResponse):
            return wait
        return await job_status_async(self.reliable.runtime, job_id, wait, allow)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        started_worker = False
        ending = _Termination()

        async def receive_then_stop() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown" and started_worker:
                # Before the app's own shutdown: running jobs may use what it closes.
                stop = functools.partial(self.reliable.stop_worker, exiting=ending.seen)
                await anyio.to_thread.run_sync(stop)
            return message

        async def start_then_send(message: Message) -> None:
            nonlocal started_worker
            if message["type"] == "lifespan.startup.complete":  # after the app's startup
                check_routes(scope.get("app"))
                self._adopt(scope.get("app"), scope.get("state"))
                started_worker = await anyio.to_thread.run_sync(self._open)
                if started_worker:
                    ending.watch()
            await send(message)

        await self.app(scope, receive_then_stop, start_then_send)

    def _open(self) -> bool:
        self.reliable.store  # noqa: B018 - open and migrate now, not at the first request
        worker = self.reliable.worker
        if not self.reliable.settings.embedded_worker or (worker is not None and worker.running):
            return False
        self.reliable.start_worker()
        return True

    def _adopt(self, app: Any, state: dict[str, Any] | None) -> None:
        self._seen = app
        if app is None:
            return
        describe(app, self.reliable.settings.url_prefix)
        host = _HOSTS.get(self.reliable.runtime)
        if host is None or host.app is not app:
            _HOSTS[self.reliable.runtime] = host = _Host(app)
        if state is not None:
            host.state = state
        app_state = getattr(app, "state", None)
        if app_state is not None and getattr(app_state, "reliable", None) is None:
            app_state.reliable = self.reliable


class _Termination:
    """Whether the server was told to end the process (SIGTERM, SIGINT) before the
    lifespan's shutdown: then the worker gives back at once the jobs whose attempts
    outlive the grace period, since their threads end with the process; a lifespan
    that ends otherwise (a test client) leaves them their jobs until they return.

    Servers such as uvicorn handle those signals and, once served, kill the process
    with the signal's default action, where ``atexit`` does not run: this is the last
    moment to give the jobs back. The server's own handlers still run, after ours.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.seen = False

    def watch(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may handle signals: a test client's portal
        for signum in self.SIGNALS:
            previous = signal.getsignal(signum)
            if callable(previous):
                signal.signal(signum, functools.partial(self._note, previous))

    def _note(self, previous: Callable[[int, Any], Any], signum: int, frame: Any) -> None:
        self.seen = True
        previous(signum, frame)


def _response(answer: HttpResponse) -> Response:
    response = Response(answer.body, status_code=answer.status)
    response.raw_headers.extend(
        (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers
    )
    return response


def _replay(body: bytes) -> Receive:
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()  # a client that stays connected
        return {"type": "http.disconnect"}

    return receive


def _address(value: Any) -> tuple[str, int] | None:
    return (str(value[0]), value[1]) if value and isinstance(value[1], int) else None


def _snapshot(scope: Scope, body: bytes, arguments: dict[str, Any] | None) -> RequestSnapshot:
    return RequestSnapshot(
        method=scope["method"],
        path=scope["path"],
        query_string=scope["query_string"].decode("latin-1"),
        headers=tuple(
            (k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]
        ),
        body=body,
        path_params=dict(scope.get("path_params") or {}),
        client=_address(scope.get("client")),
        scheme=scope.get("scheme", "http"),
        server=_address(scope.get("server")),
        root_path=scope.get("root_path", ""),
        arguments=arguments,
    )


def _scope(snapshot: RequestSnapshot, host: _Host | None) -> Scope:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": snapshot.method,
        "scheme": snapshot.scheme,
        "path": snapshot.path,
        "raw_path": snapshot.path.encode("utf-8"),
        "query_string": snapshot.query_string.encode("latin-1"),
        "root_path": snapshot.root_path,
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in snapshot.headers],
        "client": snapshot.client,
        "server": snapshot.server,
        "path_params": dict(snapshot.path_params),
        "state": dict(host.state) if host is not None else {},
        "extensions": {},
    }
    if host is not None:
        scope["app"] = host.app
    return scope


class StarletteAdapter:
    """The ``Adapter`` (``reliable.web.routes``) for Starlette and FastAPI endpoints.

    A FastAPI endpoint's parameters are stored as the values FastAPI validated, except
    those that carry credentials: a ``Header()`` parameter whose header is
    ``Authorization``, ``Cookie``, ``Proxy-Authorization`` or in
    ``RELIABLE_REDACT_HEADERS``; every ``Cookie()`` parameter; and a ``Depends`` or
    ``Security`` parameter on a ``fastapi.security`` scheme (``HTTPBearer``,
    ``HTTPBasic``, ``OAuth2PasswordBearer``, ``APIKeyHeader``...). Their values are
    withheld, and so are the header or query parameter of an API key scheme anywhere
    in the endpoint's dependencies. In the worker a withheld parameter gets the value
    the capture hook returned under its name, when the hook returned a dict with that
    key, else ``None``: have the hook return who the caller is (a user id), not the
    credential, and let the endpoint take it from there.
    """

    name = "starlette"

    def offload(self, route: RouteTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Commit the current request as a job of ``route``; answer 202 (or 4xx).

        ``async def`` endpoints get an awaitable; plain ones, which Starlette runs in
        its thread pool, the response. ``NotImplemented`` outside a request that went
        through a ``ReliableMiddleware``.
        """
        incoming = _current.get()
        if incoming is None:
            return NotImplemented
        if inspect.iscoroutinefunction(route.fn):
            return self._offload(incoming, route, args, kwargs)
        return anyio.from_thread.run(self._offload, incoming, route, args, kwargs)

    async def _offload(
        self, incoming: _Incoming, route: RouteTask, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Response:
        try:
            body = await incoming.read_body()
        except ClientDisconnect:  # nobody reads the answer; it keeps the error log clean
            return _response(problem(400, "the request body broke off before its end"))
        if body is None:
            return _response(too_large(incoming.limit))
        arguments = None
        credentials = NO_CREDENTIALS
        request = args[0] if len(args) == 1 and isinstance(args[0], Request) else None
        if request is None:  # FastAPI calls with keywords: the values it validated
            arguments = {k: v for k, v in kwargs.items() if not isinstance(v, HTTPConnection)}
            given = [v for v in kwargs.values() if isinstance(v, Request)]
            request = given[0] if given else Request(incoming.scope, _replay(body))
            credentials = _credentials(route, request.scope.get("route"))
        captured = await _call_hook(route.route.capture or route.runtime.capture_hook, request)
        caller = await _call_hook(route.route.idempotency_scope, request)
        decide = functools.partial(
            admit,
            route,
            _snapshot(request.scope, body, arguments),
            framework=self.name,
            captured=captured,
            scope=None if caller is None else str(caller),
            request=request,
            credentials=credentials,
        )
        return _response(await anyio.to_thread.run_sync(decide))

    async def run(self, route: RouteTask, snapshot: RequestSnapshot) -> HttpResponse:
        """In the worker: call the endpoint on the rebuilt request; collect its response.

        A withheld parameter gets the capture hook's value under its name, else ``None``.
        """
        host = _host_of(route)
        scope = _scope(snapshot, host)
        request = Request(scope, _replay(snapshot.body))
        if snapshot.arguments is None:
            call = functools.partial(route.fn, request)
        else:
            requests = dict.fromkeys(_request_parameters(route.fn), request)
            restored = _restored(snapshot.withheld, current_job().captured)
            call = functools.partial(route.fn, **snapshot.arguments, **restored, **requests)
        try:
            if inspect.iscoroutinefunction(route.fn):
                result = await call()
            else:  # as Starlette runs a plain endpoint: in a thread, beside an event loop
                result = await to_the_end(anyio.to_thread.run_sync(call))
        except Exception as exc:
            result = await _handle(exc, request, host)
            if result is None:
                raise
        if not isinstance(result, Response):
            result = await render(result, _api_route(host, route))
        return await _collect(result, scope, request.receive)


def _restored(withheld: Iterable[str], captured: Any) -> dict[str, Any]:
    """Values for withheld parameters: the capture hook's, by name, else ``None``."""
    found = captured if isinstance(captured, dict) else {}
    return {name: found.get(name) for name in withheld}


# Per offloaded route, where its FastAPI endpoint takes credentials.
_CREDENTIALS: weakref.WeakKeyDictionary[RouteTask, Credentials] = weakref.WeakKeyDictionary()


def _credentials(route: RouteTask, api_route: Any) -> Credentials:
    """Where the FastAPI endpoint of ``route`` takes credentials (``api_route`` is the
    ``APIRoute`` that matched the request: ``scope["route"]``)."""
    found = _CREDENTIALS.get(route)
    if found is None:
        dependant = getattr(api_route, "dependant", None)
        if dependant is None or route_of(api_route) is not route:
            dependant = getattr(_api_route(_host_of(route), route), "dependant", None)
        if dependant is None:
            return NO_CREDENTIALS
        found = find_credentials(dependant, route.runtime.settings.redact_headers)
        _CREDENTIALS[route] = found
    return found


async def _call_hook(hook: Callable[[Any], Any] | None, request: Request) -> Any:
    value = None if hook is None else hook(request)
    return await value if inspect.isawaitable(value) else value


async def _handle(exc: Exception, request: Request, host: _Host | None) -> Response | None:
    """The app's answer to ``exc`` as in a request (``HTTPException``, a registered
    handler); ``None`` for an error, which fails the attempt."""
    handlers: dict[Any, Any] = getattr(host.app, "exception_handlers", {}) if host else {}
    handler = handlers.get(exc.status_code) if isinstance(exc, HTTPException) else None
    kinds = [kind for kind in type(exc).__mro__ if kind in handlers and kind is not Exception]
    handler = handler or (handlers[kinds[0]] if kinds else None)
    if handler is None:
        if not isinstance(exc, HTTPException):
            return None
        return PlainTextResponse(exc.detail, exc.status_code, headers=exc.headers)
    response = handler(request, exc)
    return await response if inspect.isawaitable(response) else response  # type: ignore[no-any-return]


async def _collect(response: Response, scope: Scope, receive: Receive) -> HttpResponse:
    """Run ``response`` as the ASGI app it is (streaming, files, background tasks too)."""
    answer = HttpResponse(500)
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            answer.status = message["status"]
            answer.headers = [
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]
            ]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await response(scope, receive, send)
    answer.body = b"".join(chunks)
    return answer


@functools.lru_cache(maxsize=1024)
def _request_parameters(fn: Callable[..., Any]) -> tuple[str, ...]:
    """Names of ``fn``'s parameters typed ``Request`` (``HTTPConnection``)."""
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        hints = {}
    return tuple(
        name
        for name, hint in hints.items()
        if name != "return" and isinstance(hint, type) and issubclass(hint, HTTPConnection)
    )


def _api_route(host: _Host | None, route: RouteTask) -> Any:
    found = routes(host.app) if host is not None else ()
    return next((r for r in found if route_of(r) is route and hasattr(r, "dependant")), None)


def _host_of(route: RouteTask) -> _Host | None:
    """The app serving ``route``: seen by a middleware, or else (a standalone worker)
    the Starlette app in the endpoint's module that carries its Reliable."""
    host = _HOSTS.get(route.runtime)
    module = sys.modules.get(route.fn.__module__)
    for value in list(vars(module).values()) if host is None and module else ():
        if isinstance(value, Starlette) and _carries(value, route.runtime):
            host = _HOSTS.setdefault(route.runtime, _Host(value))
    return host


def _carries(app: Starlette, runtime: Runtime) -> bool:
    carried = [
        getattr(app.state, "reliable", None),
        *(
            m.kwargs.get("reliable")
            for m in app.user_middleware
            if getattr(m, "cls", None) is ReliableMiddleware
        ),
    ]
    return any(isinstance(rel, Reliable) and rel.runtime is runtime for rel in carried)


register_adapter(StarletteAdapter())
