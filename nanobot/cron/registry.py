"""The tasks registered in this process, and the tasks built from stored definitions.

Threads: written by the caller of ``register_task``/``unregister_task`` (any thread) and read by
the worker thread, which builds the task of each claimed slot (:meth:`Registry.instance`):
every access holds the context's lock.
"""

from __future__ import annotations

from typing import Any

from nanobot.cron import definitions
from nanobot.cron.context import CronContext
from nanobot.cron.records import BuiltTask, StoredOptions
from nanobot.cron.task import CronTask, TaskDefinition


class Registry:
    """Registered tasks (stored or not), and the build cache of stored ones."""

    def __init__(self, ctx: CronContext) -> None:
        self._lock = ctx.lock
        self.registered: dict[str, CronTask] = {}
        # Registered tasks that cannot be stored (a class defined in a script, arguments that
        # are not JSON): they run in this process only.
        self.ephemeral: dict[str, TaskDefinition] = {}
        self._built: dict[str, BuiltTask] = {}
        self._stored_options: dict[str, StoredOptions] = {}

    def register(self, name: str, task: CronTask) -> None:
        with self._lock:
            self.registered[name] = task
            self._built.pop(name, None)
            self._stored_options.pop(name, None)

    def register_ephemeral(self, definition: TaskDefinition) -> None:
        with self._lock:
            self.ephemeral[definition.name] = definition

    def unregister(self, name: str) -> tuple[CronTask | None, TaskDefinition | None]:
        """Forget ``name``: its registered task and its definition if it was not stored."""
        with self._lock:
            task = self.registered.pop(name, None)
            ephemeral = self.ephemeral.pop(name, None)
            self._built.pop(name, None)
            self._stored_options.pop(name, None)
        return task, ephemeral

    def get(self, name: str) -> CronTask | None:
        with self._lock:
            return self.registered.get(name)

    def names(self) -> list[str]:
        with self._lock:
            return list(self.registered)

    def ephemeral_names(self) -> set[str]:
        with self._lock:
            return set(self.ephemeral)

    def set_options(self, name: str, options: StoredOptions) -> None:
        with self._lock:
            self._stored_options[name] = options

    def instance(self, name: str, task_class: str, kwargs: dict[str, Any]) -> CronTask:
        """The registered task of ``name``, else one built from its class and arguments (kept
        until they change), with its stored options applied."""
        with self._lock:
            task = self.registered.get(name)
            if task is not None:
                return task
            key = repr(sorted(kwargs.items()))
            cached = self._built.get(name)
            options = self._stored_options.get(name)
        if cached is not None and cached.task_class == task_class and cached.kwargs_key == key:
            task = cached.task
        else:
            task = definitions.build_task(task_class, kwargs)
            with self._lock:
                self._built[name] = BuiltTask(task_class, key, task)
        if options is not None:
            task.timeout, task.jitter = options.timeout, options.jitter
        return task

    def set_running(self, name: str, running: bool) -> None:
        with self._lock:
            task = self.registered.get(name)
            if task is None and name in self._built:
                task = self._built[name].task
        if task is not None:
            task.set_running(running)

    def stop_all(self) -> None:
        """Every registered task is no longer running (the scheduler stopped)."""
        for task in list(self.registered.values()):
            task.set_running(False)
