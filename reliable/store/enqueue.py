"""Enqueue: one job inserted, with its idempotency key, rate-limit admissions and
debounce, in one transaction."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sqlalchemy import (
    select,
    update,
)

from . import debounce, rates
from .database import Database
from .records import (
    EnqueueResult,
    IdempotencyClaim,
    NewJob,
)
from .schema import (
    idempotency_keys,
    jobs,
)

_INSERT_JOB = jobs.insert()


class Enqueuing(Database):
    """Enqueuing jobs (see ``Store``)."""

    def enqueue(
        self, job: NewJob, idempotency: IdempotencyClaim | None, now: float
    ) -> EnqueueResult:
        """Insert ``job``; with ``idempotency``, only if the key is free or expired.

        When an unexpired key already names a job, nothing is written and that job's id
        is returned with ``created=False`` and the fingerprint it was stored with.
        """
        if idempotency is None and not (job.rate_limits or job.debounce):
            with self._single_statement() as connection:
                connection.execute(_INSERT_JOB, self._job_values(job, job.run_at))
            self._wake()
            return EnqueueResult(job.id, True)
        with self._write() as connection:
            if idempotency is not None:
                stmt = self._insert(idempotency_keys).values(
                    scope=idempotency.scope,
                    key=idempotency.key,
                    job_id=job.id,
                    fingerprint=idempotency.fingerprint,
                    expires_at=idempotency.expires_at,
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=[idempotency_keys.c.scope, idempotency_keys.c.key],
                    set_={
                        "job_id": stmt.excluded.job_id,
                        "fingerprint": stmt.excluded.fingerprint,
                        "expires_at": stmt.excluded.expires_at,
                    },
                    where=idempotency_keys.c.expires_at <= now,
                ).returning(idempotency_keys.c.job_id)
                if connection.execute(stmt).first() is None:
                    existing = connection.execute(
                        select(idempotency_keys.c.job_id, idempotency_keys.c.fingerprint).where(
                            idempotency_keys.c.scope == idempotency.scope,
                            idempotency_keys.c.key == idempotency.key,
                        )
                    ).one()
                    return EnqueueResult(
                        existing.job_id, False, existing.fingerprint, replayed=True
                    )
            admitted_rates, admitted = rates.admit_rates(connection, self._insert, job, now)
            if admitted > job.created_at:  # it waited behind a later admission
                job = replace(job, created_at=admitted, run_at=max(job.run_at, admitted))
            if job.debounce is not None:
                pending = debounce.collapse(connection, self._insert, job, job.debounce, now)
                if pending is not None:
                    if idempotency is not None:  # the key names the job its payload joined
                        connection.execute(
                            update(idempotency_keys)
                            .where(
                                idempotency_keys.c.scope == idempotency.scope,
                                idempotency_keys.c.key == idempotency.key,
                            )
                            .values(job_id=pending)
                        )
                    fingerprint = idempotency.fingerprint if idempotency else None
                    return EnqueueResult(pending, False, fingerprint, admitted_rates)
            run_at = job.run_at + (job.debounce.window if job.debounce else 0.0)
            connection.execute(_INSERT_JOB, self._job_values(job, run_at))
        self._wake()
        fingerprint = idempotency.fingerprint if idempotency else None
        return EnqueueResult(job.id, True, fingerprint, admitted_rates)

    @staticmethod
    def _job_values(job: NewJob, run_at: float) -> dict[str, Any]:
        return {
            "id": job.id,
            "task": job.task,
            "queue": job.queue,
            "priority": job.priority,
            "status": "queued",
            "payload": job.payload,
            "attempts": 0,
            "run_at": run_at,
            "created_at": job.created_at,
            "idempotency_key": job.idempotency_key,
            "limits": job.limits,
            "cancel_on": job.cancel_on,
            "cancel_match": job.cancel_match,
            "start_by": job.start_by,
            "finish_by": job.finish_by,
        }
