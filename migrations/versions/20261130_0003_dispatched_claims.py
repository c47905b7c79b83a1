"""Runs left running by an earlier nanobot count as dispatched.

From this revision on, a ``task_runs`` row that is still ``running`` says in ``started_at``
whether its slot was dispatched (the run may have started) or only claimed ahead of its instant
(NULL: it certainly never started, and is released and caught up after a crash). Earlier
versions left ``started_at`` NULL on every running row; such a row may stand for a run that did
start, so it is marked dispatched (``started_at = scheduled_at``) and is recorded
``interrupted`` as before, never run a second time. Data only: no column changes.

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-30 03:30:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_runs = sa.table(
    "task_runs",
    sa.column("outcome", sa.String),
    sa.column("started_at", sa.String),
    sa.column("scheduled_at", sa.String),
)


def upgrade() -> None:
    op.execute(
        _runs.update()
        .where(_runs.c.outcome == "running", _runs.c.started_at.is_(None))
        .values(started_at=_runs.c.scheduled_at)
    )


def downgrade() -> None:
    # Earlier versions ignore started_at on running rows: nothing to undo.
    pass
