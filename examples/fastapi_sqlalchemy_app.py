"""A FastAPI shop on SQLAlchemy whose order and its receipt job are committed together.

    uvicorn examples.fastapi_sqlalchemy_app:app --port 8000

keeps orders and jobs in one database, ``shop.db`` (SQLite) in the current directory
unless DATABASE_URL names another (``postgresql+psycopg://...``), with the embedded
worker running in the server process. Try:

    curl -i -X POST http://127.0.0.1:8000/orders -H 'Content-Type: application/json' \\
         -d '{"email": "ada@example.com", "total_cents": 4200}'

The ``session`` dependency opens one SQLAlchemy session per request; ``POST /orders``
adds the order and enqueues its receipt in that session's transaction
(``send_receipt.options(session=session)``), then commits both at once. The job store
shares the application's engine (``Reliable(engine=engine)``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from pydantic import BaseModel
from sqlalchemy import Engine, ForeignKey, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from starlette.middleware import Middleware

from reliable import Reliable, current_job
from reliable.integrations.starlette import ReliableMiddleware


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    email: Mapped[str]
    total_cents: Mapped[int]


class Receipt(Base):
    __tablename__ = "receipts"
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"), primary_key=True)
    sent_to: Mapped[str]
    job_id: Mapped[str]


class NewOrder(BaseModel):
    email: str
    total_cents: int


def open_session(request: Request) -> Iterator[Session]:
    """One session per request, closed (rolled back unless committed) after it."""
    with request.app.state.sessions() as session:
        yield session


DbSession = Annotated[Session, Depends(open_session)]


def create_app(engine: Engine, **settings: Any) -> FastAPI:
    """The shop on ``engine``: its tables and its jobs in that one database (create the
    tables with ``Base.metadata.create_all(engine)``). ``settings`` go to ``Reliable``."""
    sessions = sessionmaker(engine)
    rel = Reliable(engine=engine, **settings)

    @rel.task(retries=5)
    def send_receipt(order_id: int) -> dict[str, Any]:
        """Email the receipt (stood in for by a row); runs in a worker."""
        with sessions.begin() as work:
            order = work.get(Order, order_id)
            if order is None:  # cannot happen: the job exists only if the order does
                raise LookupError(f"no order {order_id}")
            work.merge(Receipt(order_id=order_id, sent_to=order.email, job_id=current_job().id))
            return {"order_id": order_id, "sent_to": order.email}

    app = FastAPI(title="shop", middleware=[Middleware(ReliableMiddleware, reliable=rel)])
    app.state.reliable = rel
    app.state.sessions = sessions

    @app.post("/orders", status_code=201)
    def create_order(body: NewOrder, session: DbSession) -> dict[str, Any]:
        order = Order(email=body.email, total_cents=body.total_cents)
        session.add(order)
        session.flush()  # the order gets its id
        receipt = send_receipt.options(session=session).enqueue(order.id)
        session.commit()  # the order and its receipt job, together
        return {"order_id": order.id, "receipt_job": receipt.id}

    return app


DATABASE_URL = os.environ.get("DATABASE_URL", f"sqlite:///{os.path.abspath('shop.db')}")
engine = create_engine(DATABASE_URL)
app = create_app(engine)
rel: Reliable = app.state.reliable
