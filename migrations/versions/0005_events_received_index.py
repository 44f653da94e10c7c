"""events: an index on (type, received_at) for discountd's read of new purchases

discountd excludes from recommendations what a user bought since the model's data ended; it
polls the purchases stored since its last read (server.purchases), which without this index is
a scan of every event ever stored.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_events_type_received_at", "events", ["type", "received_at"])


def downgrade() -> None:
    op.drop_index("ix_events_type_received_at", table_name="events")
