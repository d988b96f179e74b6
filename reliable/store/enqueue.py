"""Enqueue: one job inserted, with its idempotency key, rate-limit admissions and
debounce, in one transaction: the store's own, or a caller's (``connection``).

In a caller's transaction nothing is committed here: the job, its key, its admissions
and its debounce state become visible when the caller commits, and vanish with a
rollback. A refused enqueue (``RateLimited``, a conflicting key) rolls back to a
savepoint, leaving the caller's own writes as they were. PostgreSQL's insert trigger
notifies workers in the same transaction, so the wake-up is delivered at commit; SQLite
workers see the commit by themselves (``ChangeWatch``).

``enqueue_many`` writes a batch the same way, in one transaction: all of it or none.
Jobs without rate limits or debounce are written a table at a time (SQLite: the
driver's ``executemany`` of one compiled statement; PostgreSQL: thousands of rows per
statement, as one JSON parameter); the others go through the single-job path one after
another, in that same transaction. A lone job without a key, rate limit or debounce is
one statement; on SQLite, concurrent ones share a commit (``Database._insert_alone``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    Connection,
    bindparam,
    cast,
    column,
    func,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSON
from sqlalchemy.exc import DBAPIError

from ..errors import IdempotencyConflict, StoreError
from . import debounce, rates, sqlite
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
# Keys looked up per statement: far below SQLite's limit on bound parameters.
_KEYS_PER_SELECT = 500
# Jobs per INSERT statement on PostgreSQL (see ``_INSERT_FROM_JSON``).
_ROWS_PER_STATEMENT = 5000
_JOB_COLUMNS = (
    "id",
    "task",
    "queue",
    "priority",
    "status",
    "payload",
    "attempts",
    "run_at",
    "created_at",
    "idempotency_key",
    "limits",
    "cancel_on",
    "cancel_match",
    "start_by",
    "finish_by",
    "trace_context",
)
# PostgreSQL: INSERT INTO reliable_jobs (...) SELECT CAST(r.value ->> 0 AS ...), ...
# FROM json_array_elements(:rows) AS r: the rows as one bound JSON parameter (a list of
# lists, encoded in C; the server splits it), instead of a value per placeholder.
_ROWS = func.json_array_elements(cast(bindparam("rows"), JSON)).table_valued(column("value", JSON))
_ROW = _ROWS.alias("r")
_INSERT_FROM_JSON = jobs.insert().from_select(
    list(_JOB_COLUMNS),
    select(
        *(
            cast(_ROW.c.value.op("->>")(literal_column(str(i))), jobs.c[name].type)
            for i, name in enumerate(_JOB_COLUMNS)
        )
    ).select_from(_ROW),
)


class Enqueuing(Database):
    """Enqueuing jobs (see ``Store``)."""

    _insert_jobs: str | None = None

    def enqueue(
        self,
        job: NewJob,
        idempotency: IdempotencyClaim | None,
        now: float,
        *,
        connection: Connection | None = None,
    ) -> EnqueueResult:
        """Insert ``job``; with ``idempotency``, only if the key is free or expired.

        When an unexpired key already names a job, nothing is written and that job's id
        is returned with ``created=False`` and the fingerprint it was stored with.
        ``connection``: a caller's open transaction to write in (see ``joined``),
        never committed here and never retried (the caller's transaction is the unit).
        """
        if connection is None:
            return self._enqueue_own(job, idempotency, now)
        try:
            if self.dialect == "sqlite":
                sqlite.begin_write(connection)
            if idempotency is None and not (job.rate_limits or job.debounce):
                # Compiled once, values bound as they are: no per-call processing.
                connection.exec_driver_sql(self._insert_jobs_sql(), self._job_row(job))
                return EnqueueResult(job.id, True)
            with connection.begin_nested():
                return self._enqueue_in(connection, job, idempotency, now)
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    def _enqueue_own(
        self, job: NewJob, idempotency: IdempotencyClaim | None, now: float
    ) -> EnqueueResult:
        """``enqueue`` in a transaction of the store's own (retried on a lost connection)."""
        if idempotency is None and not (job.rate_limits or job.debounce):
            sql, row = self._insert_jobs_sql(), self._job_row(job)
            if not self._insert_alone(sql, row):
                with self._single_statement() as connection:
                    connection.exec_driver_sql(sql, row)
            self._wake()
            return EnqueueResult(job.id, True)
        with self._write() as connection:
            result = self._enqueue_in(connection, job, idempotency, now)
        if result.created:
            self._wake()
        return result

    def _enqueue_in(
        self,
        connection: Connection,
        job: NewJob,
        idempotency: IdempotencyClaim | None,
        now: float,
    ) -> EnqueueResult:
        if idempotency is not None:
            stmt = self._insert(idempotency_keys).values(
                scope=idempotency.scope,
                key=idempotency.key,
                job_id=job.id,
                fingerprint=idempotency.fingerprint,
                expires_at=idempotency.expires_at,
            )
            stmt = _take_expired_keys(stmt, now).returning(idempotency_keys.c.job_id)
            if connection.execute(stmt).first() is None:
                existing = connection.execute(
                    select(idempotency_keys.c.job_id, idempotency_keys.c.fingerprint).where(
                        idempotency_keys.c.scope == idempotency.scope,
                        idempotency_keys.c.key == idempotency.key,
                    )
                ).one()
                return EnqueueResult(existing.job_id, False, existing.fingerprint, replayed=True)
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
        fingerprint = idempotency.fingerprint if idempotency else None
        return EnqueueResult(job.id, True, fingerprint, admitted_rates)

    def enqueue_many(
        self,
        batch: Sequence[NewJob],
        claims: Sequence[IdempotencyClaim | None],
        now: float,
        *,
        connection: Connection | None = None,
    ) -> list[EnqueueResult]:
        """Insert the jobs of ``batch`` in one transaction; ``claims[i]`` is the
        idempotency key of ``batch[i]`` (or ``None``).

        A key already held by an unexpired job, or by an earlier job of the batch,
        writes nothing for that job: its result names the holder (``created=False``,
        ``replayed=True``). A key held with another fingerprint raises
        ``IdempotencyConflict`` and nothing of the batch is written; so does
        ``RateLimited`` from a rate limit. ``connection``: a caller's open transaction,
        as for ``enqueue`` (the batch is a savepoint in it).
        """
        if len(batch) != len(claims):
            raise ValueError("enqueue_many needs one claim (or None) per job")
        if not batch:
            return []
        if connection is None:
            with self._write() as own:
                results = self._enqueue_many_in(own, batch, claims, now)
            if any(result.created for result in results):
                self._wake()
            return results
        try:
            if self.dialect == "sqlite":
                sqlite.begin_write(connection)
            with connection.begin_nested():
                return self._enqueue_many_in(connection, batch, claims, now)
        except DBAPIError as exc:
            raise StoreError(f"database write failed: {exc.orig}") from exc

    def _enqueue_many_in(
        self,
        connection: Connection,
        batch: Sequence[NewJob],
        claims: Sequence[IdempotencyClaim | None],
        now: float,
    ) -> list[EnqueueResult]:
        if any(job.rate_limits or job.debounce for job in batch):
            # Each admission and collapse depends on the ones before it: one at a time.
            results = [
                self._enqueue_in(connection, job, claim, now)
                for job, claim in zip(batch, claims, strict=True)
            ]
        else:
            results = self._insert_many(connection, batch, claims, now)
        for result, claim in zip(results, claims, strict=True):
            if claim is not None and result.replayed and result.fingerprint != claim.fingerprint:
                raise IdempotencyConflict(claim.key, result.job_id)  # rolls the batch back
        return results

    def _insert_many(
        self,
        connection: Connection,
        batch: Sequence[NewJob],
        claims: Sequence[IdempotencyClaim | None],
        now: float,
    ) -> list[EnqueueResult]:
        """Jobs without rate limits or debounce: one statement per table."""
        holders = self._claim_keys(connection, batch, claims, now) if any(claims) else {}
        results: list[EnqueueResult] = []
        rows: list[tuple[Any, ...]] = []
        for job, claim in zip(batch, claims, strict=True):
            if claim is None:
                rows.append(self._job_row(job))
                results.append(EnqueueResult(job.id, True))
                continue
            holder, fingerprint = holders[claim.scope, claim.key]
            if holder == job.id:
                rows.append(self._job_row(job))
                results.append(EnqueueResult(job.id, True, claim.fingerprint))
            else:
                results.append(EnqueueResult(holder, False, fingerprint, replayed=True))
        if rows:
            self._insert_rows(connection, rows)
        return results

    def _insert_rows(self, connection: Connection, rows: list[tuple[Any, ...]]) -> None:
        """Insert job rows (``_job_row``), values bound, without SQLAlchemy's per-row
        parameter processing. SQLite steps one prepared statement per row (the driver's
        executemany); PostgreSQL takes ``_ROWS_PER_STATEMENT`` rows at a time as one JSON
        parameter: one statement, one round trip, one trigger run."""
        if self.dialect == "sqlite":
            connection.exec_driver_sql(self._insert_jobs_sql(), rows)
            return
        for start in range(0, len(rows), _ROWS_PER_STATEMENT):
            chunk = json.dumps(rows[start : start + _ROWS_PER_STATEMENT], ensure_ascii=False)
            connection.execute(_INSERT_FROM_JSON, {"rows": chunk})

    def _insert_jobs_sql(self) -> str:
        """``INSERT INTO reliable_jobs`` compiled once for this database, with
        positional placeholders in the order of ``_JOB_COLUMNS`` (``_job_row``)."""
        if self._insert_jobs is None:
            make_dialect: Any = type(self.engine.dialect)
            dialect = make_dialect(paramstyle="qmark" if self.dialect == "sqlite" else "format")
            compiled = _INSERT_JOB.compile(dialect=dialect, column_keys=list(_JOB_COLUMNS))
            if tuple(compiled.positiontup or ()) != _JOB_COLUMNS:
                raise StoreError(f"unexpected parameters of the job INSERT: {compiled.positiontup}")
            self._insert_jobs = compiled.string
        return self._insert_jobs

    def _claim_keys(
        self,
        connection: Connection,
        batch: Sequence[NewJob],
        claims: Sequence[IdempotencyClaim | None],
        now: float,
    ) -> dict[tuple[str, str], tuple[str, str | None]]:
        """Take the batch's free (or expired) keys, each for the first job naming it;
        return every key's holder and fingerprint, as stored now."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for job, claim in zip(batch, claims, strict=True):
            if claim is not None and (claim.scope, claim.key) not in rows:
                rows[claim.scope, claim.key] = {
                    "scope": claim.scope,
                    "key": claim.key,
                    "job_id": job.id,
                    "fingerprint": claim.fingerprint,
                    "expires_at": claim.expires_at,
                }
        stmt = _take_expired_keys(self._insert(idempotency_keys), now)
        connection.execute(stmt, list(rows.values()))
        by_scope: dict[str, list[str]] = {}
        for scope, key in rows:
            by_scope.setdefault(scope, []).append(key)
        holders: dict[tuple[str, str], tuple[str, str | None]] = {}
        for scope, keys in by_scope.items():
            for start in range(0, len(keys), _KEYS_PER_SELECT):
                chosen = keys[start : start + _KEYS_PER_SELECT]
                found = connection.execute(
                    select(
                        idempotency_keys.c.key,
                        idempotency_keys.c.job_id,
                        idempotency_keys.c.fingerprint,
                    ).where(idempotency_keys.c.scope == scope, idempotency_keys.c.key.in_(chosen))
                )
                for key, job_id, fingerprint in found:
                    holders[scope, key] = (job_id, fingerprint)
        return holders

    @staticmethod
    def _job_row(job: NewJob) -> tuple[Any, ...]:
        """A job's values in the order of ``_JOB_COLUMNS``."""
        return (
            job.id,
            job.task,
            job.queue,
            job.priority,
            "queued",
            job.payload,
            0,
            job.run_at,
            job.created_at,
            job.idempotency_key,
            job.limits,
            job.cancel_on,
            job.cancel_match,
            job.start_by,
            job.finish_by,
            job.trace_context,
        )

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
            "trace_context": job.trace_context,
        }


def _take_expired_keys(stmt: Any, now: float) -> Any:
    """An idempotency key ``INSERT`` that takes over a key whose record has expired (and
    leaves a live one as it is: the caller reads whose job it names)."""
    return stmt.on_conflict_do_update(
        index_elements=[idempotency_keys.c.scope, idempotency_keys.c.key],
        set_={
            "job_id": stmt.excluded.job_id,
            "fingerprint": stmt.excluded.fingerprint,
            "expires_at": stmt.excluded.expires_at,
        },
        where=idempotency_keys.c.expires_at <= now,
    )
