"""Who may read and who may change: the access policy of the dashboard and the API.

- A request names its principal with ``Authorization: Bearer <token>`` (the API) or with the
  session cookie of a browser that logged in (the pages). A bearer header that is malformed or
  holds an unknown token is refused with 401 at once, even for a read.
- Reads (GET, HEAD) are open to anyone when the endpoint is bound to a loopback address (the
  default ``127.0.0.1``); bound to any other address, they need a token too, and with no token
  configured nothing of the dashboard or the API can be read (the start logs so).
- Every change needs a principal (401 without one) whose token is not read-only (403); a form
  post also needs the session's CSRF token (403 without it), and a browser post from another
  origin is refused (403).

``/healthz``, ``/readyz``, ``/status`` and ``/metrics`` are the service's probes and stay open,
as before; ``/static/`` holds only the dashboard's own CSS and JavaScript.

Used from the event loop only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Middleware

from nanobot.exceptions import NanobotError
from nanobot.web.sessions import COOKIE_NAME, BrowserSession, SessionStore, csrf_matches
from nanobot.web.tokens import Principal, TokenStore

PROBE_PATHS: Final = frozenset({"/healthz", "/readyz", "/status", "/metrics"})
OPEN_PREFIXES: Final = ("/static/",)
# Pages an anonymous browser must reach to be able to log in.
LOGIN_PATHS: Final = frozenset({"/login"})
SAFE_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS"})

REQUEST_PRINCIPAL: Final = web.RequestKey("nanobot_principal", Principal)
REQUEST_SESSION: Final = web.RequestKey("nanobot_session", BrowserSession)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class AccessDenied(NanobotError):
    """Raised by a handler to refuse a request: the middleware answers it as JSON or HTML."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    tokens: TokenStore
    sessions: SessionStore
    open_reads: bool


def principal_of(request: web.Request) -> Principal | None:
    return request.get(REQUEST_PRINCIPAL)


def session_of(request: web.Request) -> BrowserSession | None:
    return request.get(REQUEST_SESSION)


def is_api(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _bearer(request: web.Request) -> str | None:
    """The bearer token, None without an Authorization header; AccessDenied if malformed."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AccessDenied(401, "the Authorization header must be 'Bearer <token>'")
    return token.strip()


def require_writer(request: web.Request) -> Principal:
    """The principal allowed to change things, or AccessDenied (401, 403) saying why not.

    A browser session must also present its CSRF token: the form's ``csrf`` field (checked by
    the form handler with :func:`check_csrf`) or, for the API, the ``X-CSRF-Token`` header.
    """
    principal = principal_of(request)
    if principal is None:
        raise AccessDenied(401, "log in, or send 'Authorization: Bearer <token>', to change tasks")
    if not principal.can_write:
        raise AccessDenied(403, f"token {principal.name!r} is read-only")
    return principal


def check_csrf(request: web.Request, presented: object) -> None:
    """Refuse (403) a browser-session change whose CSRF token is missing or wrong."""
    session = session_of(request)
    if session is None:
        return  # a bearer token: no cookie is involved, so no request can be forged
    if not csrf_matches(session, presented):
        raise AccessDenied(403, "the form is out of date or was not sent by this dashboard")


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        # No Origin: not a cross-site browser request (or an old browser, which the CSRF token
        # covers). "null" comes from privacy-preserving contexts: refuse it for changes.
        return origin is None
    return origin.split("://", 1)[-1] == request.host


def access_middleware(
    policy: AccessPolicy, on_denied: Callable[[web.Request, AccessDenied], web.StreamResponse]
) -> Middleware:
    """The middleware that resolves each request's principal and enforces the read rule."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in PROBE_PATHS or path.startswith(OPEN_PREFIXES):
            return await handler(request)
        try:
            token = _bearer(request)
            if token is not None:
                principal = policy.tokens.check(token)
                if principal is None:
                    raise AccessDenied(401, "unknown token")
                request[REQUEST_PRINCIPAL] = principal
            else:
                session = policy.sessions.get(request.cookies.get(COOKIE_NAME))
                if session is not None:
                    request[REQUEST_PRINCIPAL] = session.principal
                    request[REQUEST_SESSION] = session
            if request.method not in SAFE_METHODS and not _same_origin(request):
                raise AccessDenied(403, "cross-origin request refused")
            if not policy.open_reads and principal_of(request) is None and path not in LOGIN_PATHS:
                raise AccessDenied(401, "this endpoint is not on loopback: a token is required")
            return await handler(request)
        except AccessDenied as denied:
            return on_denied(request, denied)

    return middleware
