"""The names that stored jobs refer to, kept importable.

Every row of ``apscheduler_job_states`` names its function as
``nanobot.cron._aps:run_stored_task``, and the pickled trigger of a cron or one-shot job names the
class ``nanobot.cron._aps.ScheduleTrigger``: this was the adapter's module before it became
:mod:`nanobot.cron.aps_adapter`. Rows keep being written with these names (so that every version
of nanobot reads every database), and this module resolves them to the adapter's objects. Import
from :mod:`nanobot.cron.aps_adapter`, not from here.
"""

from __future__ import annotations

from nanobot.cron.aps_adapter import ScheduleTrigger, run_stored_task

__all__ = ["ScheduleTrigger", "run_stored_task"]
