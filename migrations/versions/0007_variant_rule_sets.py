"""experiment_variant_rules: a variant prices with a set of rules, not at most one

A variant held one rule in experiment_variants.rule_id; a shop testing a discount program (20 %
for new customers, 5 % for everyone else) against its control needs several, which compete per
item as open rules do. Each variant's rule moves to the new table. The downgrade moves them back
and refuses a store where a variant holds more than one rule, which the old column cannot hold.

SQLite recreates experiment_variants to drop or add its column (a batch operation), and dropping
the old table deletes, through ON DELETE CASCADE, the rows that name it (migrations/env.py): so
the rules are read first, the table is recreated while nothing refers to it, and the rows are
written back after.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from alembic.util.exc import CommandError

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    pairs = bind.execute(
        sa.text("SELECT id, rule_id FROM experiment_variants WHERE rule_id IS NOT NULL")
    ).all()
    op.drop_index("ix_experiment_variants_rule_id", table_name="experiment_variants")
    with op.batch_alter_table("experiment_variants") as batch:
        batch.drop_constraint("fk_experiment_variants_rule_id_rules", type_="foreignkey")
        batch.drop_column("rule_id")
    table = op.create_table(
        "experiment_variant_rules",
        sa.Column("variant_id", sa.Integer(), nullable=False),
        sa.Column("rule_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["variant_id"],
            ["experiment_variants.id"],
            name="fk_experiment_variant_rules_variant_id_experiment_variants",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["rule_id"],
            ["rules.id"],
            name="fk_experiment_variant_rules_rule_id_rules",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("variant_id", "rule_id", name="pk_experiment_variant_rules"),
    )
    op.create_index("ix_experiment_variant_rules_rule_id", "experiment_variant_rules", ["rule_id"])
    op.bulk_insert(table, [{"variant_id": v, "rule_id": r} for v, r in pairs])


def downgrade() -> None:
    bind = op.get_bind()
    crowded = bind.execute(
        sa.text(
            "SELECT e.key, v.name, COUNT(*) FROM experiment_variant_rules vr "
            "JOIN experiment_variants v ON v.id = vr.variant_id "
            "JOIN experiments e ON e.id = v.experiment_id "
            "GROUP BY e.key, v.name HAVING COUNT(*) > 1 ORDER BY e.key, v.name"
        )
    ).all()
    if crowded:
        which = ", ".join(f"{name!r} of {key!r} ({n} rules)" for key, name, n in crowded)
        raise CommandError(
            f"variant(s) {which} price with several rules, which revision 0006 cannot hold (a "
            "variant there has at most one rule): stay at 0007, or first give each such variant "
            "one rule (`discountctl experiments update`, drafts only) or delete its draft"
        )
    pairs = bind.execute(sa.text("SELECT variant_id, rule_id FROM experiment_variant_rules")).all()
    op.drop_index("ix_experiment_variant_rules_rule_id", table_name="experiment_variant_rules")
    op.drop_table("experiment_variant_rules")
    with op.batch_alter_table("experiment_variants") as batch:
        batch.add_column(sa.Column("rule_id", sa.Integer(), nullable=True))
        batch.create_foreign_key(
            "fk_experiment_variants_rule_id_rules",
            "rules",
            ["rule_id"],
            ["id"],
            ondelete="RESTRICT",
        )
    op.create_index("ix_experiment_variants_rule_id", "experiment_variants", ["rule_id"])
    variants = sa.table("experiment_variants", sa.column("id"), sa.column("rule_id"))
    for variant_id, rule_id in pairs:
        op.execute(variants.update().where(variants.c.id == variant_id).values(rule_id=rule_id))
