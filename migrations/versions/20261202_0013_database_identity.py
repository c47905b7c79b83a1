"""A random id for each database: ``database_identity``.

One row, made when the database is created (or, for an existing one, when it is upgraded to
this revision), shared by no other database. The database guard remembers it in
``$NANOBOT_HOME/database.json`` to tell a new, empty database from the same one emptied on
purpose. It used the SQLite file's device and inode numbers, but once the old file is deleted
the new file at the path often gets the same inode number, and the loss went unnoticed.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 07:00:00

"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | Sequence[str] | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "database_identity",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_database_identity")),
    )
    op.bulk_insert(table, [{"id": str(uuid.uuid4())}])


def downgrade() -> None:
    op.drop_table("database_identity")
