"""Browser sessions of the dashboard and their CSRF tokens.

Logging in with a token (the login form) opens a session: a random id sent back as an
``HttpOnly``, ``SameSite=Strict`` cookie, never the token itself. The session remembers the
token's *name* and rights, so a token removed from the configuration ends its sessions at the
next restart, and a browser never holds the secret after the login form.

Each session has its own CSRF token, put in every form as a hidden field and checked (in
constant time) on every form post: ``SameSite=Strict`` already keeps other sites' posts from
carrying the cookie, the CSRF token also covers older browsers and same-site pages.

Sessions live in this process's memory: a restart, or another node, asks for a login again.
They end after :data:`SESSION_TTL_S` without use, at logout, and the oldest are dropped beyond
:data:`MAX_SESSIONS`.

Used from the event loop only (no lock).
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from nanobot.web.tokens import Principal

COOKIE_NAME: Final = "nanobot_session"
SESSION_TTL_S: Final = 12 * 3600.0
MAX_SESSIONS: Final = 1000


@dataclass(frozen=True, slots=True)
class BrowserSession:
    id: str
    principal: Principal
    csrf: str
    expires: float


class SessionStore:
    """The open browser sessions; ``clock`` is monotonic seconds (injected by tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._sessions: OrderedDict[str, BrowserSession] = OrderedDict()

    def open(self, principal: Principal) -> BrowserSession:
        session = BrowserSession(
            id=secrets.token_urlsafe(32),
            principal=principal,
            csrf=secrets.token_urlsafe(32),
            expires=self._clock() + SESSION_TTL_S,
        )
        self._sessions[session.id] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None) -> BrowserSession | None:
        """The live session of a cookie value, its expiry pushed back; None if unknown or old."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if session.expires <= now:
            del self._sessions[session_id]
            return None
        renewed = BrowserSession(
            id=session.id,
            principal=session.principal,
            csrf=session.csrf,
            expires=now + SESSION_TTL_S,
        )
        self._sessions[session_id] = renewed
        self._sessions.move_to_end(session_id)
        return renewed

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_matches(session: BrowserSession, presented: object) -> bool:
    """Whether a form's CSRF field is the session's, compared in constant time."""
    if not isinstance(presented, str) or not presented:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), session.csrf.encode("utf-8"))
