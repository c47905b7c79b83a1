"""Benchmarks of nanobot against its baselines, each measured in the same run.

``python -m bench`` runs them all (see bench/README.md); ``--only NAME`` one of them.
"""

from __future__ import annotations

# Figure name on the command line -> module of bench/.
FIGURES = {
    "drift": "drift",
    "burst": "burst",
    "lateness": "lateness",
    "health": "health",
    "status": "status",
    "startup": "startup",
    "memory": "memory",
}
