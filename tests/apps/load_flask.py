"""A Flask application for tests through a real server (gunicorn): offloaded routes
that only enqueue (``RELIABLE_EMBEDDED_WORKER=0``), so a test counts what was accepted.

- ``POST /orders/<id>/refunds``: requires an ``Idempotency-Key``.
- ``POST /exports``: at most ``EXPORTS_PER_HOUR`` accepted per ``X-Tenant`` per hour.
- ``POST /orders/<id>/notes``: rate limited per ``json:customer.id`` (a key read from the
  body, whatever the body is).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from reliable import RateLimit, Reliable
from reliable.integrations.flask import ReliableFlask

EXPORTS_PER_HOUR = 50

rel = Reliable()
app = Flask(__name__)
ReliableFlask(app, rel)


@app.post("/orders/<int:order_id>/refunds")
@rel.offload(idempotency="required")
def refund(order_id: int) -> tuple[dict[str, Any], int]:
    return {"order_id": order_id, "amount": request.get_json()["amount_cents"]}, 201


@app.post("/exports")
@rel.offload(rate_limit=RateLimit(EXPORTS_PER_HOUR, per="1h", key="header:X-Tenant"))
def export() -> tuple[dict[str, Any], int]:
    return {"tenant": request.headers["X-Tenant"]}, 201


@app.post("/orders/<int:order_id>/notes")
@rel.offload(rate_limit=RateLimit(1000, per="1h", key="json:customer.id"))
def note(order_id: int) -> tuple[dict[str, Any], int]:
    return {"order_id": order_id}, 201
