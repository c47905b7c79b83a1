"""Retries with backoff: attempts of a slot, and the pending retry of each task.

``task_runs.attempt`` numbers the attempts of a slot (existing rows are attempt 1), and the
unique claim becomes ``(task_name, scheduled_at, attempt)`` so that each attempt is claimed once.
``tasks.retries`` (0: none) and ``tasks.retry_backoff`` ("BASE,FACTOR,MAX[,JITTER]"; NULL: the
default) are the task's options; ``tasks.retry_at``, ``retry_slot`` and ``retry_attempt`` hold
its pending retry, written with the failed attempt's outcome so that it survives a restart.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 07:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("attempt", sa.Integer(), server_default="1", nullable=False))
        batch_op.drop_constraint("uq_task_runs_task_name_scheduled_at", type_="unique")
        batch_op.create_unique_constraint(
            "uq_task_runs_task_name_scheduled_at_attempt", ["task_name", "scheduled_at", "attempt"]
        )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retries", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("retry_backoff", sa.String(length=100), nullable=True))
        batch_op.add_column(sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("retry_slot", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("retry_attempt", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("retry_attempt")
        batch_op.drop_column("retry_slot")
        batch_op.drop_column("retry_at")
        batch_op.drop_column("retry_backoff")
        batch_op.drop_column("retries")
    # Retries go: only the last attempt of each slot stays (the slot's outcome), so that the
    # unique claim of revision 0009 holds again.
    op.execute(
        "DELETE FROM task_runs WHERE attempt < ("
        "SELECT MAX(r.attempt) FROM task_runs r "
        "WHERE r.task_name = task_runs.task_name AND r.scheduled_at = task_runs.scheduled_at)"
    )
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.drop_constraint("uq_task_runs_task_name_scheduled_at_attempt", type_="unique")
        batch_op.create_unique_constraint(
            "uq_task_runs_task_name_scheduled_at", ["task_name", "scheduled_at"]
        )
        batch_op.drop_column("attempt")
