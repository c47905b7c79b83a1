"""Task modules as this process loads them (nanobot.cron.taskcode), in this process: the age of
their code on disk and a module that fails with on_import_error = continue. The service's side
(status says a module is older than its file) is tests/test_usertasks.py."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from nanobot.config import load_config
from nanobot.cron.taskcode import load_task_code, loaded_modules, newest_mtime
from nanobot.exceptions import TaskCodeError


@pytest.fixture
def task_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder of task modules; whatever the test imports from it is forgotten afterwards."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    before = set(sys.modules)
    try:
        yield folder
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
        while str(folder) in sys.path:
            sys.path.remove(str(folder))


def test_a_package_is_as_new_as_its_newest_file(tmp_path: Path) -> None:
    """A change to any .py file of a package changes the code the service runs: the package's
    time is its newest file's, a plain module's its own."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    init, deep = package / "__init__.py", package / "sub" / "jobs.py"
    init.write_text("")
    deep.write_text("")
    os.utime(init, (1_000_000, 1_000_000))
    os.utime(deep, (2_000_000, 2_000_000))
    assert newest_mtime(str(init)) == 2_000_000
    assert newest_mtime(str(deep)) == 2_000_000
    assert newest_mtime(str(tmp_path / "gone.py")) is None


def test_a_failing_module_is_kept_with_its_error_when_told_to_continue(
    task_folder: Path,
) -> None:
    """With tasks.on_import_error = continue the good module loads, the failing one is listed
    with its error and logged; with the default (stop) the first failure raises."""
    (task_folder / "good_tasks.py").write_text("VALUE = 1\n")
    (task_folder / "bad_tasks.py").write_text("raise RuntimeError('no database driver')\n")
    config = load_config(
        {
            "NANOBOT_HOME": str(task_folder.parent / "home"),
            "NANOBOT_TASKS__PATH": str(task_folder),
            "NANOBOT_TASKS__MODULES": "good_tasks,bad_tasks,good_tasks",
        }
    )
    with structlog.testing.capture_logs() as logs:
        loaded = load_task_code(config, stop_on_error=False)
    assert [(m.name, m.error) for m in loaded] == [
        ("good_tasks", None),
        ("bad_tasks", "RuntimeError: no database driver"),
    ]
    assert loaded[0].to_json()["loaded"] is True
    assert loaded[1].to_json() == {
        "module": "bad_tasks",
        "via": "tasks.modules",
        "file": None,
        "loaded": False,
        "error": "RuntimeError: no database driver",
    }
    assert loaded_modules() == loaded
    assert [e["module"] for e in logs if e["event"] == "tasks.module_failed"] == ["bad_tasks"]
    with pytest.raises(TaskCodeError, match=r"cannot import task module 'bad_tasks'"):
        load_task_code(config)
