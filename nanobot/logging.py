"""Structured logging: one structlog pipeline for nanobot and for the libraries it uses.

:func:`setup_logging` is called once at start. After it, every line written by nanobot
(``log = structlog.get_logger(__name__)`` at module level, then
``log.info("task.finished", task=name, outcome="error")``) and by the standard library's
loggers of APScheduler, SQLAlchemy, Alembic and aiohttp goes
through the same processors and reaches two places:

* ``$NANOBOT_HOME/logs/nanobot.log`` (folder ``logging.dir``): JSON lines, one event per line,
  rotated at ``logging.max_bytes`` with ``logging.backup_count`` old files kept;
* standard error: pretty console lines on a terminal, JSON lines otherwise
  (``logging.format`` = ``auto``, ``console`` or ``json``).

Keys bound with ``structlog.contextvars.bound_contextvars(task=..., run_id=...)`` appear on every
line written inside the block, by nanobot or by a library.

Threads: the thread that logs (the event loop, the scheduler's worker...) only runs structlog's
cheap processors (level filter, context, level and logger names, timestamp) and puts the record
on a queue (:class:`QueueToListener`); one listener thread (``nanobot-log``, a
:class:`logging.handlers.QueueListener`) renders each record ONCE as JSON and writes that same
line to the file and to standard error (a terminal gets its own readable rendering of the same
event instead). Formatting and writing never happen on the event loop: a burst of runs that
each log a line costs the loop a queue put per line. :func:`flush_logging` waits until every
queued line is written (tests, and before a process exits on purpose).

This replaces the seed's ``setup_logging`` (section 5.3.1), whose guard against duplicate
handlers was ``if logger.handlers``; here a second call does nothing unless ``force=True``.
Before :func:`setup_logging` runs, structlog's defaults apply (readable lines on standard
output); loggers are never cached, so module-level loggers created at import time follow the
configuration as soon as it is set.

Several processes (the service and a command) may share one log folder; the standard library's
rotating handler is not safe for that, so commands that run beside the service should log to
standard error only (``file=False``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import queue
import sys
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from nanobot.config import Config, get_config
from nanobot.models import error_text

LOG_FILE_NAME: Final = "nanobot.log"

# Third-party loggers and their level, whatever logging.level says. APScheduler's executors
# write "Running job ..." and "... executed successfully" at INFO for every run: nanobot logs its
# own task.started / task.finished events with more fields, so those lines are only noise.
QUIET_LOGGERS: Final[dict[str, int]] = {
    "apscheduler.executors": logging.WARNING,
    "sqlalchemy.engine": logging.WARNING,
    "sqlalchemy.pool": logging.WARNING,
    "aiohttp.access": logging.WARNING,
    # Alembic says "Context impl SQLiteImpl" at every schema check; nanobot logs db.migrated
    # with the revisions before and after when a migration really ran.
    "alembic.runtime.migration": logging.WARNING,
    # "setup plugin alembic.autogenerate..." seven times at every start (Alembic 1.16+).
    "alembic.runtime.plugins": logging.WARNING,
}


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted.

    Test runners and daemon wrappers replace ``sys.stderr``; a handler that kept the stream of
    the moment it was made would write into a closed file.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


class _FileHandler(logging.handlers.RotatingFileHandler):
    """The log file; a write that fails (a full disk, a removed folder) is said once on standard
    error as a JSON line (``logging.file_unwritable``), not as a traceback per record, and once
    more when writing works again (``logging.file_writable``, with how many records were lost).

    Records are emitted under the handler's lock, so the counters need no other.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lost = 0
        self._failed_now = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed_now = False
        super().emit(record)
        if self._lost and not self._failed_now:
            _stderr_event("logging.file_writable", "info", path=self.baseFilename, lost=self._lost)
            self._lost = 0

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed_now = True
        self._lost += 1
        if self._lost == 1:
            error = sys.exc_info()[1]
            _stderr_event(
                "logging.file_unwritable",
                "error",
                path=self.baseFilename,
                error=error_text(error) if error else "unknown",
                consequence="records go to standard error only until the file can be written",
            )


def _stderr_event(event: str, level: str, **fields: Any) -> None:
    # Not through logging: that would write to the failing file again.
    line = {"event": event, "level": level, "logger": __name__, **fields}
    line["timestamp"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    with contextlib.suppress(Exception):
        sys.stderr.write(json.dumps(line) + "\n")
        sys.stderr.flush()


# Attributes a record carries from the logging thread to the listener thread.
_CONTEXT_ATTR: Final = "_nanobot_context"
_JSON_ATTR: Final = "_nanobot_json"
_CONSOLE_ATTR: Final = "_nanobot_console"


def _merge_record_context(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """The context variables of the thread that logged a standard-library record.

    Such records are rendered in the listener thread, where ``merge_contextvars`` would see that
    thread's (empty) context: :meth:`QueueToListener.prepare` saved the caller's on the record.
    """
    record = event_dict.get("_record")
    context = getattr(record, _CONTEXT_ATTR, None)
    if context:
        for key, value in context.items():
            event_dict.setdefault(key, value)
    return event_dict


def _capture_exc_info(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """Take the exception being handled now, on the thread that logs: ``log.exception`` says
    ``exc_info=True``, which means nothing by the time the listener thread renders the line."""
    exc_info = event_dict.get("exc_info")
    if exc_info is True:
        event_dict["exc_info"] = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        event_dict["exc_info"] = (exc_info.__class__, exc_info, exc_info.__traceback__)
    return event_dict


class QueueToListener(logging.handlers.QueueHandler):
    """Hands records to the listener thread, unformatted.

    The standard ``QueueHandler.prepare`` formats the message on the logging thread (and turns
    structlog's event dict into a string); here the record goes as it is and is rendered once,
    by the listener. Only the caller's context variables are taken along, for records of the
    standard library's loggers (structlog's own events merged them already).
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not isinstance(record.msg, dict):
            context = structlog.contextvars.get_contextvars()
            if context:
                setattr(record, _CONTEXT_ATTR, context)
        return record

    listener: _Listener | None = None

    def flush(self) -> None:
        """Wait until the listener wrote every record queued so far."""
        listener = self.listener
        thread = None if listener is None else listener._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return
        if isinstance(self.queue, queue.Queue):
            self.queue.join()


_LISTENER_THREAD: Final = "nanobot-log"


class _Listener(logging.handlers.QueueListener):
    """The thread that renders each record once and writes it to every handler."""

    def __init__(
        self,
        records: queue.Queue[logging.LogRecord],
        handlers: list[logging.Handler],
        json_formatter: logging.Formatter,
        console_formatter: logging.Formatter | None,
    ) -> None:
        super().__init__(records, *handlers)
        self.json_formatter = json_formatter
        self.console_formatter = console_formatter

    def start(self) -> None:
        super().start()
        if self._thread is not None:
            self._thread.name = _LISTENER_THREAD

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The one rendering of this event (plus the readable one for a terminal).
        try:
            setattr(record, _JSON_ATTR, self.json_formatter.format(record))
            if self.console_formatter is not None:
                setattr(record, _CONSOLE_ATTR, self.console_formatter.format(record))
        except Exception as exc:  # never let a bad record stop the listener thread
            fallback = f'{{"event": "logging.render_failed", "error": {str(exc)!r:.200}}}'
            setattr(record, _JSON_ATTR, fallback)
            setattr(record, _CONSOLE_ATTR, fallback)
        return record


class _Prerendered(logging.Formatter):
    """Returns the line the listener rendered (the rotating handler formats twice per record:
    once to decide whether to roll over, once to write; both get the same string for free)."""

    def __init__(self, attribute: str) -> None:
        super().__init__()
        self.attribute = attribute

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, self.attribute, None)
        if line is None:
            line = getattr(record, _JSON_ATTR, None)
        return line if isinstance(line, str) else super().format(record)


@dataclass
class _State:
    handlers: list[logging.Handler] = field(default_factory=list)
    listener: _Listener | None = None
    # Levels of the loggers setup_logging changed, to restore them in reset_logging.
    saved_levels: dict[str, int] = field(default_factory=dict)
    log_file: Path | None = None


_lock = threading.Lock()
_state: _State | None = None


def _shared_processors() -> list[Processor]:
    """The processors every event goes through, nanobot's and the standard library's."""
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def _foreign_pre_chain() -> list[Processor]:
    # Run in the listener thread: the caller's context comes from the record, not the thread.
    return [
        _merge_record_context,
        *[p for p in _shared_processors() if p is not structlog.contextvars.merge_contextvars],
    ]


def _json_formatter() -> structlog.stdlib.ProcessorFormatter:
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_foreign_pre_chain(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
    )


def _console_formatter() -> structlog.stdlib.ProcessorFormatter:
    # ConsoleRenderer formats exceptions itself; format_exc_info before it would spoil them.
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_foreign_pre_chain(),
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.dev.ConsoleRenderer(),
        ],
    )


def _wants_console(fmt: str) -> bool:
    if fmt == "console":
        return True
    if fmt == "json":
        return False
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


def log_file_path(config: Config | None = None) -> Path:
    """Where the JSON-lines log file of this configuration lives."""
    cfg = config or get_config()
    return cfg.log_dir / LOG_FILE_NAME


def setup_logging(config: Config | None = None, *, force: bool = False, file: bool = True) -> None:
    """Configure structlog and the standard library's logging once for this process.

    A second call does nothing, unless ``force`` is true: then the handlers installed by the
    first call are removed and logging is configured again from ``config``. ``file=False``
    leaves out the log file (for short commands that run beside the service).
    """
    global _state
    with _lock:
        if _state is not None:
            if not force:
                return
            _reset_locked()
        cfg = config or get_config()
        _state = _configure(cfg, file=file)


def _configure(cfg: Config, *, file: bool) -> _State:
    state = _State()
    level = logging.getLevelNamesMapping()[str(cfg.get("logging.level", "INFO")).upper()]
    root = logging.getLogger()
    state.saved_levels[""] = root.level

    # The handlers that write run in the listener thread; the root logger only has the queue.
    console = _StderrHandler()
    fmt = str(cfg.get("logging.format", "auto"))
    pretty = _wants_console(fmt)
    console.setFormatter(_Prerendered(_CONSOLE_ATTR if pretty else _JSON_ATTR))
    writers: list[logging.Handler] = [console]

    if file:
        path = log_file_path(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        file_handler = _FileHandler(
            path,
            maxBytes=int(cfg.get("logging.max_bytes", 10 * 1024 * 1024)),
            backupCount=int(cfg.get("logging.backup_count", 5)),
            encoding="utf-8",
        )
        file_handler.setFormatter(_Prerendered(_JSON_ATTR))
        writers.append(file_handler)
        state.log_file = path

    records: queue.Queue[logging.LogRecord] = queue.Queue()
    state.listener = _Listener(
        records, writers, _json_formatter(), _console_formatter() if pretty else None
    )
    state.listener.start()
    handler = QueueToListener(records)
    handler.listener = state.listener
    state.handlers = [handler, *writers]
    root.addHandler(state.handlers[0])
    root.setLevel(level)

    quiet = dict(QUIET_LOGGERS)
    if cfg.get("database.echo", False):
        quiet["sqlalchemy.engine"] = logging.INFO
    for name, quiet_level in quiet.items():
        logger = logging.getLogger(name)
        state.saved_levels[name] = logger.level
        # Never make a library more verbose than the configured level.
        logger.setLevel(max(quiet_level, level))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *_shared_processors(),
            _capture_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Module-level loggers are created at import, before setup_logging: never cache them.
        cache_logger_on_first_use=False,
    )
    return state


def _reset_locked() -> None:
    global _state
    state, _state = _state, None
    if state is not None:
        root = logging.getLogger()
        root.removeHandler(state.handlers[0])
        if state.listener is not None:
            state.listener.stop()  # writes what is queued, then ends the thread
        for handler in state.handlers:
            handler.close()
        for name, level in state.saved_levels.items():
            logging.getLogger(name or None).setLevel(level)
    structlog.reset_defaults()


def reset_logging() -> None:
    """Undo :func:`setup_logging`: remove its handlers, restore levels, reset structlog."""
    with _lock:
        _reset_locked()


def flush_logging() -> None:
    """Wait until every line logged so far is written (to the file and standard error)."""
    with _lock:
        state = _state
    if state is not None:
        for handler in state.handlers:
            handler.flush()


def is_configured() -> bool:
    with _lock:
        return _state is not None


def configured_log_file() -> Path | None:
    """The log file the current configuration writes, if any."""
    with _lock:
        return None if _state is None else _state.log_file
