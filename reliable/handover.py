"""Concurrency slots handed on between a worker's attempts, so that short capped jobs do
not cost a transaction each.

When a claim finds a job's scopes full and the claiming worker holds slots of exactly
those scopes, the job is leased as a *rider*: it waits in the worker until one of the
worker's attempts of the same scopes ends, then starts at once under its slots; settling
hands the slots on instead of releasing and taking them again (see ``store.slots``).
Everything here runs with the worker's lock held.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

from .context import AttemptControl
from .store import ClaimedJob, Outcome


@dataclass(eq=False)
class Slot:
    """A slot of each scope of a concurrency group, held by this worker's attempts one
    after another. ``valid`` turns false when the database no longer counts it (the
    attempt holding it lost its lease): then it is not handed on again."""

    group: str
    valid: bool = True


@dataclass
class Running:
    job: ClaimedJob
    timeout: float | None
    started: float | None = None  # time.monotonic() when a thread began the attempt
    slot: Slot | None = None
    control: AttemptControl | None = None
    overdue: bool = False  # told to stop at its timeout; its thread was replaced
    reported: float = 0.0  # time.monotonic() it was last reported still running

    @property
    def deadline(self) -> float | None:
        if self.timeout is None or self.started is None or self.overdue:
            return None
        return self.started + self.timeout


class SlotHandOver:
    """The slots a worker's attempts hold, per group, and the riders waiting for them.

    ``running`` is the worker's attempts by job id (a rider leaves it when it goes back);
    ``start`` hands a job to the worker's threads.
    """

    def __init__(self, running: dict[str, Running], start: Callable[[ClaimedJob], None]) -> None:
        self.running = running
        self._start = start
        # Valid slots held per group, riders waiting per group, slots of finished
        # attempts not yet settled and not handed on, slots handed on whose transfer has
        # not been settled yet, and riders left without a slot (to be given back).
        self.slots: dict[str, int] = {}
        self.riders: dict[str, collections.deque[ClaimedJob]] = {}
        self.vacant: dict[str, list[tuple[Slot, Outcome]]] = {}
        self.inherited: dict[str, Slot] = {}
        self.stranded: list[tuple[str, int]] = []

    def held(self, kept: dict[str, int]) -> dict[str, int]:
        """Slots held per group, with ``kept`` ones (settled with the next claim)."""
        return {g: self.slots.get(g, 0) + kept.get(g, 0) for g in {*self.slots, *kept}}

    def take(self, running: Running) -> None:
        """A job claimed with its own slots: count them."""
        group = running.job.slot_group
        assert group is not None
        running.slot = Slot(group)
        self.slots[group] = self.slots.get(group, 0) + 1

    def settled(self, finished: list[Outcome], orphans: list[str]) -> None:
        """Hand-overs settled: heirs whose inheritance failed lose their slots."""
        for job_id in orphans:
            orphaned = self.inherited.get(job_id)
            if orphaned is not None:
                self.drop(orphaned)
        for outcome in finished:
            if outcome.heir is not None:
                self.inherited.pop(outcome.heir[0], None)

    def board(self, rider: ClaimedJob) -> None:
        """A rider takes a slot its group left vacant, waits for one, or goes back."""
        group = rider.slot_group
        assert group is not None
        vacant = self.vacant.get(group)
        if vacant:
            slot, outcome = vacant.pop()
            outcome.heir = (rider.id, rider.attempt)
            self.give(slot, rider)
        elif self.slots.get(group):
            self.riders.setdefault(group, collections.deque()).append(rider)
        else:  # the group's slots were lost meanwhile
            del self.running[rider.id]
            self.stranded.append((rider.id, rider.attempt))

    def give(self, slot: Slot, rider: ClaimedJob) -> None:
        self.running[rider.id].slot = slot
        self.inherited[rider.id] = slot
        self._start(rider)

    def hand_on(self, running: Running | None, outcome: Outcome, *, vacate: bool = True) -> Outcome:
        """Give the slot of a finished attempt to the next rider of its group, if one
        waits. Otherwise the slot is released when ``outcome`` settles; until then
        (``vacate``) a rider claimed meanwhile may still take it over."""
        slot = running.slot if running is not None else None
        if slot is None or not slot.valid:
            return outcome
        waiting = self.riders.get(slot.group)
        while waiting:
            rider = waiting.popleft()
            queued = self.running.get(rider.id)
            if queued is not None and queued.job.attempt == rider.attempt:
                self.give(slot, rider)
                outcome.heir = (rider.id, rider.attempt)
                return outcome
        if vacate:
            self.vacant.setdefault(slot.group, []).append((slot, outcome))
        else:
            self.drop(slot)
        return outcome

    def vacate(self, *, keep: bool) -> dict[str, int]:
        """Slots left vacant are settled with the finished attempts now: with ``keep``,
        each goes to a rider of its group claimed in the same transaction if there is
        one. Returns how many are kept per group."""
        kept: dict[str, int] = {}
        for group, vacant in self.vacant.items():
            for slot, outcome in vacant:
                self.drop(slot)
                if keep:
                    outcome.keep_slots = True
                    kept[group] = kept.get(group, 0) + 1
        self.vacant.clear()
        return kept

    def drop(self, slot: Slot) -> None:
        """Stop counting ``slot`` as held; riders left with no slot of their group go back."""
        if not slot.valid:
            return
        slot.valid = False
        left = self.slots.get(slot.group, 0) - 1
        if left > 0:
            self.slots[slot.group] = left
            return
        self.slots.pop(slot.group, None)
        for rider in self.riders.pop(slot.group, ()):
            queued = self.running.get(rider.id)
            if queued is not None and queued.job.attempt == rider.attempt:
                del self.running[rider.id]
                self.stranded.append((rider.id, rider.attempt))
