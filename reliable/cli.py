"""The ``reliable`` command: ``worker``, ``db upgrade``, ``jobs show``, ``purge``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import metadata
from types import ModuleType
from typing import Any

from .app import Reliable
from .durations import parse_duration
from .errors import ConfigError, ReliableError
from .retention import finished_statuses
from .store import Store


def _attribute(value: object, name: str) -> Any:
    try:
        return getattr(value, name, None)
    except Exception:  # proxies such as flask.request raise outside their context
        return None


def _candidates(target: object) -> Iterator[object]:
    yield target
    yield _attribute(target, "reliable")
    extensions = _attribute(target, "extensions")
    if isinstance(extensions, Mapping):
        yield extensions.get("reliable")
    yield _attribute(_attribute(target, "state"), "reliable")
    # Starlette builds its middleware on first use; until then the Reliable is an
    # argument of ``Middleware(ReliableMiddleware, reliable=rel)``.
    middlewares = _attribute(target, "user_middleware")
    for middleware in middlewares if isinstance(middlewares, list | tuple) else ():
        kwargs = _attribute(middleware, "kwargs")
        if isinstance(kwargs, Mapping):
            yield kwargs.get("reliable")


def carried(target: object) -> Reliable | None:
    """The ``Reliable`` that ``target`` is or carries, else ``None``.

    Carriers: a ``ReliableFlask`` (``.reliable``), a Flask app (``app.extensions
    ["reliable"]``), a Starlette or FastAPI app (``app.state.reliable``, or the
    ``reliable=`` argument of its ``ReliableMiddleware``).
    """
    for candidate in _candidates(target):
        if isinstance(candidate, Reliable):
            return candidate
        inner = _attribute(candidate, "reliable")
        if isinstance(inner, Reliable):
            return inner
    return None


def _only_reliable(module: ModuleType) -> Reliable:
    holders: dict[int, tuple[Reliable, list[str]]] = {}
    for name, value in vars(module).items():
        if name.startswith("__") or isinstance(value, ModuleType | type):
            continue
        rel = carried(value)
        if rel is not None:
            holders.setdefault(id(rel), (rel, []))[1].append(name)
    example = f"{module.__name__}:attribute"
    if not holders:
        raise ReliableError(
            f"{module.__name__} holds no Reliable, nor an application that carries one; "
            f"name it as {example}"
        )
    if len(holders) > 1:
        groups = "; ".join(" = ".join(names) for _, names in holders.values())
        raise ReliableError(
            f"{module.__name__} holds {len(holders)} different Reliable objects ({groups}); "
            f"name the one to use as {example}"
        )
    [(rel, _)] = holders.values()
    return rel


def locate(spec: str) -> Reliable:
    """Find the ``Reliable`` of an application given as ``module:attribute`` or ``module``.

    The attribute may be the ``Reliable`` itself or anything carrying one (see
    ``carried``): a ``ReliableFlask``, a Flask app, a Starlette or FastAPI app.
    Without ``:attribute`` the module's variables are searched the same way; they must
    lead to exactly one ``Reliable``. Raises ``ReliableError`` saying what to change.
    """
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReliableError(f"cannot import {module_name!r}: {exc}") from exc
    if not attribute:
        return _only_reliable(module)
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ReliableError(f"{module_name} has no attribute {attribute!r}") from None
    found = carried(target)
    if found is None:
        raise ReliableError(f"{spec} is not a Reliable, nor an application that carries one")
    return found


def run_worker(args: argparse.Namespace) -> int:
    # The application is imported to register its tasks; it must not start threads too.
    os.environ["RELIABLE_EMBEDDED_WORKER"] = "0"
    rel = locate(args.app)
    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        logging.getLogger("reliable").info("received signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    rel.start_worker(threads=args.threads, queues=queues)
    print(f"reliable worker running on {rel.store.describe()}", file=sys.stderr, flush=True)
    while not stop.wait(1.0):
        if rel.worker is None or not rel.worker.running:
            logging.getLogger("reliable").error("the worker's dispatcher stopped; exiting")
            rel.close()
            return 1
    rel.stop_worker(timeout=args.grace, exiting=True)
    rel.close()
    return 0


def run_db_upgrade(args: argparse.Namespace) -> int:
    if args.app:
        url = locate(args.app).settings.database_url
    else:
        url = Reliable(args.database_url, auto_migrate=False).settings.database_url
    store = Store(url, pool_size=1, auto_migrate=True)
    print(f"database {store.describe()} is at the current schema revision")
    store.close()
    return 0


def run_jobs_show(args: argparse.Namespace) -> int:
    rel = locate(args.app) if args.app else Reliable(args.database_url)
    info = rel.get_job(args.job_id)
    document = {
        "id": info.id,
        "task": info.task,
        "status": info.status,
        "attempts": info.attempts,
        "created_at": info.created_at.isoformat(),
        "started_at": info.started_at.isoformat() if info.started_at else None,
        "finished_at": info.finished_at.isoformat() if info.finished_at else None,
        "result": info.result,
        "error": info.error,
    }
    print(json.dumps(document, indent=2, default=str))
    return 0


def run_purge(args: argparse.Namespace) -> int:
    os.environ["RELIABLE_EMBEDDED_WORKER"] = "0"  # importing the application starts none
    rel = locate(args.app) if args.app else Reliable(args.database_url, embedded_worker=False)
    try:
        count = rel.purge(older_than=args.older_than, status=args.status)
    finally:
        rel.close()
    print(f"purged {count} finished {'job' if count == 1 else 'jobs'}")
    return 0


def _statuses(text: str) -> tuple[str, ...]:
    try:
        return finished_statuses(text)
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"must be succeeded, failed or cancelled (comma-separated), got {text!r}"
        ) from None


def _whole_number(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be a whole number >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        return parse_duration(text, name="--grace")
    except ConfigError:
        raise argparse.ArgumentTypeError(
            f"must be a duration >= 0 (seconds, or such as 30s or 2m), got {text!r}"
        ) from None


def _version() -> str:
    try:
        return metadata.version("reliable")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


APP_HELP = (
    "the application as module:attribute, where the attribute is its Reliable or a "
    "Flask, Starlette or FastAPI app carrying one; module alone will do when it leads "
    "to a single Reliable"
)
DATABASE_URL_HELP = "database URL (default: RELIABLE_DATABASE_URL, else sqlite:///reliable.db)"


def build_parser() -> argparse.ArgumentParser:
    """The ``reliable`` command line, with plain-text help for every command."""
    parser = argparse.ArgumentParser(
        prog="reliable",
        description=(
            "Run and operate the durable background jobs of an application that uses "
            "reliable. Settings come from RELIABLE_* environment variables; options "
            "given here win over them."
        ),
    )
    parser.add_argument("--version", action="version", version=f"reliable {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    def add_command(
        group: argparse._SubParsersAction[argparse.ArgumentParser], name: str, text: str
    ) -> argparse.ArgumentParser:
        return group.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")

    worker = add_command(
        commands, "worker", "run the application's jobs in this process until SIGTERM or Ctrl-C"
    )
    worker.add_argument("app", help=APP_HELP)
    worker.add_argument(
        "--threads",
        metavar="N",
        type=_whole_number(1),
        default=None,
        help="worker threads, at least 1 (default: RELIABLE_WORKER_THREADS, else 4)",
    )
    worker.add_argument(
        "--queues",
        metavar="NAMES",
        default=None,
        help="comma-separated queues to take jobs from (default: all)",
    )
    worker.add_argument(
        "--grace",
        metavar="DURATION",
        type=_seconds,
        default=None,
        help=(
            "how long running jobs may take to finish once asked to stop, in seconds or "
            "such as 30s (default: RELIABLE_SHUTDOWN_GRACE, else 30)"
        ),
    )
    worker.set_defaults(run=run_worker)

    db = add_command(commands, "db", "manage the database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="command")
    db_upgrade = add_command(
        db_commands, "upgrade", "bring the database schema to this version's revision"
    )
    db_upgrade.add_argument("--database-url", default=None, help=DATABASE_URL_HELP)
    db_upgrade.add_argument(
        "--app", default=None, help="take the database URL from this application instead"
    )
    db_upgrade.set_defaults(run=run_db_upgrade)

    jobs = add_command(commands, "jobs", "inspect jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True, metavar="command")
    show = add_command(jobs_commands, "show", "print one job as JSON")
    show.add_argument("job_id", help="the job's id")
    show.add_argument("--database-url", default=None, help=DATABASE_URL_HELP)
    show.add_argument(
        "--app", default=None, help="take the database URL and tasks from this application"
    )
    show.set_defaults(run=run_jobs_show)

    purge = add_command(
        commands,
        "purge",
        "remove finished jobs, with their attempts, steps and idempotency keys, and print "
        "how many (workers also do it by themselves, for RELIABLE_RESULT_TTL)",
    )
    purge.add_argument(
        "--older-than",
        metavar="DURATION",
        type=_seconds,
        required=True,
        help="remove jobs that finished longer ago than this, such as 7d or 12h",
    )
    purge.add_argument(
        "--status",
        metavar="STATUSES",
        type=_statuses,
        default=None,
        help="only jobs that ended so: succeeded, failed, cancelled, comma-separated "
        "(default: all three; unfinished jobs are never removed)",
    )
    purge.add_argument("--database-url", default=None, help=DATABASE_URL_HELP)
    purge.add_argument("--app", default=None, help="take the database URL from this application")
    purge.set_defaults(run=run_purge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ReliableError as exc:
        print(f"reliable: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
