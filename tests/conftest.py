"""Shared fixtures: a private NANOBOT_HOME per test, and real databases.

``db_url`` runs a test twice: on a real SQLite file in ``tmp_path`` and on the PostgreSQL server
at 127.0.0.1:5432, in a schema of its own that is dropped afterwards. The PostgreSQL case carries
the ``postgres`` marker and is skipped, with the reason shown, when no server answers, unless
``NANOBOT_REQUIRE_POSTGRES=1`` (as in CI) makes that a failure.
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faults.harness import BASE_ENV, ServiceProcess
from sqlalchemy import Engine, create_engine, text

from nanobot import config as config_module
from nanobot.db import create_db_engine, dispose_engines, upgrade_database

PG_ADMIN_URL = os.environ.get(
    "NANOBOT_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REQUIRE_PG = os.environ.get("NANOBOT_REQUIRE_POSTGRES", "") == "1"

_pg_state: dict[str, str | None] = {}

FAULTS_DIR = Path(__file__).parent / "faults"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """The fault suite (tests/faults/, minutes of real faults) runs when asked for: named on
    the command line or selected with ``-m faults`` (as ``.ci/run`` does); a plain ``pytest``
    runs the rest."""
    if collection_path != FAULTS_DIR:
        return None
    if "faults" in (config.option.markexpr or ""):
        return None
    for arg in config.args:
        path = Path(arg.split("::")[0]).absolute()
        if path == FAULTS_DIR or FAULTS_DIR in path.parents:
            return None
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    """One process, not pytest-xdist's workers (addopts ``-n auto``), for the runs that time
    real processes or print what they measure: the fault suite and the soak (selected by marker
    or named by path), and ``-s``, whose prints a worker would swallow. Before xdist's own
    pytest_configure (trylast), which starts the workers."""
    in_faults = any(
        FAULTS_DIR in (path := Path(arg.split("::")[0]).absolute()).parents or path == FAULTS_DIR
        for arg in config.args
    )
    markexpr = config.option.markexpr or ""
    if in_faults or "faults" in markexpr or "soak" in markexpr or config.option.capture == "no":
        config.option.dist = "no"
        config.option.tx = []


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """One worker per core for ``-n auto``. Two per core filled the idle half of a fast
    machine's cores, but on a machine 2.5 times slower (a start of the service 2.2 s instead of
    0.9 s) the tests that time real processes and bursts against their bounds failed under the
    load of four workers on two cores, and passed alone."""
    return os.cpu_count() or 1


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The soak (minutes of several nodes under churn) runs when selected with ``-m soak``, as
    ``.ci/run`` does; a plain ``pytest`` leaves it out to stay quick."""
    if "soak" in (config.option.markexpr or ""):
        return
    kept = [item for item in items if item.get_closest_marker("soak") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


def _pg_unavailable() -> str | None:
    """None when PostgreSQL answers, else why not (checked once per run)."""
    if "reason" not in _pg_state:
        try:
            engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            engine.dispose()
            _pg_state["reason"] = None
        except Exception as exc:
            _pg_state["reason"] = f"PostgreSQL at {PG_ADMIN_URL} does not answer: {exc}"
    return _pg_state["reason"]


def _reset_singletons() -> None:
    # Imported lazily: a module under test may not exist yet in every checkout of the suite.
    for module_name, reset in (
        ("nanobot.bus", "reset_bus"),
        ("nanobot.session", "reset_session_manager"),
        ("nanobot.heartbeat", "reset_heartbeat_monitor"),
        ("nanobot.cron", "reset_cron_manager"),
        ("nanobot.logging", "reset_logging"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        func = getattr(module, reset, None)
        if func is not None:
            func()
    config_module.reset_config()
    dispose_engines()


@pytest.fixture(autouse=True)
def nanobot_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own NANOBOT_HOME and no NANOBOT_* setting from the outside."""
    for name in list(os.environ):
        if name.startswith("NANOBOT_") and name not in {
            "NANOBOT_TEST_PG_URL",
            "NANOBOT_REQUIRE_POSTGRES",
        }:
            monkeypatch.delenv(name)
    home = tmp_path / "home"
    monkeypatch.setenv("NANOBOT_HOME", str(home))
    _reset_singletons()
    yield home
    _reset_singletons()


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A real, empty database (SQLite file or PostgreSQL schema), set as nanobot's database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'db' / 'nanobot.db'}"
        monkeypatch.setenv("NANOBOT_DATABASE__URL", url)
        config_module.reset_config()
        yield url
        return
    reason = _pg_unavailable()
    if reason is not None:
        if REQUIRE_PG:
            pytest.fail(reason)
        pytest.skip(reason)
    schema = f"nb_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    monkeypatch.setenv("NANOBOT_DATABASE__URL", url)
    config_module.reset_config()
    try:
        yield url
    finally:
        dispose_engines()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on ``db_url`` with the schema at head."""
    eng = create_db_engine(db_url)
    upgrade_database(eng)
    try:
        yield eng
    finally:
        eng.dispose()


@pytest.fixture
def services(
    nanobot_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start real services (``python -m nanobot``) on this test's NANOBOT_HOME with the fault
    suite's fast settings; ``start(**env)`` adds environment variables; every one is killed
    afterwards."""
    for name, value in BASE_ENV.items():
        monkeypatch.setenv(name, value)
    started: list[ServiceProcess] = []

    def start(**env: str) -> ServiceProcess:
        label = f"service{len(started)}"
        service = ServiceProcess(home=nanobot_home, logs=tmp_path, label=label, env=env)
        started.append(service)
        return service.start()

    try:
        yield start
    finally:
        for service in started:
            service.close()
