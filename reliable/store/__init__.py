"""Storage of jobs on SQLite or PostgreSQL; the only package that speaks SQL."""

from .database import ClaimResult, Store, parse_database_url
from .records import (
    AttemptRow,
    AttemptStates,
    ClaimedJob,
    EnqueueResult,
    IdempotencyClaim,
    JobRow,
    NewJob,
    Outcome,
)

__all__ = [
    "AttemptRow",
    "AttemptStates",
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
