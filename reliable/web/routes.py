"""Offloaded routes: ``@rel.offload`` and the job that replays a request in a worker.

The wrapper that ``offload`` returns stands in for the handler: during a request it
asks the installed framework adapter to snapshot the request, ``admit`` commits the
job and decides the answer (202, 400, 422), and the adapter turns it into the
framework's response. In the worker, ``RouteTask.invoke`` hands the snapshot to the same
adapter, which rebuilds the request, calls the real handler, and returns its response.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..calls import NO_OPTIONS
from ..errors import ConfigError, IdempotencyConflict, RateLimited, ReliableError, StoreError
from ..limits import Key, MissingKey, describe_key, plan, scope_value
from ..registry import Registry
from ..runtime import Runtime
from ..serialization import dumps
from ..store.records import RateState
from ..tasks import Task, TaskOptions
from .http import SECRET_RESPONSE_HEADERS, HttpResponse, accepted, problem, unavailable
from .idempotency import InvalidIdempotencyKey, parse_idempotency_key, request_fingerprint
from .snapshot import NO_CREDENTIALS, Credentials, RequestSnapshot, hidden_headers

log = logging.getLogger("reliable.web")

IDEMPOTENCY_MODES = ("optional", "required", "off")
RequestHook = Callable[[Any], Any]


class Adapter(Protocol):
    """What a framework integration provides to offloaded routes."""

    name: str

    def offload(self, route: RouteTask, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Answer the current request by enqueuing it, or return ``NotImplemented``
        when no request of this framework is active. May return an awaitable."""

    def run(self, route: RouteTask, snapshot: RequestSnapshot) -> Any:
        """In the worker: call the handler on the rebuilt request; return an
        ``HttpResponse`` (or an awaitable of one)."""


# Framework name -> adapter, filled when an integration module is imported.
ADAPTERS: dict[str, Adapter] = {}


def register_adapter(adapter: Adapter) -> None:
    ADAPTERS[adapter.name] = adapter


def adapter_for(name: str) -> Adapter:
    """The adapter of framework ``name``; its integration registers it when imported
    (the application's module imports it to install the middleware or extension)."""
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise ReliableError(
            f"a job of an offloaded {name} route needs reliable.integrations.{name}, which "
            "this worker has not imported: load the application module that installs it "
            "(reliable worker module:app)"
        )
    return adapter


class HandlerFailed(ReliableError):
    """The handler answered with a 5xx status; the attempt is retried."""

    def __init__(self, response: HttpResponse) -> None:
        excerpt = response.body[:200].decode("utf-8", "replace")
        super().__init__(f"the handler answered {response.status}: {excerpt}")
        self.status = response.status


@dataclass(frozen=True)
class RouteOptions:
    """Options of an offloaded route beyond the task options."""

    idempotency: str
    idempotency_scope: RequestHook | None
    capture: RequestHook | None
    session: RequestHook | None = None  # the request's SQLAlchemy session or connection

    @classmethod
    def build(
        cls,
        *,
        idempotency: str = "optional",
        idempotency_scope: RequestHook | None = None,
        capture: RequestHook | None = None,
        session: RequestHook | None = None,
    ) -> RouteOptions:
        if idempotency not in IDEMPOTENCY_MODES:
            raise ConfigError(
                "idempotency",
                f"expected one of {', '.join(IDEMPOTENCY_MODES)}, got {idempotency!r}",
            )
        if idempotency_scope is not None and not callable(idempotency_scope):
            raise ConfigError("idempotency_scope", "expected a function of the request")
        if capture is not None and not callable(capture):
            raise ConfigError("capture", "expected a function of the request returning JSON")
        if session is not None and not callable(session):
            raise ConfigError(
                "session", "expected a function of the request returning its SQLAlchemy session"
            )
        return cls(idempotency, idempotency_scope, capture, session)


def result_document(response: HttpResponse, redact: Iterable[str] = ()) -> dict[str, Any]:
    """The stored result of a handler: status code, headers and the whole body.

    ``Set-Cookie``, the credential headers and the ``redact`` header names
    (``RELIABLE_REDACT_HEADERS``) are left out of the headers.
    """
    hidden = SECRET_RESPONSE_HEADERS | hidden_headers(redact)
    headers: dict[str, str] = {}
    for name, value in response.headers:
        if name.lower() not in hidden:
            headers[name.lower()] = value
    content_type = headers.get("content-type", "")
    body: Any
    try:
        text = response.body.decode("utf-8")
        encoding = "text"
        body = text
        if "json" in content_type and text:
            body, encoding = json.loads(text), "json"
    except (UnicodeDecodeError, ValueError):
        import base64

        body, encoding = base64.b64encode(response.body).decode("ascii"), "base64"
    return {
        "status_code": response.status,
        "headers": headers,
        "body": body,
        "body_encoding": encoding,
    }


class RouteTask(Task[..., Any]):
    """The task behind an offloaded route; its jobs carry a request snapshot."""

    def __init__(
        self,
        runtime: Runtime,
        fn: Callable[..., Any],
        options: TaskOptions,
        route: RouteOptions,
    ) -> None:
        super().__init__(runtime, fn, options)
        self.route = route
        self.is_async = False  # the adapter's run() decides; awaitables are awaited

    def invoke(self, payload: dict[str, Any]) -> Any:
        adapter = adapter_for(payload["framework"])
        snapshot = RequestSnapshot.from_json(payload["request"])
        outcome = adapter.run(self, snapshot)
        if inspect.isawaitable(outcome):
            return self._finish_later(outcome)
        return self._finish(outcome)

    async def _finish_later(self, outcome: Awaitable[HttpResponse]) -> dict[str, Any]:
        return self._finish(await outcome)

    def _finish(self, response: HttpResponse) -> dict[str, Any]:
        if response.status >= 500:
            raise HandlerFailed(response)
        return result_document(response, self.runtime.settings.redact_headers)


def offload(registry: Registry, fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """Build the stand-in for ``fn``; see ``Reliable.offload``."""
    route_options = RouteOptions.build(
        idempotency=options.pop("idempotency", "optional"),
        idempotency_scope=options.pop("idempotency_scope", None),
        capture=options.pop("capture", None),
        session=options.pop("session", None),
    )
    if "idempotency_key" in options:
        raise ConfigError(
            "idempotency_key", "routes take the Idempotency-Key header; use idempotency="
        )
    route = RouteTask(
        registry.runtime, fn, TaskOptions.build(fn, route=True, **options), route_options
    )
    registry.register(route)

    def answer(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for adapter in list(ADAPTERS.values()):
            response = adapter.offload(route, args, kwargs)
            if response is not NotImplemented:
                return response
        raise ReliableError(
            f"{route.name} was called outside a request handled by reliable: install "
            "ReliableFlask(app, rel) or Middleware(ReliableMiddleware, reliable=rel)"
        )

    wrapper: Callable[..., Any]
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_view(*args: Any, **kwargs: Any) -> Any:
            return await answer(args, kwargs)

        wrapper = async_view
    else:

        @functools.wraps(fn)
        def view(*args: Any, **kwargs: Any) -> Any:
            return answer(args, kwargs)

        wrapper = view
    setattr(wrapper, "reliable_route", route)  # noqa: B010 - found by the integrations
    return wrapper


def admit(
    route: RouteTask,
    snapshot: RequestSnapshot,
    *,
    framework: str,
    captured: Any = None,
    scope: str | None = None,
    request: Any = None,
    credentials: Credentials = NO_CREDENTIALS,
) -> HttpResponse:
    """Check, snapshot and commit one request; decide the answer (SPEC §4), or 503 when
    the job store fails (nothing accepted).

    ``snapshot`` still carries every header and argument; credentials (the credential
    headers, ``RELIABLE_REDACT_HEADERS`` and what ``credentials`` names for this route)
    are dropped here, before anything is written. ``scope`` is the caller's
    idempotency scope value, if any; ``request`` the framework's request, given to key
    functions.

    An ``Idempotency-Key`` is scoped to the route and to the caller: the ``scope``
    value where the route has a scope function, else a digest of the credentials the
    request carries, so that another caller reusing a key neither gets the first
    caller's job nor learns, from a 422, that the key exists.
    """
    settings = route.runtime.settings
    key = None
    raw_key = snapshot.header("idempotency-key")
    if route.route.idempotency != "off":
        if raw_key is None:
            if route.route.idempotency == "required":
                return problem(400, "this endpoint requires an Idempotency-Key header")
        else:
            try:
                key = parse_idempotency_key(raw_key)
            except InvalidIdempotencyKey as exc:
                return problem(400, str(exc))
    payload = dumps(
        {
            "framework": framework,
            "request": snapshot.redacted(settings.redact_headers, credentials).to_json(),
            "captured": captured,
        }
    )
    try:
        flow = plan(
            route.name,
            route.options.flow,
            lambda key, option: resolve_request_key(
                key, option, snapshot, request, settings.redact_headers, credentials
            ),
            route.options.cancel_on,
        )
    except MissingKey as exc:
        return problem(400, str(exc))
    fingerprint = None
    idempotency_scope = None
    if key is not None:
        fingerprint = request_fingerprint(
            snapshot.method, snapshot.path, snapshot.query_string, snapshot.body
        )
        idempotency_scope = f"route:{route.name}"
        if scope is not None:
            idempotency_scope = f"{idempotency_scope}:{scope}"
        elif held := snapshot.carried_credentials(settings.redact_headers, credentials):
            idempotency_scope = f"{idempotency_scope}:caller:{caller_fingerprint(held)}"
    # With a ``session`` hook, the job is written in the request's transaction, which
    # is committed here: a 202 promises a committed job. A refused request leaves that
    # transaction to the application (Flask-SQLAlchemy rolls it back after the request).
    within = None if route.route.session is None else route.route.session(request)
    try:
        handle = route.enqueue_payload(
            payload,
            idempotency_key=key,
            idempotency_scope=idempotency_scope,
            fingerprint=fingerprint,
            flow=flow,
            call=replace(NO_OPTIONS, within=within),
        )
        if within is not None:
            route.runtime.store.commit(within)
    except IdempotencyConflict:
        return problem(
            422, "this Idempotency-Key was already used with a different request", key=key
        )
    except RateLimited as exc:
        return rate_limited(route, exc)
    except StoreError as exc:
        return store_failed(route, exc)
    try:
        status = (
            (route.runtime.store.get_status(handle.id) or "queued") if handle.replayed else "queued"
        )
    except StoreError as exc:
        return store_failed(route, exc)
    response = accepted(handle.id, settings.url_prefix, replayed=handle.replayed, status=status)
    response.headers += rate_limit_headers(route, handle.rates)
    return response


def store_failed(route: RouteTask, exc: StoreError) -> HttpResponse:
    """503: the job store failed (down, read-only, full), so the request was not
    accepted; the database's message is logged, not sent to the client."""
    log.error("%s: the request was not accepted: %s", route.name, exc)
    return unavailable(
        "the job store is unavailable, so the request was not accepted; try again later "
        "(with the same Idempotency-Key, if it had one)"
    )


def caller_fingerprint(credentials: Sequence[tuple[str, str]]) -> str:
    """A SHA-256 hex digest of a request's credentials, never the credentials.

    Only where the route has no scope function: that one alone defines the caller,
    because what a request carries may change between one caller's retries (a session
    cookie rotated, a token refreshed) and the retry must still find its job.
    """
    encoded = json.dumps([list(pair) for pair in credentials], separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


def _policy_name(route: RouteTask, index: int) -> str:
    return route.name if index == 0 else f"{route.name}-{index}"


def rate_limit_headers(route: RouteTask, rates: Sequence[RateState]) -> list[tuple[str, str]]:
    """``RateLimit`` and ``RateLimit-Policy`` (draft-ietf-httpapi-ratelimit-headers)."""
    if not rates:
        return []
    policies = []
    limits = []
    for index, rate in enumerate(rates):
        name = _policy_name(route, index)
        policies.append(f'"{name}";q={rate.limit};w={math.ceil(rate.period)}')
        limits.append(f'"{name}";r={max(rate.remaining, 0)};t={math.ceil(max(rate.reset, 0))}')
    return [("ratelimit-policy", ", ".join(policies)), ("ratelimit", ", ".join(limits))]


def rate_limited(route: RouteTask, exc: RateLimited) -> HttpResponse:
    """429 with ``Retry-After`` and the rate-limit headers; nothing was stored."""
    seconds = max(1, math.ceil(exc.retry_after))
    headers = [("retry-after", str(seconds))]
    if isinstance(exc.state, RateState):
        option = exc.state.scope.split("#")[1]  # "task#rate_limit<i>#key"
        index = int(option.removeprefix("rate_limit") or 0)
        name = _policy_name(route, index)
        headers += [
            ("ratelimit-policy", f'"{name}";q={exc.state.limit};w={math.ceil(exc.state.period)}'),
            ("ratelimit", f'"{name}";r=0;t={seconds}'),
        ]
    return problem(429, str(exc), headers=headers, retry_after=seconds)


def resolve_request_key(
    key: Key,
    option: str,
    snapshot: RequestSnapshot,
    request: Any,
    redacted: Sequence[str],
    credentials: Credentials = NO_CREDENTIALS,
) -> str:
    """The value of a limit key for one request (see ``reliable.limits``)."""
    if callable(key):
        value = key(request)
    else:
        kind, _, detail = key.partition(":")
        value = None
        secret = False
        if kind == "header":
            value = snapshot.header(detail)
            secret = detail.lower() in hidden_headers(redacted) | credentials.headers
        elif kind == "path":
            value = snapshot.path_params.get(detail)
        elif kind == "arg":
            value = (snapshot.arguments or {}).get(detail, snapshot.path_params.get(detail))
            secret = detail in credentials.arguments
        elif kind == "ip":
            value = snapshot.client[0] if snapshot.client else None
        elif kind == "json":
            value = _json_path(snapshot.body, detail)
        if secret and value is not None:
            # Never store a credential, not even as a key: keep a digest of it.
            value = "sha256:" + hashlib.sha256(str(value).encode()).hexdigest()[:32]
    if value is None or value == "":
        raise MissingKey(describe_key(key), option)
    return scope_value(value)


def _json_path(body: bytes, path: str) -> Any:
    try:
        value: Any = json.loads(body or b"null")
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested too deeply
        return None
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return None if isinstance(value, dict | list) else value
