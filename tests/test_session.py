"""The session store: create, read, extend, delete and expire sessions on real databases."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine, func, select

from nanobot import config
from nanobot.db import get_engine, upgrade_database
from nanobot.exceptions import (
    InvalidSessionError,
    NanobotError,
    UnknownSessionError,
)
from nanobot.models import SessionRecord
from nanobot.session import SessionManager, get_session_manager, reset_session_manager

START = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


class FakeClock:
    """A clock that only moves when a test moves it."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(engine: Engine, clock: FakeClock) -> SessionManager:
    return SessionManager(engine, default_ttl=60, clock=clock)


def _rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(SessionRecord)).scalar_one())


def test_create_then_get_returns_the_session(manager: SessionManager) -> None:
    """A created session reads back with its data, its times and an expiry of now + ttl."""
    info = manager.create({"user": "alice", "n": 1, "tags": ["a", "b"]})
    assert len(info.id) >= 40
    got = manager.get(info.id)
    assert got == info
    assert got.data == {"user": "alice", "n": 1, "tags": ["a", "b"]}
    assert got.created_at == START
    assert got.last_active_at == START
    assert got.expires_at == START + timedelta(seconds=60)
    assert got.expires_at.tzinfo is not None


def test_ids_are_unique_and_unguessable(manager: SessionManager) -> None:
    """Every session gets a fresh random URL-safe id."""
    ids = {manager.create().id for _ in range(20)}
    assert len(ids) == 20
    assert all(i.replace("-", "").replace("_", "").isalnum() for i in ids)


def test_create_without_data_stores_an_empty_object(manager: SessionManager) -> None:
    """data=None is stored as {}."""
    info = manager.create()
    got = manager.get(info.id)
    assert got is not None
    assert got.data == {}


def test_explicit_ttl_overrides_the_default(manager: SessionManager) -> None:
    """create(ttl=...) accepts seconds or a timedelta."""
    assert manager.create(ttl=5).expires_at == START + timedelta(seconds=5)
    assert manager.create(ttl=timedelta(hours=1)).expires_at == START + timedelta(hours=1)


def test_default_ttl_comes_from_the_configuration(
    db_url: str, engine: Engine, monkeypatch: pytest.MonkeyPatch, clock: FakeClock
) -> None:
    """Without default_ttl, session.ttl from the configuration applies."""
    monkeypatch.setenv("NANOBOT_SESSION__TTL", "120")
    config.reset_config()
    info = SessionManager(engine, clock=clock).create()
    assert info.expires_at == START + timedelta(seconds=120)


def test_get_returns_none_for_an_unknown_id(manager: SessionManager) -> None:
    """An id that was never issued reads as None, whatever its type or length."""
    assert manager.get("no-such-session") is None
    assert manager.get("x" * 500) is None
    assert manager.get(123) is None  # type: ignore[arg-type]


def test_session_expires_at_its_expiry(manager: SessionManager, clock: FakeClock) -> None:
    """A session is live until just before expires_at and gone from that instant on."""
    info = manager.create(ttl=10)
    clock.advance(9.999)
    assert manager.get(info.id) is not None
    clock.advance(0.001)
    assert manager.get(info.id) is None


def test_touch_extends_the_session(manager: SessionManager, clock: FakeClock) -> None:
    """touch moves last_active_at to now and expires_at to now + ttl, keeping the data."""
    info = manager.create({"k": "v"}, ttl=10)
    clock.advance(8)
    touched = manager.touch(info.id)
    assert touched.last_active_at == START + timedelta(seconds=8)
    assert touched.expires_at == START + timedelta(seconds=8 + 60)
    assert touched.created_at == START
    assert touched.data == {"k": "v"}
    clock.advance(30)
    assert manager.get(info.id) == touched
    assert manager.touch(info.id, ttl=timedelta(seconds=1)).expires_at == clock.now + timedelta(
        seconds=1
    )


def test_touch_of_an_unknown_or_expired_session_raises(
    manager: SessionManager, clock: FakeClock
) -> None:
    """touch raises UnknownSessionError, a KeyError of nanobot's hierarchy, and cannot revive."""
    with pytest.raises(UnknownSessionError) as caught:
        manager.touch("no-such-session")
    assert isinstance(caught.value, KeyError)
    assert isinstance(caught.value, NanobotError)
    assert "unknown or expired session" in str(caught.value)

    info = manager.create(ttl=1)
    clock.advance(1)
    with pytest.raises(KeyError):
        manager.touch(info.id)
    assert manager.get(info.id) is None


def test_unknown_session_message_does_not_reveal_the_id(manager: SessionManager) -> None:
    """The error message shows only the start of the (secret) id."""
    info = manager.create()
    manager.delete(info.id)
    with pytest.raises(UnknownSessionError) as caught:
        manager.touch(info.id)
    assert info.id not in str(caught.value)
    assert caught.value.session_id == info.id


def test_update_data_replaces_the_data_without_extending(
    manager: SessionManager, clock: FakeClock
) -> None:
    """update_data stores the new object; the expiry stays where it was."""
    info = manager.create({"a": 1})
    clock.advance(5)
    updated = manager.update_data(info.id, {"b": 2})
    assert updated.data == {"b": 2}
    assert updated.expires_at == info.expires_at
    assert manager.get(info.id) == updated
    with pytest.raises(UnknownSessionError):
        manager.update_data("no-such-session", {})


def test_delete_removes_the_session(manager: SessionManager) -> None:
    """delete returns True once and False afterwards; the session is gone."""
    info = manager.create()
    assert manager.delete(info.id) is True
    assert manager.get(info.id) is None
    assert manager.delete(info.id) is False
    assert manager.delete("no-such-session") is False


def test_cleanup_deletes_only_expired_rows(
    engine: Engine, manager: SessionManager, clock: FakeClock
) -> None:
    """cleanup_expired_sessions removes expired rows, keeps live ones, and says how many."""
    short = [manager.create(ttl=10) for _ in range(3)]
    long = manager.create(ttl=100)
    assert manager.cleanup_expired_sessions() == 0
    clock.advance(10)
    assert manager.count() == 1
    assert manager.cleanup_expired_sessions() == 3
    assert _rows(engine) == 1
    assert manager.get(long.id) is not None
    assert all(manager.get(s.id) is None for s in short)
    assert manager.cleanup_expired_sessions() == 0


def test_cleanup_accepts_an_explicit_time(manager: SessionManager) -> None:
    """cleanup_expired_sessions(now=...) judges expiry at that time; naive times are refused."""
    manager.create(ttl=10)
    manager.create(ttl=20)
    assert manager.cleanup_expired_sessions(now=START + timedelta(seconds=15)) == 1
    with pytest.raises(InvalidSessionError):
        manager.cleanup_expired_sessions(now=datetime(2030, 1, 1))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param({"when": datetime(2026, 1, 1, tzinfo=UTC)}, id="datetime"),
        pytest.param({"obj": object()}, id="object"),
        pytest.param({"nan": math.nan}, id="nan"),
        pytest.param({"s": {1, 2}}, id="set"),
        pytest.param(["not", "an", "object"], id="list"),
        pytest.param("text", id="str"),
    ],
)
def test_bad_data_is_refused(manager: SessionManager, data: object) -> None:
    """Data that is not a JSON object raises InvalidSessionError (a ValueError), writes nothing."""
    with pytest.raises(InvalidSessionError) as caught:
        manager.create(data)  # type: ignore[arg-type]
    assert isinstance(caught.value, ValueError)
    assert "session data" in str(caught.value)
    assert manager.count() == 0


@pytest.mark.parametrize("ttl", [0, -5, math.nan, math.inf, True, "60", timedelta(0)])
def test_bad_ttl_is_refused(engine: Engine, manager: SessionManager, ttl: object) -> None:
    """A ttl that is not a positive finite number of seconds is refused wherever it is given."""
    info = manager.create()
    with pytest.raises(InvalidSessionError, match="ttl"):
        manager.create(ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        manager.touch(info.id, ttl=ttl)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ttl"):
        SessionManager(engine, default_ttl=ttl)  # type: ignore[arg-type]


def test_data_reads_back_as_json_would(manager: SessionManager) -> None:
    """The stored data is a JSON copy: tuples read back as lists, later changes do not leak."""
    data: dict[str, object] = {"t": (1, 2), "nested": {"x": 1}}
    info = manager.create(data)
    data["added"] = True
    got = manager.get(info.id)
    assert got is not None
    assert got.data == {"t": [1, 2], "nested": {"x": 1}}


def test_get_session_manager_is_process_wide_on_the_configured_database(db_url: str) -> None:
    """get_session_manager returns one manager on get_engine(); reset forgets it."""
    upgrade_database(get_engine())
    first = get_session_manager()
    assert first is get_session_manager()
    assert first.engine is get_engine()
    info = first.create({"via": "global"})
    reset_session_manager()
    second = get_session_manager()
    assert second is not first
    got = second.get(info.id)
    assert got is not None
    assert got.data == {"via": "global"}
