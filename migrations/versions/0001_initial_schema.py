"""initial schema: segments, rules, experiments, model versions, offers, events, audit log

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

NAME = 200
ID = 128


def _times() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "segments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("condition", sa.JSON(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        *_times(),
        sa.CheckConstraint("kind IN ('condition', 'members')", name="ck_segments_kind"),
        sa.PrimaryKeyConstraint("id", name="pk_segments"),
        sa.UniqueConstraint("name", name="uq_segments_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "segment_members",
        sa.Column("segment_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.String(ID), nullable=False),
        sa.ForeignKeyConstraint(
            ["segment_id"],
            ["segments.id"],
            name="fk_segment_members_segment_id_segments",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("segment_id", "user_id", name="pk_segment_members"),
    )
    op.create_index("ix_segment_members_user_id", "segment_members", ["user_id"])
    op.create_table(
        "rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(NAME), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("segment_id", sa.Integer(), nullable=True),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("item_ids", sa.JSON(), nullable=False),
        sa.Column("policy", sa.String(32), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("max_discount_pct", sa.Float(), nullable=False),
        sa.Column("min_margin_pct", sa.Float(), nullable=False),
        sa.Column("budget", sa.Numeric(14, 2), nullable=True),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=True),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        *_times(),
        sa.CheckConstraint(
            "max_discount_pct >= 0 AND max_discount_pct < 100", name="ck_rules_max_discount"
        ),
        sa.CheckConstraint("min_margin_pct >= 0", name="ck_rules_min_margin"),
        sa.CheckConstraint("budget IS NULL OR budget >= 0", name="ck_rules_budget"),
        sa.CheckConstraint(
            "valid_from IS NULL OR valid_until IS NULL OR valid_from < valid_until",
            name="ck_rules_validity",
        ),
        sa.ForeignKeyConstraint(
            ["segment_id"],
            ["segments.id"],
            name="fk_rules_segment_id_segments",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_rules"),
        sa.UniqueConstraint("name", name="uq_rules_name"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_rules_segment_id", "rules", ["segment_id"])
    op.create_table(
        "experiments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("salt", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("target_segment_id", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        *_times(),
        sa.CheckConstraint(
            "status IN ('draft', 'running', 'paused', 'stopped')", name="ck_experiments_status"
        ),
        sa.ForeignKeyConstraint(
            ["target_segment_id"],
            ["segments.id"],
            name="fk_experiments_target_segment_id_segments",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_experiments"),
        sa.UniqueConstraint("key", name="uq_experiments_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_experiments_target_segment_id", "experiments", ["target_segment_id"])
    op.create_table(
        "experiment_variants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False),
        sa.Column("rule_id", sa.Integer(), nullable=True),
        sa.CheckConstraint("weight >= 0 AND weight <= 100", name="ck_experiment_variants_weight"),
        sa.ForeignKeyConstraint(
            ["experiment_id"],
            ["experiments.id"],
            name="fk_experiment_variants_experiment_id_experiments",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["rules.id"],
            name="fk_experiment_variants_rule_id_rules",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_experiment_variants"),
        sa.UniqueConstraint(
            "experiment_id", "name", name="uq_experiment_variants_experiment_id_name"
        ),
        sa.UniqueConstraint(
            "experiment_id", "position", name="uq_experiment_variants_experiment_id_position"
        ),
    )
    op.create_index("ix_experiment_variants_rule_id", "experiment_variants", ["rule_id"])
    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(NAME), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest_sha256", sa.String(64), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("rolled_back_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('staged', 'active', 'retired')", name="ck_model_versions_status"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_model_versions"),
        sa.UniqueConstraint("version", name="uq_model_versions_version"),
    )
    op.create_table(
        "offers",
        sa.Column("offer_id", sa.String(64), nullable=False),
        sa.Column("user_id", sa.String(ID), nullable=False),
        sa.Column("item_id", sa.String(ID), nullable=False),
        sa.Column("rule_id", sa.Integer(), nullable=True),
        sa.Column("segment", sa.String(NAME), nullable=True),
        sa.Column("experiment_key", sa.String(64), nullable=True),
        sa.Column("variant", sa.String(64), nullable=True),
        sa.Column("base_price", sa.Numeric(12, 2), nullable=False),
        sa.Column("discount_pct", sa.Float(), nullable=False),
        sa.Column("final_price", sa.Numeric(12, 2), nullable=False),
        sa.Column("model_version", sa.String(NAME), nullable=False),
        sa.Column("reason_codes", sa.JSON(), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("offer_id", name="pk_offers"),
    )
    op.create_index("ix_offers_user_id", "offers", ["user_id"])
    op.create_index("ix_offers_experiment_key_variant", "offers", ["experiment_key", "variant"])
    op.create_index("ix_offers_rule_id", "offers", ["rule_id"])
    op.create_index("ix_offers_issued_at", "offers", ["issued_at"])
    op.create_table(
        "events",
        sa.Column("event_id", sa.String(ID), nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("user_id", sa.String(ID), nullable=False),
        sa.Column("item_id", sa.String(ID), nullable=True),
        sa.Column("offer_id", sa.String(64), nullable=True),
        sa.Column("revenue", sa.Numeric(14, 2), nullable=True),
        sa.Column("quantity", sa.Integer(), nullable=True),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "type IN ('impression', 'click', 'add_to_cart', 'purchase', 'redemption')",
            name="ck_events_type",
        ),
        sa.CheckConstraint("revenue IS NULL OR revenue >= 0", name="ck_events_revenue"),
        sa.PrimaryKeyConstraint("event_id", name="pk_events"),
    )
    op.create_index("ix_events_user_id", "events", ["user_id"])
    op.create_index("ix_events_offer_id", "events", ["offer_id"])
    op.create_index("ix_events_type_occurred_at", "events", ["type", "occurred_at"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(NAME), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("entity_type", sa.String(32), nullable=False),
        sa.Column("entity_id", sa.String(NAME), nullable=False),
        sa.Column("entity_name", sa.String(NAME), nullable=False),
        sa.Column("before", sa.JSON(), nullable=True),
        sa.Column("after", sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_entity_type_entity_id", "audit_log", ["entity_type", "entity_id"])
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def downgrade() -> None:
    for table in (
        "audit_log",
        "events",
        "offers",
        "model_versions",
        "experiment_variants",
        "experiments",
        "rules",
        "segment_members",
        "segments",
    ):
        # Indexes go with their table on both backends.
        op.drop_table(table)
