"""``column IN (list)`` with the list bound at execution, built once per dialect.

The statement's text is the same whatever the list's length, so it is compiled once
and not rendered again for every call, and the server can keep one prepared plan for
it. The list is one JSON text parameter (``json.dumps`` is far cheaper than the driver's
quoting of an array, element by element): on PostgreSQL made an array again
(``column = ANY(ARRAY(SELECT json_array_elements_text(:name)))``, one index lookup
per value); on SQLite read back as rows by ``json_each`` (``column IN (SELECT value
FROM json_each(:name))``), which SQLite answers with one index lookup per value.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sqlalchemy import JSON, ColumnElement, String, any_, bindparam, cast, func, select
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.types import TypeDecorator

DIALECTS = ("sqlite", "postgresql")

T = TypeVar("T")


class JSONList(TypeDecorator[Sequence[Any]]):
    """A list bound as one JSON text parameter."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: Sequence[Any] | None, dialect: Any) -> str | None:
        return None if value is None else json.dumps(list(value))


def one_of(column: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """``column`` is one of the values bound as ``name``."""
    listed = bindparam(name, type_=JSONList())
    if dialect == "postgresql":
        elements = select(func.json_array_elements_text(cast(listed, JSON)))
        return column == any_(func.array(elements.scalar_subquery()))
    values = func.json_each(listed).table_valued("value")
    return column.in_(select(values.c.value))


def among(column: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """``column`` is one of the values bound as ``name``, for a filter whose plan depends
    on them (the tasks a claim may take): SQLite sees the values, in an expanding ``IN``; on
    PostgreSQL they are one array parameter."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return column.in_(bindparam(name, expanding=True))


def per_dialect(build: Callable[[str], T]) -> dict[str, T]:
    """``build(dialect)`` for each dialect, keyed by its name."""
    return {dialect: build(dialect) for dialect in DIALECTS}
