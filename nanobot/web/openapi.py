"""The OpenAPI 3.1 document of ``/api/v1``, served at ``/api/v1/openapi.json``.

The request schemas here are the ones the server validates bodies and query strings with
(:func:`validate`), so the document cannot drift from what the server accepts; a test checks
that every route of the application is in the document and the reverse, and that the server's
answers validate against the response schemas.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from nanobot.cron.control import PAGE_SIZE_MAX, TaskState
from nanobot.cron.definitions import TASK_NAME_MAX

PREFIX: Final = "/api/v1"

_TIME: Final = {"type": ["string", "null"], "format": "date-time"}
_OUTCOMES: Final = [
    "running",
    "success",
    "error",
    "timeout",
    "cancelled",
    "missed",
    "skipped",
    "interrupted",
]

_SCHEDULE_FIELDS: Final[dict[str, Any]] = {
    "interval": {
        "type": ["number", "string"],
        "description": "seconds between runs, or a duration such as '5m' or '1h30m'",
    },
    "cron": {
        "type": "string",
        "maxLength": 200,
        "description": "a cron expression (5 fields, or 6 with seconds first, or @daily...)",
    },
    "at": {
        "type": "string",
        "maxLength": 100,
        "description": "one run at this ISO-8601 time (local to timezone if it has no offset)",
    },
    "timezone": {
        "type": "string",
        "maxLength": 64,
        "description": "the IANA zone of cron and at (default scheduler.timezone)",
    },
}
_OPTION_FIELDS: Final[dict[str, Any]] = {
    "timeout": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "jitter": {"type": ["number", "null"], "exclusiveMinimum": 0},
    "misfire_policy": {"enum": ["catch_up_once", "skip"]},
}

SCHEMAS: Final[dict[str, Any]] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["status", "message"],
                "properties": {
                    "status": {"type": "integer"},
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"], "description": "the bad field, if one"},
                    "reason": {"type": ["string", "null"], "description": "what is wrong with it"},
                },
            }
        },
    },
    "Task": {
        "type": "object",
        "required": [
            "name",
            "task",
            "interval",
            "kwargs",
            "paused",
            "state",
            "schedule",
            "next_run_at",
            "last_run_at",
            "last_outcome",
            "consecutive_failures",
            "error",
        ],
        "properties": {
            "name": {"type": "string"},
            "task": {"type": "string", "description": "the class, pkg.module:Class"},
            "interval": {
                "type": "number",
                "description": "seconds between runs (a cron task: its nominal period)",
            },
            "schedule_kind": {"enum": ["interval", "cron", "at"]},
            "cron": {"type": ["string", "null"]},
            "timezone": {"type": ["string", "null"]},
            "run_at": _TIME,
            "kwargs": {"type": "object"},
            "source": {
                "enum": ["cli", "file", "code"],
                "description": "who defined it: the command line or API, tasks.toml, Python code",
            },
            "pause_reason": {"type": ["string", "null"]},
            "timeout": {"type": ["number", "null"]},
            "paused": {"type": "boolean"},
            "state": {"enum": [s.value for s in TaskState]},
            "schedule": {"type": "string", "description": "the schedule in words"},
            "next_run_at": _TIME,
            "next_runs": {
                "type": "array",
                "items": {"type": "string", "format": "date-time"},
                "description": "the next five slots (GET of one task only)",
            },
            "last_run_at": _TIME,
            "last_outcome": {"enum": [*_OUTCOMES, None]},
            "consecutive_failures": {"type": "integer", "minimum": 0},
            "error": {"type": ["string", "null"], "description": "why the task is broken"},
            "broken": {"type": "boolean", "description": "true when error is set"},
        },
    },
    "TaskPage": {
        "type": "object",
        "required": ["items", "total", "offset", "limit"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Task"}},
            "total": {"type": "integer", "minimum": 0},
            "offset": {"type": "integer", "minimum": 0},
            "limit": {"type": "integer", "minimum": 1},
        },
    },
    "Run": {
        "type": "object",
        "required": ["id", "task", "scheduled_at", "outcome", "duration", "error", "slots"],
        "properties": {
            "id": {"type": "integer"},
            "task": {"type": "string"},
            "scheduled_at": {"type": "string", "format": "date-time"},
            "started_at": _TIME,
            "finished_at": _TIME,
            "duration": {"type": ["number", "null"]},
            "outcome": {"enum": _OUTCOMES},
            "error": {"type": ["string", "null"]},
            "slots": {"type": "integer", "minimum": 1},
            "manual": {"type": "boolean"},
            "node": {"type": ["string", "null"]},
            "attempt": {
                "type": "integer",
                "minimum": 1,
                "description": "1 for the slot's run, 2... for its retries",
            },
        },
    },
    "RunPage": {
        "type": "object",
        "required": ["items", "next_before"],
        "properties": {
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/Run"}},
            "next_before": {
                **_TIME,
                "description": "pass as ?before= for the next (older) page; null on the last",
            },
        },
    },
    "NewTask": {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "task"],
        "description": "give exactly one schedule: interval, cron or at",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": TASK_NAME_MAX},
            "task": {
                "type": "string",
                "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
                "maxLength": 500,
                "description": "a CronTask subclass the service can import, pkg.module:Class",
            },
            **_SCHEDULE_FIELDS,
            "kwargs": {"type": "object", "description": "constructor arguments, plain JSON"},
            "paused": {"type": "boolean", "default": False},
            **_OPTION_FIELDS,
        },
    },
    "TaskChange": {
        "type": "object",
        "additionalProperties": False,
        "minProperties": 1,
        "description": "what to change; a new schedule (interval, cron or at) replaces the old",
        "properties": {
            "task": {"$ref": "#/components/schemas/NewTask/properties/task"},
            **_SCHEDULE_FIELDS,
            "kwargs": {"type": "object", "description": "replaces the constructor arguments"},
            **_OPTION_FIELDS,
        },
    },
    "Status": {
        "type": "object",
        "required": ["status", "problems", "checked_at", "version", "service", "tasks"],
        "properties": {
            "status": {"enum": ["healthy", "degraded", "unknown", "error"]},
            "problems": {"type": "array", "items": {"type": "string"}},
            "checked_at": {"type": "string", "format": "date-time"},
            "version": {"type": "string"},
            "service": {"type": "object"},
            "system": {"type": ["object", "null"]},
            "tasks": {
                "type": "object",
                "description": "how many tasks are in each state",
                "required": ["total"],
                "additionalProperties": {"type": "integer"},
            },
        },
    },
    "Component": {
        "type": "object",
        "required": ["name", "node", "status", "last_heartbeat", "last_error", "current"],
        "properties": {
            "name": {"type": "string"},
            "node": {"type": "string"},
            "status": {"enum": ["healthy", "error", "unknown"]},
            "last_heartbeat": _TIME,
            "age_s": {"type": ["number", "null"]},
            "last_error": {"type": ["string", "null"]},
            "current": {"type": "boolean"},
            "errors": {"type": "array", "items": {"type": "object"}},
            "status_changes": {"type": "array", "items": {"type": "object"}},
        },
    },
    "ComponentList": {
        "type": "object",
        "required": ["components"],
        "properties": {
            "components": {"type": "array", "items": {"$ref": "#/components/schemas/Component"}}
        },
    },
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {
        400: "malformed request (not JSON, not an object, a bad query parameter)",
        401: "no token, or an unknown one",
        403: "a read-only token, or a browser request without its CSRF token",
        404: "no such task",
        409: "a task of that name exists, or the task comes from the task file",
        413: "the body is larger than the limit",
        422: "a field is invalid: error.field and error.reason say which and why",
        503: "the database did not answer",
    }
    return {str(c): _json("Error", words[c]) for c in (*codes, 503)}


_NAME_PARAM: Final = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
}
# Query parameters: the server validates them with these schemas too.
QUERY: Final[dict[str, dict[str, Any]]] = {
    "list": {
        "search": {"type": "string", "maxLength": 200},
        "state": {"enum": [s.value for s in TaskState]},
        "limit": {"type": "integer", "minimum": 1, "maximum": PAGE_SIZE_MAX},
        "offset": {"type": "integer", "minimum": 0},
    },
    "history": {
        "limit": {"type": "integer", "minimum": 1, "maximum": PAGE_SIZE_MAX},
        "before": {"type": "string", "format": "date-time"},
    },
    "delete": {"mode": {"enum": ["remove", "pause"]}},
}


def _query(which: str) -> list[dict[str, Any]]:
    return [
        {"name": key, "in": "query", "required": False, "schema": schema}
        for key, schema in QUERY[which].items()
    ]


_READ_ERRORS: Final = (401,)
_WRITE_ERRORS: Final = (401, 403, 404)


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


def _action(summary: str, code: int = 200) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [_NAME_PARAM],
        "responses": {str(code): _json("Task", "the task after the change")}
        | _errors(*_WRITE_ERRORS),
    }


PATHS: Final[dict[str, dict[str, Any]]] = {
    "/status": {
        "get": {
            "summary": "The system's status and how many tasks are in each state",
            "responses": {"200": _json("Status", "the status")} | _errors(*_READ_ERRORS),
        }
    },
    "/components": {
        "get": {
            "summary": "The service's components and the task components that are not healthy, "
            "each with its last errors and status changes",
            "responses": {"200": _json("ComponentList", "the components")} | _errors(*_READ_ERRORS),
        }
    },
    "/tasks": {
        "get": {
            "summary": "A page of tasks, filtered by a search text and a state, by name",
            "parameters": _query("list"),
            "responses": {"200": _json("TaskPage", "the page")} | _errors(400, *_READ_ERRORS),
        },
        "post": {
            "summary": "Add a task (started at once unless paused)",
            "requestBody": _body("NewTask"),
            "responses": {"201": _json("Task", "the stored task")}
            | _errors(400, 401, 403, 409, 413, 422),
        },
    },
    "/tasks/{name}": {
        "get": {
            "summary": "One task and its next five slots",
            "parameters": [_NAME_PARAM],
            "responses": {"200": _json("Task", "the task")} | _errors(401, 404),
        },
        "patch": {
            "summary": "Change a task's class, schedule or constructor arguments (its phase is "
            "kept)",
            "parameters": [_NAME_PARAM],
            "requestBody": _body("TaskChange"),
            "responses": {"200": _json("Task", "the task after the change")}
            | _errors(400, 401, 403, 404, 409, 413, 422),
        },
        "delete": {
            "summary": "Remove a task (its history stays), or with mode=pause only pause it",
            "parameters": [_NAME_PARAM, *_query("delete")],
            "responses": {
                "204": {"description": "removed"},
                "200": _json("Task", "paused (mode=pause)"),
            }
            | _errors(400, 409, *_WRITE_ERRORS),
        },
    },
    "/tasks/{name}/pause": {"post": _action("Pause a task: no next run until resumed")},
    "/tasks/{name}/resume": {"post": _action("Resume a paused task on its original grid")},
    "/tasks/{name}/run": {"post": _action("Run a task once now, outside its schedule", 202)},
    "/tasks/{name}/history": {
        "get": {
            "summary": "A task's runs, newest first, a page at a time",
            "parameters": [_NAME_PARAM, *_query("history")],
            "responses": {"200": _json("RunPage", "the page")} | _errors(400, 401, 404),
        }
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "the OpenAPI document",
                    "content": {"application/json": {"schema": {"type": "object"}}},
                }
            },
        }
    },
}


def document(version: str) -> dict[str, Any]:
    """The OpenAPI document, with the server's version."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "nanobot API",
            "version": version,
            "description": "Tasks, their runs and the health of the service. Reads may be open "
            "on loopback; every change needs 'Authorization: Bearer <token>' (see "
            "docs/dashboard.md).",
        },
        "servers": [{"url": PREFIX}],
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": PATHS,
    }


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    return Draft202012Validator(schema | {"components": {"schemas": SCHEMAS}})


VALIDATORS: Final = {name: _validator(_ref(name)) for name in SCHEMAS}


def schema_errors(name: str, value: Any) -> Iterator[tuple[str | None, str]]:
    """``(field, reason)`` for each way ``value`` breaks schema ``name``, the first first."""
    for error in sorted(VALIDATORS[name].iter_errors(value), key=lambda e: list(e.path)):
        yield _field(error), _reason(error)


def _field(error: ValidationError) -> str | None:
    if error.validator == "required":
        # "'name' is a required property": the field is the missing one.
        return str(error.message.split("'")[1]) if "'" in error.message else None
    if error.validator == "additionalProperties":
        extra = error.message.split("'")
        return extra[1] if len(extra) > 1 else None
    return ".".join(str(p) for p in error.path) or None


def _reason(error: ValidationError) -> str:
    if error.validator == "required":
        return "is required"
    if error.validator == "additionalProperties":
        return "is not a known field"
    if error.validator == "exclusiveMinimum":
        return f"must be greater than {error.validator_value}"
    if error.validator == "type":
        return f"must be of type {error.validator_value}"
    if error.validator == "pattern":
        return "must be written pkg.module:Class"
    if error.validator == "minProperties":
        return "give at least one field to change"
    return error.message
