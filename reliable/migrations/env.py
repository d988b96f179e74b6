"""Alembic environment: migrations run on the connection ``reliable`` hands over."""

from __future__ import annotations

from alembic import context

from reliable.store.migrate import VERSION_TABLE
from reliable.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `reliable db upgrade`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
