"""A shop's Starlette API whose slow, flaky work runs durably in the background.

    python examples/starlette_app.py

serves on http://127.0.0.1:8000 with the embedded worker, keeping jobs in ``demo.db``
(SQLite) unless RELIABLE_DATABASE_URL says otherwise. More workers, on any machine
sharing the database: ``reliable worker examples.starlette_app:rel``.

- ``POST /orders/{id}/receipt`` emails a receipt through a provider that fails now and
  then (DEMO_EMAIL_FAILURE_RATE, default 0.3); failed attempts are retried with backoff.
- ``POST /orders/{id}/refunds`` refunds a payment; it requires an ``Idempotency-Key``,
  so a client may resend it safely and the customer is refunded once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
from typing import Any

import tenacity
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reliable import Reliable, current_job
from reliable.integrations.starlette import ReliableMiddleware


class ProviderUnavailable(Exception):
    """The email provider answered 503; worth trying again later."""


class EmailProvider:
    """Stands in for an email API that is unavailable now and then."""

    def __init__(self, failure_rate: float | None = None) -> None:
        rate = os.environ.get("DEMO_EMAIL_FAILURE_RATE", "0.3")
        self.failure_rate = float(rate) if failure_rate is None else failure_rate
        self.sent: list[dict[str, str]] = []

    async def send(self, to: str, subject: str, text: str) -> str:
        """Send one message; return the provider's message id."""
        await asyncio.sleep(0.05)  # the round trip to the provider
        if random.random() < self.failure_rate:
            raise ProviderUnavailable("the email provider answered 503")
        message_id = f"msg-{secrets.token_hex(6)}"
        self.sent.append({"id": message_id, "to": to, "subject": subject, "text": text})
        return message_id


class PaymentProvider:
    """Stands in for a payment API; it refunds whatever it is asked to, every time."""

    def __init__(self) -> None:
        self.refunds: list[dict[str, Any]] = []

    async def refund(self, order_id: int, amount_cents: int) -> str:
        refund_id = f"re-{secrets.token_hex(6)}"
        self.refunds.append({"id": refund_id, "order_id": order_id, "amount": amount_cents})
        return refund_id


async def send_receipt(request: Request) -> JSONResponse:
    """Email the receipt of an order to the address in the JSON body."""
    order_id: int = request.path_params["order_id"]
    data = await request.json()
    template = request.query_params.get("template", "full")
    request_id = request.headers.get("X-Request-Id", "")
    text = f"Thank you for order {order_id}."
    if template == "full":
        text += " Your items are on their way."
    emails: EmailProvider = request.app.state.emails
    message_id = await emails.send(data["email"], f"Receipt for order {order_id}", text)
    document = {
        "order_id": order_id,
        "email": data["email"],
        "template": template,
        "request_id": request_id,
        "message_id": message_id,
        "attempt": current_job().attempt,
    }
    return JSONResponse(document, status_code=201)


async def refund(request: Request) -> JSONResponse:
    """Refund part of an order; a resent request (same key) refunds once."""
    order_id: int = request.path_params["order_id"]
    amount = (await request.json()).get("amount_cents")
    if not isinstance(amount, int) or amount <= 0:
        return JSONResponse({"error": "amount_cents must be a positive whole number"}, 422)
    payments: PaymentProvider = request.app.state.payments
    refund_id = await payments.refund(order_id, amount)
    document = {"order_id": order_id, "refund_id": refund_id, "amount_cents": amount}
    return JSONResponse(document, status_code=201)


def create_app(
    rel: Reliable,
    emails: EmailProvider | None = None,
    payments: PaymentProvider | None = None,
) -> Starlette:
    """The shop's API, with its jobs in ``rel``."""
    receipt_backoff = tenacity.wait_exponential_jitter(multiplier=0.2, max=5)
    routes = [
        Route(
            "/orders/{order_id:int}/receipt",
            rel.offload(send_receipt, retries=5, backoff=receipt_backoff, timeout="30s"),
            methods=["POST"],
        ),
        Route(
            "/orders/{order_id:int}/refunds",
            rel.offload(refund, idempotency="required", retries=5),
            methods=["POST"],
        ),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(ReliableMiddleware, reliable=rel)])
    app.state.emails = emails or EmailProvider()
    app.state.payments = payments or PaymentProvider()
    return app


rel = Reliable(os.environ.get("RELIABLE_DATABASE_URL", "sqlite:///demo.db"))
app = create_app(rel)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(
        "Serving on http://127.0.0.1:8000 - try:\n"
        "  curl -i -X POST 'http://127.0.0.1:8000/orders/42/receipt?template=short' "
        "-H 'Content-Type: application/json' -H 'X-Request-Id: demo-1' "
        """-d '{"email": "ada@example.com"}'\n"""
        "then follow the Location header: curl 'http://127.0.0.1:8000/_reliable/jobs/<id>?wait=10'"
    )
    uvicorn.run(app, host="127.0.0.1", port=8000)
