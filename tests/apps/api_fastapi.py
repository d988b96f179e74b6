"""A FastAPI application for schema tests: offloaded routes and the status resource.

``create_app(rel)`` builds it on a ``Reliable``; its OpenAPI document (``/openapi.json``)
describes the offloaded routes and ``{prefix}/jobs/{job_id}`` as ``reliable`` answers
them, which is what ``tests/test_api_schema.py`` holds it to.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import FastAPI, Header
from pydantic import BaseModel, Field
from starlette.middleware import Middleware

from reliable import RateLimit, Reliable
from reliable.integrations.starlette import ReliableMiddleware


class Refund(BaseModel):
    amount_cents: int = Field(gt=0, le=1_000_000)
    reason: str = Field(default="", max_length=200)


class Note(BaseModel):
    text: str = Field(max_length=500)


def create_app(rel: Reliable) -> FastAPI:
    """The app: ``POST /orders/{order_id}/refunds`` (idempotent, rate limited per
    tenant) and ``POST /orders/{order_id}/notes``, both offloaded."""
    app = FastAPI(middleware=[Middleware(ReliableMiddleware, reliable=rel)])

    @app.post("/orders/{order_id}/refunds", status_code=201)
    @rel.offload(rate_limit=RateLimit(1000, per="1m", key="header:X-Tenant"))
    async def refund(
        order_id: int, refund: Refund, x_tenant: Annotated[str, Header(min_length=1, max_length=40)]
    ) -> dict[str, object]:
        return {"order_id": order_id, "amount_cents": refund.amount_cents, "tenant": x_tenant}

    @app.post("/orders/{order_id}/notes", status_code=201)
    @rel.offload
    async def note(order_id: int, note: Note) -> dict[str, object]:
        return {"order_id": order_id, "length": len(note.text)}

    return app
