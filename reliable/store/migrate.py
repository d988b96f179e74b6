"""Bringing a database to the schema this version of ``reliable`` expects (Alembic)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Connection, Engine, inspect, text

from ..errors import StoreError

# The newest revision in reliable/migrations/versions; checked without importing Alembic.
HEAD = "0010"
VERSION_TABLE = "reliable_alembic_version"
# Serializes concurrent upgrades on PostgreSQL (an arbitrary, fixed advisory lock id).
_ADVISORY_LOCK = 0x72656C69


def current_revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    revision: str | None = connection.execute(
        text(f"SELECT version_num FROM {VERSION_TABLE}")
    ).scalar()
    return revision


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` in one transaction, one process at a time."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent.parent / "migrations"))
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADVISORY_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def ensure_schema(engine: Engine, *, auto: bool) -> None:
    """Upgrade to ``HEAD`` when needed and ``auto``; otherwise say what to run."""
    with engine.connect() as connection:
        revision = current_revision(connection)
        connection.rollback()
    if revision == HEAD:
        return
    if not auto:
        raise StoreError(
            f"the database schema is at revision {revision or 'none'}, this version of "
            f"reliable needs {HEAD}: run `reliable db upgrade`"
        )
    upgrade(engine)
