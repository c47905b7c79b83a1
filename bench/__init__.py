"""Benchmarks of nanobot against its baselines, each measured in the same run.

``python -m bench`` runs the default figures (see bench/README.md); ``--only NAME`` some of them,
``--all`` every figure including the in-process diagnostics.
"""

from __future__ import annotations

# Figure name on the command line -> "module of bench/:function" returning a Result.
FIGURES = {
    # The service as users run it: `python -m nanobot` in its own process, default settings.
    "burst": "service_burst:run",
    "healthz": "service_burst:run_healthz",
    "steady": "service_steady:run",
    "phase": "service_steady:run_phase",
    "startup": "service_startup:run",
    "history": "service_history:run",
    "pgwrites": "service_history:run_pgwrites",
    # In-process figures: diagnostics of one part (a bare CronManager, logging at WARNING).
    "status": "status:run",
    "health": "health:run",
    "drift": "drift:run",
    "inproc-burst": "burst:run",
    "inproc-lateness": "lateness:run",
    "inproc-startup": "startup:run",
    "inproc-memory": "memory:run",
}

# What `python -m bench` runs without --only or --all (about 15 minutes).
DEFAULT = (
    "burst",
    "healthz",
    "steady",
    "phase",
    "startup",
    "history",
    "pgwrites",
    "status",
    "health",
)
