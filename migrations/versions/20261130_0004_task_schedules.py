"""Task schedules: the kind of each task's schedule, its cron expression, zone and one-shot time.

Existing tasks become interval tasks (``schedule_kind`` defaults to ``interval``) and keep their
``interval_s``, ``anchor_at`` and ``next_run_at``, so every schedule keeps its phase: the job in
APScheduler's table is not touched.

Revision ID: 0004
Revises: 0001
Create Date: 2026-11-30 03:20:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "schedule_kind",
                sa.String(length=16),
                server_default="interval",
                nullable=False,
            )
        )
        batch_op.add_column(sa.Column("cron", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("timezone", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("run_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Cron and one-shot tasks cannot be expressed by the previous schema: they are removed
    # (with their jobs) rather than left to run as intervals they never were.
    op.execute(
        "DELETE FROM apscheduler_jobs WHERE id IN "
        "(SELECT name FROM tasks WHERE schedule_kind <> 'interval')"
    )
    op.execute("DELETE FROM tasks WHERE schedule_kind <> 'interval'")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("run_at")
        batch_op.drop_column("timezone")
        batch_op.drop_column("cron")
        batch_op.drop_column("schedule_kind")
