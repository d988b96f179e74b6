"""The commands that run things or act on the whole application: ``worker``,
``dashboard``, ``db upgrade|current``, ``purge``, ``pause``, ``resume``, ``schedules``."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click
from sqlalchemy import create_engine

from .. import dashboard
from ..app import Reliable
from ..errors import ConfigError
from ..metrics import serve_metrics
from ..retention import finished_statuses
from ..store import Store
from ..store.database import parse_database_url
from ..store.migrate import HEAD, current_revision
from ..store.postgres import driver_url
from .common import (
    Seconds,
    WholeNumber,
    json_option,
    located,
    open_reliable,
    store_options,
)
from .output import ERROR, OK, emit_json, iso, table, when

log = logging.getLogger("reliable")


@click.command(short_help="run the application's jobs in this process")
@click.argument("app", metavar="APP")
@click.option(
    "--threads",
    type=WholeNumber(1),
    default=None,
    help="worker threads, at least 1 (default: RELIABLE_WORKER_THREADS, else 4)",
)
@click.option(
    "--queues",
    metavar="NAMES",
    default=None,
    help="comma-separated queues to take jobs from (default: all)",
)
@click.option(
    "--grace",
    type=Seconds(),
    default=None,
    help="how long running jobs may take to finish once asked to stop, in seconds "
    "or such as 30s (default: RELIABLE_SHUTDOWN_GRACE, else 30)",
)
@click.option(
    "--metrics-port",
    type=WholeNumber(0),
    default=None,
    help="serve Prometheus metrics at http://HOST:PORT/metrics (0: any free port)",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="the address the metrics are served on",
)
def worker(
    app: str,
    threads: int | None,
    queues: str | None,
    grace: float | None,
    metrics_port: int | None,
    metrics_host: str,
) -> int:
    """Run the application's jobs in this process until SIGTERM or Ctrl-C.

    APP is the application as module:attribute, where the attribute is its Reliable or
    a Flask, Starlette or FastAPI app carrying one; module alone will do when it leads
    to a single Reliable.
    """
    rel = located(app)
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        log.info("received signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    server = None
    if metrics_port is not None:
        server = serve_metrics(rel.runtime, metrics_host, metrics_port)
        host, port = str(server.server_address[0]), int(server.server_address[1])
        print(f"reliable metrics at http://{host}:{port}/metrics", file=sys.stderr, flush=True)
    rel.start_worker(threads=threads, queues=names)
    print(f"reliable worker running on {rel.store.describe()}", file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            if rel.worker is None or not rel.worker.running:
                log.error("the worker's dispatcher stopped; exiting")
                return ERROR
        rel.stop_worker(timeout=grace, exiting=True)
        return OK
    finally:
        if server is not None:
            server.shutdown()
        rel.close()


@click.command("dashboard", short_help="serve the operator dashboard")
@store_options("take the database URL and tasks from this application")
@click.option("--host", default="127.0.0.1", show_default=True, help="the address to serve on")
@click.option(
    "--port", type=WholeNumber(0), default=8765, show_default=True, help="the port to serve on"
)
def dashboard_command(database_url: str | None, app: str | None, host: str, port: int) -> int:
    """Serve the operator dashboard until Ctrl-C. Off loopback, set
    RELIABLE_DASHBOARD_TOKEN: without it, only loopback clients are let in."""
    rel = open_reliable(database_url, app)
    try:
        dashboard.serve(rel, host=host, port=port)
    except KeyboardInterrupt:
        pass
    finally:
        rel.close()
    return OK


@click.group(short_help="manage the database schema")
def db() -> None:
    """Manage the database schema."""


def _url(database_url: str | None, app: str | None) -> str:
    if app:
        return located(app).settings.database_url
    return Reliable(database_url, auto_migrate=False).settings.database_url


@db.command(short_help="bring the database schema to this version's revision")
@store_options()
def upgrade(database_url: str | None, app: str | None) -> int:
    """Bring the database schema to this version's revision."""
    store = Store(_url(database_url, app), pool_size=1, auto_migrate=True)
    click.echo(f"database {store.describe()} is at the current schema revision")
    store.close()
    return OK


@db.command(short_help="print the database schema's revision")
@store_options()
@json_option
def current(database_url: str | None, app: str | None, as_json: bool) -> int:
    """Print the database schema's revision, and whether it is this version's; exit
    code 1 when it is not (run `reliable db upgrade`)."""
    # Without reliable's own URL options (``pgbouncer=``), which the driver refuses.
    url = driver_url(parse_database_url(_url(database_url, app)))
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            revision = current_revision(connection)
    finally:
        engine.dispose()
    up_to_date = revision == HEAD
    if as_json:
        emit_json({"revision": revision, "expected": HEAD, "current": up_to_date})
    elif up_to_date:
        click.echo(f"revision {revision} (current)")
    else:
        click.echo(
            f"revision {revision or 'none'}; this version of reliable needs {HEAD}: "
            "run `reliable db upgrade`"
        )
    return OK if up_to_date else ERROR


def _statuses(
    _ctx: click.Context, _param: click.Parameter, text: str | None
) -> tuple[str, ...] | None:
    if text is None:
        return None
    try:
        return finished_statuses(text)
    except ConfigError:
        raise click.BadParameter(
            f"must be succeeded, failed or cancelled (comma-separated), got {text!r}"
        ) from None


@click.command(short_help="remove finished jobs older than a duration")
@click.option(
    "--older-than",
    type=Seconds(),
    required=True,
    help="remove jobs that finished longer ago than this, such as 7d or 12h",
)
@click.option(
    "--status",
    metavar="STATUSES",
    default=None,
    callback=_statuses,
    help="only jobs that ended so: succeeded, failed, cancelled, comma-separated "
    "(default: all three; unfinished jobs are never removed)",
)
@store_options()
@json_option
def purge(
    older_than: float,
    status: tuple[str, ...] | None,
    database_url: str | None,
    app: str | None,
    as_json: bool,
) -> int:
    """Remove finished jobs, with their attempts, steps and idempotency keys, and print
    how many (workers also do it by themselves, for RELIABLE_RESULT_TTL)."""
    rel = open_reliable(database_url, app)
    try:
        count = rel.purge(older_than=older_than, status=status)
    finally:
        rel.close()
    if as_json:
        emit_json({"purged": count})
    else:
        click.echo(f"purged {count} finished {'job' if count == 1 else 'jobs'}")
    return OK


def _pause_target(task: str | None, queue: str | None) -> dict[str, str]:
    if (task is None) == (queue is None):
        raise click.UsageError("give either --task or --queue")
    return {"task": task} if task is not None else {"queue": queue or ""}


@click.command(short_help="stop workers from claiming a task's or a queue's jobs")
@click.option("--task", default=None, help="the task to pause")
@click.option("--queue", default=None, help="the queue to pause")
@store_options()
def pause(task: str | None, queue: str | None, database_url: str | None, app: str | None) -> int:
    """Pause a task or a queue, durably: no worker claims its jobs until `reliable
    resume` (every worker sees it within a second); running attempts go on."""
    target = _pause_target(task, queue)
    rel = open_reliable(database_url, app)
    try:
        rel.pause(**target)
    finally:
        rel.close()
    [(kind, name)] = target.items()
    click.echo(f"paused {kind} {name}")
    return OK


@click.command(short_help="resume a paused task or queue")
@click.option("--task", default=None, help="the task to resume")
@click.option("--queue", default=None, help="the queue to resume")
@store_options()
def resume(task: str | None, queue: str | None, database_url: str | None, app: str | None) -> int:
    """Resume a paused task or queue."""
    target = _pause_target(task, queue)
    rel = open_reliable(database_url, app)
    try:
        resumed = rel.resume(**target)
    finally:
        rel.close()
    [(kind, name)] = target.items()
    click.echo(f"resumed {kind} {name}" if resumed else f"{kind} {name} was not paused")
    return OK


@click.command(short_help="list the application's cron schedules")
@click.argument("app", metavar="APP")
@json_option
def schedules(app: str, as_json: bool) -> int:
    """List the cron schedules of APP (module:attribute, as for `reliable worker`),
    each with its last and next run."""
    rel = located(app)
    try:
        infos = rel.schedules()
        paused = rel.paused()
    finally:
        rel.close()
    if as_json:
        emit_json(
            {
                "schedules": [
                    {
                        "name": s.name,
                        "cron": s.cron,
                        "timezone": s.timezone,
                        "catch_up": s.catch_up,
                        "max_lateness": s.max_lateness,
                        "last_run_at": iso(s.last_run_at),
                        "last_job_id": s.last_job_id,
                        "last_status": s.last_status,
                        "next_run_at": iso(s.next_run_at),
                    }
                    for s in infos
                ],
                "paused": paused,
            }
        )
        return OK
    headers = ("NAME", "CRON", "TIME ZONE", "LAST RUN (UTC)", "LAST STATUS", "NEXT RUN (UTC)")
    rows = [
        [s.name, s.cron, s.timezone, when(s.last_run_at), s.last_status or "-",
         when(s.next_run_at)]
        for s in infos
    ]  # fmt: skip
    click.echo(table(headers, rows) if rows else "no schedules")
    return OK
