"""The ``reliable`` command line: its commands, and the exit codes errors map to."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from importlib import metadata

import click

from ..errors import ConfigError, JobNotFound, ReliableError
from . import commands
from .jobs import jobs
from .output import ERROR, NOT_FOUND, OK, USAGE


def _version() -> str:
    try:
        return metadata.version("reliable")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


@click.group(
    "reliable", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(_version(), "--version", prog_name="reliable", message="%(prog)s %(version)s")
def cli() -> None:
    """Run and operate the durable background jobs of an application that uses
    reliable. Settings come from RELIABLE_* environment variables; options given here
    win over them.

    Exit codes: 0 ok, 1 error, 2 usage (a bad option, setting or application), 3 not
    found (no job with that id).
    """


cli.add_command(commands.worker)
cli.add_command(commands.dashboard_command)
cli.add_command(commands.db)
cli.add_command(commands.purge)
cli.add_command(commands.pause)
cli.add_command(commands.resume)
cli.add_command(commands.schedules)
cli.add_command(jobs)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``reliable`` with ``argv`` (default: the process's arguments); return the
    exit code."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        code = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="reliable",
            standalone_mode=False,
        )
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return ERROR
    except click.BadParameter as exc:
        # "--threads: must be >= 1, got 0": the option, then what it must be.
        if exc.ctx is not None:
            click.echo(exc.ctx.get_usage(), err=True)
        named = exc.param.opts[0] if exc.param is not None and exc.param.opts else None
        click.echo(f"Error: {named or exc.param_hint}: {exc.message}", err=True)
        return USAGE
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except JobNotFound as exc:
        click.echo(f"reliable: {exc}", err=True)
        return NOT_FOUND
    except ConfigError as exc:
        click.echo(f"reliable: {exc}", err=True)
        return USAGE
    except ReliableError as exc:
        click.echo(f"reliable: {exc}", err=True)
        return ERROR
    except KeyboardInterrupt:
        return ERROR
    sys.stdout.flush()
    return code if isinstance(code, int) else OK
