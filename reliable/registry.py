"""``Registry``: the tasks of one application, by name, with the runtime they run in.

What workers and attempts need to know about the application: which function a job's
task name stands for, with which options, and in which queues to look for jobs. The
``Reliable`` façade is a registry with the public API on top.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .errors import ConfigError
from .overrides import apply_overrides
from .runtime import Runtime
from .tasks import DEFAULT_QUEUE, Task


class Registry:
    """Registered tasks by name and alias (``tasks``), and the ``runtime`` they run in.

    A worker claims only jobs of tasks registered here: a job whose task no worker
    knows (a rolling deploy, a renamed task without ``aliases=``) waits, queued.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.tasks: dict[str, Task[Any, Any]] = {}

    def register(self, task: Task[Any, Any]) -> None:
        """Add a task to this application; its name must be unused.

        ``RELIABLE_TASK_<NAME>_<OPTION>`` environment variables override the
        decorator's ``concurrency``, ``rate_limit``, ``throttle``, ``priority``,
        ``retries`` and ``timeout``; a bad value raises ``ConfigError`` naming the
        variable.
        """
        task.options = apply_overrides(task.options, os.environ)
        for name in (task.name, *task.options.aliases):
            existing = self.tasks.get(name)
            if existing is not None and existing.fn is not task.fn:
                raise ConfigError(
                    "name" if name == task.name else "aliases",
                    f"a task named {name!r} is already registered "
                    f"({existing.fn.__module__}.{existing.fn.__qualname__}); pass name=...",
                )
        for name in (task.name, *task.options.aliases):
            self.tasks[name] = task

    def claimable(
        self, queues: Sequence[str] | None, paused: dict[str, set[str]]
    ) -> tuple[list[str], list[str]]:
        """The queues (``queues``, default: every queue of a task) and the task names
        (aliases included) whose jobs may be claimed now: those not ``paused``."""
        stopped_tasks = paused.get("task", set())
        names = [
            name
            for name, task in self.tasks.items()
            if name not in stopped_tasks and task.name not in stopped_tasks
        ]
        wanted = list(queues) if queues else self.queues()
        return [q for q in wanted if q not in paused.get("queue", set())], names

    def limited_at_claim(self) -> bool:
        """Whether any task here has a concurrency cap or a throttle (checked at claim)."""
        return any(task.options.flow.limited_at_claim for task in self.tasks.values())

    def rate_limited(self) -> bool:
        """Whether any task here has a rate limit (its admissions are pruned by workers)."""
        return any(task.options.flow.rate_limits for task in self.tasks.values())

    def queues(self) -> list[str]:
        """Every queue a registered task uses (and ``default``)."""
        return sorted({DEFAULT_QUEUE, *(task.options.queue for task in self.tasks.values())})
