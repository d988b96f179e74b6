"""A Flask-SQLAlchemy shop whose order and its receipt job are committed together.

    python examples/flask_sqlalchemy_app.py

serves on http://127.0.0.1:8000 (DEMO_PORT picks another port) with the embedded
worker, keeping orders and jobs in one database: ``shop.db`` (SQLite) in the current
directory unless DATABASE_URL names another (``postgresql+psycopg://...``). Try:

    curl -i -X POST http://127.0.0.1:8000/orders -H 'Content-Type: application/json' \\
         -d '{"email": "ada@example.com", "total_cents": 4200}'

``POST /orders`` adds the order and enqueues its receipt with
``send_receipt.options(session=db.session)``: both are written in the request's
transaction, so ``db.session.commit()`` makes both exist, and a failure before it
(an exception, a crash, a rollback) leaves neither: never an order without its receipt,
never a receipt for an order that does not exist. ``RELIABLE_SHARE_SQLALCHEMY_ENGINE``
puts the job store in Flask-SQLAlchemy's database and connection pool.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from flask import Flask, request
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import ForeignKey
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from reliable import Reliable, current_job
from reliable.integrations.flask import ReliableFlask


class Base(DeclarativeBase):
    pass


db = SQLAlchemy(model_class=Base)


class Order(db.Model):  # type: ignore[name-defined,misc]
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    total_cents: Mapped[int]


class Receipt(db.Model):  # type: ignore[name-defined,misc]
    order_id: Mapped[int] = mapped_column(ForeignKey("order.id"), primary_key=True)
    sent_to: Mapped[str]
    job_id: Mapped[str]


def create_app(rel: Reliable, database_url: str) -> Flask:
    """The shop, its tables in ``database_url`` and its jobs in ``rel``, sharing one
    engine (create the tables with ``db.create_all()`` in an app context)."""
    app = Flask(__name__)
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    app.config["RELIABLE_SHARE_SQLALCHEMY_ENGINE"] = True
    db.init_app(app)  # before ReliableFlask, which takes its engine

    @rel.task(retries=5)
    def send_receipt(order_id: int) -> dict[str, Any]:
        """Email the receipt (stood in for by a row); runs in a worker."""
        with app.app_context():
            order = db.session.get(Order, order_id)
            if order is None:  # cannot happen: the job exists only if the order does
                raise LookupError(f"no order {order_id}")
            db.session.merge(
                Receipt(order_id=order_id, sent_to=order.email, job_id=current_job().id)
            )
            db.session.commit()
            return {"order_id": order_id, "sent_to": order.email}

    @app.post("/orders")
    def create_order() -> tuple[dict[str, Any], int]:
        data = request.get_json()
        order = Order(email=data["email"], total_cents=data["total_cents"])
        db.session.add(order)
        db.session.flush()  # the order gets its id
        receipt = send_receipt.options(session=db.session).enqueue(order.id)
        if data.get("fail_before_commit"):  # a crash here leaves neither behind
            raise RuntimeError("the request failed before its commit")
        db.session.commit()  # the order and its receipt job, together
        return {"order_id": order.id, "receipt_job": receipt.id}, 201

    ReliableFlask(app, rel)
    return app


DATABASE_URL = os.environ.get("DATABASE_URL", f"sqlite:///{os.path.abspath('shop.db')}")
rel = Reliable()
app = create_app(rel, DATABASE_URL)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with app.app_context():
        db.create_all()
    port = int(os.environ.get("DEMO_PORT", "8000"))
    print(f"Serving on http://127.0.0.1:{port}: POST /orders", flush=True)
    app.run("127.0.0.1", port, threaded=True)
