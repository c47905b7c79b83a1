"""Configuration: defaults < $NANOBOT_HOME/config.json < NANOBOT_<SECTION>__<KEY>, all validated."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from nanobot.config import SETTINGS, get_config, load_config, reset_config
from nanobot.cron.dispatch import DISPATCH_AHEAD
from nanobot.exceptions import ConfigError, NanobotError

REPO = Path(__file__).resolve().parent.parent


def _write(home: Path, data: Any) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _refused(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(**kwargs)
    message = str(caught.value)
    assert "\n" not in message, "a ConfigError message is one line"
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, NanobotError)
    return message


def test_defaults_without_file_or_environment(nanobot_home: Path) -> None:
    """With no file and no variables every setting has its documented default."""
    cfg = load_config()
    for setting in SETTINGS:
        if setting.default is not None:
            assert cfg[setting.key] == setting.check(setting.default), setting.key
        assert cfg.sources[setting.key] == "default"
    assert cfg.get("heartbeat.interval") == 30.0
    assert cfg.home == nanobot_home


def test_database_url_defaults_under_nanobot_home(nanobot_home: Path) -> None:
    """database.url defaults to a SQLite file nanobot.db in NANOBOT_HOME; logs to home/logs."""
    cfg = load_config()
    assert cfg.database_url == f"sqlite:///{nanobot_home / 'nanobot.db'}"
    assert cfg.log_dir == nanobot_home / "logs"


def test_file_overrides_defaults(nanobot_home: Path) -> None:
    """A value in config.json replaces the default and records the file as its source."""
    path = _write(nanobot_home, {"heartbeat": {"interval": 5}, "http": {"port": 9000}})
    cfg = load_config()
    assert cfg["heartbeat.interval"] == 5.0
    assert cfg["http.port"] == 9000
    assert cfg.sources["heartbeat.interval"] == str(path)
    assert cfg["heartbeat.check_timeout"] == 5.0


def test_environment_overrides_file(nanobot_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NANOBOT_HEARTBEAT__INTERVAL=5 wins over the file's value."""
    _write(nanobot_home, {"heartbeat": {"interval": 60}})
    monkeypatch.setenv("NANOBOT_HEARTBEAT__INTERVAL", "5")
    cfg = load_config()
    assert cfg["heartbeat.interval"] == 5.0
    assert cfg.sources["heartbeat.interval"] == "NANOBOT_HEARTBEAT__INTERVAL"


def test_explicit_environ_mapping_is_used(tmp_path: Path) -> None:
    """load_config(environ=...) reads that mapping instead of os.environ."""
    cfg = load_config({"NANOBOT_HOME": str(tmp_path / "h"), "NANOBOT_HTTP__ENABLED": "no"})
    assert cfg["http.enabled"] is False
    assert cfg.home == tmp_path / "h"


def test_get_config_reads_dotted_keys_as_the_seed_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """get_config().get("heartbeat.interval", 30) returns the configured value or the default."""
    monkeypatch.setenv("NANOBOT_HEARTBEAT__INTERVAL", "12")
    reset_config()
    assert get_config().get("heartbeat.interval", 30) == 12.0
    assert get_config().get("no.such.key", 30) == 30
    assert get_config().get("service.node", "fallback") == "fallback"
    assert get_config() is get_config()


def test_unknown_key_by_index_is_refused() -> None:
    """cfg["no.such"] raises ConfigError naming the key."""
    with pytest.raises(ConfigError, match=r"no\.such"):
        load_config()["no.such"]


def test_malformed_json_is_refused(nanobot_home: Path) -> None:
    """A file that is not JSON is refused with its path and the position of the error."""
    path = _write(nanobot_home, '{"heartbeat": {"interval": 5,}}')
    message = _refused()
    assert str(path) in message
    assert "not valid JSON" in message
    assert "line 1" in message


@pytest.mark.parametrize("data", [[1, 2], "text", 5, None])
def test_non_object_json_is_refused(nanobot_home: Path, data: Any) -> None:
    """A file whose JSON is not an object of sections is refused naming the file."""
    path = _write(nanobot_home, json.dumps(data))
    message = _refused()
    assert str(path) in message
    assert "JSON object" in message


def test_section_that_is_not_an_object_is_refused(nanobot_home: Path) -> None:
    """{"heartbeat": 5} is refused naming the file and the section."""
    path = _write(nanobot_home, {"heartbeat": 5})
    message = _refused()
    assert str(path) in message
    assert "'heartbeat'" in message
    assert "object" in message


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"nosuch": {"x": 1}}, "nosuch.x"),
        ({"heartbeat": {"intervall": 5}}, "heartbeat.intervall"),
    ],
)
def test_unknown_section_or_key_in_file_is_refused(
    nanobot_home: Path, data: dict[str, Any], key: str
) -> None:
    """An unknown section or key in the file is refused naming the file and the key."""
    path = _write(nanobot_home, data)
    message = _refused()
    assert str(path) in message
    assert repr(key) in message
    assert "unknown setting" in message


def test_unknown_key_in_environment_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown NANOBOT_<SECTION>__<KEY> is refused naming the variable."""
    monkeypatch.setenv("NANOBOT_HEARTBEAT__INTERVALL", "5")
    message = _refused()
    assert "NANOBOT_HEARTBEAT__INTERVALL" in message
    assert "'heartbeat.intervall'" in message


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "nan", "NaN", "inf", ""])
def test_bad_heartbeat_interval_in_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    """A bad interval from the environment names the variable, the key, what is expected."""
    monkeypatch.setenv("NANOBOT_HEARTBEAT__INTERVAL", raw)
    message = _refused()
    assert message.startswith("NANOBOT_HEARTBEAT__INTERVAL: heartbeat.interval = ")
    assert "expected a positive number" in message


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("abc", id="text"),
        pytest.param(0, id="zero"),
        pytest.param(-5, id="negative"),
        pytest.param(True, id="bool"),
        pytest.param(False, id="false"),
        pytest.param([5], id="list"),
        pytest.param({"s": 5}, id="object"),
    ],
)
def test_bad_heartbeat_interval_in_file_is_refused(nanobot_home: Path, value: Any) -> None:
    """A bad interval in the file names the file, the key, the value and what is expected."""
    path = _write(nanobot_home, {"heartbeat": {"interval": value}})
    message = _refused()
    assert message.startswith(f"{path}: heartbeat.interval = {value!r} is invalid")
    assert message.endswith("expected a positive number")


def test_nan_literal_in_file_is_refused(nanobot_home: Path) -> None:
    """Python's json accepts a bare NaN; nanobot still refuses it as an interval."""
    path = _write(nanobot_home, '{"heartbeat": {"interval": NaN}}')
    message = _refused()
    assert str(path) in message
    assert "heartbeat.interval" in message
    assert "positive number" in message


@pytest.mark.parametrize("raw", ["0", "65536", "-1", "http", "80.5"])
def test_http_port_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    """http.port must be a whole number from 1 to 65535."""
    monkeypatch.setenv("NANOBOT_HTTP__PORT", raw)
    message = _refused()
    assert "NANOBOT_HTTP__PORT" in message
    assert "http.port" in message
    assert "a port number from 1 to 65535" in message


@pytest.mark.parametrize("good", ["1", "8765", "65535"])
def test_http_port_in_range_is_accepted(monkeypatch: pytest.MonkeyPatch, good: str) -> None:
    """Ports 1 to 65535 load as integers."""
    monkeypatch.setenv("NANOBOT_HTTP__PORT", good)
    assert load_config()["http.port"] == int(good)


@pytest.mark.parametrize(
    "url", ["mysql://u@h/db", "http://example.com", "nanobot.db", "/var/lib/nanobot.db"]
)
def test_bad_database_url_scheme_is_refused(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """database.url must be a sqlite or postgresql URL."""
    monkeypatch.setenv("NANOBOT_DATABASE__URL", url)
    message = _refused()
    assert "NANOBOT_DATABASE__URL" in message
    assert "database.url" in message
    assert "sqlite:///" in message
    assert "postgresql" in message


@pytest.mark.parametrize("raw", ["0.05", "0", "1.5", "-0.2", "soon", "nan"])
def test_dispatch_ahead_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    """cron.dispatch_ahead is a number of seconds from 0.1 to 1; its default is the scheduler's
    DISPATCH_AHEAD."""
    monkeypatch.setenv("NANOBOT_CRON__DISPATCH_AHEAD", raw)
    message = _refused()
    assert message.startswith("NANOBOT_CRON__DISPATCH_AHEAD: cron.dispatch_ahead")
    assert message.endswith("expected a number of seconds from 0.1 to 1")
    monkeypatch.delenv("NANOBOT_CRON__DISPATCH_AHEAD")
    assert load_config()["cron.dispatch_ahead"] == DISPATCH_AHEAD
    monkeypatch.setenv("NANOBOT_CRON__DISPATCH_AHEAD", "0.25")
    assert load_config()["cron.dispatch_ahead"] == 0.25


@pytest.mark.parametrize(
    ("var", "raw", "expected"),
    [
        ("NANOBOT_LOGGING__LEVEL", "loud", "one of debug, info, warning, error, critical"),
        ("NANOBOT_LOGGING__FORMAT", "xml", "one of auto, console, json"),
        ("NANOBOT_DATABASE__ECHO", "maybe", "true or false"),
        ("NANOBOT_LOGGING__BACKUP_COUNT", "2.5", "a positive whole number"),
        ("NANOBOT_CRON__DEFAULT_TIMEOUT", "-1", "a number >= 0"),
    ],
)
def test_other_bad_values_are_refused(
    monkeypatch: pytest.MonkeyPatch, var: str, raw: str, expected: str
) -> None:
    """Each kind of check names the variable and what it expects."""
    monkeypatch.setenv(var, raw)
    message = _refused()
    assert message.startswith(f"{var}: ")
    assert message.endswith(f"expected {expected}")


def test_values_are_normalised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Text from the environment is converted: numbers, booleans, lower-case choices."""
    monkeypatch.setenv("NANOBOT_LOGGING__LEVEL", "DEBUG")
    monkeypatch.setenv("NANOBOT_DATABASE__ECHO", "yes")
    monkeypatch.setenv("NANOBOT_CRON__HISTORY_MAX_ROWS", " 50 ")
    cfg = load_config()
    assert cfg["logging.level"] == "debug"
    assert cfg["database.echo"] is True
    assert cfg["cron.history_max_rows"] == 50


# --- README ------------------------------------------------------------------------------------


def _readme_defaults() -> dict[str, str]:
    """The settings table of docs/configuration.md: key -> default cell."""
    rows: dict[str, str] = {}
    pattern = re.compile(r"^\|\s*`([a-z_]+\.[a-z_]+)`\s*\|\s*(.*?)\s*\|(.*)\|\s*$")
    for line in (REPO / "docs" / "configuration.md").read_text(encoding="utf-8").splitlines():
        match = pattern.match(line)
        if match:
            rows[match.group(1)] = match.group(2).strip("`")
    return rows


def _render_default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_readme_documents_every_setting_with_its_default() -> None:
    """docs/configuration.md's settings table lists every key of SETTINGS with its default."""
    documented = _readme_defaults()
    assert sorted(documented) == sorted(s.key for s in SETTINGS)
    for setting in SETTINGS:
        default = None if setting.default is None else setting.check(setting.default)
        assert documented[setting.key] == _render_default(default), setting.key
