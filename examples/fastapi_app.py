"""A shop's FastAPI API whose slow, flaky work runs durably in the background.

    python examples/fastapi_app.py

serves on http://127.0.0.1:8000 with the embedded worker, keeping jobs in ``demo.db``
(SQLite) unless RELIABLE_DATABASE_URL says otherwise. More workers, on any machine
sharing the database: ``reliable worker examples.fastapi_app:rel``.

FastAPI validates each request at once (a bad body gets its 422 and nothing is
stored); the validated values - path and query parameters, headers, the pydantic body -
are stored with the job and given back to the endpoint in the worker.

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
from typing import Annotated, Any

import tenacity
import uvicorn
from fastapi import FastAPI, Header, Request
from pydantic import BaseModel, Field
from starlette.middleware import Middleware

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


class Receipt(BaseModel):
    """Where to send a receipt."""

    email: str = Field(pattern=r"^[^@\s]+@[^@\s]+$")


class Refund(BaseModel):
    """How much of an order to refund."""

    amount_cents: int = Field(gt=0)


class ReceiptSent(BaseModel):
    order_id: int
    email: str
    template: str
    request_id: str
    message_id: str
    attempt: int


def create_app(
    rel: Reliable,
    emails: EmailProvider | None = None,
    payments: PaymentProvider | None = None,
) -> FastAPI:
    """The shop's API, with its jobs in ``rel``."""
    app = FastAPI(title="shop", middleware=[Middleware(ReliableMiddleware, reliable=rel)])
    app.state.emails = emails or EmailProvider()
    app.state.payments = payments or PaymentProvider()

    @app.post("/orders/{order_id}/receipt", status_code=201)
    @rel.offload(
        retries=5, backoff=tenacity.wait_exponential_jitter(multiplier=0.2, max=5), timeout="30s"
    )
    async def send_receipt(
        order_id: int,
        receipt: Receipt,
        request: Request,
        template: str = "full",
        x_request_id: Annotated[str, Header()] = "",
    ) -> ReceiptSent:
        """Email the receipt of an order."""
        text = f"Thank you for order {order_id}."
        if template == "full":
            text += " Your items are on their way."
        emails: EmailProvider = request.app.state.emails
        message_id = await emails.send(receipt.email, f"Receipt for order {order_id}", text)
        return ReceiptSent(
            order_id=order_id,
            email=receipt.email,
            template=template,
            request_id=x_request_id,
            message_id=message_id,
            attempt=current_job().attempt,
        )

    @app.post("/orders/{order_id}/refunds", status_code=201)
    @rel.offload(idempotency="required", retries=5)
    async def refund(order_id: int, body: Refund, request: Request) -> dict[str, Any]:
        """Refund part of an order; a resent request (same key) refunds once."""
        payments: PaymentProvider = request.app.state.payments
        refund_id = await payments.refund(order_id, body.amount_cents)
        return {"order_id": order_id, "refund_id": refund_id, "amount_cents": body.amount_cents}

    return app


rel = Reliable(os.environ.get("RELIABLE_DATABASE_URL", "sqlite:///demo.db"))
app = create_app(rel)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(
        "Serving on http://127.0.0.1:8000 (API docs at /docs) - try:\n"
        "  curl -i -X POST 'http://127.0.0.1:8000/orders/42/receipt?template=short' "
        "-H 'Content-Type: application/json' -H 'X-Request-Id: demo-1' "
        """-d '{"email": "ada@example.com"}'\n"""
        "then follow the Location header: curl 'http://127.0.0.1:8000/_reliable/jobs/<id>?wait=10'"
    )
    uvicorn.run(app, host="127.0.0.1", port=8000)
