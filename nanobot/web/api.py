"""The REST API under ``/api/v1``: JSON in and out, described by :mod:`nanobot.web.openapi`.

Errors are ``{"error": {"status", "message", "field", "reason"}}``: 400 for a body that is not
a JSON object or a bad query parameter, 413 past the size limit, 422 for a field that breaks its
schema or a class the service cannot import (field and reason say which), 404 for an unknown
task, 409 for a name that exists, 401/403 from :mod:`nanobot.web.auth`. Every body and
parameter is checked before the database is touched, and each change is one transaction of the
control plane, so nothing is changed on any error.

A task class is only ever *named* by a request: it must be a ``CronTask`` subclass that the
service can import, and no code is taken from the body.

Handlers run on the event loop; database work runs in a thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final, TypeVar

import structlog
from aiohttp import web
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from nanobot.cron import control, definitions
from nanobot.cron.control import RunInfo, TaskInfo, TaskState
from nanobot.cron.overlap import OverlapPolicy
from nanobot.cron.schedules import ParsedAt, Schedule, resolve_schedule
from nanobot.cron.task import TaskDefinition, check_interval, default_timezone
from nanobot.exceptions import (
    InvalidScheduleError,
    InvalidTaskError,
    NanobotError,
    TaskExistsError,
    UnknownTaskError,
)
from nanobot.http import read_in_thread
from nanobot.models import MisfirePolicy, error_text, utcnow
from nanobot.status import build_heartbeat_status, build_status, nanobot_version
from nanobot.web import actions, auth, queries
from nanobot.web.openapi import PREFIX, QUERY, document, schema_errors
from nanobot.web.tokens import Principal

log = structlog.get_logger(__name__)
T = TypeVar("T")


class ApiError(NanobotError):
    """A request the API refuses: answered as its status with the field and the reason."""

    def __init__(
        self, status: int, message: str, *, field: str | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.reason = reason


def error_response(status: int, message: str, **extra: str | None) -> web.Response:
    body = {"error": {"status": status, "message": message} | extra}
    response = web.json_response(body, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="nanobot"'
    return response


def task_json(info: TaskInfo, *, now: datetime, with_next: bool = False) -> dict[str, Any]:
    # The keys of cron list --json, and the dashboard's state of the task.
    body = info.to_json() | {"state": control.state_of(info, now).value}
    if with_next:
        body["next_runs"] = [t.isoformat() for t in queries.next_runs(info)]
    return body


def _query_params(request: web.Request, which: str) -> dict[str, Any]:
    """The query string checked against the document's parameter schemas (400 if bad)."""
    schemas = QUERY[which]
    values: dict[str, Any] = {}
    for key, raw in request.query.items():
        if key not in schemas:
            raise ApiError(400, f"unknown query parameter {key!r}", field=key, reason="unknown")
        schema = schemas[key]
        value: Any = raw
        if schema.get("type") == "integer":
            try:
                value = int(raw)
            except ValueError:
                raise ApiError(
                    400, f"{key} must be a whole number", field=key, reason="not a whole number"
                ) from None
            if value < schema.get("minimum", value) or value > schema.get("maximum", value):
                raise ApiError(
                    400,
                    f"{key} must be from {schema.get('minimum')} to {schema.get('maximum', '∞')}",
                    field=key,
                    reason="out of range",
                )
        elif schema.get("format") == "date-time":
            try:
                # A "+" of the offset left unencoded in the URL arrives as a space.
                value = datetime.fromisoformat(raw.replace(" ", "+"))
            except ValueError:
                raise ApiError(
                    400, f"{key} must be an ISO-8601 time", field=key, reason="not a time"
                ) from None
            if value.tzinfo is None:
                raise ApiError(400, f"{key} needs a UTC offset", field=key, reason="no UTC offset")
        elif "enum" in schema and raw not in schema["enum"]:
            raise ApiError(
                400,
                f"{key} must be one of {', '.join(schema['enum'])}",
                field=key,
                reason="not one of the choices",
            )
        elif len(raw) > schema.get("maxLength", len(raw)):
            raise ApiError(400, f"{key} is too long", field=key, reason="too long")
        values[key] = value
    return values


async def _body(request: web.Request, schema: str) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise ApiError(400, "send the body as application/json", field=None, reason="media type")
    raw = await request.read()  # aiohttp answers 413 past client_max_size
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, not {type(value).__name__}")
    for field, reason in schema_errors(schema, value):
        raise ApiError(422, f"{field or 'body'} {reason}", field=field, reason=reason)
    return value


@web.middleware
async def api_errors(request: web.Request, handler: auth.Handler) -> web.StreamResponse:
    """API errors as JSON; the control plane's errors as their status codes."""
    if not auth.is_api(request):
        return await handler(request)
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, field=exc.field, reason=exc.reason)
    except UnknownTaskError as exc:
        return error_response(404, str(exc), field="name", reason="unknown task")
    except TaskExistsError as exc:
        return error_response(409, str(exc), field="name", reason="exists")
    except actions.TaskFromFileError as exc:
        return error_response(409, str(exc), field="name", reason="defined in the task file")
    except InvalidTaskError as exc:
        return error_response(422, str(exc), field=None, reason=str(exc))
    except web.HTTPRequestEntityTooLarge as exc:
        return error_response(413, exc.text or "the body is too large")
    except web.HTTPNotFound:
        return error_response(404, "no such endpoint: see /api/v1/openapi.json")
    except web.HTTPMethodNotAllowed:
        return error_response(405, f"{request.method} is not allowed here")
    except (TimeoutError, SQLAlchemyError) as exc:
        log.warning("web.api_unreadable", path=request.path, error=error_text(exc))
        return error_response(503, "the database did not answer")


class Api:
    """The API's handlers on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def _db(self, func: Callable[[], T]) -> T:
        return await read_in_thread(func)

    def routes(self) -> list[web.RouteDef]:
        p = PREFIX
        return [
            web.get(p + "/openapi.json", self.openapi),
            web.get(p + "/status", self.status),
            web.get(p + "/components", self.components),
            web.get(p + "/tasks", self.list_tasks),
            web.post(p + "/tasks", self.create_task),
            web.get(p + "/tasks/{name}", self.get_task),
            web.patch(p + "/tasks/{name}", self.update_task),
            web.delete(p + "/tasks/{name}", self.delete_task),
            web.post(p + "/tasks/{name}/pause", self.pause),
            web.post(p + "/tasks/{name}/resume", self.resume),
            web.post(p + "/tasks/{name}/run", self.run_now),
            web.get(p + "/tasks/{name}/history", self.history),
        ]

    # --- reads ----------------------------------------------------------------------------------

    async def openapi(self, _request: web.Request) -> web.Response:
        return web.json_response(document(nanobot_version()))

    async def status(self, _request: web.Request) -> web.Response:
        def read() -> dict[str, Any]:
            # The counts replace the list of every task, which is what a large system cannot
            # afford to read at each poll; the status and its problems are the same.
            body = build_status(self.engine, problems_only=True)
            body["tasks"] = control.count_by_state(self.engine)
            return body

        return web.json_response(await self._db(read))

    async def components(self, _request: web.Request) -> web.Response:
        data = await self._db(lambda: build_heartbeat_status(self.engine, problems_only=True))
        return web.json_response({"components": data["components"]})

    async def list_tasks(self, request: web.Request) -> web.Response:
        params = _query_params(request, "list")
        state = TaskState(params["state"]) if "state" in params else None
        now = utcnow()
        page = await self._db(
            lambda: control.page_tasks(
                self.engine,
                search=params.get("search", ""),
                state=state,
                offset=params.get("offset", 0),
                limit=params.get("limit", 50),
                now=now,
            )
        )
        return web.json_response(
            {
                "items": [task_json(t, now=now) for t in page.items],
                "total": page.total,
                "offset": page.offset,
                "limit": page.limit,
            }
        )

    async def get_task(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        info = await self._db(lambda: control.get_task(self.engine, name))
        return web.json_response(task_json(info, now=utcnow(), with_next=True))

    async def history(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        params = _query_params(request, "history")
        limit = params.get("limit", 50)
        runs: list[RunInfo] = await self._db(
            lambda: control.task_history(self.engine, name, limit, before=params.get("before"))
        )
        next_before = runs[-1].scheduled_at.isoformat() if len(runs) >= limit else None
        return web.json_response({"items": [r.to_json() for r in runs], "next_before": next_before})

    # --- changes --------------------------------------------------------------------------------

    def _writer(self, request: web.Request) -> Principal:
        principal = auth.require_writer(request)
        auth.check_csrf(request, request.headers.get("X-CSRF-Token"))
        return principal

    async def create_task(self, request: web.Request) -> web.Response:
        who = self._writer(request)
        body = await _body(request, "NewTask")

        def create() -> TaskInfo:
            schedule = _schedule(body)
            if schedule is None:
                raise ApiError(
                    422,
                    "give the schedule: interval, cron or at",
                    field="interval",
                    reason="is required (or cron, or at)",
                )
            definition = _definition(
                body["name"], body["task"], schedule, body.get("kwargs", {}), body
            )
            return actions.create(
                self.engine, definition, who, "api", paused=bool(body.get("paused", False))
            )

        info = await self._db(create)
        return web.json_response(task_json(info, now=utcnow(), with_next=True), status=201)

    async def update_task(self, request: web.Request) -> web.Response:
        who = self._writer(request)
        name = request.match_info["name"]
        body = await _body(request, "TaskChange")

        def update() -> TaskInfo:
            current = control.get_task(self.engine, name)
            stored = _stored_options(self.engine, name)
            schedule = _schedule(body)
            kwargs = dict(body.get("kwargs", current.kwargs))
            if schedule is None:
                schedule = current.schedule
            elif "kwargs" not in body:
                # The stored arguments carry the old interval: the new schedule replaces it.
                kwargs.pop("interval", None)
            path = body.get("task", current.task_class)
            # Options the body does not give are kept as stored (set by `cron add`, the class
            # or an earlier change); a new task class brings its own, except those given.
            kept = stored if path == current.task_class else {}
            options = kept | {key: body[key] for key in OPTIONS if key in body}
            definition = _definition(name, path, schedule, kwargs, options)
            return actions.update(self.engine, definition, who, "api")

        info = await self._db(update)
        return web.json_response(task_json(info, now=utcnow(), with_next=True))

    async def delete_task(self, request: web.Request) -> web.Response:
        who = self._writer(request)
        name = request.match_info["name"]
        mode = _query_params(request, "delete").get("mode", "remove")
        if mode == "pause":
            info = await self._db(lambda: actions.pause(self.engine, name, who, "api"))
            return web.json_response(task_json(info, now=utcnow()))
        await self._db(lambda: actions.remove(self.engine, name, who, "api"))
        return web.Response(status=204)

    async def _simple(
        self,
        request: web.Request,
        change: Callable[[Engine, str, Principal, str], TaskInfo],
        status: int = 200,
    ) -> web.Response:
        who = self._writer(request)
        name = request.match_info["name"]
        info = await self._db(lambda: change(self.engine, name, who, "api"))
        return web.json_response(task_json(info, now=utcnow()), status=status)

    async def pause(self, request: web.Request) -> web.Response:
        return await self._simple(request, actions.pause)

    async def resume(self, request: web.Request) -> web.Response:
        return await self._simple(request, actions.resume)

    async def run_now(self, request: web.Request) -> web.Response:
        return await self._simple(request, actions.run_now, status=202)


OPTIONS: Final = ("timeout", "jitter", "misfire_policy")


def _stored_options(engine: Engine, name: str) -> dict[str, Any]:
    """Every option stored for a task, which an update keeps unless it gives new ones: a change
    of the schedule through the API must not reset the retries, the overlap policy or the
    failure handling that `cron add` or the class set."""
    definition = control.stored_definition_of(engine, name)
    overlap = definition.overlap
    return {
        "timeout": definition.timeout,
        "jitter": definition.jitter,
        "misfire_policy": definition.misfire_policy.value,
        "overlap": overlap.policy.value,
        "max_concurrent": (
            overlap.max_concurrent if overlap.policy is OverlapPolicy.ALLOW else None
        ),
        "pause_after_failures": definition.pause_after_failures,
        "ping_url": definition.ping_url,
        "catch_up_window": definition.catch_up_window,
        "retries": definition.retries,
        "retry_backoff": definition.retry_backoff,
    }


def _schedule(body: dict[str, Any]) -> Schedule | None:
    """The schedule a body declares (None if it gives none), or ApiError 422 naming the field."""
    given = [key for key in ("interval", "cron", "at") if key in body]
    if not given:
        if "timezone" in body:
            raise ApiError(
                422, "timezone goes with cron or at", field="timezone", reason="needs cron or at"
            )
        return None
    try:
        resolved = resolve_schedule(
            interval=body.get("interval"),
            cron=body.get("cron"),
            at=body.get("at"),
            tz=body.get("timezone"),
            default_tz=default_timezone(),
            now=utcnow(),
        )
    except InvalidScheduleError as exc:
        field = "timezone" if "zone" in str(exc) and "timezone" in body else given[-1]
        raise ApiError(422, str(exc), field=field, reason=str(exc)) from None
    return resolved.schedule if isinstance(resolved, ParsedAt) else resolved


def _definition(
    name: str,
    path: str,
    schedule: Schedule,
    kwargs: dict[str, Any],
    options: dict[str, Any],
) -> TaskDefinition:
    """The validated definition, or ApiError 422 naming the field."""
    try:
        definitions.check_name(name)
    except InvalidTaskError as exc:
        raise ApiError(422, str(exc), field="name", reason=str(exc)) from None
    try:
        definitions.import_task_class(path)
    except InvalidTaskError as exc:
        raise ApiError(422, str(exc), field="task", reason=str(exc)) from None
    for key in OPTIONS:
        try:
            if key == "misfire_policy":
                if options.get(key) is not None:
                    MisfirePolicy(options[key])
            elif options.get(key) is not None:
                check_interval(options[key], key)
        except (ValueError, InvalidTaskError) as exc:
            raise ApiError(422, str(exc), field=key, reason=str(exc)) from None
    try:
        return definitions.definition_from_class(
            name,
            path,
            kwargs=kwargs,
            schedule=schedule,
            timeout=options.get("timeout"),
            jitter=options.get("jitter"),
            misfire_policy=options.get("misfire_policy"),
            overlap=options.get("overlap"),
            max_concurrent=options.get("max_concurrent"),
            pause_after_failures=options.get("pause_after_failures"),
            ping_url=options.get("ping_url"),
            catch_up_window=options.get("catch_up_window"),
            retries=options.get("retries"),
            retry_backoff=options.get("retry_backoff"),
        )
    except InvalidTaskError as exc:
        raise ApiError(422, str(exc), field="kwargs", reason=str(exc)) from None
