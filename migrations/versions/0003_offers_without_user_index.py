"""offers: drop the index on user_id, which no query reads and every issued offer paid for

Reports find an experiment's offers through (experiment_key, variant) and redeemed discounts
through the offer id; nothing looks offers up by user. With random user ids each issued offer
put its entry on a random page of this index: on a SQLite store of 1.6M offers it was 15 of
the 21 us an offer's insert cost (docs/BENCHMARKS.md).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_offers_user_id", table_name="offers")


def downgrade() -> None:
    op.create_index("ix_offers_user_id", "offers", ["user_id"])
