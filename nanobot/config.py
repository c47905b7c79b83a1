"""Typed, validated configuration.

Sources, later wins: the built-in defaults below < ``$NANOBOT_HOME/config.json`` < environment
variables ``NANOBOT_<SECTION>__<KEY>`` (``NANOBOT_HEARTBEAT__INTERVAL=5``). Every value is
checked when the configuration loads, so a bad value is refused once, at start, with a message
that names its source, its key and what is expected, instead of failing later in a task.

``get_config().get("heartbeat.interval", 30)`` reads a dotted key, as the seed does.
"""

from __future__ import annotations

import json
import math
import os
import threading
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from nanobot.exceptions import ConfigError
from nanobot.times import is_positive_number
from nanobot.web.tokens import parse_token_entries

ENV_PREFIX: Final = "NANOBOT_"
HOME_ENV: Final = "NANOBOT_HOME"
CONFIG_FILE_NAME: Final = "config.json"


def _positive_number(value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("a positive number") from None
    if not is_positive_number(value):
        raise ValueError("a positive number")
    return float(value)


def _non_negative_number(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a number >= 0")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError("a number >= 0") from None
    if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError("a number >= 0")
    return float(value)


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a positive whole number")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError("a positive whole number") from None
    if not isinstance(value, int) or value <= 0:
        raise ValueError("a positive whole number")
    return value


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a whole number >= 0")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError("a whole number >= 0") from None
    if not isinstance(value, int) or value < 0:
        raise ValueError("a whole number >= 0")
    return value


def _dispatch_ahead(value: Any) -> float:
    # Below 0.1 s a pass could not claim ahead of its own wakeup margin (launcher.SCHEDULE_LEAD
    # plus dispatch.PASS_MARGIN); above 1 s a crash would leave more than a second of slots
    # recorded interrupted.
    try:
        number = _positive_number(value)
    except ValueError:
        number = 0.0
    if not 0.1 <= number <= 1.0:
        raise ValueError("a number of seconds from 0.1 to 1")
    return number


def _port(value: Any) -> int:
    try:
        port = _positive_int(value)
    except ValueError:
        raise ValueError("a port number from 1 to 65535") from None
    if port > 65535:
        raise ValueError("a port number from 1 to 65535")
    return port


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
    raise ValueError("true or false")


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("a non-empty string")
    return value.strip()


def _optional_string(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _string(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError("one of " + ", ".join(choices))
        return value.strip().lower()

    return check


def _token_list(value: Any) -> tuple[Any, ...]:
    # Checked in full by nanobot.web.tokens (names, hashes); here only the shape, so that the
    # configuration module does not import the web package.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(
                'a JSON list of {"name", "hash", "read_only"} objects '
                "(make one with 'nanobot http token NAME')"
            ) from None
    if not isinstance(value, list | tuple):
        raise ValueError(
            'a list of {"name", "hash", "read_only"} objects '
            "(make one with 'nanobot http token NAME')"
        )
    return tuple(parse_token_entries(value))


def _string_list(value: Any) -> tuple[str, ...]:
    """A list of non-empty strings; from an environment variable, comma-separated text."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not all(
        isinstance(item, str) and item.strip() for item in value
    ):
        raise ValueError("a list of non-empty strings (comma-separated in a variable)")
    return tuple(item.strip() for item in value)


def _time_zone(value: Any) -> str:
    name = _string(value)
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError("an IANA time zone name such as UTC or Europe/Berlin") from None
    return name


def _database_url(value: Any) -> str:
    url = _string(value)
    if not url.startswith(("sqlite:", "sqlite+", "postgresql:", "postgresql+")):
        raise ValueError("a sqlite:/// or postgresql+psycopg:// URL")
    return url


def _json_list(value: Any) -> tuple[Any, ...]:
    # From an environment variable the list comes as JSON text.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("a JSON list") from None
    if not isinstance(value, list | tuple):
        raise ValueError("a JSON list")
    return tuple(value)


def _optional_url(value: Any) -> str | None:
    url = _optional_string(value)
    if url is not None and not url.startswith(("http://", "https://")):
        raise ValueError("an http:// or https:// URL")
    return url.rstrip("/") if url is not None else None


@dataclass(frozen=True, slots=True)
class Setting:
    key: str
    default: Any
    check: Callable[[Any], Any]
    doc: str
    # A value that may hold a secret (a token pasted where its hash belongs) is never echoed.
    secret: bool = False


# The reference table of every setting. README.md documents the same keys; a test keeps them equal.
SETTINGS: Final[tuple[Setting, ...]] = (
    Setting(
        "database.url",
        None,
        _database_url,
        "SQLAlchemy URL; default sqlite:///$NANOBOT_HOME/nanobot.db",
    ),
    Setting("database.echo", False, _boolean, "log every SQL statement"),
    Setting(
        "database.statement_timeout",
        60.0,
        _non_negative_number,
        "PostgreSQL: seconds a statement may run before the server cancels it (0: no limit)",
    ),
    Setting(
        "logging.level",
        "INFO",
        _one_of("debug", "info", "warning", "error", "critical"),
        "lowest level written",
    ),
    Setting("logging.dir", None, _optional_string, "log folder; default $NANOBOT_HOME/logs"),
    Setting(
        "logging.format",
        "auto",
        _one_of("auto", "console", "json"),
        "console output: auto (pretty on a terminal, JSON lines otherwise), console or json",
    ),
    Setting(
        "logging.max_bytes", 10 * 1024 * 1024, _positive_int, "size at which nanobot.log is rotated"
    ),
    Setting("logging.backup_count", 5, _positive_int, "rotated log files kept"),
    Setting(
        "heartbeat.interval",
        30.0,
        _positive_number,
        "seconds between health cycles; stale after 2 x interval",
    ),
    Setting(
        "heartbeat.check_timeout",
        5.0,
        _positive_number,
        "seconds one health check may take (capped below the interval)",
    ),
    Setting(
        "heartbeat.error_retention_days",
        30.0,
        _positive_number,
        "days component errors and status changes are kept",
    ),
    Setting(
        "heartbeat.history_retention_days",
        7.0,
        _positive_number,
        "days per-cycle heartbeat rows are kept",
    ),
    Setting(
        "cron.cleanup_interval",
        3600.0,
        _positive_number,
        "seconds between runs of the built-in cleanup task",
    ),
    Setting(
        "cron.poll_interval",
        1.0,
        _positive_number,
        "longest sleep of the scheduler; bounds how fast changes by other processes apply",
    ),
    Setting(
        "cron.dispatch_ahead",
        0.1,
        _dispatch_ahead,
        "seconds ahead a pass claims slots as dispatched: more means fewer passes, less CPU, "
        "and more slots recorded interrupted after a crash",
    ),
    Setting("cron.history_retention_days", 30.0, _positive_number, "days task runs are kept"),
    Setting("cron.history_max_rows", 1000, _positive_int, "task runs kept per task"),
    Setting(
        "cron.default_timeout",
        0.0,
        _non_negative_number,
        "seconds a run may take when its task sets no timeout; 0 means no limit",
    ),
    Setting(
        "cron.overrun_intervals",
        3.0,
        _non_negative_number,
        "a run in flight longer than this many intervals shows as overrunning; 0 turns it off",
    ),
    Setting(
        "cron.pause_after_failures",
        0,
        _non_negative_int,
        "pause a task after this many consecutive failed slots unless it sets its own; 0: never",
    ),
    Setting(
        "cron.overdue_grace_share",
        0.1,
        _non_negative_number,
        "a task is overdue when its slot is this share of its interval late and not claimed",
    ),
    Setting(
        "cron.overdue_grace_min",
        5.0,
        _non_negative_number,
        "... and at least this many seconds late (also the slack past a run's expected end)",
    ),
    Setting(
        "scheduler.timezone",
        "UTC",
        _time_zone,
        "IANA zone of cron expressions and naive --at times when a task gives none",
    ),
    Setting(
        "scheduler.backfill_max_slots",
        100,
        _positive_int,
        "most slots 'nanobot cron backfill' runs without --yes",
    ),
    Setting("session.ttl", 86400.0, _positive_number, "seconds a session lives after its last use"),
    Setting(
        "service.node",
        None,
        _optional_string,
        "this node's name; default the host name and an id kept in $NANOBOT_HOME/node-id",
    ),
    Setting(
        "service.shutdown_grace",
        10.0,
        _non_negative_number,
        "seconds a stopping service waits for runs in flight before cancelling them",
    ),
    Setting(
        "service.lease_ttl",
        10.0,
        _positive_number,
        "seconds the scheduling lease lasts without renewal (bounds fail-over time)",
    ),
    Setting(
        "service.lock_check_interval",
        1.0,
        _positive_number,
        "seconds between the leader's checks of its PostgreSQL lock connection (at most ttl/3)",
    ),
    Setting(
        "alerts.destinations",
        None,
        _json_list,
        "where alerts go: a list of Apprise URLs or objects with url, name and a filter",
    ),
    Setting(
        "alerts.after",
        1,
        _positive_int,
        "consecutive failed runs after which a task is reported failing",
    ),
    Setting(
        "alerts.cooldown",
        300.0,
        _positive_number,
        "seconds between two alerts about one subject; changes meanwhile are counted",
    ),
    Setting(
        "alerts.group_window",
        10.0,
        _non_negative_number,
        "seconds task alerts are held so that tasks failing together give one alert",
    ),
    Setting(
        "alerts.check_interval",
        5.0,
        _positive_number,
        "seconds between two evaluations of the alert rules and the outbox",
    ),
    Setting(
        "alerts.retry_base", 5.0, _positive_number, "seconds before the first retry of a delivery"
    ),
    Setting(
        "alerts.retry_max",
        600.0,
        _positive_number,
        "longest wait between two attempts of a delivery (the backoff doubles up to it)",
    ),
    Setting(
        "alerts.give_up_after",
        86400.0,
        _positive_number,
        "seconds after which an undelivered alert is given up for a destination",
    ),
    Setting(
        "alerts.send_timeout",
        30.0,
        _positive_number,
        "seconds one attempt to send an alert may take",
    ),
    Setting("alerts.retention_days", 30.0, _positive_number, "days alerts are kept"),
    Setting(
        "alerts.dashboard_url",
        None,
        _optional_url,
        "base URL of the dashboard; alerts link to its page of their subject",
    ),
    Setting(
        "tasks.modules",
        None,
        _string_list,
        "modules of task code the service imports at start",
    ),
    Setting(
        "tasks.path", None, _string_list, "folders put on sys.path before task code is imported"
    ),
    Setting(
        "tasks.on_import_error",
        "stop",
        _one_of("stop", "continue"),
        "a task module that fails to import: stop the start (exit 2) or log it and continue",
    ),
    Setting(
        "tasks.file", None, _optional_string, "the task file; default $NANOBOT_HOME/tasks.toml"
    ),
    Setting("http.enabled", True, _boolean, "serve /healthz, /readyz, /status and /metrics"),
    Setting("http.host", "127.0.0.1", _string, "address the HTTP endpoint binds"),
    Setting("http.port", 8765, _port, "port of the HTTP endpoint"),
    Setting(
        "http.dashboard",
        True,
        _boolean,
        "serve the dashboard (/) and the REST API (/api/v1) on the HTTP endpoint",
    ),
    Setting(
        "http.tokens",
        None,
        _token_list,
        "named API tokens, stored hashed: a list of {name, hash, read_only}",
        secret=True,
    ),
    Setting(
        "http.token_file",
        None,
        _optional_string,
        "file of more tokens, one 'NAME HASH [read-only]' per line",
    ),
)

_BY_KEY: Final = {s.key: s for s in SETTINGS}
# Where an operator finds every setting (the README links it).
_EVERY_KEY: Final = "see docs/configuration.md for every key"


def nanobot_home(environ: Mapping[str, str] | None = None) -> Path:
    """The folder that holds everything nanobot writes unless configured otherwise."""
    env = os.environ if environ is None else environ
    raw = env.get(HOME_ENV, "").strip()
    return Path(raw).expanduser() if raw else Path("~/.nanobot").expanduser()


class Config:
    """A loaded, validated configuration. Values are read with dotted keys."""

    def __init__(self, values: Mapping[str, Any], home: Path, sources: Mapping[str, str]) -> None:
        self._values = dict(values)
        self.home = home
        self.sources = dict(sources)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a dotted key such as ``"heartbeat.interval"``; ``default`` if unset."""
        value = self._values.get(key)
        return default if value is None else value

    def __getitem__(self, key: str) -> Any:
        if key not in _BY_KEY:
            raise ConfigError(f"unknown configuration key {key!r}")
        return self._values[key]

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    @property
    def database_url(self) -> str:
        url = self._values["database.url"]
        assert isinstance(url, str)
        return url

    @property
    def log_dir(self) -> Path:
        raw = self._values["logging.dir"]
        return Path(raw).expanduser() if raw else self.home / "logs"


def _flatten(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, body in data.items():
        if not isinstance(body, Mapping):
            raise ConfigError(f"{source}: section {section!r} must be an object of settings")
        for key, value in body.items():
            flat[f"{section}.{key}"] = value
    return flat


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must hold a JSON object of sections")
    return _flatten(data, str(path))


def _read_env(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    found: dict[str, tuple[str, str]] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == HOME_ENV or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].partition("__")
        found[f"{section.lower()}.{key.lower()}"] = (value, name)
    return found


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Load and validate the configuration from defaults, the file and the environment."""
    env = os.environ if environ is None else environ
    home = nanobot_home(env)
    path = home / CONFIG_FILE_NAME
    raw: dict[str, tuple[Any, str]] = {s.key: (s.default, "default") for s in SETTINGS}
    for key, value in _read_file(path).items():
        if key not in _BY_KEY:
            raise ConfigError(f"{path}: unknown setting {key!r} ({_EVERY_KEY})")
        raw[key] = (value, str(path))
    for key, (value, var) in _read_env(env).items():
        if key not in _BY_KEY:
            raise ConfigError(f"{var}: unknown setting {key!r} ({_EVERY_KEY})")
        raw[key] = (value, var)

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, (value, source) in raw.items():
        setting = _BY_KEY[key]
        sources[key] = source
        if value is None:
            values[key] = None
            continue
        try:
            values[key] = setting.check(value)
        except ValueError as exc:
            shown = "(not shown)" if setting.secret else repr(value)
            raise ConfigError(f"{source}: {key} = {shown} is invalid: expected {exc}") from None
    if values["database.url"] is None:
        values["database.url"] = f"sqlite:///{home / 'nanobot.db'}"
    return Config(values, home, sources)


_lock = threading.Lock()
_config: Config | None = None


def get_config() -> Config:
    """The process-wide configuration, loaded on first use."""
    global _config
    with _lock:
        if _config is None:
            _config = load_config()
        return _config


def reset_config() -> None:
    """Forget the process-wide configuration so that the next :func:`get_config` reloads it."""
    global _config
    with _lock:
        _config = None
