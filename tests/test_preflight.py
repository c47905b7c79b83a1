"""The checks before the service starts (nanobot.preflight), in this process on real folders and
files: each failure is one line naming the path and the documented exit code. The service's
side (the line printed, the exit code) is the fault suite's tests/faults/test_startup.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nanobot.config import load_config
from nanobot.preflight import (
    EXIT_FAILED,
    EXIT_UNREADABLE,
    EXIT_USAGE,
    StartupError,
    check_database_file,
    check_paths,
    claim_node,
    ensure_folder,
    sqlite_file,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql+psycopg://db.example/nanobot", None),
        ("sqlite://", None),
        ("sqlite:///:memory:", None),
        ("sqlite:///file:shared?mode=memory&uri=true", None),
        ("sqlite:////srv/nanobot/nanobot.db", Path("/srv/nanobot/nanobot.db")),
    ],
)
def test_only_a_sqlite_file_is_a_database_file(
    tmp_path: Path, url: str, expected: Path | None
) -> None:
    config = load_config({"NANOBOT_HOME": str(tmp_path), "NANOBOT_DATABASE__URL": url})
    assert sqlite_file(config) == expected


def test_a_missing_folder_is_made_and_probed(tmp_path: Path) -> None:
    """The folder is created; the probe file that proved it writable is gone afterwards."""
    folder = tmp_path / "a" / "b"
    ensure_folder(folder, "log folder (logging.dir)", EXIT_USAGE)
    assert folder.is_dir()
    assert list(folder.iterdir()) == []


def test_a_file_where_a_folder_belongs_is_refused_with_its_exit_code(tmp_path: Path) -> None:
    in_the_way = tmp_path / "home"
    in_the_way.write_text("")
    with pytest.raises(StartupError, match=rf"^NANOBOT_HOME {in_the_way} is not a folder$") as e:
        ensure_folder(in_the_way, "NANOBOT_HOME", EXIT_USAGE)
    assert e.value.exit_code == EXIT_USAGE
    with pytest.raises(StartupError, match=r"cannot be created: Not a directory$") as e:
        ensure_folder(in_the_way / "logs", "log folder (logging.dir)", EXIT_USAGE)
    assert e.value.exit_code == EXIT_USAGE


def test_a_database_path_that_is_a_folder_exits_3(tmp_path: Path) -> None:
    folder = tmp_path / "nanobot.db"
    folder.mkdir()
    with pytest.raises(StartupError, match=rf"^database {folder} is not a file$") as e:
        check_database_file(folder)
    assert e.value.exit_code == EXIT_UNREADABLE


def test_check_paths_accepts_a_writable_home_and_database(tmp_path: Path) -> None:
    """A new home, log folder and database folder are made; an existing database file that can
    be opened for writing passes."""
    home = tmp_path / "home"
    database = tmp_path / "data" / "nanobot.db"
    config = load_config(
        {"NANOBOT_HOME": str(home), "NANOBOT_DATABASE__URL": f"sqlite:///{database}"}
    )
    check_paths(config)
    database.write_bytes(b"")
    check_paths(config)
    assert home.is_dir()
    assert config.log_dir.is_dir()
    assert database.parent.is_dir()


def test_a_second_service_as_the_same_node_is_refused_until_the_first_releases(
    tmp_path: Path,
) -> None:
    """The claim is a flock on a file in the home naming its holder: a second claim of the node
    fails with exit 1 and names the first; after release the node can be claimed again."""
    config = load_config({"NANOBOT_HOME": str(tmp_path)})
    first = claim_node(config, "alpha", 8765)
    try:
        with pytest.raises(
            StartupError, match=r"another service already runs as node 'alpha'"
        ) as e:
            claim_node(config, "alpha", None)
        assert e.value.exit_code == EXIT_FAILED
        assert f"(pid {os.getpid()}, port 8765)" in str(e.value)
        other = claim_node(config, "beta", None)  # another node from the same home: allowed
        other.release()
    finally:
        first.release()
    first.release()  # twice: nothing happens
    again = claim_node(config, "alpha", None)
    again.release()
