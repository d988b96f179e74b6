"""``reliable jobs``: list, show, retry, cancel and replay jobs, one by id or every job
matching a filter (``--all-matching``, after a confirmation showing how many)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import click

from ..errors import JobNotFound
from ..operations import STATUSES
from .common import json_option, open_reliable, store_options
from .output import (
    JOB_HEADERS,
    NOT_FOUND,
    OK,
    brief_error,
    emit_json,
    job_document,
    job_rows,
    table,
    when,
)

F = TypeVar("F", bound=Callable[..., Any])


def _time(_ctx: click.Context, param: click.Parameter, text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"expected a date or time such as 2026-01-31 or 2026-01-31T12:00, got {text!r}"
        ) from None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def filter_options(fn: F) -> F:
    """The filters of ``Reliable.jobs``."""
    options = [
        click.option("--task", default=None, help="jobs of this task"),
        click.option("--status", multiple=True, type=click.Choice(STATUSES),
                     help="jobs in this status (repeat for several)"),
        click.option("--queue", default=None, help="jobs of this queue"),
        click.option("--key", default=None,
                     help="jobs with this idempotency key or limit key value"),
        click.option("--error", default=None, help="jobs whose last error contains this text"),
        click.option("--since", default=None, callback=_time,
                     help="jobs created at or after this time (ISO 8601; UTC unless given)"),
        click.option("--until", default=None, callback=_time,
                     help="jobs created before this time (ISO 8601; UTC unless given)"),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


def _filters(**given: Any) -> dict[str, Any]:
    found = {name: value for name, value in given.items() if value not in (None, ())}
    if "status" in found:
        found["status"] = list(found["status"])
    return found


@click.group(short_help="list, show, retry, cancel and replay jobs")
def jobs() -> None:
    """List, show, retry, cancel and replay jobs. These act on the database alone: no
    application is needed (--app only to take its database URL)."""


@jobs.command("list", short_help="list jobs, newest first")
@filter_options
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=50,
    show_default=True,
    help="at most this many jobs (1 to 1000)",
)
@click.option(
    "--after",
    default=None,
    metavar="JOB_ID",
    help="the page after this job (the last id of the previous page)",
)
@store_options()
@json_option
def list_jobs(
    limit: int, after: str | None, database_url: str | None, app: str | None, as_json: bool,
    **filters: Any,
) -> int:  # fmt: skip
    """List jobs, newest first, a page at a time (--after the last id shown)."""
    rel = open_reliable(database_url, app)
    try:
        found = rel.jobs(**_filters(**filters), limit=limit, after=after)
    finally:
        rel.close()
    if as_json:
        emit_json({"jobs": [job_document(info) for info in found],
                   "next_after": found[-1].id if len(found) == limit else None})  # fmt: skip
    elif found:
        click.echo(table(JOB_HEADERS, job_rows(found)))
        if len(found) == limit:
            click.echo(f"\nmore: --after {found[-1].id}")
    else:
        click.echo("no jobs match")
    return OK


@jobs.command(short_help="print one job")
@click.argument("job_id")
@store_options("take the database URL and tasks from this application")
@json_option
def show(job_id: str, database_url: str | None, app: str | None, as_json: bool) -> int:
    """Print the job JOB_ID: its status, times, result or last error."""
    rel = open_reliable(database_url, app)
    try:
        info = rel.get_job(job_id)
    finally:
        rel.close()
    document = job_document(info)
    if as_json:
        emit_json(document)
        return OK
    error = info.error or {}
    for name in ("id", "task", "status", "queue", "priority", "attempts", "idempotency_key",
                 "replay_of"):  # fmt: skip
        if document[name] is not None:
            click.echo(f"{name + ':':<17}{document[name]}")
    for name in ("created_at", "run_at", "started_at", "finished_at", "start_by", "finish_by"):
        value = getattr(info, name)
        if value is not None:
            click.echo(f"{name + ':':<17}{when(value)} UTC")
    if info.status == "succeeded":
        click.echo(f"{'result:':<17}{info.result!r}")
    if error:
        click.echo(f"{'last error:':<17}{brief_error(error, 200)}")
        if error.get("traceback"):
            click.echo("\n" + str(error["traceback"]).rstrip())
    return OK


def _act(
    verb: str,
    job_ids: tuple[str, ...],
    all_matching: bool,
    yes: bool,
    dry_run: bool,
    as_json: bool,
    filters: dict[str, Any],
    bulk: Callable[..., int],
    one: Callable[[str], bool],
    created: list[str] | None = None,
) -> int:
    """Apply ``one`` to the jobs named, or ``bulk`` (``rel.retry_jobs`` and the like,
    a batch per transaction) to every job ``filters`` match, and report."""
    if job_ids and all_matching:
        raise click.UsageError("give job ids or --all-matching, not both")
    if not job_ids and not all_matching:
        raise click.UsageError("give one or more job ids, or --all-matching with filters")
    if job_ids and filters:
        raise click.UsageError("filters go with --all-matching, not with job ids")
    if all_matching:
        total = bulk(dry_run=True, **filters)
        if dry_run or total == 0:
            _report(as_json, verb, total, total, dry_run=True)
            return OK
        if not yes:
            click.confirm(f"{verb.capitalize()} {total} matching jobs?", abort=True, err=True)
        bar = click.progressbar(
            length=total, label=f"{verb}ing", file=sys.stderr, hidden=as_json or total < 2
        )
        with bar:
            seen = 0

            def advance(done: int, _matched: int) -> None:
                nonlocal seen
                bar.update(done - seen)
                seen = done

            done = bulk(progress=advance, **filters)
        _report(as_json, verb, total, done)
        return OK
    if dry_run:
        _report(as_json, verb, len(job_ids), len(job_ids), dry_run=True)
        return OK
    done = 0
    missing = []
    for job_id in job_ids:
        try:
            done += bool(one(job_id))
        except JobNotFound:
            missing.append(job_id)
    _report(as_json, verb, len(job_ids) - len(missing), done, missing=missing, created=created)
    return NOT_FOUND if missing else OK


def _report(
    as_json: bool,
    verb: str,
    matched: int,
    done: int,
    *,
    dry_run: bool = False,
    missing: list[str] | None = None,
    created: list[str] | None = None,
) -> None:
    past = {"retry": "retried", "cancel": "cancelled", "replay": "replayed"}[verb]
    if as_json:
        document: dict[str, Any] = {"matched": matched, "dry_run": dry_run}
        if not dry_run:
            document[past] = done
            document["not_found"] = missing or []
            if created is not None:
                document["created"] = created
        emit_json(document)
        return
    if dry_run:
        click.echo(f"would {verb} {matched} {'job' if matched == 1 else 'jobs'} (dry run)")
        return
    click.echo(f"{past} {done} of {matched} {'job' if matched == 1 else 'jobs'}")
    for job_id in missing or ():
        click.echo(f"reliable: no job with id {job_id!r}", err=True)


def _act_on(
    verb: str, job_ids: tuple[str, ...], all_matching: bool, yes: bool, dry_run: bool,
    as_json: bool, database_url: str | None, app: str | None, filters: dict[str, Any],
) -> int:  # fmt: skip
    """``retry`` or ``cancel`` (``rel.<verb>`` for one job, ``rel.<verb>_jobs`` for
    the jobs matching ``filters``), on the store of ``database_url`` or ``app``."""
    given = _filters(**filters)
    rel = open_reliable(database_url, app)
    try:
        bulk, one = getattr(rel, f"{verb}_jobs"), getattr(rel, verb)
        return _act(verb, job_ids, all_matching, yes, dry_run, as_json, given, bulk, one)
    finally:
        rel.close()


def bulk_options(fn: F) -> F:
    options = [
        click.argument("job_ids", nargs=-1, metavar="[JOB_ID]..."),
        click.option("--all-matching", is_flag=True,
                     help="act on every job matching the filters, after a confirmation"),
        click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation"),
        click.option("--dry-run", is_flag=True, help="only count the jobs that would be acted on"),
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return filter_options(store_options()(json_option(fn)))


@jobs.command(short_help="run failed or cancelled jobs again")
@bulk_options
def retry(
    job_ids: tuple[str, ...], all_matching: bool, yes: bool, dry_run: bool,
    database_url: str | None, app: str | None, as_json: bool, **filters: Any,
) -> int:  # fmt: skip
    """Run failed or cancelled jobs again, now: the same jobs, their completed steps
    kept, their retries counted afresh. A job that is not failed or cancelled is left
    as it is."""
    return _act_on("retry", job_ids, all_matching, yes, dry_run, as_json,
                   database_url, app, filters)  # fmt: skip


@jobs.command(short_help="cancel unfinished jobs")
@bulk_options
def cancel(
    job_ids: tuple[str, ...], all_matching: bool, yes: bool, dry_run: bool,
    database_url: str | None, app: str | None, as_json: bool, **filters: Any,
) -> int:  # fmt: skip
    """Cancel jobs that have not finished: queued and sleeping ones never run (again);
    a running attempt is told to stop."""
    return _act_on("cancel", job_ids, all_matching, yes, dry_run, as_json,
                   database_url, app, filters)  # fmt: skip


@jobs.command(short_help="run jobs again as new jobs, from the same input")
@bulk_options
@click.option(
    "--from-step",
    default=None,
    metavar="STEP",
    help="copy the steps completed before this one (one job id only)",
)
def replay(
    job_ids: tuple[str, ...], all_matching: bool, yes: bool, dry_run: bool,
    database_url: str | None, app: str | None, as_json: bool, from_step: str | None,
    **filters: Any,
) -> int:  # fmt: skip
    """Create a new job from the same input as each job; the originals stay as they
    were. For jobs named by id, the new jobs' ids are printed; with --all-matching,
    their count."""
    if from_step is not None and (all_matching or len(job_ids) != 1):
        raise click.UsageError("--from-step goes with exactly one job id")
    given = _filters(**filters)
    rel = open_reliable(database_url, app)
    created: list[str] = []

    def one(job_id: str) -> bool:
        created.append(rel.replay(job_id, from_step=from_step).id)
        return True

    try:
        code = _act("replay", job_ids, all_matching, yes, dry_run, as_json, given,
                    rel.replay_jobs, one, created)  # fmt: skip
    finally:
        rel.close()
    if created and not as_json:
        for job_id in created:
            click.echo(job_id)
    return code
