"""The dashboard in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium against a real ``python -m nanobot`` on 127.0.0.1.

Without the browser these tests are skipped with the reason, except where
``NANOBOT_REQUIRE_BROWSER=1`` (CI) makes that a failure. No browser or driver is ever
downloaded: the driver's path is given, so Selenium Manager is never asked, and it is told to
stay offline anyway. A screenshot of each page is saved under ``.artifacts/screenshots`` (or
``$NANOBOT_ARTIFACTS``/screenshots).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faults.harness import BASE_ENV, REPO, ServiceProcess, run_cli, wait_for
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from web_helpers import OPERATOR

from nanobot.web.tokens import hash_token

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRE_BROWSER = os.environ.get("NANOBOT_REQUIRE_BROWSER", "") == "1"
ARTIFACTS = Path(os.environ.get("NANOBOT_ARTIFACTS", REPO / ".artifacts")) / "screenshots"
TOKENS = json.dumps([{"name": "ops", "hash": hash_token(OPERATOR)}])
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture
def services(
    nanobot_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start services on this test's NANOBOT_HOME (as tests/test_service.py does); each one is
    killed afterwards."""
    for name, value in BASE_ENV.items():
        monkeypatch.setenv(name, value)
    started: list[ServiceProcess] = []

    def start(**env: str) -> ServiceProcess:
        service = ServiceProcess(
            home=nanobot_home, logs=tmp_path, label=f"service{len(started)}", env=env
        )
        started.append(service)
        return service.start()

    try:
        yield start
    finally:
        for service in started:
            service.close()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A headless Chromium with a fresh profile, closed afterwards."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if REQUIRE_BROWSER:
            pytest.fail(reason)
        pytest.skip(reason)
    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager: never the network
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}")
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=DriverService(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, name: str, width: int = 1280) -> Path:
    """A full-page screenshot of what the browser shows, kept as a test artifact."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(width, 900)
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    # The whole page, beyond the window (a window cannot grow past the virtual screen).
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 6000), "scale": 1},
        },
    )
    path = ARTIFACTS / f"{name}.png"
    path.write_bytes(base64.b64decode(shot["data"]))
    driver.set_window_size(1280, 900)
    return path


def text(driver: Any) -> str:
    # In one script: the overview replaces its live part while the test reads it.
    return str(driver.execute_script("return document.body.innerText"))


def start(services: Callable[..., ServiceProcess]) -> ServiceProcess:
    service = services(NANOBOT_HTTP__TOKENS=TOKENS)
    service.wait_up()
    return service


def cli_task(name: str) -> dict[str, Any]:
    code, tasks = run_cli("cron", "list", "--json")
    assert code == 0, tasks
    return next(t for t in tasks if t["name"] == name)


def test_an_operator_logs_in_and_manages_a_task_added_by_the_command_line(
    services: Callable[..., ServiceProcess], browser: Any, tmp_path: Path
) -> None:
    """The overview shows a task added by the CLI without a reload; after login, Pause makes the
    CLI report it paused, Run now adds a history row, and a failing task's error is shown. No
    page and no log line holds the token. Every page is photographed."""
    service = start(services)
    base = service.base
    browser.get(base + "/")
    assert "Overview" in browser.title
    wait_for("the overview's first heartbeat", lambda: "leader" in text(browser), timeout=15)
    count_script = "return document.querySelector('.counts li:first-child .n').textContent"
    total = browser.execute_script(count_script)

    # A task added by the command line appears on the open overview, which refreshes itself.
    out = tmp_path / "hello.txt"
    kwargs = json.dumps({"path": str(out)})
    code, _ = run_cli(
        "cron", "add", "hello", "--task", "e2e_tasks:AppendLine", "--interval", "3600",
        "--kwargs", kwargs, "--json",
    )  # fmt: skip
    assert code == 0
    code, _ = run_cli("cron", "add", "bad", "--task", "cron_tasks:Failing", "--interval", "2")
    assert code == 0

    def counted() -> bool:
        return bool(browser.execute_script(count_script) != total)

    wait_for("the overview to count the new tasks without a reload", counted, timeout=15)
    wait_for("a recent failure on the overview", lambda: "RuntimeError" in text(browser), 15)
    screenshot(browser, "overview")

    browser.get(base + "/tasks")
    assert "hello" in text(browser)
    assert "every hour" in text(browser)
    screenshot(browser, "tasks")

    # Log in with the token.
    browser.get(base + "/login?next=/tasks/hello")
    screenshot(browser, "login")
    browser.find_element(By.ID, "token").send_keys(OPERATOR)
    browser.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    wait_for("the task page after login", lambda: "Signed in as ops" in text(browser), 10)
    assert browser.current_url.endswith("/tasks/hello")
    cookie = browser.get_cookie("nanobot_session")
    assert cookie is not None
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"

    # Pause: the command line reports it paused.
    browser.find_element(By.XPATH, "//button[text()='Pause']").click()
    wait_for("the paused notice", lambda: "Paused." in text(browser), 10)
    assert cli_task("hello")["paused"] is True
    browser.find_element(By.XPATH, "//button[text()='Resume']").click()
    wait_for("the resumed notice", lambda: "Resumed." in text(browser), 10)
    assert cli_task("hello")["paused"] is False

    # Run now: a new row appears in the history, marked as a run now.
    wait_for("the first run", lambda: out.exists(), timeout=10)
    before = len(browser.find_elements(By.CSS_SELECTOR, "#hist-h ~ .scroll tbody tr"))
    browser.find_element(By.XPATH, "//button[text()='Run now']").click()

    def new_row() -> bool:
        browser.get(base + "/tasks/hello")
        rows = browser.find_elements(By.CSS_SELECTOR, "#hist-h ~ .scroll tbody tr")
        return len(rows) > before and "(run now)" in rows[0].text

    wait_for("the run-now row in the history", new_row, timeout=15)
    screenshot(browser, "task")

    # A failing task's error.
    def error_shown() -> bool:
        browser.get(base + "/tasks/bad")
        return "RuntimeError: boom" in text(browser)

    wait_for("the failing task's error", error_shown, timeout=15)
    assert "failing" in text(browser)
    screenshot(browser, "task-failing")

    browser.get(base + "/components")
    assert "task:bad" in text(browser)
    screenshot(browser, "components")
    browser.get(base + "/alerts")
    assert "Alerts" in browser.title
    screenshot(browser, "alerts")

    # Narrow window: nothing wider than the screen but the tables' own scroll areas.
    browser.set_window_size(420, 900)
    browser.get(base + "/tasks")
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
    )
    assert overflow <= 1
    screenshot(browser, "tasks-narrow", width=420)

    for page in ("/", "/tasks", "/tasks/hello", "/components", "/login"):
        browser.get(base + page)
        assert OPERATOR not in browser.page_source
    service.stop()
    assert OPERATOR not in service.output(tail=10**8)
    log_file = service.home / "logs" / "nanobot.log"
    if log_file.exists():
        assert OPERATOR not in log_file.read_text()


def test_an_action_without_login_is_refused(
    services: Callable[..., ServiceProcess], browser: Any, tmp_path: Path
) -> None:
    """Without login the page offers no button, and a pause posted anyway is refused with 401:
    the command line still reports the task running."""
    service = start(services)
    kwargs = json.dumps({"path": str(tmp_path / "x.txt")})
    code, _ = run_cli(
        "cron", "add", "hello", "--task", "e2e_tasks:AppendLine", "--interval", "3600",
        "--kwargs", kwargs,
    )  # fmt: skip
    assert code == 0
    browser.get(service.base + "/tasks/hello")
    assert not browser.find_elements(By.XPATH, "//button[text()='Pause']")
    assert "Log in with an operator token" in text(browser)
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/tasks/hello/pause', {method: 'POST', body: new URLSearchParams({csrf: 'x'})})"
        ".then(r => done(r.status));"
    )
    assert status == 401
    assert cli_task("hello")["paused"] is False
    # Keyboard: the first Tab reaches the skip link, which leads to the content.
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("class") == "skip"
