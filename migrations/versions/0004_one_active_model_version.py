"""model_versions: at most one active version, enforced by the database

Promote retires the active version and activates another in one transaction, but two promotes
racing on PostgreSQL could each do so and commit two active versions: the second waits on the
first's lock of the version both retire, then goes on. A unique index over the active rows
makes the second one fail instead. A store that the race already left with several active
versions keeps the most recently activated one (the one its last promote pointed CURRENT at)
and the others are retired, so the index can be built.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

ACTIVE = sa.text("status = 'active'")


def upgrade() -> None:
    op.execute(
        "UPDATE model_versions SET status = 'retired' WHERE status = 'active' AND id <> ("
        "SELECT id FROM model_versions WHERE status = 'active' "
        "ORDER BY activated_at DESC, id DESC LIMIT 1)"
    )
    op.create_index(
        "ix_model_versions_one_active",
        "model_versions",
        ["status"],
        unique=True,
        postgresql_where=ACTIVE,
        sqlite_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ix_model_versions_one_active", table_name="model_versions")
