"""A shop's Flask API whose slow, flaky work runs durably in the background.

    python examples/flask_app.py

serves on http://127.0.0.1:8000 (DEMO_PORT picks another port) with the embedded
worker, keeping jobs in ``demo.db`` (SQLite) unless RELIABLE_DATABASE_URL says
otherwise; it prints a ``curl`` line to try. More workers, on any machine sharing the
database: ``reliable worker examples.flask_app:app`` (or ``flask --app
examples.flask_app reliable worker``).

- ``POST /orders/<id>/receipt`` emails a receipt through a provider that fails now and
  then (DEMO_EMAIL_FAILURE_RATE, default 0.3); failed attempts are retried with backoff.
- ``POST /orders/<id>/refunds`` refunds a payment; it requires an ``Idempotency-Key``,
  so a client may resend it safely and the customer is refunded once.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import threading
from typing import Any

import tenacity
from flask import Flask, request

from reliable import Reliable, current_job
from reliable.integrations.flask import ReliableFlask


class ProviderUnavailable(Exception):
    """The email provider answered 503; worth trying again later."""


class EmailProvider:
    """Stands in for an email API that is unavailable now and then."""

    def __init__(self, failure_rate: float | None = None) -> None:
        rate = os.environ.get("DEMO_EMAIL_FAILURE_RATE", "0.3")
        self.failure_rate = float(rate) if failure_rate is None else failure_rate
        self.sent: list[dict[str, str]] = []
        self._lock = threading.Lock()

    def send(self, to: str, subject: str, text: str) -> str:
        """Send one message; return the provider's message id."""
        if random.random() < self.failure_rate:
            raise ProviderUnavailable("the email provider answered 503")
        message_id = f"msg-{secrets.token_hex(6)}"
        with self._lock:
            self.sent.append({"id": message_id, "to": to, "subject": subject, "text": text})
        return message_id


class PaymentProvider:
    """Stands in for a payment API; it refunds whatever it is asked to, every time."""

    def __init__(self) -> None:
        self.refunds: list[dict[str, Any]] = []

    def refund(self, order_id: int, amount_cents: int) -> str:
        refund_id = f"re-{secrets.token_hex(6)}"
        self.refunds.append({"id": refund_id, "order_id": order_id, "amount": amount_cents})
        return refund_id


def create_app(
    rel: Reliable,
    emails: EmailProvider | None = None,
    payments: PaymentProvider | None = None,
) -> Flask:
    """The shop's API, with its jobs in ``rel``."""
    app = Flask(__name__)
    emails = emails or EmailProvider()
    payments = payments or PaymentProvider()

    @app.post("/orders/<int:order_id>/receipt")
    @rel.offload(
        retries=5,
        backoff=tenacity.wait_exponential_jitter(multiplier=0.2, max=5, jitter=0.2),
        timeout="30s",
    )
    def send_receipt(order_id: int) -> tuple[dict[str, Any], int]:
        """Email the receipt of an order to the address in the JSON body."""
        data = request.get_json()
        template = request.args.get("template", "full")
        request_id = request.headers.get("X-Request-Id", "")
        text = f"Thank you for order {order_id}."
        if template == "full":
            text += " Your items are on their way."
        message_id = emails.send(data["email"], f"Receipt for order {order_id}", text)
        document = {
            "order_id": order_id,
            "email": data["email"],
            "template": template,
            "request_id": request_id,
            "message_id": message_id,
            "attempt": current_job().attempt,
        }
        return document, 201

    @app.post("/orders/<int:order_id>/refunds")
    @rel.offload(idempotency="required", retries=5)
    def refund(order_id: int) -> tuple[dict[str, Any], int]:
        """Refund part of an order; a resent request (same key) refunds once."""
        amount = request.get_json().get("amount_cents")
        if not isinstance(amount, int) or amount <= 0:
            return {"error": "amount_cents must be a positive whole number"}, 422
        refund_id = payments.refund(order_id, amount)
        return {"order_id": order_id, "refund_id": refund_id, "amount_cents": amount}, 201

    ReliableFlask(app, rel)
    return app


rel = Reliable(os.environ.get("RELIABLE_DATABASE_URL", "sqlite:///demo.db"))
app = create_app(rel)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    port = int(os.environ.get("DEMO_PORT", "8000"))
    base = f"http://127.0.0.1:{port}"
    print(
        f"Serving on {base} - try:\n"
        f"  curl -i -X POST '{base}/orders/42/receipt?template=short' "
        "-H 'Content-Type: application/json' -H 'X-Request-Id: demo-1' "
        """-d '{"email": "ada@example.com"}'\n"""
        f"then follow the Location header: curl '{base}/_reliable/jobs/<id>?wait=10'\n"
        f"and see every job in the dashboard: {base}/_reliable/",
        flush=True,  # also when the output is a pipe, not a terminal
    )
    app.run("127.0.0.1", port, threaded=True)
