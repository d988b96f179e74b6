"""FastAPI's OpenAPI document says what an offloaded route answers: 202 with the job and a
Location, its refusals as problem+json, and the status resource beside it."""

from __future__ import annotations

import warnings

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.exceptions import StarletteDeprecationWarning
from starlette.middleware import Middleware

from reliable import Reliable
from reliable.integrations.starlette import ReliableMiddleware

with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from starlette.testclient import TestClient


class Receipt(BaseModel):
    order: int
    sent: bool


def test_offloaded_routes_are_documented_as_accepted_with_a_status_resource(
    rel: Reliable,
) -> None:
    app = FastAPI(middleware=[Middleware(ReliableMiddleware, reliable=rel)])

    @app.post("/orders/{order}/receipt", status_code=201)
    @rel.offload
    async def receipt(order: int) -> Receipt:
        return Receipt(order=order, sent=True)

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    with TestClient(app) as client:
        document = client.get("/openapi.json").json()
        again = client.get("/openapi.json").json()
        # The handler's own 201 is still what the worker renders.
        accepted = client.post("/orders/7/receipt")
        assert accepted.status_code == 202
        rel.run_until_idle()
        result = rel.get_job(accepted.json()["id"]).result
        assert result["status_code"] == 201 and result["body"] == {"order": 7, "sent": True}
    assert document == again
    responses = document["paths"]["/orders/{order}/receipt"]["post"]["responses"]
    assert "201" not in responses
    assert set(responses["202"]["headers"]) >= {"Location", "Retry-After"}
    schema = responses["202"]["content"]["application/json"]["schema"]
    assert schema == {"$ref": "#/components/schemas/ReliableAccepted"}
    for refusal in ("400", "413", "422", "429"):
        assert "application/problem+json" in responses[refusal]["content"]
    assert "application/json" in responses["422"]["content"]  # FastAPI's own validation
    status = document["paths"]["/_reliable/jobs/{job_id}"]
    assert set(status) == {"get", "delete"}
    assert "ReliableJob" in document["components"]["schemas"]
    health_responses = document["paths"]["/health"]["get"]["responses"]
    assert "202" not in health_responses and "200" in health_responses
