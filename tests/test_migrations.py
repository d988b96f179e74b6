"""The schema is created by the Alembic migrations, and they match the table definitions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from reliable import Reliable, StoreError
from reliable.store import Store
from reliable.store.migrate import HEAD, VERSION_TABLE
from reliable.store.schema import metadata

REPO = Path(__file__).resolve().parent.parent


def test_migrated_schema_matches_the_table_definitions(db_url: str) -> None:
    store = Store(db_url)
    try:
        with store.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            assert context.get_current_revision() == HEAD
            differences = compare_metadata(context, metadata)
    finally:
        store.close()
    # Alembic cannot compare expression indexes (priority DESC) on SQLite: it reports
    # them removed and added under the same name. Those pairs are equal; drop them.
    added = {d[1].name for d in differences if d[0] == "add_index"}
    removed = {d[1].name for d in differences if d[0] == "remove_index"}
    same = added & removed
    rest = [
        d for d in differences if not (d[0] in ("add_index", "remove_index") and d[1].name in same)
    ]
    assert rest == []


def test_a_fresh_sqlite_file_is_upgraded_on_first_use(tmp_path: Path) -> None:
    rel = Reliable(f"sqlite:///{tmp_path / 'new.db'}")

    @rel.task
    def hello() -> str:
        return "hi"

    handle = hello.enqueue()
    rel.run_until_idle()
    assert handle.result(timeout=1) == "hi"
    rel.close()


def test_without_auto_migrate_an_old_schema_names_the_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(StoreError, match="reliable db upgrade"):
        Store(url, auto_migrate=False)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reliable.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_db_upgrade_command_creates_the_schema(db_url: str, tmp_path: Path) -> None:
    if db_url.startswith("sqlite"):
        db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    completed = run_cli("db", "upgrade", "--database-url", db_url)
    assert completed.returncode == 0, completed.stderr
    assert "up to date" in completed.stdout or "current schema" in completed.stdout
    engine = create_engine(db_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"reliable_jobs", "reliable_attempts", VERSION_TABLE} <= tables


def test_jobs_show_prints_the_job(db_url: str) -> None:
    rel = Reliable(db_url, embedded_worker=False)

    @rel.task
    def square(x: int) -> int:
        return x * x

    handle = square.enqueue(9)
    rel.run_until_idle()
    rel.close()
    completed = run_cli("jobs", "show", handle.id, "--database-url", db_url, "--json")
    assert completed.returncode == 0, completed.stderr
    document = json.loads(completed.stdout)
    assert (document["status"], document["result"], document["task"]) == ("succeeded", 81, "square")


def test_unknown_job_is_a_clear_cli_error(db_url: str) -> None:
    completed = run_cli("jobs", "show", "0" * 32, "--database-url", db_url)
    assert completed.returncode == 3  # not found (docs/cli.md)
    assert "no job with id" in completed.stderr


def test_indexes_of_due_jobs_keep_their_descending_priority(tmp_path: Path) -> None:
    """Alembic cannot compare ``priority DESC`` on SQLite (see above), and a table that
    batch mode copies gets its indexes back without it: the claim would sort instead of
    reading due jobs in order."""
    store = Store(f"sqlite:///{tmp_path / 'desc.db'}")
    try:
        with store.engine.connect() as connection:
            sql = dict(
                connection.exec_driver_sql(
                    "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
                ).all()
            )
            connection.rollback()
    finally:
        store.close()
    assert "priority DESC" in sql["ix_reliable_jobs_due"]
    assert "priority DESC" in sql["ix_reliable_jobs_blocked"]
