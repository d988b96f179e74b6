"""The job store: a narrow set of atomic operations on SQLite or PostgreSQL.

Each concept has its module; ``Store`` puts them together:

- ``database``: the URL, engine, transactions and change signals;
- ``enqueue``: a job with its idempotency key, rate-limit admission and debounce;
- ``claims``: claiming due jobs and settling finished attempts (``admission`` and
  ``slots`` for concurrency caps and throttles);
- ``leasing``: leases renewed, checked, given back;
- ``maintenance``: dead workers' jobs taken over, races repaired, admissions pruned;
- ``steps``: steps, event waits and events;
- ``queries``: reads of jobs;
- ``insight``: the dashboard's bounded counts, throughput, queue wait and workers;
- ``operator``: listings, cancel, retry, replay, pauses, events;
- ``schedules``: cron schedules and the ticks they dealt with;
- ``retention``: finished jobs removed, a batch at a time.
"""

from __future__ import annotations

from .claims import Claiming
from .enqueue import Enqueuing
from .insight import Insight
from .leasing import Leasing
from .maintenance import Maintaining
from .operator import Operating
from .queries import Querying
from .reconnect import reconnecting
from .retention import Purging
from .schedules import Scheduling
from .steps import Stepping


@reconnecting(
    "_enqueue_own",  # not enqueue: a caller's transaction is never made twice
    "claim",
    "settle",
    "heartbeat",
    "check_attempts",
    "remove_worker",
    "recover_expired",
    "release",
    "cancel",
    "cancel_many",
    "retry",
    "replay",
    "pause",
    "resume",
    "paused",
    "known_tasks",
    "list_jobs",
    "count_jobs",
    "job_ids",
    "load_steps",
    "record_step",
    "end_wait",
    "get_wait",
    "send_event",
    "wake_orphaned_sleepers",
    "get_job",
    "get_status",
    "get_attempts",
    "has_due",
    "prune_rate_events",
    "sweep_parked",
    "flow_state",
    "count_by_status",
    "count_by_status_bounded",
    "count_matching",
    "recent_by_task",
    "finished_per_bucket",
    "recent_waits",
    "list_workers",
    "register_schedules",
    "schedule_ticks",
    "advance_schedule",
    "list_schedules",
    "purge_finished",
)
class Store(
    Enqueuing,
    Claiming,
    Leasing,
    Maintaining,
    Stepping,
    Querying,
    Insight,
    Operating,
    Scheduling,
    Purging,
):
    """Jobs, attempts, leases and idempotency keys in one database (see ``Database``).

    Every method is one transaction (or one statement), made once more when the
    database dropped its connection (see ``reconnect``).
    """
