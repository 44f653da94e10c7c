"""model_versions: at most one active version, enforced by the database

Promote retires the active version and activates another in one transaction, but two promotes
racing on PostgreSQL could each do so and commit two active versions: the second waits on the
first's lock of the version both retire, then goes on. A unique index over the active rows
makes the second one fail instead. (A store already holding two active versions must retire
one before this upgrade.)

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
