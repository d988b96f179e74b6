"""A Starlette application for tests through a real server (uvicorn), the twin of
``load_flask``: offloaded routes that only enqueue (``RELIABLE_EMBEDDED_WORKER=0``).

- ``POST /orders/{id}/refunds``: requires an ``Idempotency-Key``.
- ``POST /exports``: at most ``EXPORTS_PER_HOUR`` accepted per ``X-Tenant`` per hour.
- ``POST /orders/{id}/notes``: rate limited per ``json:customer.id``.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reliable import RateLimit, Reliable
from reliable.integrations.starlette import ReliableMiddleware

EXPORTS_PER_HOUR = 50

rel = Reliable()


@rel.offload(idempotency="required")
async def refund(request: Request) -> JSONResponse:
    data = await request.json()
    order_id = request.path_params["order_id"]
    return JSONResponse({"order_id": order_id, "amount": data["amount_cents"]}, 201)


@rel.offload(rate_limit=RateLimit(EXPORTS_PER_HOUR, per="1h", key="header:X-Tenant"))
async def export(request: Request) -> JSONResponse:
    return JSONResponse({"tenant": request.headers["X-Tenant"]}, 201)


@rel.offload(rate_limit=RateLimit(1000, per="1h", key="json:customer.id"))
async def note(request: Request) -> JSONResponse:
    return JSONResponse({"order_id": request.path_params["order_id"]}, 201)


app = Starlette(
    routes=[
        Route("/orders/{order_id:int}/refunds", refund, methods=["POST"]),
        Route("/exports", export, methods=["POST"]),
        Route("/orders/{order_id:int}/notes", note, methods=["POST"]),
    ],
    middleware=[Middleware(ReliableMiddleware, reliable=rel)],
)
