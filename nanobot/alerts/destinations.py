"""Destinations: where alerts go, which alerts each one takes, and sending one alert to one.

A destination is an Apprise URL (``json://host/path``, ``slack://...``, ``tgram://...``,
``mailto://...``: https://github.com/caronc/apprise/wiki) with an optional filter::

    "alerts": {"destinations": [
        "jsons://hooks.example.com/nanobot",
        {"name": "oncall", "url": "tgram://TOKEN/CHAT", "min_severity": "error",
         "kinds": ["task.*", "leader.*"], "subjects": ["task:billing-*"]}
    ]}

``kinds`` and ``subjects`` are shell-style patterns (``fnmatch``); an alert passes when its kind
matches one of ``kinds``, its severity is at least ``min_severity`` and one of its subjects
matches one of ``subjects`` (each filter is all-pass when absent). A destination's ``name``
identifies its deliveries in the outbox; it defaults to the URL's scheme and a hash of the URL,
so it is stable across restarts and shows no secret.

:func:`send` is blocking (Apprise does its HTTP in the calling thread): call it from a worker
thread. Apprise is imported only when a destination is parsed or used, not when nanobot starts
a command that sends nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from nanobot.alerts.alert import Alert, AlertKind, Severity
from nanobot.config import Config
from nanobot.exceptions import ConfigError
from nanobot.models import error_text

SETTING: Final = "alerts.destinations"
_KEYS: Final = frozenset({"url", "name", "kinds", "min_severity", "subjects"})
# Headers and JSON fields that carry the idempotency key to a webhook.
KEY_HEADER: Final = "Idempotency-Key"
KEY_FIELD: Final = "idempotency_key"
_ERROR_MAX: Final = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class Destination:
    """One configured destination and its filter."""

    name: str
    url: str
    # The URL with its secrets masked, for logs and the command line.
    shown: str
    kinds: tuple[str, ...] = ("*",)
    min_severity: Severity = Severity.INFO
    subjects: tuple[str, ...] = ("*",)

    def accepts(self, alert: Alert) -> bool:
        """True if this destination's filter lets ``alert`` through."""
        if alert.kind is AlertKind.TEST:
            return True
        if alert.severity.rank < self.min_severity.rank:
            return False
        if not any(fnmatch.fnmatchcase(alert.kind.value, k) for k in self.kinds):
            return False
        return any(fnmatch.fnmatchcase(s, p) for s in alert.subjects for p in self.subjects)


@dataclass(frozen=True, slots=True)
class SendResult:
    ok: bool
    error: str | None = None


def default_name(url: str) -> str:
    scheme = url.split("://", 1)[0].lower() if "://" in url else "url"
    return f"{scheme}-{hashlib.sha256(url.encode()).hexdigest()[:8]}"


def _strings(value: Any, where: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"{where}: {what} must be a non-empty list of patterns")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{where}: {what} must be a non-empty list of patterns")
    return tuple(v.strip() for v in value)


def parse_destinations(config: Config) -> tuple[Destination, ...]:
    """The destinations of ``config``, each URL checked by Apprise; ConfigError (one line) if
    one is malformed, names a service Apprise does not know, or lacks what that service needs."""
    raw = config.get(SETTING) or ()
    source = config.sources.get(SETTING, SETTING)
    found: list[Destination] = []
    for index, entry in enumerate(raw):
        where = f"{source}: {SETTING}[{index}]"
        spec: dict[str, Any]
        if isinstance(entry, str):
            spec = {"url": entry}
        elif isinstance(entry, dict):
            spec = dict(entry)
        else:
            raise ConfigError(f"{where}: expected a URL or an object with a url")
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(_KEYS))})"
            )
        url = spec.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"{where}: url must be a non-empty Apprise URL")
        url = url.strip()
        plugin = _instantiate(url)
        if plugin is None:
            scheme = url.split("://", 1)[0] if "://" in url else url[:12]
            raise ConfigError(
                f"{where}: {scheme}:// URL is not one Apprise can send to (unknown service, "
                "or a part it needs is missing or malformed; see docs/alerts.md)"
            )
        name = spec.get("name", default_name(url))
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ConfigError(f"{where}: name must be a non-empty string of at most 200 characters")
        kinds = _strings(spec.get("kinds", ["*"]), where, "kinds")
        known = [k.value for k in AlertKind]
        for pattern in kinds:
            if not fnmatch.filter(known, pattern):
                raise ConfigError(
                    f"{where}: kinds pattern {pattern!r} matches no alert kind "
                    f"(kinds: {', '.join(known)})"
                )
        try:
            severity = Severity(str(spec.get("min_severity", "info")).strip().lower())
        except ValueError:
            raise ConfigError(
                f"{where}: min_severity must be one of {', '.join(s.value for s in Severity)}"
            ) from None
        found.append(
            Destination(
                name=name.strip(),
                url=url,
                shown=str(plugin.url(privacy=True)),
                kinds=kinds,
                min_severity=severity,
                subjects=_strings(spec.get("subjects", ["*"]), where, "subjects"),
            )
        )
    names = [d.name for d in found]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{source}: {SETTING}: two destinations are named {name!r}")
    return tuple(found)


def _instantiate(url: str) -> Any:
    with warnings.catch_warnings():
        # Apprise's plugins import modules that Python 3.11 deprecates (imghdr): not ours to fix,
        # and not worth a line in the operator's log.
        warnings.simplefilter("ignore", DeprecationWarning)
        import apprise  # noqa: PLC0415 -- under the filter above; it loads a hundred plugins

        return apprise.Apprise.instantiate(url, suppress_exceptions=True)


def render(alert: Alert) -> str:
    """The text body sent to chat and e-mail services."""
    lines = [alert.body.rstrip()]
    if alert.link:
        lines.append(f"\n{alert.link}")
    lines.append(
        f"\n{alert.kind.value} | {alert.severity.value} | {alert.created_at:%Y-%m-%d %H:%M:%S} UTC"
        f" | {KEY_FIELD}: {alert.key}"
    )
    return "\n".join(lines)


def _notify_type(alert: Alert) -> str:
    if alert.kind in (
        AlertKind.TASK_RECOVERED,
        AlertKind.TASK_MENDED,
        AlertKind.TASK_RESUMED,
        AlertKind.TASK_ON_TIME,
        AlertKind.COMPONENT_RECOVERED,
        AlertKind.DATABASE_RECOVERED,
    ):
        return "success"
    return {
        Severity.INFO: "info",
        Severity.WARNING: "warning",
        Severity.ERROR: "failure",
        Severity.CRITICAL: "failure",
    }[alert.severity]


class _ThreadErrors(logging.Handler):
    """Apprise reports why a send failed only in its log: keep this thread's warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread and len(self.messages) < 5:
            self.messages.append(record.getMessage())


@contextmanager
def _captured() -> Iterator[_ThreadErrors]:
    handler = _ThreadErrors()
    logger = logging.getLogger("apprise")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def send(destination: Destination, alert: Alert, *, timeout: float) -> SendResult:
    """Send ``alert`` to ``destination`` (blocking, at most about ``timeout`` seconds per request).

    Webhooks (``json://``, ``jsons://``, ``form://``, ``xml://``) get the idempotency key as an
    ``Idempotency-Key`` header; JSON webhooks also get it, the kind, subject, severity, link and
    count as fields of the body. Every other service gets it on the last line of the text.
    """
    plugin = _instantiate(destination.url)
    if plugin is None:  # pragma: no cover - checked when the configuration was parsed
        return SendResult(False, "the URL is no longer accepted by Apprise")
    plugin.socket_connect_timeout = timeout
    plugin.socket_read_timeout = timeout
    headers = getattr(plugin, "headers", None)
    if isinstance(headers, dict):
        headers[KEY_HEADER] = alert.key
    extras = getattr(plugin, "payload_extras", None)
    if isinstance(extras, dict):
        extras.update(
            {
                KEY_FIELD: alert.key,
                "kind": alert.kind.value,
                "subject": alert.subject,
                "severity": alert.severity.value,
                "link": alert.link or "",
                "count": str(alert.count),
                "created_at": alert.created_at.isoformat(),
            }
        )
    with _captured() as errors:
        try:
            ok = bool(
                plugin.notify(
                    body=render(alert), title=alert.title, notify_type=_notify_type(alert)
                )
            )
        except Exception as exc:
            return SendResult(False, _bounded(error_text(exc)))
    if ok:
        return SendResult(True)
    return SendResult(False, _bounded("; ".join(errors.messages) or "the service refused it"))


def _bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_MAX else text[: _ERROR_MAX - 3] + "..."


def find(destinations: Sequence[Destination], name: str) -> Destination | None:
    return next((d for d in destinations if d.name == name), None)
