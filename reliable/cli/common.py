"""What the commands share: the options naming the database or the application, the
``Reliable`` they open, and option types with plain error messages."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..app import Reliable
from ..durations import parse_duration
from ..errors import ConfigError, ReliableError
from .target import locate

F = TypeVar("F", bound=Callable[..., Any])

APP_HELP = (
    "the application as module:attribute, where the attribute is its Reliable or a "
    "Flask, Starlette or FastAPI app carrying one; module alone will do when it leads "
    "to a single Reliable"
)
DATABASE_URL_HELP = "database URL (default: RELIABLE_DATABASE_URL, else sqlite:///reliable.db)"


class WholeNumber(click.ParamType[int, Any]):
    """An integer of at least ``minimum``."""

    name = "N"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            number = value
        else:
            try:
                number = int(value)
            except ValueError:
                self.fail(f"must be a whole number >= {self.minimum}, got {value!r}", param, ctx)
        if number < self.minimum:
            self.fail(f"must be >= {self.minimum}, got {number}", param, ctx)
        return number


class Seconds(click.ParamType[float, Any]):
    """A duration: seconds, or such as ``30s``, ``2m``, ``7d``."""

    name = "DURATION"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, name=param.name if param and param.name else "duration")
        except ConfigError:
            self.fail(
                f"must be a duration >= 0 (seconds, or such as 30s or 2m), got {value!r}",
                param,
                ctx,
            )


def store_options(
    app_help: str = "take the database URL from this application",
) -> Callable[[F], F]:
    """``--database-url`` and ``--app``: which database a command works on."""

    def decorate(fn: F) -> F:
        fn = click.option("--app", "app", default=None, metavar="MODULE:ATTR", help=app_help)(fn)
        return click.option("--database-url", default=None, metavar="URL", help=DATABASE_URL_HELP)(
            fn
        )

    return decorate


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="print JSON, for scripts")(fn)


def located(spec: str) -> Reliable:
    """The application's ``Reliable``; a bad target is a usage error (exit code 2)."""
    # The application is imported to find its Reliable (and tasks): it must not start
    # a worker of its own.
    os.environ["RELIABLE_EMBEDDED_WORKER"] = "0"
    try:
        return locate(spec)
    except ConfigError:
        raise
    except ReliableError as exc:
        raise click.UsageError(str(exc)) from None


def open_reliable(database_url: str | None, app: str | None) -> Reliable:
    """The ``Reliable`` a store-only command works on: the application's when ``--app``
    names one, else one on ``--database-url`` (or ``RELIABLE_DATABASE_URL``)."""
    if app:
        return located(app)
    os.environ["RELIABLE_EMBEDDED_WORKER"] = "0"
    return Reliable(database_url, embedded_worker=False)
