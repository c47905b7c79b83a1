"""Structured logging: one pipeline, JSON lines in the file, stdlib loggers included."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

from nanobot.config import Config, load_config
from nanobot.db import get_engine, upgrade_database
from nanobot.logging import (
    QueueToListener,
    configured_log_file,
    flush_logging,
    is_configured,
    log_file_path,
    reset_logging,
    setup_logging,
)

# Created at import, long before any test configures logging: it must still follow the setup.
early_log = structlog.get_logger("nanobot.tests.early")


def _config(monkeypatch: pytest.MonkeyPatch, **settings: str) -> Config:
    for key, value in settings.items():
        section, _, name = key.partition("__")
        monkeypatch.setenv(f"NANOBOT_{section.upper()}__{name.upper()}", value)
    return load_config()


def _flush() -> None:
    flush_logging()


def _lines(path: Path) -> list[dict[str, Any]]:
    _flush()
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _our_handlers() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, QueueToListener)]


def test_setup_is_idempotent(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second setup_logging adds no handler; force=True replaces them instead of adding."""
    cfg = _config(monkeypatch)
    setup_logging(cfg)
    first = _our_handlers()
    assert len(first) == 1
    setup_logging(cfg)
    assert _our_handlers() == first
    setup_logging(cfg, force=True)
    again = _our_handlers()
    assert len(again) == 1
    assert not set(again) & set(first)


def test_reset_removes_the_handlers_and_restores_levels(monkeypatch: pytest.MonkeyPatch) -> None:
    """reset_logging removes what setup_logging installed and puts logger levels back."""
    before_root = logging.getLogger().level
    before_aps = logging.getLogger("apscheduler.executors").level
    setup_logging(_config(monkeypatch, logging__level="debug"))
    assert is_configured()
    reset_logging()
    assert not is_configured()
    assert _our_handlers() == []
    assert logging.getLogger().level == before_root
    assert logging.getLogger("apscheduler.executors").level == before_aps
    reset_logging()  # twice is harmless


def test_file_holds_json_lines(monkeypatch: pytest.MonkeyPatch, nanobot_home: Path) -> None:
    """nanobot.log in $NANOBOT_HOME/logs holds one JSON object a line: event, level, timestamp."""
    cfg = _config(monkeypatch)
    setup_logging(cfg)
    path = nanobot_home / "logs" / "nanobot.log"
    assert configured_log_file() == path == log_file_path(cfg)
    log = structlog.get_logger("nanobot.tests")
    log.info("task.finished", task="cleanup", outcome="success", duration_s=0.05)
    log.warning("task.slow", task="cleanup", note="über 5 s")
    lines = _lines(path)
    assert [line["event"] for line in lines] == ["task.finished", "task.slow"]
    first = lines[0]
    assert first["level"] == "info"
    assert first["logger"] == "nanobot.tests"
    assert first["task"] == "cleanup"
    assert first["outcome"] == "success"
    stamp = datetime.fromisoformat(first["timestamp"])
    assert stamp.utcoffset() == UTC.utcoffset(None)
    assert lines[1]["level"] == "warning"
    assert lines[1]["note"] == "über 5 s"


def test_log_dir_setting_moves_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """logging.dir chooses the folder of nanobot.log, which is created if missing."""
    folder = tmp_path / "elsewhere" / "logs"
    setup_logging(_config(monkeypatch, logging__dir=str(folder)))
    structlog.get_logger("nanobot.tests").info("moved")
    assert [line["event"] for line in _lines(folder / "nanobot.log")] == ["moved"]


def test_stdlib_loggers_share_the_file_and_format(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """A standard-library logger (APScheduler's) lands in the same file as the same JSON."""
    setup_logging(_config(monkeypatch))
    logging.getLogger("apscheduler.scheduler").info("Added job %r to job store %r", "tick", "db")
    structlog.get_logger("nanobot.tests").info("ours")
    foreign, ours = _lines(nanobot_home / "logs" / "nanobot.log")
    assert foreign["event"] == "Added job 'tick' to job store 'db'"
    assert foreign["logger"] == "apscheduler.scheduler"
    assert foreign["level"] == "info"
    assert set(foreign) >= {"event", "level", "logger", "timestamp"}
    assert set(foreign) - {"event"} == set(ours) - {"event"}


def test_bound_contextvars_appear_on_every_line(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """Keys bound with bound_contextvars are on nanobot's lines and the libraries' lines alike."""
    setup_logging(_config(monkeypatch))
    log = structlog.get_logger("nanobot.tests")
    with structlog.contextvars.bound_contextvars(task="cleanup", run_id=42):
        log.info("task.started")
        logging.getLogger("sqlalchemy.engine.Engine").warning("slow query")
    log.info("outside")
    inside_ours, inside_foreign, outside = _lines(nanobot_home / "logs" / "nanobot.log")
    for line in (inside_ours, inside_foreign):
        assert line["task"] == "cleanup"
        assert line["run_id"] == 42
    assert "task" not in outside
    assert "run_id" not in outside


def test_exceptions_are_rendered_in_the_json(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """log.exception writes the traceback as text in an "exception" field."""
    setup_logging(_config(monkeypatch))
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger("nanobot.tests").exception("task.failed", task="t")
    (line,) = _lines(nanobot_home / "logs" / "nanobot.log")
    assert line["level"] == "error"
    assert "RuntimeError: boom" in line["exception"]
    assert "Traceback" in line["exception"]


def test_file_rotates_by_size(monkeypatch: pytest.MonkeyPatch, nanobot_home: Path) -> None:
    """Past logging.max_bytes the file rotates, keeping logging.backup_count old files."""
    setup_logging(_config(monkeypatch, logging__max_bytes="400", logging__backup_count="2"))
    log = structlog.get_logger("nanobot.tests")
    for i in range(60):
        log.info("filler", i=i, pad="x" * 40)
    _flush()
    folder = nanobot_home / "logs"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["nanobot.log", "nanobot.log.1", "nanobot.log.2"]
    for path in folder.iterdir():
        assert path.stat().st_size <= 400
        for line in path.read_text(encoding="utf-8").splitlines():
            assert json.loads(line)["event"] == "filler"
    # The newest lines are in nanobot.log.
    assert _lines(folder / "nanobot.log")[-1]["i"] == 59


def test_level_comes_from_the_configuration(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """logging.level=warning drops info lines, of nanobot and of libraries."""
    setup_logging(_config(monkeypatch, logging__level="warning"))
    log = structlog.get_logger("nanobot.tests")
    log.info("dropped")
    logging.getLogger("apscheduler.scheduler").info("dropped too")
    log.warning("kept")
    assert [line["event"] for line in _lines(nanobot_home / "logs" / "nanobot.log")] == ["kept"]


def test_debug_level_is_written_when_configured(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """logging.level=debug writes nanobot's debug lines."""
    setup_logging(_config(monkeypatch, logging__level="debug"))
    structlog.get_logger("nanobot.tests").debug("detail")
    assert [line["level"] for line in _lines(nanobot_home / "logs" / "nanobot.log")] == ["debug"]


def test_noisy_library_loggers_are_quieted(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """APScheduler's per-run lines and SQLAlchemy's statements stay out at INFO."""
    setup_logging(_config(monkeypatch))
    logging.getLogger("apscheduler.executors.default").info('Running job "tick"')
    logging.getLogger("sqlalchemy.engine.Engine").info("SELECT 1")
    logging.getLogger("apscheduler.scheduler").info("Scheduler started")
    events = [line["event"] for line in _lines(nanobot_home / "logs" / "nanobot.log")]
    assert events == ["Scheduler started"]


def test_database_echo_lets_sql_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """database.echo=true sets sqlalchemy.engine to INFO so that statements are logged."""
    setup_logging(_config(monkeypatch, database__echo="true"))
    assert logging.getLogger("sqlalchemy.engine").getEffectiveLevel() == logging.INFO


def test_module_level_logger_created_before_setup_follows_it(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """A logger made at import time, before setup_logging, writes through the configuration."""
    setup_logging(_config(monkeypatch))
    early_log.info("early.logger", k=1)
    (line,) = _lines(nanobot_home / "logs" / "nanobot.log")
    assert line["event"] == "early.logger"
    assert line["logger"] == "nanobot.tests.early"


def test_logging_before_setup_does_not_crash(capsys: pytest.CaptureFixture[str]) -> None:
    """Before setup_logging, structlog's defaults print a readable line and nothing breaks."""
    assert not is_configured()
    early_log.info("before.setup", k=1)
    out = capsys.readouterr().out
    assert "before.setup" in out
    assert "k=1" in out


def test_console_is_json_when_not_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With logging.format=auto and stderr not a terminal, standard error gets JSON lines."""
    setup_logging(_config(monkeypatch))
    structlog.get_logger("nanobot.tests").info("to.stderr", n=3)
    flush_logging()
    (line,) = capsys.readouterr().err.splitlines()
    assert json.loads(line)["event"] == "to.stderr"


def test_console_format_can_be_forced(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], nanobot_home: Path
) -> None:
    """logging.format=console renders pretty lines on stderr; the file stays JSON."""
    setup_logging(_config(monkeypatch, logging__format="console"))
    structlog.get_logger("nanobot.tests").info("pretty", n=3)
    flush_logging()
    err = capsys.readouterr().err
    assert "pretty" in err
    with pytest.raises(json.JSONDecodeError):
        json.loads(err.splitlines()[0])
    assert _lines(nanobot_home / "logs" / "nanobot.log")[0]["event"] == "pretty"


def test_without_file_only_stderr_is_written(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """file=False (for short commands beside the service) writes no log file."""
    setup_logging(_config(monkeypatch), file=False)
    structlog.get_logger("nanobot.tests").info("no.file")
    assert configured_log_file() is None
    assert not (nanobot_home / "logs" / "nanobot.log").exists()


def test_capture_logs_sees_events_after_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """structlog.testing.capture_logs still captures events once logging is configured."""
    setup_logging(_config(monkeypatch))
    with structlog.testing.capture_logs() as captured:
        structlog.get_logger("nanobot.tests").info("captured", k="v")
    assert captured == [{"event": "captured", "k": "v", "log_level": "info"}]


class _RenderProbe:
    """A field value that notes which thread renders it, and how many times."""

    def __init__(self) -> None:
        self.threads: list[str] = []

    def __repr__(self) -> str:
        self.threads.append(threading.current_thread().name)
        return "probe"


def test_lines_are_rendered_once_off_the_logging_thread(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An event is rendered once, in the listener thread, and that one line goes to both the
    file and standard error: the thread that logs (the event loop) never formats or writes."""
    setup_logging(_config(monkeypatch))
    # pytest's own capture handler formats on this thread: leave only nanobot's handler.
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", _our_handlers())
    probe = _RenderProbe()
    structlog.get_logger("nanobot.tests").info("rendered.once", probe=probe)
    flush_logging()
    assert probe.threads == ["nanobot-log"]
    (in_file,) = _lines(nanobot_home / "logs" / "nanobot.log")
    (on_stderr,) = capsys.readouterr().err.splitlines()
    assert json.loads(on_stderr) == in_file
    assert in_file["probe"] == "probe"


def test_reset_writes_what_is_queued(monkeypatch: pytest.MonkeyPatch, nanobot_home: Path) -> None:
    """Lines logged just before reset_logging (or process exit) are written, none lost."""
    setup_logging(_config(monkeypatch))
    log = structlog.get_logger("nanobot.tests")
    for i in range(500):
        log.info("queued", i=i)
    reset_logging()
    path = nanobot_home / "logs" / "nanobot.log"
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["i"] for line in lines] == list(range(500))


def test_a_migration_logs_no_alembic_chatter(
    monkeypatch: pytest.MonkeyPatch, nanobot_home: Path
) -> None:
    """Creating the database logs db.migrated, not Alembic's plugin and context lines."""
    cfg = _config(monkeypatch)
    setup_logging(cfg)
    engine = get_engine(cfg)
    try:
        upgrade_database(engine)
    finally:
        engine.dispose()
    lines = _lines(nanobot_home / "logs" / "nanobot.log")
    assert [line["logger"] for line in lines if line["logger"].startswith("alembic")] == []
