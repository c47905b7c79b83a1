"""Tokens (hashed, named, read-only), their settings and file, the ``nanobot http token``
command, browser sessions, and what the start says about the dashboard's protection."""

from __future__ import annotations

import fnmatch
import json
import tomllib
from pathlib import Path

import pytest
from aiohttp import web
from click.testing import CliRunner
from sqlalchemy import Engine
from structlog.testing import capture_logs

from nanobot.cli import cli
from nanobot.config import load_config
from nanobot.exceptions import ConfigError
from nanobot.web.app import setup_dashboard
from nanobot.web.auth import is_loopback
from nanobot.web.sessions import SESSION_TTL_S, SessionStore, csrf_matches
from nanobot.web.tokens import (
    Principal,
    TokenEntry,
    TokenStore,
    hash_token,
    new_token,
    parse_token_entries,
    read_token_file,
)


def test_a_token_is_found_by_its_hash_and_a_wrong_one_is_not() -> None:
    """check() gives the name and rights of the matching entry, None for anything else."""
    ops, viewer = new_token(), new_token()
    assert ops != viewer
    assert ops.startswith("nbt_")
    store = TokenStore(
        [TokenEntry("ops", hash_token(ops)), TokenEntry("viewer", hash_token(viewer), True)]
    )
    assert store.check(ops) == Principal("ops", read_only=False)
    assert store.check(viewer) == Principal("viewer", read_only=True)
    assert store.check(ops + "x") is None
    assert store.check("") is None
    assert TokenStore([]).check(ops) is None


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        pytest.param({"name": "ops"}, "sha256:", id="no-hash"),
        pytest.param({"name": "ops", "hash": "nbt_the-token-itself"}, "not the token", id="token"),
        pytest.param({"name": "", "hash": hash_token("x")}, "name", id="empty-name"),
        pytest.param({"name": "a b", "hash": hash_token("x")}, "name", id="space-in-name"),
        pytest.param({"name": "ops", "hash": hash_token("x"), "admin": True}, "only", id="key"),
        pytest.param(
            {"name": "ops", "hash": hash_token("x"), "read_only": "no"}, "read_only", id="ro"
        ),
        pytest.param("ops", "object", id="not-an-object"),
    ],
)
def test_bad_token_entries_are_refused_without_echoing_the_value(entry: object, words: str) -> None:
    """Each bad entry is refused with what is expected, and never with the value given (which
    may be a secret pasted in the wrong place)."""
    with pytest.raises(ValueError, match=words) as caught:
        parse_token_entries([entry])
    assert "nbt_the-token-itself" not in str(caught.value)


def test_token_names_are_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        parse_token_entries(
            [{"name": "ops", "hash": hash_token("a")}, {"name": "ops", "hash": hash_token("b")}]
        )


def test_tokens_from_the_environment_and_a_token_file(tmp_path: Path, nanobot_home: Path) -> None:
    """http.tokens as JSON text in the environment, and a token file with comments and a
    read-only flag, make one store; a bad line names the file and the line."""
    entry = {"name": "ops", "hash": hash_token("a")}
    cfg = load_config(
        {"NANOBOT_HOME": str(nanobot_home), "NANOBOT_HTTP__TOKENS": json.dumps([entry])}
    )
    assert cfg["http.tokens"] == (TokenEntry("ops", hash_token("a")),)
    path = tmp_path / "tokens"
    path.write_text(f"# operators\nviewer {hash_token('b')} read-only\n\nci {hash_token('c')}\n")
    assert read_token_file(path) == [
        TokenEntry("viewer", hash_token("b"), True),
        TokenEntry("ci", hash_token("c"), False),
    ]
    store = TokenStore.from_config(cfg["http.tokens"], str(path))
    assert store.names == ["ops", "viewer", "ci"]
    assert store.check("b") == Principal("viewer", True)
    path.write_text(f"viewer {hash_token('b')} admin\n")
    with pytest.raises(ConfigError, match="line 1"):
        read_token_file(path)
    with pytest.raises(ConfigError, match="cannot be read"):
        read_token_file(tmp_path / "missing")
    path.write_text(f"ops {hash_token('z')}\n")
    with pytest.raises(ConfigError, match="unique"):
        TokenStore.from_config(cfg["http.tokens"], str(path))


def test_a_malformed_tokens_setting_is_one_clear_error(nanobot_home: Path) -> None:
    """Not JSON, not a list, a token where its hash belongs: one line naming the variable and
    the key, which never repeats the value."""
    secret = "nbt_pasted-secret"
    for raw in (
        "not json",
        json.dumps({"name": "ops"}),
        json.dumps([{"name": "ops", "hash": secret}]),
    ):
        with pytest.raises(ConfigError, match=r"^NANOBOT_HTTP__TOKENS: http\.tokens") as caught:
            load_config({"NANOBOT_HOME": str(nanobot_home), "NANOBOT_HTTP__TOKENS": raw})
        assert "\n" not in str(caught.value)
        assert secret not in str(caught.value)


def test_the_token_command_prints_a_token_once_and_the_entry_with_its_hash() -> None:
    """`nanobot http token NAME` makes a token whose hash is in the printed entry and line;
    --stdin hashes a given token without printing it; a bad name is exit 2."""
    result = CliRunner().invoke(cli, ["http", "token", "ops", "--read-only"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    token = lines[0].split(": ", 1)[1]
    entry = json.loads(lines[1].split(": ", 1)[1])
    assert entry == {"name": "ops", "hash": hash_token(token), "read_only": True}
    assert lines[2] == f"token file line: ops {hash_token(token)} read-only"
    result = CliRunner().invoke(cli, ["http", "token", "ci", "--stdin"], input="nbt_given\n")
    assert result.exit_code == 0
    assert "nbt_given" not in result.stdout
    assert hash_token("nbt_given") in result.stdout
    result = CliRunner().invoke(cli, ["http", "token", "two words"])
    assert result.exit_code == 2
    assert result.stderr == (
        "nanobot: error: a token name is 1-64 letters, digits or _.@-, got 'two words'\n"
    )


def test_sessions_expire_after_their_ttl_without_use_and_end_at_close() -> None:
    now = [0.0]
    store = SessionStore(clock=lambda: now[0])
    session = store.open(Principal("ops", False))
    now[0] = SESSION_TTL_S - 1
    assert store.get(session.id) is not None  # used: its expiry moves on
    now[0] += SESSION_TTL_S - 1
    assert store.get(session.id) is not None
    now[0] += SESSION_TTL_S + 1
    assert store.get(session.id) is None
    other = store.open(Principal("ops", False))
    store.close(other.id)
    assert store.get(other.id) is None
    assert store.get("made-up") is None
    assert csrf_matches(other, other.csrf)
    assert not csrf_matches(other, "x")
    assert not csrf_matches(other, None)


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("127.1.2.3")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.4")
    assert not is_loopback("example.org")


def test_the_start_says_how_the_dashboard_is_protected(engine: Engine) -> None:
    """On loopback: reads open, writes by token; elsewhere without a token: locked, said with
    a warning; elsewhere with tokens: reads need one too. Token names only, never hashes."""
    ops = TokenStore([TokenEntry("ops", hash_token("secret"))])
    with capture_logs() as logs:
        open_reads = setup_dashboard(web.Application(), engine, host="127.0.0.1", tokens=ops)
        locked = setup_dashboard(web.Application(), engine, host="0.0.0.0", tokens=TokenStore([]))
        guarded = setup_dashboard(web.Application(), engine, host="10.0.0.5", tokens=ops)
    assert open_reads.open_reads
    assert not locked.open_reads
    assert not guarded.open_reads
    events = [(e["event"], e["log_level"]) for e in logs]
    assert events == [
        ("http.dashboard", "info"),
        ("http.dashboard_locked", "warning"),
        ("http.dashboard", "warning"),
    ]
    assert "no token configured" in logs[1]["reason"]
    assert hash_token("secret") not in repr(logs)


def test_every_template_and_static_file_ships_in_the_package() -> None:
    """pyproject's package data covers each file the pages load, so a wheel serves them."""
    repo = Path(__file__).resolve().parent.parent
    data = tomllib.loads((repo / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["nanobot.web"]
    web_dir = repo / "nanobot" / "web"
    files = [
        p.relative_to(web_dir).as_posix()
        for folder in ("templates", "static")
        for p in (web_dir / folder).iterdir()
    ]
    assert files
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in patterns), name
