"""offers: what a response model learns from, logged with each offer

A `randomized` rule draws each offer's discount so that `discount-train response` can learn what
a discount does; it needs, per offer, the model's score and rank, the item's cost, the shopper's
numeric features as priced, and the probability the drawn discount had. Offers logged before
this revision have none of them (NULL), and `discountctl offers export` leaves them out.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

COLUMNS = ("cf_score", "rank", "cost", "propensity", "user_features")


def upgrade() -> None:
    with op.batch_alter_table("offers") as batch:
        batch.add_column(sa.Column("cf_score", sa.Float(), nullable=True))
        batch.add_column(sa.Column("rank", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("cost", sa.Float(), nullable=True))
        batch.add_column(sa.Column("propensity", sa.Float(), nullable=True))
        batch.add_column(sa.Column("user_features", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("offers") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
