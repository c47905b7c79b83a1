"""Overlap policies, forced run-now requests and backfills.

``tasks.overlap_policy`` and ``tasks.max_concurrent`` (NULL: ``skip``, today's behaviour: the
slot that comes while a run still goes is recorded skipped), ``tasks.run_forced`` (a run-now
request that ignores the overlap policy) and ``tasks.backfill_from``, ``tasks.backfill_to``,
``tasks.backfill_concurrency`` (a backfill the leader has still to run). Existing tasks keep
skipping overlapping slots and have no backfill pending.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 07:00:00

"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("overlap_policy", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("max_concurrent", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("run_forced", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("backfill_from", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("backfill_to", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("backfill_concurrency", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("backfill_concurrency")
        batch_op.drop_column("backfill_to")
        batch_op.drop_column("backfill_from")
        batch_op.drop_column("run_forced")
        batch_op.drop_column("max_concurrent")
        batch_op.drop_column("overlap_policy")
