"""A Starlette app whose worker runs inside the web process, for tests that stop uvicorn
with SIGTERM (``uvicorn tests.apps.embedded_starlette:app``).

``POST /jobs/{name}`` offloads a handler that leaves ``<name>.started`` in the folder
named by ``EMBEDDED_APP_MARKERS`` and then waits for ``<name>.release`` there, blocking
its thread (so that it cannot be cancelled before it has finished). It is a plain
``def``, as blocking handlers should be: Starlette, and the worker, run it in a thread,
so it does not block the event loop that async handlers share.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from reliable import Reliable
from reliable.integrations.starlette import ReliableMiddleware

MARKERS = Path(os.environ["EMBEDDED_APP_MARKERS"])

rel = Reliable()


async def ready(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ready")


@rel.offload
def job(request: Request) -> JSONResponse:
    name = request.path_params["name"]
    (MARKERS / f"{name}.started").touch()
    while not (MARKERS / f"{name}.release").exists():
        time.sleep(0.02)
    return JSONResponse({"done": name})


app = Starlette(
    routes=[Route("/", ready), Route("/jobs/{name}", job, methods=["POST"])],
    middleware=[Middleware(ReliableMiddleware, reliable=rel)],
)
