"""Durable background execution for Flask and Starlette backends, without a message queue."""

from .app import Reliable
from .clock import Clock, ManualClock, SystemClock
from .context import JobContext, current_job
from .errors import (
    ConfigError,
    ConfigWarning,
    DeadlineExceeded,
    IdempotencyConflict,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NonRetriable,
    PayloadTooLarge,
    RateLimited,
    ReliableError,
    RetryAfter,
    SerializationError,
    StoreError,
    UnknownTask,
)
from .handles import JobHandle
from .jobs import AttemptInfo, JobInfo, JobStatus, StepInfo
from .limits import CancelOn, Concurrency, Debounce, RateLimit, Throttle
from .schedules import ScheduleInfo
from .serialization import register_type
from .settings import Settings
from .steps import sleep, sleep_until, step, wait_for_event
from .tasks import Task

__all__ = [
    "AttemptInfo",
    "CancelOn",
    "Clock",
    "Concurrency",
    "ConfigError",
    "ConfigWarning",
    "DeadlineExceeded",
    "Debounce",
    "IdempotencyConflict",
    "JobCancelled",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "JobInfo",
    "JobNotFound",
    "JobStatus",
    "JobTimeout",
    "ManualClock",
    "NonRetriable",
    "PayloadTooLarge",
    "RateLimit",
    "RateLimited",
    "Reliable",
    "ReliableError",
    "RetryAfter",
    "ScheduleInfo",
    "SerializationError",
    "Settings",
    "StepInfo",
    "StoreError",
    "SystemClock",
    "Task",
    "Throttle",
    "UnknownTask",
    "current_job",
    "register_type",
    "sleep",
    "sleep_until",
    "step",
    "wait_for_event",
]
