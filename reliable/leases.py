"""The lease keeper: renews a worker's leases on a timer of its own, and finds out which of
its attempts were cancelled or taken over.

It runs beside the dispatcher, so a claim that waits for the database (a SQLite write
lock, a locked row on PostgreSQL) never delays a renewal. Between renewals it looks,
with a cheap read, whether any attempt the worker holds was cancelled or lost its
lease, so that a job cancelled while it waits in the worker's queue never starts, and a
running one is told to stop at its next step.

``recover`` is the dispatcher's periodic repair: the jobs of dead workers requeued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from .background import Background, backoff
from .clock import Clock
from .errors import StoreError
from .registry import Registry
from .store import AttemptStates, Store

log = logging.getLogger("reliable.worker")

# How often a worker looks whether attempts it holds were cancelled elsewhere.
CANCEL_CHECK_SECONDS = 0.1


class LeaseKeeper(Background):
    """A thread that renews the leases of ``held()`` every third of ``lease_seconds``
    and, while there are any, checks them every ``CANCEL_CHECK_SECONDS``; it hands what
    it learns to ``apply``. ``about()`` describes the worker for the workers table."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        worker_id: str,
        lease_seconds: float,
        held: Callable[[], Sequence[tuple[str, int]]],
        apply: Callable[[AttemptStates], None],
        about: Callable[[], dict[str, Any]],
    ) -> None:
        self.store = store
        self.clock = clock
        self.worker_id = worker_id
        self.lease_seconds = lease_seconds
        self._held = held
        self._apply = apply
        self._about = about
        self._next_renewal = 0.0
        super().__init__(f"reliable-leases-{worker_id}")

    def start(self) -> None:
        """Record the worker alive now, before it claims anything (so that it is listed
        as soon as it runs jobs), then keep it so on the thread."""
        try:
            self.store.heartbeat(
                self.worker_id, (), self.clock.now, self.lease_seconds, **self._about()
            )
            self._next_renewal = time.monotonic() + self.lease_seconds / 3
        except StoreError as exc:  # the thread tries again at once
            log.warning("worker %s: cannot record itself alive yet (%s)", self.worker_id, exc)
        super().start()

    def _run(self) -> None:
        interval = self.lease_seconds / 3
        next_renewal = self._next_renewal
        failures = 0
        while not self._closed.is_set():
            now = time.monotonic()
            held = self._held()
            try:
                if now >= next_renewal:
                    states = self.store.heartbeat(
                        self.worker_id,
                        held,
                        self.clock.now,
                        self.lease_seconds,
                        **self._about(),
                    )
                    next_renewal = now + interval
                else:
                    states = self.store.check_attempts(self.worker_id, held)
                failures = 0
            except StoreError as exc:
                failures += 1
                pause = backoff(failures, interval / 2)
                log.warning(
                    "worker %s: cannot renew leases (%s); again in %.2fs",
                    self.worker_id,
                    exc,
                    pause,
                )
                self._closed.wait(pause)
                continue
            if states.cancelled or states.lost:
                self._apply(states)
            wait = next_renewal - time.monotonic()
            if held:
                wait = min(wait, CANCEL_CHECK_SECONDS)
            self._closed.wait(max(0.0, wait))


def recover(store: Store, registry: Registry, now: float) -> bool:
    """Requeue the jobs of dead workers, and repair what races may have left; whether
    jobs became due."""
    woken = bool(store.recover_expired(now))
    woken |= bool(store.wake_orphaned_sleepers(now))
    if registry.limited_at_claim():
        woken |= bool(store.sweep_parked())
    if registry.rate_limited():
        store.prune_rate_events(now)
    return woken
