"""Riding out a database restart: a call whose connection turns out to be dead is made
once more, on a new connection.

When PostgreSQL restarts (or a proxy drops idle connections) every connection in the
pool is dead, and the first statement on one fails. SQLAlchemy then marks the error
``connection_invalidated`` and invalidates the whole pool, so one retry gets a fresh
connection. A failure that is not a lost connection is raised as it is. A store call
runs in one transaction that a lost connection rolled back, so making it again is safe;
the one case left, a connection lost while its COMMIT was on the wire, surfaces as the
retry's error (a duplicate key, for a job that was stored after all).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError

from ..errors import StoreError

log = logging.getLogger("reliable.store")

C = TypeVar("C", bound=type)


def lost_connection(exc: BaseException) -> bool:
    """Whether ``exc`` (a ``StoreError``) came from a connection the database dropped."""
    cause = exc.__cause__
    return isinstance(cause, DBAPIError) and bool(cause.connection_invalidated)


def _retried(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError as exc:
            if not lost_connection(exc):
                raise
            log.info("the database dropped a connection (%s); trying again", exc)
            return method(self, *args, **kwargs)

    return call


def reconnecting(*names: str) -> Callable[[C], C]:
    """A class decorator: the methods ``names`` are made again once when they fail on a
    lost connection."""

    def decorate(cls: C) -> C:
        for name in names:
            setattr(cls, name, _retried(getattr(cls, name)))
        return cls

    return decorate
