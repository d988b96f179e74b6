"""``reliable``'s Alembic migrations (run by ``reliable db upgrade``), and the filters
that keep an application's own Alembic autogenerate away from ``reliable``'s tables.

An application that keeps its tables in the same database as the job store hands these
to its ``env.py``::

    from reliable.migrations import include_name, include_object

    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        include_name=include_name,      # not even reflected
        include_object=include_object,  # and never compared
    )

Without them, ``alembic revision --autogenerate`` sees the ``reliable_*`` tables in the
database but not in the application's metadata, and writes a migration that drops
them. The two histories do not meet: ``reliable`` keeps its revision in
``reliable_alembic_version``, the application in its own ``alembic_version``.
"""

from __future__ import annotations

from typing import Any

PREFIX = "reliable_"


def include_name(name: str | None, type_: str, parent_names: dict[str, Any]) -> bool:
    """Alembic's ``include_name`` hook: false for ``reliable``'s tables (every one is
    named ``reliable_*``) and for their columns, indexes and constraints."""
    if type_ == "table":
        return not (name or "").startswith(PREFIX)
    table = parent_names.get("table_name")
    return not (isinstance(table, str) and table.startswith(PREFIX))


def include_object(
    object: Any,
    name: str | None,
    type_: str,
    reflected: bool,
    compare_to: Any,
) -> bool:
    """Alembic's ``include_object`` hook: false for ``reliable``'s tables and for what
    belongs to them (for older Alembic versions, or an ``env.py`` that filters here)."""
    table = object if type_ == "table" else getattr(object, "table", None)
    table_name = name if type_ == "table" else getattr(table, "name", None)
    return not (table_name or "").startswith(PREFIX)
