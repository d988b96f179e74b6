"""Storage of jobs on SQLite or PostgreSQL; the only package that speaks SQL."""

from .database import ClaimResult, Store, parse_database_url
from .records import (
    AttemptRow,
    ClaimedJob,
    EnqueueResult,
    IdempotencyClaim,
    JobRow,
    NewJob,
    Outcome,
)

__all__ = [
    "AttemptRow",
    "ClaimResult",
    "ClaimedJob",
    "EnqueueResult",
    "IdempotencyClaim",
    "JobRow",
    "NewJob",
    "Outcome",
    "Store",
    "parse_database_url",
]
