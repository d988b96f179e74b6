"""``column IN (list)`` with the list bound at execution, built once per dialect.

On PostgreSQL the list is one array parameter (``column = ANY(:name)``): the statement's
text is the same whatever the list's length, so it is not rendered again for every
call and the server can keep one prepared plan for it. SQLite gets an expanding ``IN``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, any_, bindparam
from sqlalchemy.dialects.postgresql import ARRAY

DIALECTS = ("sqlite", "postgresql")

T = TypeVar("T")


def one_of(column: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """``column`` is one of the values bound as ``name``."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


def per_dialect(build: Callable[[str], T]) -> dict[str, T]:
    """``build(dialect)`` for each dialect, keyed by its name."""
    return {dialect: build(dialect) for dialect in DIALECTS}
