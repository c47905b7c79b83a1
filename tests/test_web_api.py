"""The REST API over a real socket on real databases: what it answers, what it refuses, and that
its OpenAPI document is the truth."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import pytest
from jsonschema import Draft202012Validator
from sqlalchemy import Engine
from structlog.testing import capture_logs
from web_helpers import (
    OPERATOR,
    READER,
    add_node,
    add_run,
    add_task_row,
    bearer,
    serve,
    snapshot,
    task_count,
)

from nanobot.cron import control, definitions
from nanobot.models import utcnow
from nanobot.web.openapi import PREFIX, SCHEMAS

JSON = {"Content-Type": "application/json"}


def check(schema: str, body: Any) -> None:
    """``body`` validates against the document's schema ``schema``."""
    validator = Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema}", "components": {"schemas": SCHEMAS}}
    )
    errors = [e.message for e in validator.iter_errors(body)]
    assert not errors, (schema, errors, body)


def check_error(body: Any, status: int, field: str | None = None) -> None:
    check("Error", body)
    assert body["error"]["status"] == status
    if field is not None:
        assert body["error"]["field"] == field, body


async def test_every_api_route_is_in_the_document_and_every_documented_route_is_served(
    engine: Engine,
) -> None:
    """The application's routes under /api/v1 and the document's paths are the same set, method
    by method; the document is a valid OpenAPI 3.1 shape with a schema for every response."""
    async with serve(engine) as served, aiohttp.ClientSession() as http:
        async with http.get(served.base + PREFIX + "/openapi.json") as r:
            assert r.status == 200
            doc = await r.json()
        served_routes = set()
        for route in served.app.router.routes():
            info = route.resource.get_info() if route.resource else {}
            path = info.get("path") or info.get("formatter")
            if path and path.startswith(PREFIX) and route.method != "HEAD":
                served_routes.add((route.method.lower(), path[len(PREFIX) :]))
    documented = {
        (method, path) for path, ops in doc["paths"].items() for method in ops if method != "head"
    }
    assert served_routes == documented
    assert doc["openapi"].startswith("3.1")
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (method, path)
            for param in re.findall(r"{(\w+)}", path):
                assert any(p["name"] == param for p in op["parameters"]), (method, path)


async def test_reads_answer_what_the_document_says(engine: Engine) -> None:
    """Open reads on loopback: status, components, a page of tasks, one task with its next five
    slots, its history a page at a time; every answer validates against its schema."""
    add_node(engine)
    add_task_row(engine, "alpha")
    add_task_row(engine, "beta", paused=True, next_run_at=None)
    add_task_row(engine, "gamma", last_outcome="error", consecutive_failures=3)
    for i in range(5):
        add_run(engine, "alpha", 60 * (i + 1), "success")
    async with serve(engine) as served, aiohttp.ClientSession() as http:
        base = served.base + PREFIX
        async with http.get(base + "/status") as r:
            body = await r.json()
            check("Status", body)
            assert body["tasks"]["total"] == 3
            assert body["tasks"]["paused"] == 1
            assert body["tasks"]["failing"] == 1
        async with http.get(base + "/components") as r:
            body = await r.json()
            check("ComponentList", body)
            assert [c["name"] for c in body["components"]] == ["database"]
        async with http.get(base + "/tasks", params={"limit": "2"}) as r:
            body = await r.json()
            check("TaskPage", body)
            assert body["total"] == 3
            assert [t["name"] for t in body["items"]] == ["alpha", "beta"]
        async with http.get(base + "/tasks", params={"offset": "2", "limit": "2"}) as r:
            assert [t["name"] for t in (await r.json())["items"]] == ["gamma"]
        async with http.get(base + "/tasks", params={"state": "paused"}) as r:
            assert [t["name"] for t in (await r.json())["items"]] == ["beta"]
        async with http.get(base + "/tasks", params={"search": "AMM"}) as r:
            assert [t["name"] for t in (await r.json())["items"]] == ["gamma"]
        async with http.get(base + "/tasks/alpha") as r:
            body = await r.json()
            check("Task", body)
            assert body["schedule"] == "every minute"
            assert body["state"] == "active"
            assert len(body["next_runs"]) == 5
        async with http.get(base + "/tasks/alpha/history", params={"limit": "3"}) as r:
            page1 = await r.json()
            check("RunPage", page1)
            assert len(page1["items"]) == 3
            assert page1["next_before"] == page1["items"][-1]["scheduled_at"]
        async with http.get(
            base + "/tasks/alpha/history", params={"limit": "3", "before": page1["next_before"]}
        ) as r:
            page2 = await r.json()
            check("RunPage", page2)
            assert len(page2["items"]) == 2
            assert page2["next_before"] is None
            ids = {x["id"] for x in page1["items"]} | {x["id"] for x in page2["items"]}
            assert len(ids) == 5
        async with http.get(base + "/tasks/nope") as r:
            assert r.status == 404
            check_error(await r.json(), 404, "name")
        async with http.get(base + "/tasks", params={"state": "sleepy"}) as r:
            assert r.status == 400
            check_error(await r.json(), 400, "state")
        async with http.get(base + "/tasks", params={"limit": "0"}) as r:
            assert r.status == 400
            check_error(await r.json(), 400, "limit")
        async with http.get(base + "/tasks/alpha/history", params={"before": "yesterday"}) as r:
            assert r.status == 400
            check_error(await r.json(), 400, "before")


async def test_changes_through_the_api_reach_the_control_plane(engine: Engine) -> None:
    """Create, update, pause, resume, run now, pause by DELETE and remove, each with a bearer
    token; each answer validates and the tasks table says the same; each is logged with who."""
    async with serve(engine) as served, aiohttp.ClientSession(headers=bearer(OPERATOR)) as http:
        base = served.base + PREFIX
        with capture_logs() as logs:
            async with http.post(
                base + "/tasks",
                json={"name": "job", "task": "cron_tasks:Counter", "interval": 30, "paused": True},
            ) as r:
                assert r.status == 201, await r.text()
                body = await r.json()
                check("Task", body)
            assert control.get_task(engine, "job").paused
            assert control.get_task(engine, "job").interval == 30
            async with http.patch(
                base + "/tasks/job", json={"interval": 120, "kwargs": {"label": "x"}}
            ) as r:
                assert r.status == 200, await r.text()
                check("Task", await r.json())
            info = control.get_task(engine, "job")
            assert info.interval == 120
            assert info.kwargs == {"label": "x", "interval": 120}
            async with http.post(base + "/tasks/job/resume") as r:
                assert r.status == 200
                check("Task", await r.json())
            assert not control.get_task(engine, "job").paused
            async with http.post(base + "/tasks/job/run") as r:
                assert r.status == 202
                check("Task", await r.json())
            async with http.post(base + "/tasks/job/pause") as r:
                assert (await r.json())["paused"] is True
            async with http.post(base + "/tasks/job/resume") as r:
                assert (await r.json())["paused"] is False
            async with http.delete(base + "/tasks/job", params={"mode": "pause"}) as r:
                assert r.status == 200
                check("Task", await r.json())
            assert control.get_task(engine, "job").paused
            async with http.delete(base + "/tasks/job") as r:
                assert r.status == 204
            assert task_count(engine) == 0
    done = [(e["action"], e["by"]) for e in logs if e["event"] == "web.action"]
    assert done == [
        ("create", "ops"),
        ("update", "ops"),
        ("resume", "ops"),
        ("run", "ops"),
        ("pause", "ops"),
        ("resume", "ops"),
        ("pause", "ops"),
        ("remove", "ops"),
    ]


async def test_a_change_through_the_api_keeps_the_options_set_on_the_command_line(
    engine: Engine,
) -> None:
    """A task added with retries, an overlap policy and failure handling (as `cron add` stores
    them), then given a new interval through the API, keeps every one of those options."""
    control.add_task(
        engine,
        definitions.definition_from_class(
            "kept",
            "cron_tasks:Counter",
            30,
            overlap="allow",
            max_concurrent=3,
            pause_after_failures=4,
            catch_up_window=600,
            retries=2,
            retry_backoff="1s,2,60s",
            timeout=20,
        ),
    )
    before = control.stored_definition_of(engine, "kept")
    async with serve(engine) as served, aiohttp.ClientSession(headers=bearer(OPERATOR)) as http:
        async with http.patch(served.base + PREFIX + "/tasks/kept", json={"interval": 90}) as r:
            assert r.status == 200, await r.text()
        after = control.stored_definition_of(engine, "kept")
        assert after.interval == 90
        assert (after.overlap, after.retries, after.retry_backoff) == (
            before.overlap,
            2,
            before.retry_backoff,
        )
        assert after.overlap.max_concurrent == 3
        assert (after.pause_after_failures, after.catch_up_window, after.timeout) == (4, 600, 20)
        async with http.patch(served.base + PREFIX + "/tasks/kept", json={"timeout": 5}) as r:
            assert r.status == 200, await r.text()
        changed = control.stored_definition_of(engine, "kept")
        assert (changed.timeout, changed.retries, changed.overlap) == (5, 2, before.overlap)


async def test_cron_and_one_shot_tasks_through_the_api(engine: Engine) -> None:
    """A cron task in a zone: its schedule in words, its next five runs from the expression; a
    PATCH to an interval keeps the class; a one-shot task has one next run."""
    async with serve(engine) as served, aiohttp.ClientSession(headers=bearer(OPERATOR)) as http:
        base = served.base + PREFIX
        async with http.post(
            base + "/tasks",
            json={
                "name": "weekday",
                "task": "cron_tasks:Counter",
                "cron": "0 9 * * 1-5",
                "timezone": "Europe/Berlin",
                "timeout": 30,
            },
        ) as r:
            assert r.status == 201, await r.text()
            body = await r.json()
            check("Task", body)
        assert body["schedule_kind"] == "cron"
        assert body["timezone"] == "Europe/Berlin"
        assert "09:00" in body["schedule"]
        assert "Europe/Berlin" in body["schedule"]
        runs = [datetime.fromisoformat(t) for t in body["next_runs"]]
        assert len(runs) == 5
        berlin = ZoneInfo("Europe/Berlin")
        assert all(t.astimezone(berlin).hour == 9 for t in runs)
        assert all(t.astimezone(berlin).weekday() < 5 for t in runs)
        assert runs == sorted(runs)
        assert control.stored_definition_of(engine, "weekday").timeout == 30
        async with http.patch(base + "/tasks/weekday", json={"interval": "5m"}) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert body["schedule_kind"] == "interval"
        assert body["interval"] == 300
        assert body["schedule"] == "every 5 minutes"
        # The options stored before are kept when an update does not give them.
        assert control.stored_definition_of(engine, "weekday").timeout == 30
        when = (utcnow() + timedelta(days=2)).replace(microsecond=0)
        async with http.post(
            base + "/tasks",
            json={"name": "once", "task": "cron_tasks:Counter", "at": when.isoformat()},
        ) as r:
            assert r.status == 201, await r.text()
            body = await r.json()
        assert body["schedule_kind"] == "at"
        assert [datetime.fromisoformat(t) for t in body["next_runs"]] == [when]


async def test_a_task_of_the_task_file_is_changed_there_only(engine: Engine) -> None:
    """Updating or removing a task of tasks.toml is a 409 that says so (the file's sync would
    undo it); pausing and running it now work."""
    add_task_row(engine, "filed", source="file")
    before = snapshot(engine)
    async with serve(engine) as served, aiohttp.ClientSession(headers=bearer(OPERATOR)) as http:
        base = served.base + PREFIX
        async with http.patch(base + "/tasks/filed", json={"interval": 5}) as r:
            assert r.status == 409
            body = await r.json()
            check_error(body, 409, "name")
            assert "tasks.toml" in body["error"]["message"]
        async with http.delete(base + "/tasks/filed") as r:
            assert r.status == 409
        assert snapshot(engine) == before
        async with http.post(base + "/tasks/filed/pause") as r:
            assert r.status == 200
            body = await r.json()
            check("Task", body)
            assert body["source"] == "file"
    assert control.get_task(engine, "filed").paused


async def test_writes_without_a_token_or_with_a_wrong_or_read_only_one_are_refused(
    engine: Engine,
) -> None:
    """No token: 401 with WWW-Authenticate; a wrong one: 401 even for a read; a read-only one:
    403. The tasks table is unchanged after all of them."""
    add_task_row(engine, "job")
    before = snapshot(engine)
    attempts = [
        ("post", "/tasks", {"name": "x", "task": "cron_tasks:Counter", "interval": 5}),
        ("patch", "/tasks/job", {"interval": 5}),
        ("delete", "/tasks/job", None),
        ("post", "/tasks/job/pause", None),
        ("post", "/tasks/job/resume", None),
        ("post", "/tasks/job/run", None),
    ]
    async with serve(engine) as served, aiohttp.ClientSession() as http:
        base = served.base + PREFIX
        for headers, status in (({}, 401), (bearer("nbt_wrong"), 401), (bearer(READER), 403)):
            for method, path, body in attempts:
                async with http.request(method, base + path, json=body, headers=headers) as r:
                    assert r.status == status, (method, path, headers)
                    check_error(await r.json(), status)
                    if status == 401:
                        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(base + "/tasks", headers=bearer("nbt_wrong")) as r:
            assert r.status == 401
        async with http.get(base + "/tasks", headers={"Authorization": "Basic eDp5"}) as r:
            assert r.status == 401
        async with http.get(base + "/tasks", headers=bearer(READER)) as r:
            assert r.status == 200
    assert snapshot(engine) == before


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        pytest.param(b"{not json", 400, None, id="malformed-json"),
        pytest.param(b"[1, 2]", 400, None, id="not-an-object"),
        pytest.param(b'{"task": "cron_tasks:Counter", "interval": 5}', 422, "name", id="no-name"),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "interval": 0}',
            422,
            "interval",
            id="zero-interval",
        ),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "interval": "5 parsecs"}',
            422,
            "interval",
            id="bad-duration",
        ),
        pytest.param(b'{"name": "n", "task": "cron_tasks:Counter"}', 422, "interval", id="none"),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "cron": "61 * * * *"}',
            422,
            "cron",
            id="bad-cron",
        ),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "cron": "0 9 * * *", "interval": 5}',
            422,
            "cron",
            id="two-schedules",
        ),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "cron": "0 9 * * *",'
            b' "timezone": "Mars/Olympus"}',
            422,
            "timezone",
            id="unknown-zone",
        ),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "at": "2001-01-01T00:00:00Z"}',
            422,
            "at",
            id="at-in-the-past",
        ),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "interval": 5, "timeout": -1}',
            422,
            "timeout",
            id="negative-timeout",
        ),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "interval": 5, "code": "x"}',
            422,
            "code",
            id="unknown-field",
        ),
        pytest.param(
            b'{"name": "n", "task": "os.system", "interval": 5}', 422, "task", id="not-a-class-path"
        ),
        pytest.param(
            b'{"name": "n", "task": "no_such_module:Task", "interval": 5}',
            422,
            "task",
            id="unimportable",
        ),
        pytest.param(
            b'{"name": "n", "task": "e2e_tasks:NotATask", "interval": 5}',
            422,
            "task",
            id="not-a-cron-task",
        ),
        pytest.param(
            b'{"name": "n", "task": "cron_tasks:Counter", "interval": 5, "kwargs": {"x": 1}}',
            422,
            "kwargs",
            id="bad-kwargs",
        ),
        pytest.param(
            b'{"name": " n", "task": "cron_tasks:Counter", "interval": 5}', 422, "name", id="spaces"
        ),
        pytest.param(
            b'{"name": "job", "task": "cron_tasks:Counter", "interval": 5}',
            409,
            "name",
            id="exists",
        ),
    ],
)
async def test_bad_create_bodies_are_refused_with_the_field_and_nothing_changes(
    engine: Engine, body: bytes, status: int, field: str | None
) -> None:
    """400 for a body that is not a JSON object, 422 naming the bad field, 409 for a taken
    name; the tasks table is the same afterwards."""
    add_task_row(engine, "job")
    before = snapshot(engine)
    async with (
        serve(engine) as served,
        aiohttp.ClientSession(headers=bearer(OPERATOR)) as http,
        http.post(served.base + PREFIX + "/tasks", data=body, headers=JSON) as r,
    ):
        assert r.status == status, await r.text()
        answer = await r.json()
        check_error(answer, status, field)
        assert answer["error"]["message"]
    assert snapshot(engine) == before


async def test_oversized_bodies_wrong_media_types_and_bad_updates_change_nothing(
    engine: Engine,
) -> None:
    """A body past 64 KiB is 413; a form body to the API 400; an update of an unknown task 404
    (no task appears); an empty update 422."""
    add_task_row(engine, "job")
    before = snapshot(engine)
    big = b'{"name": "n", "task": "cron_tasks:Counter", "interval": 5, "kwargs": {"pad": "'
    big += b"x" * 70_000 + b'"}}'
    async with serve(engine) as served, aiohttp.ClientSession(headers=bearer(OPERATOR)) as http:
        base = served.base + PREFIX
        async with http.post(base + "/tasks", data=big, headers=JSON) as r:
            assert r.status == 413
            check_error(await r.json(), 413)
        async with http.post(base + "/tasks", data={"name": "n"}) as r:
            assert r.status == 400
            check_error(await r.json(), 400)
        async with http.patch(base + "/tasks/ghost", json={"interval": 5}) as r:
            assert r.status == 404
            check_error(await r.json(), 404, "name")
        async with http.patch(base + "/tasks/job", json={}) as r:
            assert r.status == 422
            check_error(await r.json(), 422)
        async with http.patch(base + "/tasks/job", json={"task": "e2e_tasks:NotATask"}) as r:
            assert r.status == 422
            check_error(await r.json(), 422, "task")
        async with http.post(base + "/tasks/ghost/pause") as r:
            assert r.status == 404
        async with http.delete(base + "/tasks/job", params={"mode": "shred"}) as r:
            assert r.status == 400
            check_error(await r.json(), 400, "mode")
    assert snapshot(engine) == before


async def test_no_token_reaches_the_log_or_an_answer(engine: Engine) -> None:
    """Good, wrong and read-only tokens, by header and by the login form: none of them appears
    in any log event or in any answer."""
    add_task_row(engine, "job")
    wrong = "nbt_wrong-secret-should-never-be-logged-123456"
    texts: list[str] = []
    with capture_logs() as logs:
        async with serve(engine) as served, aiohttp.ClientSession() as http:
            for token in (OPERATOR, READER, wrong):
                for method, path in (("get", "/api/v1/tasks"), ("post", "/api/v1/tasks/job/run")):
                    async with http.request(method, served.base + path, headers=bearer(token)) as r:
                        texts.append(await r.text())
                async with http.post(served.base + "/login", data={"token": token}) as r:
                    texts.append(await r.text())
                for path in ("/", "/tasks", "/tasks/job", "/components", "/api/v1/status"):
                    async with http.get(served.base + path) as r:
                        texts.append(await r.text())
    logged = repr(logs)
    assert "web.action" in logged
    assert "web.login_failed" in logged
    for token in (OPERATOR, READER, wrong):
        assert token not in logged
        assert all(token not in text for text in texts)


async def test_off_loopback_every_read_needs_a_token(engine: Engine) -> None:
    """Bound (as far as the policy knows) to 0.0.0.0: reads without a token are 401 for the API
    and go to the login form for pages; the probes stay open; a token reads."""
    add_task_row(engine, "job")
    async with (
        serve(engine, host="0.0.0.0") as served,
        aiohttp.ClientSession() as http,
    ):
        async with http.get(served.base + "/api/v1/tasks") as r:
            assert r.status == 401
        async with http.get(served.base + "/tasks", allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"].startswith("/login?next=")
        async with http.get(served.base + "/login") as r:
            assert r.status == 200
        async with http.get(served.base + "/healthz") as r:
            assert r.status == 200
        async with http.get(served.base + "/api/v1/tasks", headers=bearer(READER)) as r:
            assert r.status == 200
