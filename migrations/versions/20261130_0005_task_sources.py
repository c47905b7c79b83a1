"""Task sources: who defined a task, why nanobot paused it, command output, loaded task code.

``tasks.source`` (cli, file or code; existing tasks were added by the command line or by code,
and are marked ``cli``, the value the task file's sync never touches), ``tasks.pause_reason``,
``task_runs.output`` (the tail of a shell command's output) and the table ``task_code``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 03:30:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", sa.String(length=8), server_default="cli", nullable=False)
        )
        batch_op.add_column(sa.Column("pause_reason", sa.Text(), nullable=True))
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("output", sa.Text(), nullable=True))
    op.create_table(
        "task_code",
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=500), nullable=False),
        sa.Column("origin", sa.Text(), nullable=True),
        sa.Column("mtime", sa.Float(), nullable=True),
        sa.Column("loaded_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("node", "kind", "name", name=op.f("pk_task_code")),
    )


def downgrade() -> None:
    op.drop_table("task_code")
    with op.batch_alter_table("task_runs", schema=None) as batch_op:
        batch_op.drop_column("output")
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("pause_reason")
        batch_op.drop_column("source")
