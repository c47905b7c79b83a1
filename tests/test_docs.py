"""The README's commands are the ones CI runs."""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section)


def test_quick_start_has_two_one_line_commands() -> None:
    """The Quick start is two commands: one runs nanobot, one runs the tests."""
    commands = _quick_start_commands()
    assert len(commands) == 2
    assert all("\n" not in c for c in commands)
    assert commands[0].endswith("python -m nanobot")
    assert commands[1].endswith("pytest")


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the README's test command, and is an executable bash script."""
    test_command = _quick_start_commands()[1]
    script = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert f'TEST_COMMAND="{test_command}"\n' in script
    assert 'bash -c "$TEST_COMMAND"\n' in script
    assert script.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in script
    assert "export NANOBOT_REQUIRE_POSTGRES=1" in script
    assert os.access(REPO / ".ci" / "run", os.X_OK)
