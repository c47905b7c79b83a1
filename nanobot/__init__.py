"""nanobot: the runtime of the Nanobot2 assistant.

Persistent periodic tasks on APScheduler, component health with history, structured logs, and
a status command that tells an operator the truth.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
