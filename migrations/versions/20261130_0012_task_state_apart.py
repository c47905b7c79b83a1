"""The run state of each task apart from its definition: ``task_state``.

``tasks.next_run_at``, ``last_run_at``, ``last_outcome`` and ``consecutive_failures`` move to a
narrow table of their own, one row per task (``task_name`` references ``tasks.name``, deleted
and renamed with it). They change at every run, and on PostgreSQL an UPDATE leaves a dead copy
of the whole row: about 290 bytes per run in ``tasks``, a few dozen in ``task_state``. The
values of existing tasks are copied; the downgrade copies them back.

Revision ID: 0012
Revises: 0011
Create Date: 2026-11-30 13:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | Sequence[str] | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COLUMNS = "next_run_at, last_run_at, last_outcome, consecutive_failures"


def upgrade() -> None:
    # The values go aside before tasks loses its columns, and into task_state after: on SQLite
    # the batch copy of tasks drops the old table, and with foreign keys on, that would delete
    # (cascade) every task_state row already referencing it.
    op.execute(
        "CREATE TABLE _task_state_copy AS SELECT name AS task_name, next_run_at, last_run_at, "
        "last_outcome, consecutive_failures FROM tasks"
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("consecutive_failures")
        batch_op.drop_column("last_outcome")
        batch_op.drop_column("last_run_at")
        batch_op.drop_column("next_run_at")
    op.create_table(
        "task_state",
        sa.Column("task_name", sa.String(length=200), nullable=False),
        sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_outcome", sa.String(length=16), nullable=True),
        sa.Column("consecutive_failures", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["task_name"],
            ["tasks.name"],
            name=op.f("fk_task_state_task_name_tasks"),
            onupdate="CASCADE",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_name", name=op.f("pk_task_state")),
    )
    op.execute(
        f"INSERT INTO task_state (task_name, {_COLUMNS}) "
        "SELECT task_name, next_run_at, last_run_at, last_outcome, "
        "coalesce(consecutive_failures, 0) FROM _task_state_copy"
    )
    op.drop_table("_task_state_copy")


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("next_run_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_run_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_outcome", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("consecutive_failures", sa.Integer(), nullable=True))
    for column in ("next_run_at", "last_run_at", "last_outcome", "consecutive_failures"):
        op.execute(
            f"UPDATE tasks SET {column} = (SELECT s.{column} FROM task_state s "
            "WHERE s.task_name = tasks.name)"
        )
    op.execute("UPDATE tasks SET consecutive_failures = 0 WHERE consecutive_failures IS NULL")
    # Dropped before tasks is copied again below (the cascade, as in upgrade).
    op.drop_table("task_state")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.alter_column("consecutive_failures", existing_type=sa.Integer(), nullable=False)
