"""Durable background execution for Flask and Starlette backends, without a message queue."""

from .app import Reliable
from .clock import Clock, ManualClock, SystemClock
from .context import JobContext, current_job
from .errors import (
    ConfigError,
    IdempotencyConflict,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    NonRetriable,
    RateLimited,
    ReliableError,
    RetryAfter,
    SerializationError,
    StoreError,
    UnknownTask,
)
from .jobs import AttemptInfo, JobHandle, JobInfo, JobStatus
from .settings import Settings
from .tasks import Task

__all__ = [
    "AttemptInfo",
    "Clock",
    "ConfigError",
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
    "RateLimited",
    "Reliable",
    "ReliableError",
    "RetryAfter",
    "SerializationError",
    "Settings",
    "StoreError",
    "SystemClock",
    "Task",
    "UnknownTask",
    "current_job",
]
