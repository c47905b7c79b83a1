"""The dashboard and the REST API, added to the service's HTTP endpoint.

:func:`setup_dashboard` adds the pages (:mod:`nanobot.web.pages`), the API
(:mod:`nanobot.web.api`), the static files shipped in the package, the access policy
(:mod:`nanobot.web.auth`) and the security headers to the endpoint's application, and logs how it
is protected: reads open on loopback, or a token required for everything.

Runs on the event loop; set up before the application starts.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp_jinja2
import jinja2
import structlog
from aiohttp import web
from markupsafe import Markup
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from nanobot.models import error_text
from nanobot.status import nanobot_version
from nanobot.web import auth
from nanobot.web.api import Api, api_errors, error_response
from nanobot.web.auth import AccessDenied, AccessPolicy
from nanobot.web.pages import Pages
from nanobot.web.sessions import SessionStore
from nanobot.web.timefmt import absolute, duration, relative
from nanobot.web.tokens import TokenStore

log = structlog.get_logger(__name__)

HERE: Final = Path(__file__).parent
# Request bodies past this are refused with 413: a task definition is a few hundred bytes.
MAX_BODY_BYTES: Final = 64 * 1024

SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


@jinja2.pass_context
def _when(
    context: Any, then: datetime | None, zone: tzinfo | None = None, *, inline: bool = False
) -> Markup:
    """A time as ``<time>``: relative text, absolute in the viewer's zone (and ``zone``);
    ``inline`` keeps it on one line, for a sentence."""
    if then is None:
        return Markup('<span class="muted">-</span>')
    now: datetime = context["now"]
    viewer: tzinfo = context["zone"]
    parts = [absolute(then, viewer)]
    if zone is not None and absolute(then, zone) != parts[0]:
        parts.append(absolute(then, zone))
    return Markup(
        '<time datetime="{iso}" title="{utc}"{cls}><span class="rel">{rel}</span> '
        '<span class="abs">{abs}</span></time>'
    ).format(
        cls=Markup(' class="inline"') if inline else "",
        iso=then.isoformat(),
        utc=absolute(then, UTC),
        rel=relative(then, now),
        abs=" / ".join(parts),
    )


def _todatetime(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _static(name: str) -> str:
    # The version in the address: a new release is never served an old cached stylesheet.
    return f"/static/{name}?v={nanobot_version()}"


def _environment() -> dict[str, Any]:
    return {"when": _when, "static": _static}


def _denied_handler(pages_login: str) -> Any:
    def on_denied(request: web.Request, denied: AccessDenied) -> web.StreamResponse:
        if auth.is_api(request):
            return error_response(denied.status, denied.message)
        if denied.status == 401 and request.method in auth.SAFE_METHODS:
            # A page that needs a login: go to the form, and come back after it.
            raise web.HTTPSeeOther(f"{pages_login}?next={request.path_qs}")
        return aiohttp_jinja2.render_template(
            "error.html",
            request,
            _bare_context(request)
            | {
                "title": "Not allowed" if denied.status == 403 else "Log in first",
                "message": denied.message,
                "login": denied.status == 401,
            },
            status=denied.status,
        )

    return on_denied


@web.middleware
async def _page_errors(request: web.Request, handler: auth.Handler) -> web.StreamResponse:
    """A page that fails answers an HTML page saying so (the API answers JSON, the probes
    their own), and one log line; a database that does not answer within the read timeout
    is said in words."""
    if auth.is_api(request) or request.path in auth.PROBE_PATHS:
        return await handler(request)
    try:
        return await handler(request)
    except (web.HTTPException, AccessDenied, asyncio.CancelledError):
        raise  # answered by aiohttp, by the access middleware, or not at all
    except Exception as exc:
        log.error(
            "web.page_failed",
            path=request.path,
            method=request.method,
            error=error_text(exc),
        )
        unreachable = isinstance(exc, TimeoutError | SQLAlchemyError)
        return aiohttp_jinja2.render_template(
            "error.html",
            request,
            _bare_context(request)
            | {
                "title": "The state could not be read" if unreachable else "Something failed",
                "message": "The database did not answer: the service may be unable to reach it."
                if unreachable
                else "This page failed; the service's log says why (event web.page_failed).",
            },
            status=503 if unreachable else 500,
        )


def _bare_context(request: web.Request) -> dict[str, Any]:
    return {
        "page": "error",
        "principal": auth.principal_of(request),
        "csrf": "",
        "now": datetime.now(UTC),
        "zone": UTC,
        "zone_name": "UTC",
        "version": nanobot_version(),
        "path": request.path_qs,
    }


async def _security_headers(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def setup_dashboard(
    app: web.Application, engine: Engine, *, host: str, tokens: TokenStore
) -> AccessPolicy:
    """Add the dashboard and the API to ``app`` (before it starts); the access policy used."""
    open_reads = auth.is_loopback(host)
    policy = AccessPolicy(tokens=tokens, sessions=SessionStore(), open_reads=open_reads)
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("nanobot.web", "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(_environment())
    env.filters["duration"] = duration
    env.filters["todatetime"] = _todatetime
    # A task name is one path segment: Jinja's urlencode keeps "/", which would split it.
    env.filters["segment"] = lambda value: quote(str(value), safe="")
    app.middlewares.append(auth.access_middleware(policy, _denied_handler("/login")))
    app.middlewares.append(api_errors)
    app.middlewares.append(_page_errors)
    pages = Pages(engine, tokens, policy.sessions, open_reads)
    app.router.add_routes(pages.routes())
    app.router.add_routes(Api(engine).routes())
    app.router.add_static("/static/", HERE / "static")
    app.on_response_prepare.append(_security_headers)
    if open_reads:
        log.info(
            "http.dashboard",
            host=host,
            reads="open on loopback",
            writes="token" if tokens else "refused: no token configured",
            tokens=tokens.names,
        )
    elif tokens:
        log.warning(
            "http.dashboard",
            host=host,
            reads="token required: not bound to loopback",
            writes="token",
            tokens=tokens.names,
        )
    else:
        log.warning(
            "http.dashboard_locked",
            host=host,
            reason="not bound to loopback and no token configured: the dashboard and the API "
            "refuse every request until http.tokens or http.token_file names one",
        )
    return policy
