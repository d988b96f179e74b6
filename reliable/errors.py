"""Exceptions raised by ``reliable`` and the signals a task may raise to steer its retries."""

from __future__ import annotations


class ReliableError(Exception):
    """Root of every error ``reliable`` raises."""


class ConfigError(ReliableError, ValueError):
    """A setting, environment variable or task option has a bad value.

    ``name`` is the variable or option at fault.
    """

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


class ConfigWarning(UserWarning):
    """A ``RELIABLE_*`` environment variable looks like a misspelt setting.

    The variable is not read; the warning names the setting it probably means.
    """


class SerializationError(ReliableError, TypeError):
    """A value cannot be stored as JSON (job arguments, results, step values)."""


class PayloadTooLarge(ReliableError, ValueError):
    """A job's arguments, as JSON, are larger than ``RELIABLE_MAX_PAYLOAD``."""


class StoreError(ReliableError):
    """The database failed in a way ``reliable`` could not recover from."""


class JobNotFound(ReliableError, LookupError):
    """No job has this id."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class UnknownTask(ReliableError, LookupError):
    """A job names a task that is not registered in this process."""


class JobFailed(ReliableError):
    """The job ended ``failed``; ``error`` is the last attempt's error document."""

    def __init__(self, job_id: str, error: dict[str, object] | None) -> None:
        detail = ""
        if error:
            detail = f": {error.get('type')}: {error.get('message')}"
        super().__init__(f"job {job_id} failed{detail}")
        self.job_id = job_id
        self.error = error


class JobCancelled(ReliableError):
    """The job was cancelled before it finished."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class JobTimeout(ReliableError, TimeoutError):
    """Waiting for a job's result took longer than the caller allowed; ``detail`` says
    why, when it is known (no worker could have run it)."""

    def __init__(self, job_id: str, timeout: float, *, detail: str | None = None) -> None:
        message = f"job {job_id} did not finish within {timeout:g} s"
        super().__init__(f"{message}: {detail}" if detail else message)
        self.job_id = job_id
        self.timeout = timeout
        self.detail = detail


class RateLimited(ReliableError):
    """An enqueue was refused by a rate limit; try again after ``retry_after`` seconds.

    ``state`` describes the limit (scope, limit, period) for ``RateLimit`` headers.
    """

    def __init__(self, message: str, retry_after: float, *, state: object = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.state = state


class IdempotencyConflict(ReliableError):
    """An idempotency key was reused with a different request or arguments."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"idempotency key {key!r} was already used for other input (job {job_id})")
        self.key = key
        self.job_id = job_id


class DeadlineExceeded(ReliableError):
    """A job missed a deadline it was enqueued with, and failed for it.

    ``option`` is ``"start_within"`` (it had not started by ``deadline``: it never ran)
    or ``"finish_within"`` (it had not finished by then, retries and sleeps included);
    ``deadline`` is that time, in UTC epoch seconds.
    """

    def __init__(self, message: str, *, option: str, deadline: float) -> None:
        super().__init__(message)
        self.option = option
        self.deadline = deadline


class NonRetriable(Exception):
    """Raise from a task to fail the job now, without further retries."""


class RetryAfter(Exception):
    """Raise from a task to retry it after ``seconds``, instead of the backoff's delay.

    The attempt still counts against ``retries``.
    """

    def __init__(self, seconds: float, message: str = "") -> None:
        super().__init__(message or f"retry after {seconds:g} s")
        self.seconds = float(seconds)
