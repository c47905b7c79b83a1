"""Task failures: pause after N consecutive failed slots; pings; a catch-up window.

``tasks.pause_after_failures`` (NULL: the ``cron.pause_after_failures`` setting; 0: never) and
``tasks.auto_paused_at`` (when nanobot paused the task for its failures; its reason is in
``tasks.pause_reason``), ``tasks.ping_url`` (healthchecks.io-style pings of each run) and
``tasks.catch_up_window_s``. Existing tasks keep the setting's default, are not auto-paused,
send no pings and keep today's catch-up (the latest missed slot, however late).

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 04:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pause_after_failures", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("auto_paused_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("ping_url", sa.String(length=2000), nullable=True))
        batch_op.add_column(sa.Column("catch_up_window_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("catch_up_window_s")
        batch_op.drop_column("ping_url")
        batch_op.drop_column("auto_paused_at")
        batch_op.drop_column("pause_after_failures")
