"""Errors that say what to do: a missing driver, bad CLI numbers, misspelt variables, an
outdated schema, an application that carries its Reliable; the version, the help text,
and what the wheel ships."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import click
import pytest

import reliable.settings
from reliable import ConfigError, ConfigWarning, Reliable, ReliableError, Settings, StoreError
from reliable.cli import cli, locate

REPO = Path(__file__).resolve().parent.parent

# Makes every import of psycopg fail, as when the postgres extra is not installed.
BLOCK_PSYCOPG = """
import sys

class BlockPsycopg:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("psycopg", "psycopg_binary", "psycopg_c"):
            raise ImportError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, BlockPsycopg())
"""


def run_cli(*args: str, code: str = "") -> subprocess.CompletedProcess[str]:
    """``reliable *args`` in a new interpreter, after running ``code``."""
    program = f"{code}\nimport sys\nfrom reliable.cli import main\nraise SystemExit(main())"
    return subprocess.run(
        [sys.executable, "-c", program, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


# -- 1. PostgreSQL without psycopg -------------------------------------------------------


def test_a_postgres_url_without_psycopg_says_what_to_install() -> None:
    program = BLOCK_PSYCOPG + (
        "from reliable import ConfigError, Reliable\n"
        "rel = Reliable('postgresql://app@127.0.0.1:5432/app')\n"
        "try:\n"
        "    rel.store\n"
        "except ConfigError as exc:\n"
        "    print('ConfigError', exc.name, exc, sep='|')\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert completed.returncode == 0, completed.stderr
    kind, name, message = completed.stdout.strip().split("|")
    assert (kind, name) == ("ConfigError", "RELIABLE_DATABASE_URL")
    assert "pip install 'reliable[postgres]'" in message


def test_the_cli_reports_a_missing_psycopg_without_a_traceback() -> None:
    completed = run_cli(
        "db", "upgrade", "--database-url", "postgresql://app@127.0.0.1:5432/app", code=BLOCK_PSYCOPG
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert "RELIABLE_DATABASE_URL" in completed.stderr
    assert "pip install 'reliable[postgres]'" in completed.stderr


# -- 2. numeric options of the CLI -------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--threads", "0", "must be >= 1"),
        ("--threads", "-3", "must be >= 1"),
        ("--threads", "two", ">= 1"),
        ("--grace", "-1", ">= 0"),
        ("--grace", "soon", ">= 0"),
    ],
)
def test_a_bad_number_is_a_usage_error(option: str, value: str, expected: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "reliable.cli", "worker", "examples.flask_app", option, value],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    assert f"Error: {option}: " in completed.stderr
    assert expected in completed.stderr


def test_good_numbers_are_parsed() -> None:
    worker = cli.commands["worker"]
    args = worker.make_context("worker", ["app", "--threads", "2", "--grace", "2m"]).params
    assert (args["threads"], args["grace"]) == (2, 120.0)
    args = worker.make_context("worker", ["app", "--grace", "0"]).params
    assert (args["threads"], args["grace"]) == (None, 0.0)


# -- 3. misspelt RELIABLE_* variables ----------------------------------------------------


@pytest.fixture
def nothing_warned_yet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reliable.settings, "_warned", set())


@pytest.mark.usefixtures("nothing_warned_yet")
@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("RELIABLE_LEASE_SECOND", "RELIABLE_LEASE_SECONDS"),
        ("RELIABLE_DATABASE_ULR", "RELIABLE_DATABASE_URL"),
        ("RELIABLE_THREADS", "RELIABLE_WORKER_THREADS"),
        ("RELIABLE_AUTOMIGRATE", "RELIABLE_AUTO_MIGRATE"),
    ],
)
def test_a_misspelt_variable_is_warned_about(variable: str, meant: str) -> None:
    with pytest.warns(ConfigWarning, match=f"{variable} .*did you mean {meant}\\?"):
        settings = Settings.load(environ={variable: "5"})
    assert settings == Settings.load(environ={})


@pytest.mark.usefixtures("nothing_warned_yet")
def test_each_variable_is_warned_about_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELIABLE_RETRYS", "2")
    with pytest.warns(ConfigWarning, match="RELIABLE_RETRYS .*RELIABLE_RETRIES"):
        Reliable("sqlite:///once.db")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Reliable("sqlite:///once.db")
        Settings.load()
    assert caught == []


@pytest.mark.usefixtures("nothing_warned_yet")
@pytest.mark.parametrize(
    "variable",
    [
        "RELIABLE_TEST_POSTGRES_URL",
        "RELIABLE_TASK_SEND_INVOICE_CONCURRENCY",
        "RELIABLE_TASK_SEND_INVOICE_CONCURENCY",
        "RELIABLE_TASK_RETRIES",
        "RELIABLE_X",
        "RELIABLE_LEASE_SECONDS",
        "RELIABLE_AUTO_MIGRATE",
        "LEASE_SECOND",
    ],
)
def test_other_variables_are_not_warned_about(variable: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Settings.load(environ={variable: "1"})
    assert caught == []


# -- 4. RELIABLE_AUTO_MIGRATE ------------------------------------------------------------


def test_without_auto_migrate_an_empty_database_names_the_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELIABLE_AUTO_MIGRATE", "0")
    rel = Reliable(f"sqlite:///{tmp_path / 'empty.db'}")
    assert rel.settings.auto_migrate is False
    with pytest.raises(StoreError, match="reliable db upgrade"):
        _ = rel.store


def test_the_auto_migrate_argument_wins_over_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RELIABLE_AUTO_MIGRATE", "0")
    rel = Reliable(f"sqlite:///{tmp_path / 'jobs.db'}", auto_migrate=True)

    @rel.task
    def hello() -> str:
        return "hi"

    handle = hello.enqueue()
    rel.run_until_idle()
    assert handle.result(timeout=1) == "hi"
    rel.close()

    monkeypatch.setenv("RELIABLE_AUTO_MIGRATE", "1")
    with pytest.raises(StoreError, match="reliable db upgrade"):
        _ = Reliable(f"sqlite:///{tmp_path / 'other.db'}", auto_migrate=False).store


def test_auto_migrate_is_on_by_default_and_a_bad_value_names_the_variable() -> None:
    assert Settings.load(environ={}).auto_migrate is True
    with pytest.raises(ConfigError, match="RELIABLE_AUTO_MIGRATE") as raised:
        Settings.load(environ={"RELIABLE_AUTO_MIGRATE": "sometimes"})
    assert raised.value.name == "RELIABLE_AUTO_MIGRATE"


# -- 5. finding the application's Reliable -----------------------------------------------


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder on ``sys.path`` for modules of a test; the examples import without
    starting a worker, and every module imported here is forgotten afterwards."""
    monkeypatch.setenv("RELIABLE_EMBEDDED_WORKER", "0")
    monkeypatch.setenv("RELIABLE_DATABASE_URL", f"sqlite:///{tmp_path / 'examples.db'}")
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name == "examples" or name.startswith(("examples.", "app_")):
            del sys.modules[name]


@pytest.mark.parametrize("name", ["flask_app", "starlette_app", "fastapi_app"])
def test_an_example_module_alone_names_its_reliable(modules: Path, name: str) -> None:
    found = locate(f"examples.{name}")
    assert found is sys.modules[f"examples.{name}"].rel
    assert locate(f"examples.{name}:app") is found


@pytest.mark.parametrize("name", ["flask_app", "starlette_app", "fastapi_app"])
def test_a_module_holding_only_the_web_app_names_its_reliable(modules: Path, name: str) -> None:
    (modules / f"app_only_{name}.py").write_text(f"from examples.{name} import app\n")
    assert locate(f"app_only_{name}") is sys.modules[f"examples.{name}"].rel


def test_a_module_holding_only_the_flask_extension_names_its_reliable(modules: Path) -> None:
    (modules / "app_flask_extension.py").write_text(
        "from flask import Flask\n"
        "from reliable import Reliable\n"
        "from reliable.integrations.flask import ReliableFlask\n"
        "extension = ReliableFlask(Flask(__name__), Reliable())\n"
    )
    found = locate("app_flask_extension")
    assert found is sys.modules["app_flask_extension"].extension.reliable


def test_several_reliables_are_named_and_an_attribute_asked_for(modules: Path) -> None:
    (modules / "app_two.py").write_text(
        "from examples.flask_app import app as shop, rel\n"
        "from examples.starlette_app import app as other\n"
    )
    with pytest.raises(ReliableError, match="2 different Reliable") as raised:
        locate("app_two")
    message = str(raised.value)
    assert "shop = rel" in message or "rel = shop" in message
    assert "other" in message
    assert "app_two:attribute" in message


def test_a_module_without_a_reliable_asks_for_an_attribute(modules: Path) -> None:
    (modules / "app_none.py").write_text("answer = 42\n")
    with pytest.raises(ReliableError, match=r"holds no Reliable.*app_none:attribute"):
        locate("app_none")


# -- 6. and 7. version and help ----------------------------------------------------------


def test_version() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "reliable.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0
    assert completed.stdout == f"reliable {metadata.version('reliable')}\n"


RST = re.compile(r"``|:[a-z]+:`|^\.\. |::$", re.MULTILINE)


def every_command(
    command: click.Command, parent: click.Context | None = None
) -> Iterator[click.Context]:
    context = click.Context(command, info_name=command.name or "reliable", parent=parent)
    yield context
    if isinstance(command, click.Group):
        for child in command.commands.values():
            yield from every_command(child, context)


def test_help_is_plain_text() -> None:
    contexts = list(every_command(cli))
    assert {context.command_path for context in contexts} >= {
        "reliable",
        "reliable worker",
        "reliable db upgrade",
        "reliable jobs show",
        "reliable jobs retry",
    }
    for context in contexts:
        text = context.command.get_help(context)
        assert RST.search(text) is None, text
        assert context.command.help, context.command_path
    completed = subprocess.run(
        [sys.executable, "-m", "reliable.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0
    assert "worker" in completed.stdout
    assert RST.search(completed.stdout) is None, completed.stdout


# -- 8. the wheel ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_wheel_ships_the_migrations_and_builds_without_warnings(tmp_path: Path) -> None:
    # A copy, so the build leaves nothing (build/, *.egg-info) in the working tree.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("reliable", "integrations"):
        shutil.copytree(
            REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    # With PYTHONDONTWRITEBYTECODE set, setuptools says "byte-compiling is disabled":
    # a remark on the environment, not on the package.
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    dist = tmp_path / "dist"
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "-w", str(dist), "--no-deps", "-v"],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
        env=environ,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    # pip's own notices ("WARNING: ..." about indexes) are about this machine; setuptools
    # writes "warning: ..." and "...Warning: ..." lines.
    warned = [
        line
        for line in output.splitlines()
        if "warning" in line.lower() and not line.strip().startswith("WARNING: ")
    ]
    assert warned == [], "\n".join(warned)

    [wheel] = dist.glob("reliable-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = REPO / "reliable" / "migrations"
    expected = {
        path.relative_to(REPO).as_posix()
        for path in migrations.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert {
        "reliable/migrations/env.py",
        "reliable/migrations/script.py.mako",
        "reliable/migrations/versions/0001_initial.py",
    } <= expected
    assert expected <= names, sorted(expected - names)
    assert "reliable/py.typed" in names
    # The dashboard's templates, stylesheet and script are served from the package.
    dashboard = REPO / "reliable" / "dashboard"
    assets = {
        path.relative_to(REPO).as_posix()
        for folder in ("templates", "static")
        for path in (dashboard / folder).iterdir()
        if path.is_file()
    }
    assert any(name.endswith(".html") for name in assets)
    assert assets <= names, sorted(assets - names)
    assert "reliable/integrations/starlette.py" in names
