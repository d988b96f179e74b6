"""The ``reliable`` command: ``worker``, ``db upgrade``, ``jobs show``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from .app import Reliable
from .errors import ReliableError
from .store import Store


def locate(spec: str) -> Reliable:
    """Find the ``Reliable`` of an application given as ``module:attribute``.

    The attribute may be the ``Reliable`` itself or a web application carrying one
    (``app.extensions["reliable"]`` in Flask; in Starlette ``app.state.reliable``, or the
    ``reliable=`` argument of the app's ``ReliableMiddleware``).
    Without ``:attribute`` the module's only ``Reliable`` is used.
    """
    module_name, _, attribute = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ReliableError(f"cannot import {module_name!r}: {exc}") from exc
    if not attribute:
        found = [value for value in vars(module).values() if isinstance(value, Reliable)]
        if len(found) != 1:
            raise ReliableError(f"{module_name} has {len(found)} Reliable objects; name one")
        return found[0]
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ReliableError(f"{module_name} has no attribute {attribute!r}") from None
    for candidate in (
        target,
        getattr(target, "reliable", None),
        getattr(getattr(target, "extensions", None) or {}, "get", lambda _: None)("reliable"),
        getattr(getattr(target, "state", None), "reliable", None),
        # Starlette builds its middleware on first use; until then the Reliable is an
        # argument of ``Middleware(ReliableMiddleware, reliable=rel)``.
        *(
            getattr(middleware, "kwargs", {}).get("reliable")
            for middleware in getattr(target, "user_middleware", ())
        ),
    ):
        if isinstance(candidate, Reliable):
            return candidate
        inner = getattr(candidate, "reliable", None)
        if isinstance(inner, Reliable):
            return inner
    raise ReliableError(f"{spec} is not a Reliable, nor an application that carries one")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reliable", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    worker = commands.add_parser("worker", help="run jobs in this process until SIGTERM")
    worker.add_argument("app", help="module:attribute of the application or its Reliable")
    worker.add_argument("--threads", type=int, default=None, help="default RELIABLE_WORKER_THREADS")
    worker.add_argument("--queues", default=None, help="comma-separated; default: every queue")
    worker.add_argument(
        "--grace", type=float, default=None, help="seconds to finish running jobs on SIGTERM"
    )
    worker.set_defaults(run=run_worker)

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_upgrade = db_commands.add_parser("upgrade", help="apply the migrations")
    db_upgrade.add_argument("--database-url", default=None, help="default RELIABLE_DATABASE_URL")
    db_upgrade.add_argument("--app", default=None, help="module:attribute to take the URL from")
    db_upgrade.set_defaults(run=run_db_upgrade)

    jobs = commands.add_parser("jobs", help="inspect jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    show = jobs_commands.add_parser("show", help="print one job as JSON")
    show.add_argument("job_id")
    show.add_argument("--database-url", default=None)
    show.add_argument("--app", default=None)
    show.set_defaults(run=run_jobs_show)
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
