"""Sessions of the assistant, kept in the ``sessions`` table until they expire.

A session is an opaque, unguessable id (``secrets.token_urlsafe``) with a JSON object of data
and an expiry: ``session.ttl`` seconds after it was created or last touched. An expired session
is as good as absent (``get`` returns None, ``touch`` raises) from the moment it expires; the
row itself is removed by :meth:`SessionManager.cleanup_expired_sessions`, which the built-in
cleanup task calls, as the seed's ``CleanupTask`` does.

Time comes from an injected ``clock`` so that expiry is tested without sleeping.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import structlog
from sqlalchemy import Engine, Row, delete, func, insert, select, update

from nanobot.config import get_config
from nanobot.db import get_engine, read_transaction, write_transaction
from nanobot.exceptions import InvalidSessionError, UnknownSessionError
from nanobot.models import SessionRecord, utcnow
from nanobot.times import Clock, is_positive_number

log = structlog.get_logger(__name__)

DEFAULT_TTL: Final = 86400.0
# 32 random bytes: 43 URL-safe characters, within the 64 of sessions.id.
TOKEN_BYTES: Final = 32

Ttl = float | int | timedelta


@dataclass(frozen=True, slots=True, kw_only=True)
class SessionInfo:
    """One live session as read from the database."""

    id: str
    created_at: datetime
    last_active_at: datetime
    expires_at: datetime
    data: dict[str, Any]


def _ttl_seconds(ttl: Ttl) -> float:
    seconds = ttl.total_seconds() if isinstance(ttl, timedelta) else ttl
    if not is_positive_number(seconds):
        raise InvalidSessionError(f"session ttl must be a positive number of seconds, got {ttl!r}")
    return float(seconds)


def _json_object(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of ``data`` as it will read back from the database (a JSON object)."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidSessionError(
            f"session data must be a JSON object (a dict), got {type(data).__name__}"
        )
    try:
        text = json.dumps(dict(data), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidSessionError(f"session data is not JSON-serialisable: {exc}") from None
    loaded = json.loads(text)
    assert isinstance(loaded, dict)
    return loaded


def _info(row: Row[Any]) -> SessionInfo:
    return SessionInfo(
        id=row.id,
        created_at=row.created_at,
        last_active_at=row.last_active_at,
        expires_at=row.expires_at,
        data=dict(row.data or {}),
    )


_COLUMNS: Final = (
    SessionRecord.id,
    SessionRecord.created_at,
    SessionRecord.last_active_at,
    SessionRecord.expires_at,
    SessionRecord.data,
)


class SessionManager:
    """Create, read, extend and expire sessions in the ``sessions`` table of ``engine``."""

    def __init__(
        self,
        engine: Engine,
        *,
        default_ttl: Ttl | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        if default_ttl is None:
            default_ttl = get_config().get("session.ttl", DEFAULT_TTL)
        self.default_ttl = _ttl_seconds(default_ttl)
        self._clock = clock

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise InvalidSessionError(f"the session clock returned a naive datetime {now!r}")
        return now

    def _expiry(self, now: datetime, ttl: Ttl | None) -> datetime:
        seconds = self.default_ttl if ttl is None else _ttl_seconds(ttl)
        return now + timedelta(seconds=seconds)

    def create(self, data: Mapping[str, Any] | None = None, ttl: Ttl | None = None) -> SessionInfo:
        """A new session holding ``data``, expiring ``ttl`` seconds from now."""
        payload = _json_object(data)
        now = self._now()
        info = SessionInfo(
            id=secrets.token_urlsafe(TOKEN_BYTES),
            created_at=now,
            last_active_at=now,
            expires_at=self._expiry(now, ttl),
            data=payload,
        )
        with write_transaction(self.engine) as conn:
            conn.execute(
                insert(SessionRecord).values(
                    id=info.id,
                    created_at=info.created_at,
                    last_active_at=info.last_active_at,
                    expires_at=info.expires_at,
                    data=info.data,
                )
            )
        log.debug("session.created", expires_at=info.expires_at.isoformat())
        return info

    def get(self, session_id: str) -> SessionInfo | None:
        """The live session of that id; None if there is none or it has expired."""
        if not isinstance(session_id, str):
            return None
        now = self._now()
        with read_transaction(self.engine) as conn:
            row = conn.execute(
                select(*_COLUMNS).where(
                    SessionRecord.id == session_id, SessionRecord.expires_at > now
                )
            ).one_or_none()
        return None if row is None else _info(row)

    def touch(self, session_id: str, ttl: Ttl | None = None) -> SessionInfo:
        """Mark the session used now and extend it to ``ttl`` seconds from now.

        Raises :class:`UnknownSessionError` (a ``KeyError``) for an unknown or expired id.
        """
        now = self._now()
        expires_at = self._expiry(now, ttl)
        return self._update(session_id, now, last_active_at=now, expires_at=expires_at)

    def update_data(self, session_id: str, data: Mapping[str, Any]) -> SessionInfo:
        """Replace the session's data. It does not extend the session: :meth:`touch` does."""
        payload = _json_object(data)
        return self._update(session_id, self._now(), data=payload)

    def _update(self, session_id: str, now: datetime, **values: Any) -> SessionInfo:
        if not isinstance(session_id, str):
            raise UnknownSessionError(repr(session_id))
        live = (SessionRecord.id == session_id) & (SessionRecord.expires_at > now)
        with write_transaction(self.engine) as conn:
            result = conn.execute(update(SessionRecord).where(live).values(**values))
            if result.rowcount == 0:
                raise UnknownSessionError(session_id)
            row = conn.execute(select(*_COLUMNS).where(SessionRecord.id == session_id)).one()
        return _info(row)

    def delete(self, session_id: str) -> bool:
        """Remove the session; False if no row had that id (an expired row still counts)."""
        if not isinstance(session_id, str):
            return False
        with write_transaction(self.engine) as conn:
            result = conn.execute(delete(SessionRecord).where(SessionRecord.id == session_id))
        return result.rowcount > 0

    def cleanup_expired_sessions(self, now: datetime | None = None) -> int:
        """Delete every session expired at ``now`` (default: the clock); how many went."""
        at = self._now() if now is None else now
        if at.tzinfo is None:
            raise InvalidSessionError(f"cleanup time must be timezone-aware, got {at!r}")
        with write_transaction(self.engine) as conn:
            result = conn.execute(delete(SessionRecord).where(SessionRecord.expires_at <= at))
        removed = int(result.rowcount)
        if removed:
            log.info("session.cleanup", removed=removed)
        return removed

    def count(self) -> int:
        """How many live sessions there are (for the status command and metrics)."""
        now = self._now()
        with read_transaction(self.engine) as conn:
            live = conn.execute(
                select(func.count())
                .select_from(SessionRecord)
                .where(SessionRecord.expires_at > now)
            ).scalar_one()
        return int(live)


def probe_sessions(engine: Engine) -> None:
    """Read one row of ``sessions`` at most, by its primary key: raises when the table does not
    answer (the heartbeat's session check)."""
    with engine.connect() as conn:
        conn.execute(select(SessionRecord.id).limit(1)).all()


_manager: SessionManager | None = None
_manager_lock = threading.Lock()


def get_session_manager() -> SessionManager:
    """The process-wide session manager, on the configured database."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = SessionManager(get_engine())
        return _manager


def reset_session_manager() -> None:
    """Forget the process-wide manager (for tests, after the configuration changed)."""
    global _manager
    with _manager_lock:
        _manager = None
