"""Migrations: one head, up/down/up for every revision, models equal to migrations, the CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, insert, inspect, select, text

from nanobot.db import (
    alembic_config,
    create_db_engine,
    current_revision,
    database_id,
    downgrade_database,
    head_revision,
    migrations_dir,
    upgrade_database,
)
from nanobot.exceptions import DatabaseError, SchemaTooNewError
from nanobot.models import Base, TaskRun

REPO = Path(__file__).resolve().parent.parent
NANOBOT_TABLES = set(Base.metadata.tables)


def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


@pytest.fixture
def empty_engine(db_url: str) -> Iterator[Engine]:
    """An engine on an empty database (no migration applied)."""
    engine = create_db_engine(db_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo what Alembic's fileConfig does to the root logger when it runs as a command."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


def _tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


def test_single_head() -> None:
    """The migrations form one line: exactly one head."""
    heads = _script().get_heads()
    assert len(heads) == 1, f"several heads, merge them: {heads}"
    assert head_revision() == heads[0]


def test_each_script_is_named_after_its_revision() -> None:
    """Every script's name carries its revision (``<date>_<revision>_<what>.py``) and the
    revisions sort in the order of the line: what head_revision reads without Alembic."""
    ordered = [r.revision for r in reversed(list(_script().walk_revisions()))]
    named = {
        path.name.split("_")[1]: path.name
        for path in (migrations_dir() / "versions").glob("[0-9]*_*_*.py")
    }
    assert sorted(named) == ordered
    for revision in _script().walk_revisions():
        assert Path(revision.path).name == named[revision.revision]


def test_stairway(empty_engine: Engine) -> None:
    """Every revision upgrades, downgrades one step and upgrades again (both databases)."""
    revisions = list(reversed(list(_script().walk_revisions())))
    assert revisions, "no migration found"
    for revision in revisions:
        upgrade_database(empty_engine, revision.revision)
        assert current_revision(empty_engine) == revision.revision
        down = revision.down_revision
        assert down is None or isinstance(down, str), "merge revisions are not expected here"
        downgrade_database(empty_engine, down or "base")
        assert current_revision(empty_engine) == down
        upgrade_database(empty_engine, revision.revision)
        assert current_revision(empty_engine) == revision.revision


def test_models_match_migrations(engine: Engine) -> None:
    """After upgrade to head, autogenerate finds no difference from the models (both databases)."""
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


def test_head_creates_every_table(engine: Engine) -> None:
    """Upgrade to head creates every table of the models, and Alembic's version table."""
    assert _tables(engine) == NANOBOT_TABLES | {"alembic_version"}
    assert current_revision(engine) == head_revision()


def test_upgrade_twice_is_harmless(engine: Engine) -> None:
    """upgrade_database on a database already at head changes nothing."""
    upgrade_database(engine)
    assert current_revision(engine) == head_revision()


def test_downgrade_base_leaves_no_nanobot_table(engine: Engine) -> None:
    """Downgrading to base drops every table the migrations created."""
    downgrade_database(engine, "base")
    assert _tables(engine) & NANOBOT_TABLES == set()
    assert current_revision(engine) is None


def test_unknown_revision_is_refused(engine: Engine) -> None:
    """A database at a revision this code does not know is refused, naming the revision."""
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfacecafe'"))
    with pytest.raises(SchemaTooNewError, match="'f00dfacecafe'") as caught:
        upgrade_database(engine)
    assert isinstance(caught.value, DatabaseError)
    assert "upgrade nanobot" in str(caught.value)
    # Nothing was touched.
    assert current_revision(engine) == "f00dfacecafe"


def _alembic(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NANOBOT_")}
    env.update(extra)
    return env


def test_alembic_command_uses_the_configured_database(db_url: str, tmp_path: Path) -> None:
    """`alembic upgrade head` and `alembic check` in the repository use NANOBOT_DATABASE__URL."""
    env = _clean_env(NANOBOT_HOME=str(tmp_path / "cli-home"), NANOBOT_DATABASE__URL=db_url)
    upgraded = _alembic("upgrade", "head", env=env)
    assert upgraded.returncode == 0, upgraded.stderr
    checked = _alembic("check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "No new upgrade operations detected" in checked.stdout + checked.stderr
    engine = create_db_engine(db_url)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()
    # NANOBOT_DATABASE__URL pointed elsewhere: nothing was created under NANOBOT_HOME.
    assert not (tmp_path / "cli-home" / "nanobot.db").exists()


def test_alembic_command_defaults_to_nanobot_home(tmp_path: Path) -> None:
    """Without a database URL, `alembic upgrade head` migrates $NANOBOT_HOME/nanobot.db."""
    home = tmp_path / "cli-home"
    upgraded = _alembic("upgrade", "head", env=_clean_env(NANOBOT_HOME=str(home)))
    assert upgraded.returncode == 0, upgraded.stderr
    engine = create_db_engine(f"sqlite:///{home / 'nanobot.db'}")
    try:
        assert current_revision(engine) == head_revision()
        assert _tables(engine) >= NANOBOT_TABLES
    finally:
        engine.dispose()


@pytest.mark.usefixtures("restore_logging")
def test_migrations_do_not_disable_existing_loggers(empty_engine: Engine) -> None:
    """A logger created before a migration is still enabled after it, in-process and via the ini."""
    probe = logging.getLogger("nanobot.tests.migration_probe")
    assert probe.disabled is False
    upgrade_database(empty_engine, "base")
    upgrade_database(empty_engine)
    assert probe.disabled is False

    downgrade_database(empty_engine, "base")
    # As `alembic upgrade head` does: the repository's alembic.ini, whose [loggers] Alembic applies
    # with fileConfig; the database comes from nanobot's configuration (db_url set it).
    ini = AlembicConfig(str(REPO / "alembic.ini"))
    command.upgrade(ini, "head")
    assert probe.disabled is False
    assert logging.getLogger("nanobot").disabled is False
    assert current_revision(empty_engine) == head_revision()


def test_0003_marks_running_rows_of_earlier_versions_dispatched(empty_engine: Engine) -> None:
    """A database at 0001 with a run left running (started_at NULL, as earlier versions wrote
    it) and a finished run: after the upgrade the running row counts as dispatched (recorded
    interrupted, never run again), and the finished row is unchanged."""
    upgrade_database(empty_engine, "0001")
    slot = datetime(2026, 1, 1, tzinfo=UTC)
    done = datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC)
    with empty_engine.begin() as conn:
        conn.execute(
            insert(TaskRun),
            [
                {"task_name": "a", "scheduled_at": slot, "outcome": "running", "slots": 1},
                {
                    "task_name": "b",
                    "scheduled_at": slot,
                    "started_at": None,
                    "finished_at": done,
                    "outcome": "missed",
                    "slots": 3,
                },
            ],
        )
    upgrade_database(empty_engine)
    with empty_engine.connect() as conn:
        rows = {r.task_name: r for r in conn.execute(select(TaskRun.__table__))}
    assert rows["a"].started_at == slot
    assert rows["a"].outcome == "running"
    assert rows["b"].started_at is None
    assert rows["b"].slots == 3


def test_0013_gives_each_database_an_id_of_its_own(empty_engine: Engine) -> None:
    """A database upgraded in place from 0012 gets one random id, kept by a second upgrade; a
    database made afresh gets another (both databases; the guard tells them apart by it)."""
    upgrade_database(empty_engine, "0012")
    assert "database_identity" not in _tables(empty_engine)
    upgrade_database(empty_engine)
    upgraded = database_id(empty_engine)
    assert upgraded is not None
    assert len(upgraded) == 36
    upgrade_database(empty_engine)
    assert database_id(empty_engine) == upgraded
    with empty_engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM database_identity")).scalar_one() == 1
    downgrade_database(empty_engine, "base")
    upgrade_database(empty_engine)
    afresh = database_id(empty_engine)
    assert afresh is not None
    assert afresh != upgraded
