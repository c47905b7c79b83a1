"""The dashboard's pages: server-rendered HTML that reads without JavaScript.

==============================  ===========================================================
path                            what
==============================  ===========================================================
``/``                           overview: status, problems, nodes, task counts, overdue
                                tasks, recent failures, components
``/overview/live``              the overview's live part alone (the page's script polls it)
``/tasks``                      tasks, searched and filtered, a page at a time
``/tasks/{name}``               one task: definition, next runs, chart, run history (paged)
``/tasks/{name}/remove``        GET: the confirmation; POST: remove
``/tasks/{name}/{action}``      POST pause, resume, run (a form with the CSRF token)
``/components``                 components: status, last errors, status changes
``/alerts``                     the newest alerts and each destination's delivery
``/login``, ``/logout``         a browser session from a token
==============================  ===========================================================

Handlers run on the event loop; database reads run in a thread.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Final, TypeVar
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import structlog
from aiohttp import web
from sqlalchemy import Engine

from nanobot.alerts.store import recent
from nanobot.cron import control
from nanobot.cron.control import TaskState
from nanobot.exceptions import UnknownTaskError
from nanobot.heartbeat.store import TASK_COMPONENT_PREFIX
from nanobot.http import read_in_thread
from nanobot.models import utcnow
from nanobot.status import build_heartbeat_status, build_status, nanobot_version
from nanobot.web import actions, auth, chart, queries
from nanobot.web.sessions import COOKIE_NAME, SESSION_TTL_S, SessionStore
from nanobot.web.timefmt import TZ_COOKIE, viewer_zone, zone_name
from nanobot.web.tokens import Principal, TokenStore

log = structlog.get_logger(__name__)
T = TypeVar("T")

PAGE_SIZE: Final = 50
HISTORY_PAGE: Final = 25
CHART_RUNS: Final = 60
TASK_COMPONENTS_SHOWN: Final = 50
ALERTS_SHOWN: Final = 100
ACTIONS: Final = {
    "pause": (actions.pause, "paused"),
    "resume": (actions.resume, "resumed"),
    "run": (actions.run_now, "asked to run now"),
}


def _split_components(
    components: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The service's own components, and the ``task:<name>`` ones."""
    system = [c for c in components if not c["name"].startswith(TASK_COMPONENT_PREFIX)]
    tasks = [c for c in components if c["name"].startswith(TASK_COMPONENT_PREFIX)]
    return system, tasks


def _safe_next(raw: str | None) -> str:
    """A local path to go back to after login; anything else goes to the overview."""
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/"


class Pages:
    """The pages' handlers on one engine."""

    def __init__(
        self, engine: Engine, tokens: TokenStore, sessions: SessionStore, open_reads: bool
    ) -> None:
        self.engine = engine
        self.tokens = tokens
        self.sessions = sessions
        self.open_reads = open_reads

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.overview),
            web.get("/overview/live", self.overview_live),
            web.get("/tasks", self.tasks),
            web.get("/tasks/{name}", self.task),
            web.get("/tasks/{name}/remove", self.confirm_remove),
            web.post("/tasks/{name}/remove", self.remove),
            web.post("/tasks/{name}/{action:pause|resume|run}", self.action),
            web.get("/components", self.components),
            web.get("/alerts", self.alerts),
            web.get("/login", self.login_form),
            web.post("/login", self.login),
            web.post("/logout", self.logout),
        ]

    async def _db(self, func: Callable[[], T]) -> T:
        return await read_in_thread(func)

    def _context(self, request: web.Request, page: str, **values: Any) -> dict[str, Any]:
        session = auth.session_of(request)
        zone = viewer_zone(request.cookies.get(TZ_COOKIE))
        return {
            "page": page,
            "principal": auth.principal_of(request),
            "csrf": session.csrf if session is not None else "",
            "now": values.pop("now", None) or utcnow(),
            "zone": zone,
            "zone_name": zone_name(zone),
            # Interval tasks have no zone of their own: their slots are shown in UTC too.
            "task_zone": UTC,
            "version": nanobot_version(),
            "path": request.path_qs,
            "tokens_configured": len(self.tokens) > 0,
        } | values

    def _render(
        self, template: str, request: web.Request, context: dict[str, Any], status: int = 200
    ) -> web.Response:
        response = aiohttp_jinja2.render_template(template, request, context, status=status)
        return response

    # --- overview -------------------------------------------------------------------------------

    def _overview_data(self) -> dict[str, Any]:
        now = utcnow()
        # Only the rows that can make a problem: the same verdict without reading every task.
        status = build_status(self.engine, now=now, problems_only=True)
        system, _task_components = _split_components(status["components"])
        return {
            "now": now,
            "status": status,
            "components": system,
            "task_components": queries.count_task_components(self.engine),
            "counts": control.count_by_state(self.engine, now=now),
            "overdue": control.overdue_tasks(self.engine, now=now),
            "failures": queries.recent_failures(self.engine),
            "upcoming": control.upcoming(self.engine),
            "failure_window": queries.FAILURE_WINDOW,
        }

    async def overview(self, request: web.Request) -> web.Response:
        data = await self._db(self._overview_data)
        return self._render("overview.html", request, self._context(request, "overview", **data))

    async def overview_live(self, request: web.Request) -> web.Response:
        data = await self._db(self._overview_data)
        response = self._render(
            "_overview_live.html", request, self._context(request, "overview", **data)
        )
        response.headers["Cache-Control"] = "no-store"
        return response

    # --- tasks ----------------------------------------------------------------------------------

    async def tasks(self, request: web.Request) -> web.Response:
        search = request.query.get("q", "").strip()[:200]
        raw_state = request.query.get("state", "")
        state = TaskState(raw_state) if raw_state in set(TaskState) else None
        try:
            page_number = max(1, int(request.query.get("page", "1")))
        except ValueError:
            page_number = 1
        now = utcnow()
        page = await self._db(
            lambda: control.page_tasks(
                self.engine,
                search=search,
                state=state,
                offset=(page_number - 1) * PAGE_SIZE,
                limit=PAGE_SIZE,
                now=now,
            )
        )
        pages = max(1, -(-page.total // PAGE_SIZE))

        def link(number: int) -> str:
            query = {"q": search, "state": state.value if state else "", "page": number}
            return "/tasks?" + urlencode({k: v for k, v in query.items() if v})

        rows = [
            {
                "info": info,
                "state": control.state_of(info, now).value,
                "schedule": queries.describe_schedule(info),
                "zone": queries.task_zone(info),
            }
            for info in page.items
        ]
        return self._render(
            "tasks.html",
            request,
            self._context(
                request,
                "tasks",
                now=now,
                rows=rows,
                total=page.total,
                first=page.offset + 1,
                last=page.offset + len(page.items),
                search=search,
                state=state.value if state else "",
                states=list(TaskState),
                page_number=page_number,
                pages=pages,
                prev_link=link(page_number - 1) if page_number > 1 else None,
                next_link=link(page_number + 1) if page_number < pages else None,
            ),
        )

    async def task(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        raw_before = request.query.get("before")
        before: datetime | None = None
        if raw_before:
            try:
                before = datetime.fromisoformat(raw_before)
            except ValueError:
                before = None
            if before is not None and before.tzinfo is None:
                before = None
        now = utcnow()

        def read() -> dict[str, Any]:
            info = control.get_task(self.engine, name)
            history = control.task_history(self.engine, name, HISTORY_PAGE, before=before)
            recent = (
                history
                if before is None and len(history) >= CHART_RUNS
                else control.task_history(self.engine, name, CHART_RUNS)
            )
            return {"info": info, "history": history, "recent": recent}

        try:
            data = await self._db(read)
        except UnknownTaskError:
            return self._render(
                "error.html",
                request,
                self._context(
                    request,
                    "tasks",
                    title="No such task",
                    message=f"There is no task named {name!r}. It may have been removed.",
                ),
                status=404,
            )
        info = data["info"]
        history = data["history"]
        older = (
            f"/tasks/{name}?" + urlencode({"before": history[-1].scheduled_at.isoformat()})
            if len(history) >= HISTORY_PAGE
            else None
        )
        return self._render(
            "task.html",
            request,
            self._context(
                request,
                "tasks",
                now=now,
                info=info,
                state=control.state_of(info, now).value,
                schedule=queries.describe_schedule(info),
                task_zone=queries.task_zone(info),
                next_runs=queries.next_runs(info),
                history=history,
                paged=before is not None,
                older=older,
                chart=chart.layout(data["recent"]),
                done=request.query.get("done", ""),
            ),
        )

    async def confirm_remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            info = await self._db(lambda: control.get_task(self.engine, name))
        except UnknownTaskError:
            raise web.HTTPSeeOther("/tasks") from None
        return self._render(
            "confirm_remove.html", request, self._context(request, "tasks", info=info)
        )

    async def _form_writer(self, request: web.Request) -> tuple[Principal, Any]:
        principal = auth.require_writer(request)
        form = await request.post()
        auth.check_csrf(request, form.get("csrf"))
        return principal, form

    async def action(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        action = request.match_info["action"]
        who, _form = await self._form_writer(request)
        change, _done = ACTIONS[action]
        try:
            await self._db(lambda: change(self.engine, name, who, "browser"))
        except UnknownTaskError:
            raise web.HTTPSeeOther("/tasks") from None
        raise web.HTTPSeeOther(f"/tasks/{quote(name, safe='')}?" + urlencode({"done": action}))

    async def remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        who, _form = await self._form_writer(request)
        try:
            await self._db(lambda: actions.remove(self.engine, name, who, "browser"))
        except UnknownTaskError:
            pass  # already gone: the list shows that it is
        except actions.TaskFromFileError as exc:
            return self._render(
                "error.html",
                request,
                self._context(request, "tasks", title="Not removed", message=str(exc)),
                status=409,
            )
        raise web.HTTPSeeOther("/tasks?" + urlencode({"removed": name}))

    # --- components -----------------------------------------------------------------------------

    async def components(self, request: web.Request) -> web.Response:
        now = utcnow()
        shown = {"task": 0}

        def wanted(component: dict[str, Any]) -> bool:
            # Every system component; task components only when not healthy, and a bounded
            # number of them (each costs two statements for its details).
            if not component["name"].startswith(TASK_COMPONENT_PREFIX):
                return True
            if component["status"] == "healthy" or shown["task"] >= TASK_COMPONENTS_SHOWN:
                return False
            shown["task"] += 1
            return True

        def read() -> dict[str, Any]:
            status = build_heartbeat_status(self.engine, now=now, only=wanted, problems_only=True)
            counts = queries.count_task_components(self.engine)
            return {"status": status, "task_components": counts}

        data = await self._db(read)
        system, tasks = _split_components(data["status"]["components"])
        return self._render(
            "components.html",
            request,
            self._context(
                request,
                "components",
                now=now,
                status=data["status"],
                components=system,
                task_problems=tasks,
                task_components=data["task_components"],
                task_components_shown=TASK_COMPONENTS_SHOWN,
            ),
        )

    # --- alerts ---------------------------------------------------------------------------------

    async def alerts(self, request: web.Request) -> web.Response:
        now = utcnow()
        views = await self._db(lambda: recent(self.engine, limit=ALERTS_SHOWN))
        return self._render(
            "alerts.html",
            request,
            self._context(request, "alerts", now=now, alerts=views, shown=ALERTS_SHOWN),
        )

    # --- login ----------------------------------------------------------------------------------

    async def login_form(self, request: web.Request) -> web.Response:
        return self._render(
            "login.html",
            request,
            self._context(
                request, "login", next=_safe_next(request.query.get("next")), failed=False
            ),
        )

    async def login(self, request: web.Request) -> web.Response:
        form = await request.post()
        token = form.get("token")
        target = _safe_next(str(form.get("next") or "/"))
        principal = self.tokens.check(token) if isinstance(token, str) and token else None
        if principal is None:
            log.warning("web.login_failed", remote=request.remote)
            return self._render(
                "login.html",
                request,
                self._context(request, "login", next=target, failed=True),
                status=401,
            )
        self.sessions.close(request.cookies.get(COOKIE_NAME))
        session = self.sessions.open(principal)
        log.info("web.login", by=principal.name, read_only=principal.read_only)
        response = web.HTTPSeeOther(target)
        response.set_cookie(
            COOKIE_NAME,
            session.id,
            max_age=int(SESSION_TTL_S),
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
        )
        raise response

    async def logout(self, request: web.Request) -> web.Response:
        session = auth.session_of(request)
        if session is not None:
            form = await request.post()
            auth.check_csrf(request, form.get("csrf"))
            self.sessions.close(session.id)
            log.info("web.logout", by=session.principal.name)
        response = web.HTTPSeeOther("/")
        response.del_cookie(COOKIE_NAME, path="/")
        raise response
