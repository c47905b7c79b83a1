"""``CronTask``: the base class of every periodic task, as in the seed, plus what persistence needs.

A task is stored as plain data, never as a pickled instance: the import path of its class
(``pkg.module:Class``) and the arguments it was constructed with. ``CronTask.__new__`` captures
those arguments, so subclasses written against the seed (``super().__init__(interval)``) need
nothing more to survive a restart.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from nanobot.config import get_config
from nanobot.cron.overlap import DEFAULT as DEFAULT_OVERLAP
from nanobot.cron.overlap import Overlap, OverlapPolicy, check_overlap
from nanobot.cron.pings import check_ping_url
from nanobot.cron.retries import RetryBackoff, check_retries, parse_backoff
from nanobot.cron.schedules import (
    AtSchedule,
    CronSchedule,
    IntervalSchedule,
    Schedule,
    fire_times,
    parse_at,
    resolve_schedule,
)
from nanobot.exceptions import InvalidTaskError
from nanobot.models import MisfirePolicy, utcnow
from nanobot.times import positive_seconds

DEFAULT_INTERVAL: Final = 60.0
# Cron tasks: the longest gap among this many fires after PERIOD_FROM is their nominal period
# (health staleness, the informational tasks.interval_s); fixed so that it never changes.
PERIOD_SAMPLE: Final = 32
PERIOD_FROM: Final = datetime(2026, 1, 1, tzinfo=UTC)


def nominal_period(schedule: Schedule) -> float:
    """Seconds between runs as far as one number can say: the interval; for a cron schedule
    the longest gap among its first fires of 2026; 0 for a one-shot."""
    if isinstance(schedule, IntervalSchedule):
        return schedule.seconds
    if isinstance(schedule, AtSchedule):
        return 0.0
    times = fire_times(schedule, PERIOD_FROM, PERIOD_SAMPLE)
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    return max(gaps, default=DEFAULT_INTERVAL)


class _NotGiven:
    def __repr__(self) -> str:
        return "<not given>"


# The default of ``interval``: "not given" (60 s unless cron or at is declared); None given
# explicitly is a bad interval, as it always was.
NOT_GIVEN: Final[Any] = _NotGiven()


def default_timezone() -> str:
    """The configured ``scheduler.timezone`` (UTC unless set)."""
    return str(get_config().get("scheduler.timezone", "UTC"))


def check_interval(value: Any, what: str = "interval") -> float:
    """A positive finite number of seconds, or :class:`InvalidTaskError` naming the value."""
    return positive_seconds(value, what, InvalidTaskError)


def check_failure_count(value: Any, what: str = "pause_after_failures") -> int | None:
    """None, or a whole number of failures >= 0 (0: never pause), else InvalidTaskError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidTaskError(f"{what} must be a whole number >= 0 (0: never), got {value!r}")
    return value


def _check_optional_seconds(value: Any, what: str) -> float | None:
    if value is None:
        return None
    return check_interval(value, what)


class CronTask(ABC):
    """Base class of periodic tasks: subclasses implement ``async run()``.

    Options beyond the seed, as class attributes or constructor keywords:

    - ``timeout``: seconds a run may take before it is cancelled and recorded as ``timeout``
      (None: the configured ``cron.default_timeout``, whose 0 means no limit).
    - ``jitter``: up to this many seconds added at random to each start, to spread load.
    - ``misfire_policy``: what to do with slots that passed while nothing ran them.
    - ``overlap`` and ``max_concurrent``: what a slot that comes while the previous run still
      goes does (:mod:`nanobot.cron.overlap`: ``skip``, the default, ``buffer_one``,
      ``cancel_previous`` or ``allow`` with at most ``max_concurrent`` runs at once).
    - ``cron``: a cron expression (``"0 9 * * 1-5"``, ``"@daily"``) instead of an interval,
      read in ``tz`` (an IANA zone; default ``scheduler.timezone``, itself UTC by default).
    - ``at``: one instant (an aware ``datetime``, or naive and read in ``tz``) instead of an
      interval: the task runs once, then it is done.
    - ``pause_after_failures``: pause the task after this many consecutive failed slots (None:
      the ``cron.pause_after_failures`` setting; 0: never). See docs/failures.md.
    - ``ping_url``: a healthchecks.io-style URL pinged at each run's start and end.
    - ``catch_up_window``: seconds; a missed slot reached later than this is recorded missed
      instead of caught up (None: the latest missed slot is caught up however late).
    - ``retries``: attempts of a failed slot after its first (0: none), and ``retry_backoff``:
      their backoff, a :class:`nanobot.cron.retries.RetryBackoff` or its text
      ``"BASE,FACTOR,MAX[,JITTER]"`` such as ``"1s,2,60s"`` (None: 30s,2,1h). See
      docs/failures.md.

    Precedence: a constructor keyword wins over the class attribute of the same name. A task
    has one schedule: ``cron`` and ``at`` together, or either with an ``interval`` passed to the
    constructor, are refused (:class:`InvalidTaskError`), as is ``tz`` on an interval task.
    Without ``cron`` or ``at``, the task runs every ``interval`` seconds (60 by default).
    ``self.schedule`` holds the resulting schedule.
    """

    timeout: float | None = None
    jitter: float | None = None
    misfire_policy: MisfirePolicy = MisfirePolicy.CATCH_UP_ONCE
    overlap: OverlapPolicy | str = OverlapPolicy.SKIP
    max_concurrent: int | None = None
    cron: str | None = None
    tz: str | None = None
    at: datetime | str | None = None
    pause_after_failures: int | None = None
    ping_url: str | None = None
    catch_up_window: float | None = None
    retries: int = 0
    retry_backoff: RetryBackoff | str | None = None

    _init_args: tuple[tuple[Any, ...], dict[str, Any]]

    def __new__(cls, *args: Any, **kwargs: Any) -> CronTask:
        self = super().__new__(cls)
        # Captured before any __init__ runs, so that another process can build the same task.
        self._init_args = (args, dict(kwargs))
        return self

    def __init__(
        self,
        interval: float = NOT_GIVEN,
        *,
        timeout: float | None = None,
        jitter: float | None = None,
        misfire_policy: MisfirePolicy | str | None = None,
        overlap: OverlapPolicy | str | None = None,
        max_concurrent: int | None = None,
        cron: str | None = None,
        tz: str | None = None,
        at: datetime | str | None = None,
        pause_after_failures: int | None = None,
        ping_url: str | None = None,
        catch_up_window: float | None = None,
        retries: int | None = None,
        retry_backoff: RetryBackoff | str | None = None,
    ) -> None:
        self.schedule = _declared_schedule(self, interval, cron, tz, at)
        self.cron = self.schedule.expression if isinstance(self.schedule, CronSchedule) else None
        self.at = self.schedule.at if isinstance(self.schedule, AtSchedule) else None
        self.tz = None if isinstance(self.schedule, IntervalSchedule) else self.schedule.timezone
        self.interval = nominal_period(self.schedule)
        if timeout is not None:
            self.timeout = _check_optional_seconds(timeout, "timeout")
        else:
            self.timeout = _check_optional_seconds(type(self).timeout, "timeout")
        if jitter is not None:
            self.jitter = _check_optional_seconds(jitter, "jitter")
        if misfire_policy is not None:
            try:
                self.misfire_policy = MisfirePolicy(misfire_policy)
            except ValueError:
                choices = ", ".join(p.value for p in MisfirePolicy)
                raise InvalidTaskError(
                    f"misfire_policy must be one of {choices}, got {misfire_policy!r}"
                ) from None
        policy = overlap if overlap is not None else type(self).overlap
        if max_concurrent is None and policy == OverlapPolicy.ALLOW:
            # The class's maximum goes with the class's (or a keyword's) allow only: a keyword
            # choosing another policy is no contradiction of it.
            max_concurrent = type(self).max_concurrent
        chosen = check_overlap(policy, max_concurrent)
        self.overlap, self.max_concurrent = chosen.policy, chosen.max_concurrent
        given = pause_after_failures
        self.pause_after_failures = check_failure_count(
            given if given is not None else type(self).pause_after_failures
        )
        self.ping_url = check_ping_url(ping_url if ping_url is not None else type(self).ping_url)
        self.catch_up_window = _check_optional_seconds(
            catch_up_window if catch_up_window is not None else type(self).catch_up_window,
            "catch_up_window",
        )
        self.retries = check_retries(retries if retries is not None else type(self).retries)
        backoff = retry_backoff if retry_backoff is not None else type(self).retry_backoff
        self.retry_backoff = None if backoff is None else parse_backoff(backoff)
        self.running = False
        self.task: asyncio.Task[Any] | None = None

    @abstractmethod
    async def run(self) -> None:
        """Do the work of one run."""

    def get_interval(self) -> float:
        """Seconds between runs (for a cron task its longest gap; 0 for a one-shot)."""
        return self.interval

    def get_schedule(self) -> Schedule:
        return self.schedule

    def is_running(self) -> bool:
        """True while the task is started (scheduled) in this process, as in the seed."""
        return self.running

    def set_running(self, running: bool) -> None:
        self.running = running

    def set_task(self, task: asyncio.Task[Any] | None) -> None:
        """The asyncio task of the run in flight, if any."""
        self.task = task

    def get_task(self) -> asyncio.Task[Any] | None:
        return self.task


def _declared_schedule(
    task: CronTask,
    interval: Any,
    cron: str | None,
    tz: str | None,
    at: datetime | str | None,
) -> Schedule:
    """The one schedule a task declares by constructor keywords and class attributes."""
    cls = type(task)
    cron = cron if cron is not None else cls.cron
    at = at if at is not None else cls.at
    tz = tz if tz is not None else cls.tz
    if cron is not None and at is not None:
        raise InvalidTaskError(
            f"task {cls.__qualname__} declares both cron {cron!r} and at {at!r}: keep one"
        )
    if interval is not NOT_GIVEN and (cron is not None or at is not None):
        other = "cron" if cron is not None else "at"
        raise InvalidTaskError(
            f"task {cls.__qualname__} is given interval {interval!r} and {other}: keep one"
        )
    if cron is None and at is None:
        if tz is not None:
            raise InvalidTaskError(
                f"task {cls.__qualname__} has tz {tz!r} but no cron or at: a time zone applies "
                "to wall-clock schedules only"
            )
        return IntervalSchedule(
            seconds=check_interval(DEFAULT_INTERVAL if interval is NOT_GIVEN else interval)
        )
    zone_name = tz if tz is not None else default_timezone()
    if cron is not None:
        resolved = resolve_schedule(cron=cron, tz=zone_name, now=utcnow())
        assert isinstance(resolved, CronSchedule)
        return resolved
    if isinstance(at, datetime) and at.tzinfo is not None:
        return AtSchedule(at=at, timezone=zone_name)
    if isinstance(at, str) and _CLOCK_ONLY.match(at.strip()):
        raise InvalidTaskError(
            f"task {cls.__qualname__} has at {at!r}: give a date and time, such as "
            "2026-12-24T17:30 (a clock time alone would mean another day at every start)"
        )
    # Not refused when past: code registers its tasks at every start, and a one-shot that has
    # run must still build; the scheduler runs it at most once (the command line refuses the
    # past). A naive time is read in the zone; one the clocks skip is refused.
    assert at is not None
    return parse_at(at, zone_name, now=_EPOCH).schedule


_CLOCK_ONLY: Final = re.compile(r"^\d{1,2}:\d{2}(:\d{2})?$")
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TaskDefinition:
    """What is stored of a task: enough to build and schedule it in any process."""

    name: str
    task_class: str
    interval: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    jitter: float | None = None
    misfire_policy: MisfirePolicy = MisfirePolicy.CATCH_UP_ONCE
    overlap: Overlap = DEFAULT_OVERLAP
    # Why the task cannot be rebuilt in another process, or None if it can.
    not_persistable: str | None = None
    # None: every ``interval`` seconds (as before schedules existed).
    schedule: Schedule | None = None
    # None: the cron.pause_after_failures setting; 0: never.
    pause_after_failures: int | None = None
    ping_url: str | None = None
    catch_up_window: float | None = None
    retries: int = 0
    # None: the default backoff (nanobot.cron.retries.DEFAULT_BACKOFF).
    retry_backoff: RetryBackoff | None = None

    def __post_init__(self) -> None:
        if self.schedule is None:
            object.__setattr__(self, "schedule", IntervalSchedule(seconds=self.interval))

    @property
    def the_schedule(self) -> Schedule:
        """The schedule (never None after construction)."""
        assert self.schedule is not None
        return self.schedule

    def same_schedule_as(self, other: TaskDefinition) -> bool:
        return (
            self.task_class == other.task_class
            and self.the_schedule == other.the_schedule
            and self.interval == other.interval
            and self.kwargs == other.kwargs
            and self.timeout == other.timeout
            and self.jitter == other.jitter
            and self.misfire_policy == other.misfire_policy
            and self.overlap == other.overlap
            and self.pause_after_failures == other.pause_after_failures
            and self.ping_url == other.ping_url
            and self.catch_up_window == other.catch_up_window
            and self.retries == other.retries
            and self.retry_backoff == other.retry_backoff
        )


def class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _captured_kwargs(task: CronTask) -> tuple[dict[str, Any], str | None]:
    """The constructor arguments of ``task`` as keyword arguments, or why they cannot be."""
    args, kwargs = getattr(task, "_init_args", ((), {}))
    try:
        bound = inspect.signature(type(task)).bind(*args, **kwargs)
    except TypeError as exc:
        return {}, f"its constructor arguments cannot be bound: {exc}"
    result: dict[str, Any] = {}
    for pname, value in bound.arguments.items():
        kind = bound.signature.parameters[pname].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                return {}, "its constructor takes *args, which cannot be stored by name"
        elif kind is inspect.Parameter.VAR_KEYWORD:
            result.update(value)
        else:
            result[pname] = value
    schedule = getattr(task, "schedule", None)
    if isinstance(schedule, AtSchedule) and isinstance(result.get("at"), datetime | str):
        # Stored as the resolved instant, so that a rebuild means the same moment whatever
        # the configured zone becomes.
        result["at"] = schedule.at.isoformat()
    try:
        if json.loads(json.dumps(result)) != result:
            return {}, "its constructor arguments do not survive a JSON round trip"
    except (TypeError, ValueError):
        return {}, "its constructor arguments are not plain JSON data"
    return result, None


def definition_of(name: str, task: CronTask) -> TaskDefinition:
    """The storable definition of a registered task instance."""
    cls = type(task)
    path = class_path(cls)
    reason: str | None = None
    if cls.__module__ == "__main__":
        reason = (
            f"its class {cls.__qualname__} lives in __main__, which another process cannot import"
        )
    elif "<locals>" in cls.__qualname__:
        reason = f"its class {cls.__qualname__} is defined inside a function"
    kwargs, kwargs_reason = _captured_kwargs(task)
    reason = reason or kwargs_reason
    return TaskDefinition(
        name=name,
        task_class=path,
        interval=_stored_interval(task),
        kwargs=kwargs,
        timeout=task.timeout,
        jitter=task.jitter,
        misfire_policy=MisfirePolicy(task.misfire_policy),
        overlap=_overlap_of(task),
        not_persistable=reason,
        schedule=_schedule_of(task),
        pause_after_failures=getattr(task, "pause_after_failures", None),
        ping_url=getattr(task, "ping_url", None),
        catch_up_window=getattr(task, "catch_up_window", None),
        retries=getattr(task, "retries", 0),
        retry_backoff=getattr(task, "retry_backoff", None),
    )


def _overlap_of(task: CronTask) -> Overlap:
    policy = getattr(task, "overlap", None)
    count = getattr(task, "max_concurrent", None)
    if policy is not None and OverlapPolicy(policy) is not OverlapPolicy.ALLOW:
        count = None  # a subclass's attribute left at 1 is no contradiction
    return check_overlap(policy, count)


def _schedule_of(task: CronTask) -> Schedule:
    schedule = getattr(task, "schedule", None)
    if isinstance(schedule, IntervalSchedule):
        # A subclass may change self.interval after super().__init__ (or override
        # get_interval): the interval it reports is the one scheduled, as before schedules.
        return IntervalSchedule(seconds=check_interval(task.get_interval()))
    if isinstance(schedule, CronSchedule | AtSchedule):
        return schedule
    return IntervalSchedule(seconds=check_interval(task.get_interval()))


def _stored_interval(task: CronTask) -> float:
    schedule = _schedule_of(task)
    return schedule.seconds if isinstance(schedule, IntervalSchedule) else nominal_period(schedule)
