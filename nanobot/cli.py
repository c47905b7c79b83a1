"""The command line: ``python -m nanobot`` (and ``python -m nanobot.cli``, and ``nanobot``).

Every command but ``run`` only reads or changes the database, whether the service runs or not;
the running service applies changes within ``cron.poll_interval``. Commands other than ``run``
and ``db upgrade`` never create the database nor migrate it.

Exit codes: 0 success (``status``: healthy); 1 ``status``: degraded or unknown, or the service
failed; 2 bad input (usage, an unknown task, an invalid task, a malformed configuration) or,
for ``status``, error or service down; 3 the state could not be read (no database yet, database
unreachable, schema behind or ahead of this nanobot). Errors are one line on standard error:
``nanobot: error: <what is wrong>``.

The commands that need the scheduler import ``nanobot.cron`` (or the service) inside themselves
(``noqa: PLC0415 (loads the scheduler)``): that package loads APScheduler and aiohttp, which
would double the start of every command (``nanobot status``: about 0.3 s, 0.6 s with them).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import click
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from nanobot.alerts import Alert, AlertKind, Severity, alert_key, parse_destinations
from nanobot.alerts.destinations import send
from nanobot.alerts.store import recent
from nanobot.config import Config, get_config
from nanobot.db import (
    check_schema_known,
    current_revision,
    downgrade_database,
    get_engine,
    head_revision,
    upgrade_database,
)
from nanobot.exceptions import (
    ConfigError,
    DatabaseError,
    InvalidScheduleError,
    InvalidTaskError,
    NanobotError,
    TaskError,
)
from nanobot.logging import setup_logging
from nanobot.models import utcnow
from nanobot.node import node_name
from nanobot.preflight import StartupError, check_paths
from nanobot.status import (
    build_heartbeat_status,
    build_status,
    exit_code,
    nanobot_version,
    service_running,
)
from nanobot.times import iso, positive_seconds
from nanobot.web.tokens import check_token_name, hash_token, new_token, parse_token_entries

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNREADABLE: Final = 3

T = TypeVar("T")


class CommandError(click.ClickException):
    """An error reported as one line with a chosen exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.code = exit_code


def _one_line(message: str) -> str:
    return " ".join(message.split())


def _fail(message: str, code: int) -> NoReturn:
    raise CommandError(message, code)


class _Group(click.Group):
    """A group whose errors are one line on stderr, whatever the entry point."""

    def main(  # type: ignore[override]
        self,
        args: list[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            rv = super().main(
                args, prog_name or "nanobot", complete_var, standalone_mode=False, **extra
            )
        except click.exceptions.Exit as exc:  # pragma: no cover - click returns it instead
            rv = exc.exit_code
        except CommandError as exc:
            rv = _report(exc.format_message(), exc.code)
        except click.exceptions.NoArgsIsHelpError as exc:
            # A group without its subcommand: the group's help, as written, not one squeezed
            # error line; the exit code stays click's (2: a command was expected).
            click.echo(exc.format_message(), err=True)
            rv = EXIT_USAGE
        except click.UsageError as exc:
            rv = _report(exc.format_message(), EXIT_USAGE)
        except click.ClickException as exc:
            rv = _report(exc.format_message(), exc.exit_code)
        except click.Abort:
            rv = _report("aborted", EXIT_FAILED)
        except KeyboardInterrupt:
            rv = _report("interrupted", EXIT_FAILED)
        code = rv if isinstance(rv, int) else EXIT_OK
        if standalone_mode:
            sys.exit(code)
        return code


def _report(message: str, code: int) -> int:
    click.echo(f"nanobot: error: {_one_line(message)}", err=True)
    return code


# --- shared plumbing ---------------------------------------------------------------------------


def _config() -> Config:
    try:
        return get_config()
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


def _quiet_logging(cfg: Config) -> None:
    """Commands log warnings to stderr only: stdout stays for their results."""

    values = cfg.as_dict() | {"logging.level": "warning"}
    setup_logging(Config(values, cfg.home, cfg.sources), file=False)


def _sqlite_path(cfg: Config) -> Path | None:
    url = make_url(cfg.database_url)
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _existing_engine(cfg: Config) -> Engine:
    """The engine of an existing database at the schema this nanobot needs, else exit 3."""

    path = _sqlite_path(cfg)
    if path is not None and not path.is_file():
        _fail(
            f"no database at {path}: start the service or run 'nanobot db upgrade' first",
            EXIT_UNREADABLE,
        )
    engine = get_engine(cfg)
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        _fail(f"cannot read the database: {_db_error(exc)}", EXIT_UNREADABLE)
    head = head_revision()
    if current != head:
        try:
            check_schema_known(engine)
        except DatabaseError as exc:
            _fail(str(exc), EXIT_UNREADABLE)
        _fail(
            f"the database schema is at revision {current!r}, this nanobot needs {head!r}: "
            "run 'nanobot db upgrade' (or start the service)",
            EXIT_UNREADABLE,
        )
    return engine


def _db_error(exc: BaseException) -> str:
    # SQLAlchemy's messages carry the statement and a link on further lines: keep the first.
    orig = getattr(exc, "orig", None) or exc
    first = str(orig).strip().splitlines()
    text = first[0] if first else ""
    return f"{orig.__class__.__name__}: {text}"


@contextmanager
def _domain_errors() -> Iterator[None]:
    """Turn nanobot's and the database's errors into one line and an exit code."""
    try:
        yield
    except click.ClickException:
        raise
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except TaskError as exc:
        _fail(str(exc), EXIT_USAGE)
    except DatabaseError as exc:
        _fail(str(exc), EXIT_UNREADABLE)
    except SQLAlchemyError as exc:
        _fail(f"cannot read the database: {_db_error(exc)}", EXIT_UNREADABLE)
    except NanobotError as exc:
        _fail(str(exc), EXIT_FAILED)


def _prepare() -> Config:
    cfg = _config()
    _quiet_logging(cfg)
    return cfg


def _with_engine(action: Callable[[Engine], T]) -> T:
    cfg = _prepare()
    with _domain_errors():
        return action(_existing_engine(cfg))


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, ensure_ascii=False))


def _when(iso: str | None, now: datetime) -> str:
    if iso is None:
        return "-"
    at = datetime.fromisoformat(iso)
    seconds = (at - now).total_seconds()
    stamp = at.strftime("%Y-%m-%d %H:%M:%S")
    return f"{stamp} ({_span(seconds)})"


def _span(seconds: float) -> str:
    future = seconds > 0
    s = abs(seconds)
    if s < 1:
        text = "now"
        return text
    if s < 120:
        text = f"{s:.0f}s"
    elif s < 7200:
        text = f"{s / 60:.0f}m"
    elif s < 172800:
        text = f"{s / 3600:.1f}h"
    else:
        text = f"{s / 86400:.1f}d"
    return f"in {text}" if future else f"{text} ago"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:g}s"


def _short(text: str | None, width: int = 60) -> str:
    if not text:
        return "-"
    line = _one_line(text)
    return line if len(line) <= width else line[: width - 3] + "..."


# --- the group ---------------------------------------------------------------------------------


@click.group(cls=_Group, invoke_without_command=True)
@click.version_option(nanobot_version(), prog_name="nanobot")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """nanobot: persistent periodic tasks, component health and their history.

    Without a command, runs the service (as 'nanobot run').
    """
    if ctx.invoked_subcommand is None:
        ctx.invoke(run)


@cli.command()
def run() -> None:
    """Run the service until SIGINT or SIGTERM."""
    cfg = _config()
    from nanobot.service import run_service  # noqa: PLC0415 (loads the scheduler)

    try:
        # A destination that cannot work is refused now, not at the first alert at 3 a.m.
        try:
            parse_destinations(cfg)
        except ConfigError as exc:
            _fail(str(exc), EXIT_USAGE)
        # Before logging: the log folder may be the path that cannot be used.
        check_paths(cfg)
        setup_logging(cfg)
        from nanobot.cron.taskcode import load_task_code  # noqa: PLC0415 (loads the scheduler)

        with _domain_errors():
            # Imported before anything starts: a module that fails stops the start here.
            load_task_code(cfg)
        code = run_service(cfg)
    except StartupError as exc:
        _fail(str(exc), exc.exit_code)
    if code:
        _fail("the service stopped with an error (see the log above)", code)


# --- status ------------------------------------------------------------------------------------


def _read_status(builder: Callable[[Engine], dict[str, Any]]) -> dict[str, Any]:
    cfg = _prepare()
    with _domain_errors():
        return builder(_existing_engine(cfg))


def _service_lines(data: dict[str, Any], now: datetime) -> list[str]:
    service = data["service"]
    leader = service["leader"] or {}
    up = "up" if service["running"] else "DOWN"
    lines = [
        f"nanobot {nanobot_version()}: {data['status'].upper()}",
        f"service: {up}; last heartbeat {_when(service['last_heartbeat'], now)}"
        + (f" from {service['node']}" if service["node"] else ""),
        "leader: "
        + (
            f"{leader['holder']} (epoch {leader['epoch']}, until "
            f"{_when(leader['expires_at'], now)})"
            if leader.get("held")
            else "none"
        ),
    ]
    system = data.get("system")
    if system is not None:
        counts = system["components"]
        lines.append(
            f"system (last cycle): {system['status']}; components {counts['total']}: "
            f"{counts['healthy']} healthy, {counts['error']} error, {counts['unknown']} unknown"
        )
    for problem in data["problems"]:
        lines.append(f"  ! {problem}")
    return lines


def _component_rows(components: list[dict[str, Any]], now: datetime) -> list[list[str]]:
    return [
        [
            c["name"],
            c["node"],
            c["status"] + ("" if c["current"] else " (stale)"),
            _when(c["last_heartbeat"], now),
            _short(c["last_error"]),
        ]
        for c in components
    ]


def _status_text(data: dict[str, Any]) -> str:
    now = datetime.fromisoformat(data["checked_at"])
    lines = _service_lines(data, now)
    nodes = data["service"].get("nodes") or []
    if nodes:
        lines += ["", "nodes:"]
        lines.append(
            _table(
                ["NODE", "ROLE", "ALIVE", "LAST HEARTBEAT", "STATUS"],
                [
                    [
                        n["node"],
                        "leader" if n.get("leader") else "standby",
                        "yes" if n["fresh"] else "NO",
                        _when(n["last_heartbeat"], now),
                        n["status"],
                    ]
                    for n in nodes
                ],
            )
        )
    lines += ["", "components:"]
    lines.append(
        _table(
            ["NAME", "NODE", "STATUS", "LAST HEARTBEAT", "LAST ERROR"],
            _component_rows(data["components"], now),
        )
    )
    lines += ["", "tasks:"]
    lines.append(
        _table(
            ["NAME", "SCHEDULE", "PAUSED", "NEXT RUN", "LAST RUN", "OUTCOME", "FAILURES"],
            [
                [
                    t["name"],
                    t.get("schedule") or _seconds(t["interval"]),
                    "yes" if t["paused"] else "no",
                    _when(t["next_run_at"], now),
                    _when(t["last_run_at"], now),
                    ("BROKEN" if t["broken"] else (t["last_outcome"] or "-")),
                    str(t["consecutive_failures"]),
                ]
                for t in data["tasks"]
            ],
        )
    )
    code = data.get("code") or []
    if code:
        lines += ["", "task code:"]
        lines.append(
            _table(
                ["NODE", "KIND", "NAME", "STATE"],
                [
                    [
                        c["node"],
                        c["kind"],
                        c["name"],
                        ("ERROR: " + _short(c["error"], 80))
                        if c["error"]
                        else ("loaded; NEWER ON DISK: restart" if c["newer_on_disk"] else "loaded")
                        if c["kind"] == "module"
                        else "synced",
                    ]
                    for c in code
                ],
            )
        )
    return "\n".join(lines)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (see the README).")
def status(as_json: bool) -> None:
    """The service, the system, each component and each task.

    Exit code: 0 healthy, 1 degraded or unknown, 2 error or service down, 3 state unreadable.
    """

    data = _read_status(build_status)
    click.echo(json.dumps(data, indent=2, ensure_ascii=False) if as_json else _status_text(data))
    sys.exit(exit_code(data))


@cli.group()
def heartbeat() -> None:
    """The heartbeat monitor's records."""


@heartbeat.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def heartbeat_status(as_json: bool) -> None:
    """Components in detail: their last 10 errors and recent status changes.

    Exit code as for 'nanobot status'.
    """

    data = _read_status(build_heartbeat_status)
    if as_json:
        _echo_json(data)
    else:
        now = datetime.fromisoformat(data["checked_at"])
        lines = _service_lines(data, now)
        for c in data["components"]:
            lines += [
                "",
                f"{c['name']} on {c['node']}: {c['status']}"
                + ("" if c["current"] else " (stale: its node stopped beating)")
                + f"; last heartbeat {_when(c['last_heartbeat'], now)}",
            ]
            if c["last_error"]:
                lines.append(f"  last error: {_short(c['last_error'], 200)}")
            if c["errors"]:
                lines.append("  errors:")
                lines += [
                    f"    {_when(e['at'], now)}  {_short(e['error'], 100)}" for e in c["errors"]
                ]
            if c["status_changes"]:
                lines.append("  status changes:")
                lines += [
                    f"    {_when(s['at'], now)}  {s['from'] or '-'} -> {s['to']}"
                    + (f"  ({_short(s['reason'], 80)})" if s["reason"] else "")
                    for s in c["status_changes"]
                ]
        if not data["components"]:
            lines += ["", "no component has been recorded yet"]
        click.echo("\n".join(lines))
    sys.exit(exit_code(data))


# --- cron --------------------------------------------------------------------------------------


@cli.group()
def cron() -> None:
    """Stored periodic tasks: list, add, remove, pause, resume, run now, history.

    Changes take effect within cron.poll_interval while the service runs, else at its next start.
    """


def _window(raw: str | None) -> float | None:
    """--catch-up-window: seconds or a duration such as 10m."""
    from nanobot.cron.schedules import parse_every  # noqa: PLC0415 (loads the scheduler)

    if raw is None:
        return None
    try:
        return parse_every(raw).seconds
    except InvalidTaskError:
        raise InvalidTaskError(
            f"--catch-up-window must be seconds or a duration like 90s, 10m, 1h, got {raw!r}"
        ) from None


def _parse_interval(raw: str) -> float | int:

    try:
        value = positive_seconds(float(raw), "--interval", InvalidTaskError)
    except ValueError:
        raise InvalidTaskError(
            f"--interval must be a positive number of seconds, got {raw!r}"
        ) from None
    return int(value) if value.is_integer() else value


def _instant(value: datetime | None, info: Any) -> str:
    """An instant on the task's clock and in UTC: ``2026-03-08 03:00:00 EDT (-04:00) =
    07:00:00 UTC`` (an interval task: UTC only)."""
    from nanobot.cron.schedules import IntervalSchedule, format_local  # noqa: PLC0415 (loads the scheduler)

    if value is None:
        return "-"
    utc_text = f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    if isinstance(info.schedule, IntervalSchedule) or info.schedule.timezone == "UTC":
        return utc_text
    return f"{format_local(value, info.schedule.timezone)} = {utc_text}"


def _task_line(info: Any) -> str:
    from nanobot.cron.schedules import describe  # noqa: PLC0415 (loads the scheduler)

    if info.done:
        return f"task {info.name!r} ran {describe(info.schedule)}; it is done"
    if info.paused:
        return (
            f"task {info.name!r} ({describe(info.schedule)}) is paused "
            "(no next run until 'nanobot cron resume')"
        )
    return (
        f"task {info.name!r} runs {describe(info.schedule)}; "
        f"next run {_instant(info.next_run_at, info)}"
    )


def _applied_note(engine: Engine) -> str:

    try:
        running = service_running(engine)
    except Exception:
        running = False
    if running:
        return "the running service applies it within seconds"
    return "the service is not running: it applies this at its next start"


def _state(info: Any) -> str:
    if info.done:
        return "done"
    if not info.paused:
        if info.retry_at is not None:
            # A failed slot waiting for its next attempt (docs/failures.md).
            due = _when(info.retry_at.isoformat(), utcnow())
            return f"retrying: attempt {info.retry_attempt} {due}"
        return "active"
    if info.auto_paused_at is not None:
        return "PAUSED: " + _short(info.pause_reason, 60)
    return "paused: " + _short(info.pause_reason, 60) if info.pause_reason else "paused"


@cron.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of tasks.")
def cron_list(as_json: bool) -> None:
    """Every stored task, its schedule in words and its next run (its zone's clock and UTC)."""
    from nanobot.cron.control import list_tasks  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.schedules import describe  # noqa: PLC0415 (loads the scheduler)

    tasks = _with_engine(list_tasks)
    if as_json:
        _echo_json([t.to_json() for t in tasks])
        return
    if not tasks:
        click.echo("no tasks")
        return
    now = utcnow()
    click.echo(
        _table(
            ["NAME", "TASK", "SCHEDULE", "STATE", "NEXT RUN", "LAST RUN", "OUTCOME"],
            [
                [
                    t.name,
                    t.task_class,
                    describe(t.schedule),
                    _state(t),
                    _instant(t.next_run_at, t)
                    + (
                        f" ({_span((t.next_run_at - now).total_seconds())})"
                        if t.next_run_at
                        else ""
                    ),
                    _when(t.last_run_at.isoformat() if t.last_run_at else None, now),
                    ("BROKEN: " + _short(t.error, 40)) if t.error else (t.last_outcome or "-"),
                ]
                for t in tasks
            ],
        )
    )


def _command_kwargs(
    command: str, shell: bool, cwd: str | None, env: tuple[str, ...], raw_kwargs: str | None
) -> dict[str, Any]:

    if raw_kwargs:
        raise InvalidTaskError("--kwargs is for --task; a command takes --shell, --cwd and --env")
    kwargs: dict[str, Any] = {"command": command}
    if shell:
        kwargs["shell"] = True
    if cwd:
        kwargs["cwd"] = cwd
    if env:
        pairs: dict[str, str] = {}
        for item in env:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InvalidTaskError(f"--env must be NAME=VALUE, got {item!r}")
            pairs[key] = value
        kwargs["env"] = pairs
    return kwargs


def _shell_syntax_note(command: str) -> str | None:
    """Why an argv command (no ``--shell``) may not do what it reads as, if it uses shell syntax.

    Without a shell, ``echo a; exit 3`` runs ``echo`` with the arguments ``a;``, ``exit`` and
    ``3`` and succeeds: the run would say ``success`` for what the user meant to fail.
    """
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:
        return None  # unbalanced quotes: the task itself reports them
    syntax = [w for w in words if w in _SHELL_OPERATORS or w.startswith("$")]
    if not syntax:
        return None
    return (
        f"the command runs without a shell, so {syntax[0]!r} reaches the program as a word; "
        "add --shell for pipes, redirections, ';', '&&' or $VARIABLES"
    )


# The shell's operators, as shlex's punctuation_chars splits them out of a command.
_SHELL_OPERATORS: Final = frozenset({";", "|", "||", "&", "&&", ">", ">>", "<", "<<", "2>", ";;"})


def _wait_for_service(engine: Engine, name: str, poll: float) -> str | None:
    """After an add while the service runs: why the service could not build the task, if so.

    Waits (at most a few polls of the scheduler) until the service has run the task, marked it
    broken, or the time is up.
    """

    from nanobot.cron.control import get_task, task_history  # noqa: PLC0415 (loads the scheduler)

    deadline = time.monotonic() + min(10.0, 3 * poll + 2.0)
    while time.monotonic() < deadline:
        info = get_task(engine, name)
        if info.error:
            return info.error
        runs = task_history(engine, name, 1)
        if runs and runs[0].outcome.value != "running":
            return None
        time.sleep(0.1)
    return None


@cron.command("next")
@click.argument("name")
@click.option(
    "-n",
    "count",
    type=click.IntRange(min=1, max=1000),
    default=5,
    show_default=True,
    help="How many fire times.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object.")
def cron_next(name: str, count: int, as_json: bool) -> None:
    """The next fire times of task NAME, on its zone's clock and in UTC. Changes nothing."""
    from nanobot.cron.control import get_task  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.schedules import describe  # noqa: PLC0415 (loads the scheduler)

    info = _with_engine(lambda engine: get_task(engine, name))
    times = info.upcoming(count, utcnow())
    if as_json:
        _echo_json(
            {
                "name": info.name,
                "schedule": describe(info.schedule),
                "paused": info.paused,
                "done": info.done,
                "next": [
                    {
                        "utc": t.astimezone(UTC).isoformat(),
                        "local": info.to_json()["next_run_local"]
                        if t == info.next_run_at
                        else _local_iso(t, info),
                    }
                    for t in times
                ],
            }
        )
        return
    header = f"task {info.name!r} runs {describe(info.schedule)}"
    if info.done:
        click.echo(f"{header}; it is done: no next run")
        return
    if info.paused:
        header += "; it is paused, so these are the runs if it were resumed now"
    click.echo(header)
    if not times:
        click.echo("no next run")
    for t in times:
        click.echo(f"  {_instant(t, info)}")


def _local_iso(value: datetime, info: Any) -> str:
    from nanobot.cron.schedules import IntervalSchedule, zone  # noqa: PLC0415 (loads the scheduler)

    tz = "UTC" if isinstance(info.schedule, IntervalSchedule) else info.schedule.timezone
    return value.astimezone(zone(tz)).isoformat()


def _schedule_option(
    every: str | None,
    interval: str | None,
    cron_expr: str | None,
    at: str | None,
    tz: str | None,
    cfg: Config,
) -> tuple[Any, str | None]:
    """The one schedule the options give, and a note for the reader (an ambiguous time)."""
    from nanobot.cron.schedules import ParsedAt, parse_every, resolve_schedule  # noqa: PLC0415 (loads the scheduler)

    given = [
        f"--{n}"
        for n, v in (("every", every), ("interval", interval), ("cron", cron_expr), ("at", at))
        if v is not None
    ]
    if not given:
        raise InvalidScheduleError(
            "give a schedule: --every 5m (or --interval SECONDS), --cron EXPR or --at TIME"
        )
    if len(given) > 1:
        raise InvalidScheduleError(f"give one schedule, not {' and '.join(given)}")
    if tz is not None and (every is not None or interval is not None):
        raise InvalidScheduleError("--tz applies to --cron and --at, not to an interval")
    if interval is not None:
        return parse_every(_parse_interval(interval)), None
    if every is not None:
        return parse_every(every), None
    resolved = resolve_schedule(
        cron=cron_expr,
        at=at,
        tz=tz,
        default_tz=str(cfg.get("scheduler.timezone", "UTC")),
        now=utcnow(),
    )
    if isinstance(resolved, ParsedAt):
        return resolved.schedule, resolved.note
    return resolved, None


@cron.command("add")
@click.argument("name")
@click.option("--task", "task_class", default=None, help="The class, as pkg.module:Class.")
@click.option("--command", default=None, help="A command to run instead of a class.")
@click.option("--shell", is_flag=True, help="Run --command through /bin/sh -c (else as argv).")
@click.option("--cwd", default=None, help="The folder --command runs in.")
@click.option("--env", multiple=True, help="NAME=VALUE added to --command's environment.")
@click.option("--every", default=None, help="Run every 30s, 5m, 1h, 1h30m, 2d...")
@click.option("--interval", default=None, help="Seconds between runs (same as --every N).")
@click.option("--cron", "cron_expr", default=None, help="A cron expression: '0 9 * * 1-5', @daily.")
@click.option(
    "--at",
    default=None,
    help="Run once at this time: 2026-12-24T17:30 (read in --tz), with an offset, or 17:30.",
)
@click.option(
    "--tz", default=None, help="IANA zone of --cron and --at (default scheduler.timezone)."
)
@click.option("--timeout", type=float, default=None, help="Seconds a run may take.")
@click.option("--jitter", type=float, default=None, help="Up to this many seconds added to starts.")
@click.option(
    "--misfire",
    "misfire",
    type=click.Choice(["catch_up_once", "skip"]),
    default=None,
    help="Slots missed while nothing ran: run the latest once (default), or skip them all.",
)
@click.option(
    "--overlap",
    type=click.Choice(["skip", "buffer_one", "cancel_previous", "allow"]),
    default=None,
    help="A slot that comes while a run still goes: skip it (default), buffer one, cancel the "
    "run in flight, or allow runs side by side.",
)
@click.option(
    "--max-concurrent",
    "max_concurrent",
    type=click.IntRange(min=1),
    default=None,
    help="With --overlap allow: at most N runs at once (default 2); more slots are skipped.",
)
@click.option(
    "--pause-after-failures",
    "pause_after_failures",
    type=click.IntRange(min=0),
    default=None,
    help="Pause it after N consecutive failed slots (0: never; default cron.pause_after_failures).",
)
@click.option(
    "--ping-url",
    "ping_url",
    default=None,
    help="Ping this healthchecks.io-style URL at each run's start (/start) and end (/fail).",
)
@click.option(
    "--catch-up-window",
    "catch_up_window",
    default=None,
    help="A missed slot later than this (10m, 1h, seconds) is recorded missed, not caught up.",
)
@click.option(
    "--retries",
    "retries",
    type=int,
    default=None,
    help="Attempts of a failed slot after its first (0: none, the default).",
)
@click.option(
    "--retry-backoff",
    "retry_backoff",
    default=None,
    help="Wait before each retry: BASE,FACTOR,MAX[,JITTER], e.g. 1s,2,60s (default 30s,2,1h).",
)
@click.option("--kwargs", "raw_kwargs", default=None, help="Constructor arguments: a JSON object.")
@click.option("--paused", is_flag=True, help="Store it paused: no run until 'cron resume'.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored task as JSON.")
def cron_add(
    name: str,
    task_class: str | None,
    command: str | None,
    shell: bool,
    cwd: str | None,
    env: tuple[str, ...],
    every: str | None,
    interval: str | None,
    cron_expr: str | None,
    at: str | None,
    tz: str | None,
    timeout: float | None,
    jitter: float | None,
    misfire: str | None,
    overlap: str | None,
    max_concurrent: int | None,
    pause_after_failures: int | None,
    ping_url: str | None,
    catch_up_window: str | None,
    retries: int | None,
    retry_backoff: str | None,
    raw_kwargs: str | None,
    paused: bool,
    as_json: bool,
) -> None:
    """Add task NAME with one schedule: --every (first run at once), --cron or --at.

    The task is a class (--task) or a command (--command). A class is checked as the service
    sees it: with tasks.path on sys.path and tasks.modules imported. While the service runs and
    the first run is due at once, this waits for it and says if the service could not build the
    task.
    """
    from nanobot.cron.command import CommandTask  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.control import add_task  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.definitions import definition_from_class, parse_kwargs  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.task import class_path  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.taskcode import load_task_code  # noqa: PLC0415 (loads the scheduler)

    if (task_class is None) == (command is None):
        _fail("give either --task pkg.module:Class or --command '...'", EXIT_USAGE)
    if command is None and (shell or cwd or env):
        _fail("--shell, --cwd and --env go with --command", EXIT_USAGE)
    cfg = _prepare()
    with _domain_errors():
        # Everything is validated before the database is touched.
        schedule, note = _schedule_option(every, interval, cron_expr, at, tz, cfg)
        if command is not None:
            kwargs = _command_kwargs(command, shell, cwd, env, raw_kwargs)
            # The running instance applies these; the definition stores them too.
            for key, value in (("timeout", timeout), ("jitter", jitter)):
                if value is not None:
                    kwargs[key] = value
            path = class_path(CommandTask)
        else:
            assert task_class is not None
            load_task_code(cfg, stop_on_error=False)
            kwargs, path = parse_kwargs(raw_kwargs), task_class
        definition = definition_from_class(
            name,
            path,
            kwargs=kwargs,
            schedule=schedule,
            timeout=timeout,
            jitter=jitter,
            misfire_policy=misfire,
            overlap=overlap,
            max_concurrent=max_concurrent,
            pause_after_failures=pause_after_failures,
            ping_url=ping_url,
            catch_up_window=_window(catch_up_window),
            retries=retries,
            retry_backoff=retry_backoff,
        )
        engine = _existing_engine(cfg)
        info = add_task(engine, definition, paused=paused)
        applied = _applied_note(engine)
        broken = None
        due_now = info.next_run_at is not None and info.next_run_at <= utcnow()
        if due_now and service_running(engine):
            broken = _wait_for_service(engine, name, float(cfg["cron.poll_interval"]))
    if note is not None:
        click.echo(f"nanobot: note: {note}", err=True)
    shell_note = None if command is None or shell else _shell_syntax_note(command)
    if shell_note is not None:
        click.echo(f"nanobot: note: {shell_note}", err=True)
    if as_json:
        _echo_json(info.to_json() | {"note": note})
    else:
        click.echo(f"added: {_task_line(info)}; {applied}")
    if broken:
        _fail(
            f"task {name!r} is stored, but the running service cannot build it: {broken} "
            "(make its module importable by the service with tasks.path or tasks.modules, "
            "and restart it)",
            EXIT_FAILED,
        )


def _simple_change(
    name: str, as_json: bool, verb: str, change: Callable[[Engine, str], Any]
) -> None:
    cfg = _prepare()
    with _domain_errors():
        engine = _existing_engine(cfg)
        info = change(engine, name)
        note = _applied_note(engine)
    if as_json:
        _echo_json(info.to_json())
    else:
        click.echo(f"{verb}: {_task_line(info)}; {note}")


@cron.command("remove")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print {'removed': NAME}.")
def cron_remove(name: str, as_json: bool) -> None:
    """Remove task NAME (its run history stays until retention prunes it)."""
    from nanobot.cron.control import remove_task  # noqa: PLC0415 (loads the scheduler)

    cfg = _prepare()
    with _domain_errors():
        engine = _existing_engine(cfg)
        remove_task(engine, name)
        note = _applied_note(engine)
    if as_json:
        _echo_json({"removed": name})
    else:
        click.echo(f"removed: task {name!r}; {note}")


@cron.command("pause")
@click.argument("name")
@click.option("--note", default=None, help="Why: shown by 'cron list' and 'status' until resumed.")
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON.")
def cron_pause(name: str, note: str | None, as_json: bool) -> None:
    """Pause task NAME: no next run until resumed; a run in flight finishes."""
    from nanobot.cron.control import pause_task  # noqa: PLC0415 (loads the scheduler)

    _simple_change(name, as_json, "paused", lambda engine, n: pause_task(engine, n, note))


@cron.command("resume")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON.")
def cron_resume(name: str, as_json: bool) -> None:
    """Resume task NAME on its original grid (clearing why it was paused)."""
    from nanobot.cron.control import resume_task  # noqa: PLC0415 (loads the scheduler)

    _simple_change(name, as_json, "resumed", resume_task)


@cron.command("run")
@click.argument("name")
@click.option(
    "--force", is_flag=True, help="Run it now even beside a run in flight (ignore --overlap)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the task as JSON.")
def cron_run(name: str, force: bool, as_json: bool) -> None:
    """Run task NAME once now, outside its schedule.

    The run obeys the task's overlap policy: with skip (the default) and a run in flight, it is
    refused here (exit code 1, nothing requested); if a run starts between this check and the
    service's next pass, the requested run is recorded skipped in 'cron history'. --force runs
    it whatever the policy, beside the run in flight.
    """
    from nanobot.cron import control, history  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.overlap import Action, RunKind, decide  # noqa: PLC0415 (loads the scheduler)

    cfg = _prepare()
    with _domain_errors():
        engine = _existing_engine(cfg)
        info = control.get_task(engine, name)
        # Rows left running by a service that is not running are not runs in flight (they
        # are recorded interrupted when it starts): only a running service's count.
        running = history.runs_in_flight(engine, name) if service_running(engine) else []
        if info.backfill is not None:
            # A backfill's runs do not count for the policy (as in the scheduler).
            first, last, _ = info.backfill
            running = [r for r in running if not first <= r.scheduled_at <= last]
        action = (
            Action.START
            if force
            else decide(info.overlap, RunKind.MANUAL, running=len(running), buffered=False)
        )
        if action is Action.SKIP:
            since = running[0].scheduled_at.isoformat()
            _fail(
                f"task {name!r} has {len(running)} run(s) in flight (the oldest scheduled at "
                f"{since}) and its overlap policy is {info.overlap.describe()}: no run "
                "requested (--force runs it beside them)",
                EXIT_FAILED,
            )
        info = control.request_run(engine, name, force=force)
        note = _applied_note(engine)
    what = {
        Action.START: "run requested",
        Action.BUFFER: "run requested (a run is in flight: it starts when that run ends)",
        Action.CANCEL_AND_START: "run requested (the run in flight is cancelled first)",
    }[action]
    if force and running:
        what = f"forced run requested (beside {len(running)} run(s) in flight)"
    if as_json:
        _echo_json(info.to_json() | {"request": action.value, "forced": force})
    else:
        click.echo(f"{what}: {_task_line(info)}; {note}")


@cron.command("backfill")
@click.argument("name")
@click.option(
    "--from", "start", required=True, help="First instant of the range, as --at takes it."
)
@click.option("--to", "end", required=True, help="Last instant of the range (not in the future).")
@click.option(
    "--tz", default=None, help="IANA zone of naive times (default: the task's, else UTC)."
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="How many of the range's slots run at once.",
)
@click.option("--yes", is_flag=True, help="Run more than scheduler.backfill_max_slots slots.")
@click.option("--json", "as_json", is_flag=True, help="Print what was requested as JSON.")
def cron_backfill(
    name: str,
    start: str,
    end: str,
    tz: str | None,
    concurrency: int,
    yes: bool,
    as_json: bool,
) -> None:
    """Run each past slot of task NAME from --from to --to that never ran.

    A slot with no history row (or recorded missed) runs once, recorded with its own
    scheduled time; slots that ran are left alone, so running the same backfill again does
    nothing more. The running service's leader runs them, one at a time (or --concurrency at
    once); 'cron history NAME' shows them as they end.
    """
    from nanobot.cron import backfill, control  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.schedules import IntervalSchedule  # noqa: PLC0415 (loads the scheduler)

    cfg = _prepare()
    with _domain_errors():
        engine = _existing_engine(cfg)
        info = control.get_task(engine, name)
        if tz is None:
            tz = (
                str(cfg.get("scheduler.timezone", "UTC"))
                if isinstance(info.schedule, IntervalSchedule)
                else info.schedule.timezone
            )
        first = backfill.parse_time(start, tz, "--from")
        last = backfill.parse_time(end, tz, "--to")
        plan = backfill.request_backfill(
            engine,
            name,
            first,
            last,
            concurrency=concurrency,
            max_slots=int(cfg.get("scheduler.backfill_max_slots", 100)),
            confirmed=yes,
            now=utcnow(),
        )
        note = _applied_note(engine) if plan.stored else None
    if as_json:
        _echo_json(plan.to_json())
        return
    from nanobot.cron.schedules import zone  # noqa: PLC0415 (loads the scheduler)

    def local(value: datetime) -> str:
        return value.astimezone(zone(tz)).isoformat()

    span = f"from {local(first)} to {local(last)}"
    if not plan.stored:
        if plan.slots == 0:
            click.echo(
                f"nothing to backfill: task {name!r} has no slot {span} by its schedule "
                "(an interval task's slots begin when it was first started)"
            )
        else:
            click.echo(
                f"nothing to backfill: task {name!r} has {plan.slots} slot(s) {span}, "
                "and every one has run or been recorded"
            )
        return
    click.echo(
        f"backfill requested: task {name!r}, {len(plan.to_run)} of {plan.slots} slot(s) {span} "
        f"(first {local(plan.to_run[0])}, last {local(plan.to_run[-1])}), {concurrency} at a "
        f"time; {note}"
    )
    if info.paused:
        click.echo(
            f"nanobot: note: task {name!r} is paused: its backfill starts when it is resumed "
            f"(nanobot cron resume {name})",
            err=True,
        )


@cron.command("history")
@click.argument("name")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--output", "show_output", is_flag=True, help="Print each run's command output.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of runs.")
def cron_history(name: str, limit: int, show_output: bool, as_json: bool) -> None:
    """The last runs of task NAME, newest first."""
    from nanobot.cron.control import task_history  # noqa: PLC0415 (loads the scheduler)

    runs = _with_engine(lambda engine: task_history(engine, name, limit))
    if as_json:
        _echo_json([r.to_json() for r in runs])
        return
    if not runs:
        click.echo(f"task {name!r} has no runs yet")
        return
    now = utcnow()
    # Attempts of one slot are listed together, each with its number.
    retried = {r.scheduled_at for r in runs if r.attempt > 1}

    def attempt(r: Any) -> str:
        return f" (attempt {r.attempt})" if r.scheduled_at in retried else ""

    if show_output:
        for r in runs:
            click.echo(
                f"--- {r.scheduled_at.isoformat()}{attempt(r)} {r.outcome.value}"
                + (f": {_short(r.error, 200)}" if r.error else "")
            )
            if r.output:
                click.echo(r.output.rstrip("\n"))
        return
    click.echo(
        _table(
            ["SCHEDULED", "STARTED", "DURATION", "OUTCOME", "ERROR"],
            [
                [
                    _when(r.scheduled_at.isoformat(), now),
                    r.started_at.strftime("%H:%M:%S") if r.started_at else "-",
                    f"{r.duration:.3f}s" if r.duration is not None else "-",
                    r.outcome.value
                    + (f" x{r.slots}" if r.slots > 1 else "")
                    + (" (manual)" if r.manual else "")
                    + attempt(r),
                    _short(r.error),
                ]
                for r in runs
            ],
        )
    )


# --- alerts ------------------------------------------------------------------------------------


@cli.group()
def alerts() -> None:
    """Alerts: what was raised and delivered, and a test message (see docs/alerts.md)."""


@alerts.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--json", "as_json", is_flag=True, help="Print the alerts as JSON.")
def alerts_list(limit: int, as_json: bool) -> None:
    """The newest alerts, with each destination's delivery state and attempts."""

    views = _with_engine(lambda engine: recent(engine, limit=limit))
    if as_json:
        _echo_json(
            [
                {
                    "id": v.id,
                    "key": v.alert.key,
                    "kind": v.alert.kind.value,
                    "subject": v.alert.subject,
                    "severity": v.alert.severity.value,
                    "title": v.alert.title,
                    "body": v.alert.body,
                    "link": v.alert.link,
                    "count": v.alert.count,
                    "members": list(v.alert.members),
                    "created_at": v.alert.created_at.isoformat(),
                    "deliveries": [
                        {
                            "destination": d.destination,
                            "state": d.state.value,
                            "attempts": d.attempts,
                            "last_attempt_at": iso(d.last_attempt_at),
                            "next_attempt_at": iso(d.next_attempt_at),
                            "sent_at": iso(d.sent_at),
                            "last_error": d.last_error,
                        }
                        for d in v.deliveries
                    ],
                }
                for v in views
            ]
        )
        return
    if not views:
        click.echo("no alert yet")
        return
    now = utcnow()
    rows: list[list[str]] = []
    for v in views:
        deliveries = (
            "; ".join(
                f"{d.destination} {d.state.value} x{d.attempts}"
                + (f" ({_short(d.last_error, 40)})" if d.last_error and d.state != "sent" else "")
                for d in v.deliveries
            )
            or "no destination"
        )
        rows.append(
            [
                _when(v.alert.created_at.isoformat(), now),
                v.alert.severity.value,
                v.alert.kind.value,
                _short(v.alert.subject, 40),
                deliveries,
            ]
        )
    click.echo(_table(["created", "severity", "kind", "subject", "deliveries"], rows))


@alerts.command("test")
@click.argument("destination", required=False)
def alerts_test(destination: str | None) -> None:
    """Send a test message to DESTINATION (a name) or to every destination, now.

    Exit code 0 if every one accepted it, 1 if one did not.
    """

    cfg = _prepare()
    try:
        destinations = parse_destinations(cfg)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    if not destinations:
        _fail("no destination is configured (alerts.destinations)", EXIT_USAGE)
    if destination is not None:
        chosen = [d for d in destinations if d.name == destination]
        if not chosen:
            names = ", ".join(d.name for d in destinations)
            _fail(f"unknown destination {destination!r} (configured: {names})", EXIT_USAGE)
        destinations = tuple(chosen)

    alert = Alert(
        key=alert_key("test", uuid.uuid4().hex),
        kind=AlertKind.TEST,
        subject="test",
        severity=Severity.INFO,
        title="nanobot: test message",
        body=f"A test message from nanobot on {node_name(cfg)}: alerts reach this destination.",
        created_at=utcnow(),
    )
    failed = 0
    for d in destinations:
        result = send(d, alert, timeout=float(cfg["alerts.send_timeout"]))
        if result.ok:
            click.echo(f"{d.name}: sent ({d.shown})")
        else:
            failed += 1
            click.echo(f"{d.name}: FAILED ({d.shown}): {result.error}")
    if failed:
        sys.exit(EXIT_FAILED)


# --- tasks -------------------------------------------------------------------------------------


@cli.group()
def tasks() -> None:
    """The task file (tasks.toml) and task code.

    The service syncs the task file at start and whenever it changes; task modules are
    imported at start (a change to them needs a restart: 'status' says when one is due).
    """


def _read_file_tasks(cfg: Config) -> tuple[Path, Any]:
    from nanobot.cron.taskcode import load_task_code  # noqa: PLC0415 (loads the scheduler)
    from nanobot.cron.taskfile import read_task_file, task_file_path  # noqa: PLC0415 (loads the scheduler)

    path = task_file_path(cfg)
    load_task_code(cfg, stop_on_error=False)
    found = read_task_file(path, default_tz=str(cfg.get("scheduler.timezone", "UTC")))
    if found is None:
        _fail(f"no task file at {path} (tasks.file)", EXIT_USAGE)
    return path, found


@tasks.command("check")
def tasks_check() -> None:
    """Validate the task file without applying it."""
    cfg = _prepare()
    with _domain_errors():
        path, found = _read_file_tasks(cfg)
    click.echo(f"{path}: {len(found)} task(s), valid")


@tasks.command("sync")
@click.option("--json", "as_json", is_flag=True, help="Print what changed as JSON.")
def tasks_sync(as_json: bool) -> None:
    """Apply the task file now: the whole file, or nothing if any of it is invalid."""
    from nanobot.cron.taskfile import apply_tasks  # noqa: PLC0415 (loads the scheduler)

    cfg = _prepare()
    with _domain_errors():
        path, found = _read_file_tasks(cfg)
        engine = _existing_engine(cfg)
        result = apply_tasks(engine, found, path)
        note = _applied_note(engine)
    if as_json:
        _echo_json(result.to_json())
    else:
        counts = ", ".join(f"{len(v)} {k}" for k, v in result.to_json().items() if v)
        click.echo(f"{path}: {counts or 'nothing to do'}; {note}")
    clash = result.clash_error(path)
    if clash:
        _fail(clash, EXIT_USAGE)


# --- http --------------------------------------------------------------------------------------


@cli.group("http")
def http_group() -> None:
    """The HTTP endpoint: tokens of the dashboard and the REST API."""


@http_group.command("token")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="The token may read, not change anything.")
@click.option(
    "--stdin", "from_stdin", is_flag=True, help="Hash a token read from standard input instead."
)
def http_token(name: str, read_only: bool, from_stdin: bool) -> None:
    """Make a new token NAME: print it once, and the entry that goes in http.tokens.

    Only the hash is stored in the configuration; keep the token itself somewhere safe.
    """

    try:
        check_token_name(name)
    except ValueError as exc:
        _fail(str(exc), EXIT_USAGE)
    token = sys.stdin.readline().strip() if from_stdin else new_token()
    if not token:
        _fail("no token on standard input", EXIT_USAGE)
    entry = {"name": name, "hash": hash_token(token), "read_only": read_only}
    try:
        parse_token_entries([entry])
    except ValueError as exc:
        _fail(f"token name: {exc}", EXIT_USAGE)
    if not from_stdin:
        click.echo(f"token (shown once): {token}")
    click.echo(f"http.tokens entry: {json.dumps(entry)}")
    click.echo(
        "token file line: " + f"{name} {entry['hash']}" + (" read-only" if read_only else "")
    )


# --- db ----------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The database schema (Alembic): upgrade, downgrade, current."""


@db.command("upgrade")
@click.argument("revision", default="head")
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION (default head); creates the database if need be."""

    cfg = _prepare()
    with _domain_errors():
        engine = get_engine(cfg)
        upgrade_database(engine, revision)
        click.echo(f"database at revision {current_revision(engine)}")


@db.command("downgrade")
@click.argument("revision")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    from alembic.util import CommandError as AlembicError  # noqa: PLC0415 (Alembic: db commands only)

    cfg = _prepare()
    path = _sqlite_path(cfg)
    if path is not None and not path.is_file():
        _fail(f"no database at {path}", EXIT_UNREADABLE)
    with _domain_errors():
        engine = get_engine(cfg)
        try:
            downgrade_database(engine, revision)
        except AlembicError as exc:
            _fail(f"cannot downgrade to {revision!r}: {exc}", EXIT_USAGE)
        click.echo(f"database at revision {current_revision(engine)}")


@db.command("current")
@click.option("--json", "as_json", is_flag=True, help="Print {current, head, up_to_date}.")
def db_current(as_json: bool) -> None:
    """The schema revision of the database and the newest this nanobot knows."""

    cfg = _prepare()
    path = _sqlite_path(cfg)
    if path is not None and not path.is_file():
        _fail(f"no database at {path}: run 'nanobot db upgrade'", EXIT_UNREADABLE)
    with _domain_errors():
        engine = get_engine(cfg)
        current = current_revision(engine)
        # A revision this nanobot does not know comes from a newer one: exit 3, never "behind".
        check_schema_known(engine)
    head = head_revision()
    if as_json:
        _echo_json({"current": current, "head": head, "up_to_date": current == head})
    else:
        note = "up to date" if current == head else "behind: run 'nanobot db upgrade'"
        click.echo(f"current {current or '(empty)'}; head {head}; {note}")


def main() -> None:
    """The console script ``nanobot`` and ``python -m nanobot``."""
    cli()


if __name__ == "__main__":
    main()
