"""Storage of jobs on SQLite or PostgreSQL; the only package that speaks SQL."""

from .claims import ClaimResult
from .database import parse_database_url
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
from .store import Store

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
