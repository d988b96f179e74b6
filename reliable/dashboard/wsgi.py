"""The dashboard as a WSGI application, and ``serve``: the standalone dashboard
(``reliable dashboard``) on a threading ``wsgiref`` server, standard library only."""

from __future__ import annotations

import logging
import socketserver
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..app import Reliable
from .console import Console
from .request import MAX_FORM_BYTES, ConsoleRequest, parse_cookies

log = logging.getLogger("reliable.dashboard")

StartResponse = Callable[..., Any]
REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Content Too Large",
    503: "Service Unavailable",
}


def console_request(environ: dict[str, Any], prefix: str = "") -> ConsoleRequest:
    """The ``ConsoleRequest`` of a WSGI ``environ``, its path taken relative to
    ``prefix`` (where the dashboard is mounted within the application)."""
    path = environ.get("PATH_INFO", "") or "/"
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :] or "/"
    headers = {
        key[5:].replace("_", "-").lower(): str(value)
        for key, value in environ.items()
        if key.startswith("HTTP_")
    }
    if environ.get("CONTENT_TYPE"):
        headers["content-type"] = str(environ["CONTENT_TYPE"])
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = b""
    if length > 0:
        body = environ["wsgi.input"].read(min(length, MAX_FORM_BYTES + 1))
    return ConsoleRequest(
        method=str(environ.get("REQUEST_METHOD", "GET")),
        path=path,
        query=str(environ.get("QUERY_STRING", "")),
        headers=headers,
        cookies=parse_cookies(headers.get("cookie")),
        body=body,
        client_host=environ.get("REMOTE_ADDR"),
        scheme=str(environ.get("wsgi.url_scheme", "http")),
    )


class DashboardApp:
    """A WSGI application serving ``Console(rel, root)``."""

    def __init__(self, rel: Reliable, root: str = "") -> None:
        self.console = Console(rel, root)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        answer = self.console.handle(console_request(environ))
        reason = REASONS.get(answer.status, "Unknown")
        start_response(f"{answer.status} {reason}", list(answer.headers))
        return [answer.body]


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug(format, *args)


def make_dashboard_server(rel: Reliable, host: str = "127.0.0.1", port: int = 8765) -> WSGIServer:
    """A threading WSGI server of the dashboard at the site's root (not yet serving);
    ``port=0`` picks a free port (``server.server_port``)."""
    return make_server(host, port, DashboardApp(rel), server_class=_Server, handler_class=_Quiet)


def serve(rel: Reliable, host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve the dashboard of ``rel`` at ``http://host:port/`` until interrupted.

    Off loopback, set ``RELIABLE_DASHBOARD_TOKEN``: without it, only loopback clients
    are let in.
    """
    server = make_dashboard_server(rel, host, port)
    log.info("dashboard at http://%s:%d/", host, server.server_port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
