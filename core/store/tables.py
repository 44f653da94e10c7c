"""The schema: one home for the tables that the server, the CLI and the migrations share.

On PostgreSQL the tables live in the ``discount`` schema (the engine sets ``search_path``), on
SQLite in the main database. Migrations in ``migrations/`` are frozen copies of this file's DDL;
``alembic check`` in the tests proves the two agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
NAME_LENGTH = 200
ID_LENGTH = 128

SEGMENT_KINDS = ("condition", "members")
EXPERIMENT_STATUSES = ("draft", "running", "paused", "stopped")
MODEL_STATUSES = ("staged", "active", "retired")
EVENT_TYPES = ("impression", "click", "add_to_cart", "purchase", "redemption")
# The sales: a line bought at the base price, or at an offer's (docs/OFFERS.md, "Record").
BUYING = ("purchase", "redemption")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC in and out; SQLite keeps no zone, so naive reads are UTC by contract."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}; the store keeps UTC-aware times only")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Versioned:
    """Optimistic locking: every UPDATE checks and bumps ``version``, so a write based on a stale
    read matches no row and raises instead of overwriting someone else's change."""

    version: Mapped[int] = mapped_column(Integer)

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:
        return {"version_id_col": cls.__table__.c.version}  # type: ignore[attr-defined]


class Segment(Versioned, Base):
    __tablename__ = "segments"
    __table_args__ = (
        CheckConstraint(_in("kind", SEGMENT_KINDS), name="kind"),
        # Rules, variants and offers point at segment ids; SQLite must never reuse a deleted one.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    kind: Mapped[str] = mapped_column(String(16))
    condition: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Segments are tried in ascending priority; the first that matches names the user's segment.
    priority: Mapped[int] = mapped_column(Integer, default=100)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def to_dict(self, member_count: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "condition": self.condition,
            "priority": self.priority,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "version": self.version,
        }
        if member_count is not None:
            out["member_count"] = member_count
        return out


class SegmentMember(Base):
    __tablename__ = "segment_members"

    segment_id: Mapped[int] = mapped_column(
        ForeignKey("segments.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)

    __table_args__ = (Index(None, "user_id"),)


class Rule(Versioned, Base):
    __tablename__ = "rules"
    __table_args__ = (
        CheckConstraint("max_discount_pct >= 0 AND max_discount_pct < 100", name="max_discount"),
        CheckConstraint("min_margin_pct >= 0", name="min_margin"),
        CheckConstraint("budget IS NULL OR budget >= 0", name="budget"),
        CheckConstraint(
            "valid_from IS NULL OR valid_until IS NULL OR valid_from < valid_until",
            name="validity",
        ),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    # Scope: an empty list means "every category" / "every item"; no segment means everyone.
    segment_id: Mapped[int | None] = mapped_column(
        ForeignKey("segments.id", ondelete="RESTRICT"), index=True
    )
    categories: Mapped[list[str]] = mapped_column(JSON, default=list)
    item_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    policy: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    max_discount_pct: Mapped[float] = mapped_column(Float)
    min_margin_pct: Mapped[float] = mapped_column(Float)
    # Money spent on discounts is computed from offers and redemptions; this is the cap.
    budget: Mapped[float | None] = mapped_column(Numeric(14, 2, asdecimal=False))
    valid_from: Mapped[datetime | None] = mapped_column(UTCDateTime)
    valid_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Higher priority wins; one rule applies per offer.
    priority: Mapped[int] = mapped_column(Integer, default=0)
    enabled: Mapped[bool] = mapped_column(default=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    segment: Mapped[Segment | None] = relationship(lazy="joined")

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.description,
            "segment": self.segment.name if self.segment is not None else None,
            "categories": list(self.categories),
            "item_ids": list(self.item_ids),
            "policy": self.policy,
            "params": self.params,
            "max_discount_pct": self.max_discount_pct,
            "min_margin_pct": self.min_margin_pct,
            # Drivers return whole amounts as int on SQLite; the JSON shape says number with cents.
            "budget": None if self.budget is None else float(self.budget),
            "valid_from": _iso(self.valid_from),
            "valid_until": _iso(self.valid_until),
            "priority": self.priority,
            "enabled": self.enabled,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "version": self.version,
        }


def tried_order(rule: Rule) -> tuple[int, str]:
    """The order in which rules compete for an item (docs/OFFERS.md): the largest priority
    first, equal ones by name in code-point order (as Segments.list_all explains)."""
    return (-rule.priority, rule.name)


class Experiment(Versioned, Base):
    __tablename__ = "experiments"
    __table_args__ = (
        CheckConstraint(_in("status", EXPERIMENT_STATUSES), name="status"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    salt: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="draft")
    target_segment_id: Mapped[int | None] = mapped_column(
        ForeignKey("segments.id", ondelete="RESTRICT"), index=True
    )
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    target_segment: Mapped[Segment | None] = relationship(lazy="joined")
    # The first variant (position 0) is the control that reports compare against.
    variants: Mapped[list[Variant]] = relationship(
        order_by="Variant.position",
        cascade="all, delete-orphan",
        lazy="selectin",
        back_populates="experiment",
    )

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "description": self.description,
            "salt": self.salt,
            "status": self.status,
            "target_segment": (
                self.target_segment.name if self.target_segment is not None else None
            ),
            "variants": [v.to_dict() for v in self.variants],
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "version": self.version,
        }


class Variant(Base):
    __tablename__ = "experiment_variants"
    __table_args__ = (
        UniqueConstraint("experiment_id", "name"),
        UniqueConstraint("experiment_id", "position"),
        CheckConstraint("weight >= 0 AND weight <= 100", name="weight"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    experiment_id: Mapped[int] = mapped_column(ForeignKey("experiments.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    weight: Mapped[int] = mapped_column(Integer)

    experiment: Mapped[Experiment] = relationship(back_populates="variants")
    # The rules the variant prices with, competing per item as open rules do (core.offers); none:
    # this variant gets no discount (a control, usually). Unordered here: see in_order.
    rules: Mapped[list[Rule]] = relationship(secondary="experiment_variant_rules", lazy="selectin")

    def in_order(self) -> list[Rule]:
        """The variant's rules in the order they are tried."""
        return sorted(self.rules, key=tried_order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "rules": [r.name for r in self.in_order()],
        }


class VariantRule(Base):
    """A rule of a variant (migration 0007: before it, a variant held at most one)."""

    __tablename__ = "experiment_variant_rules"

    variant_id: Mapped[int] = mapped_column(
        ForeignKey("experiment_variants.id", ondelete="CASCADE"), primary_key=True
    )
    # RESTRICT: a rule an experiment measures stays as long as the experiment's record does.
    rule_id: Mapped[int] = mapped_column(
        ForeignKey("rules.id", ondelete="RESTRICT"), primary_key=True, index=True
    )


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint(_in("status", MODEL_STATUSES), name="status"),
        # At most one active version, whatever two racing promotes do (migration 0004).
        Index(
            "ix_model_versions_one_active",
            "status",
            unique=True,
            postgresql_where=text("status = 'active'"),
            sqlite_where=text("status = 'active'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    path: Mapped[str] = mapped_column(Text)
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="staged")
    registered_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Rollback returns to the most recently activated version that was not itself rolled back.
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    rolled_back_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": self.path,
            "manifest_sha256": self.manifest_sha256,
            "metrics": self.metrics,
            "status": self.status,
            "registered_at": _iso(self.registered_at),
            "activated_at": _iso(self.activated_at),
            "rolled_back_at": _iso(self.rolled_back_at),
        }


class Offer(Base):
    """An offer the server issued; written in batches off the request path."""

    __tablename__ = "offers"
    # No index on user_id: nothing reads offers by user, and with random user ids it was the
    # costliest part of writing an offer (migration 0003).
    __table_args__ = (
        Index(None, "experiment_key", "variant"),
        Index(None, "rule_id"),
        Index(None, "issued_at"),
    )

    offer_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    item_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    # Names and ids as they were when the offer was made; history outlives the rule.
    rule_id: Mapped[int | None] = mapped_column(Integer)
    segment: Mapped[str | None] = mapped_column(String(NAME_LENGTH))
    experiment_key: Mapped[str | None] = mapped_column(String(64))
    variant: Mapped[str | None] = mapped_column(String(64))
    base_price: Mapped[float] = mapped_column(Numeric(12, 2, asdecimal=False))
    discount_pct: Mapped[float] = mapped_column(Float)
    final_price: Mapped[float] = mapped_column(Numeric(12, 2, asdecimal=False))
    model_version: Mapped[str] = mapped_column(String(NAME_LENGTH))
    reason_codes: Mapped[list[str]] = mapped_column(JSON, default=list)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # What a response model learns from (discountctl offers export), as priced: the model's
    # score and rank (None: it has none), the unit cost, the probability the discount had (1
    # but for a `randomized` rule) and the user's numeric features. NULL in offers logged before
    # migration 0006.
    cf_score: Mapped[float | None] = mapped_column(Float)
    rank: Mapped[int | None] = mapped_column(Integer)
    cost: Mapped[float | None] = mapped_column(Float)
    propensity: Mapped[float | None] = mapped_column(Float)
    user_features: Mapped[dict[str, float] | None] = mapped_column(JSON)


class Event(Base):
    """A storefront event; ``event_id`` is chosen by the client so a retry never counts twice."""

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(_in("type", EVENT_TYPES), name="type"),
        CheckConstraint("revenue IS NULL OR revenue >= 0", name="revenue"),
        Index(None, "user_id"),
        Index(None, "offer_id"),
        Index(None, "type", "occurred_at"),
        # discountd reads the purchases stored since its last read (server.purchases).
        Index(None, "type", "received_at"),
    )

    event_id: Mapped[str] = mapped_column(String(ID_LENGTH), primary_key=True)
    type: Mapped[str] = mapped_column(String(16))
    user_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    item_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    offer_id: Mapped[str | None] = mapped_column(String(64))
    revenue: Mapped[float | None] = mapped_column(Numeric(14, 2, asdecimal=False))
    quantity: Mapped[int | None] = mapped_column(Integer)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Client(Base):
    """A calling service and the SHA-256 of its bearer token; the token itself is never stored."""

    __tablename__ = "clients"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LENGTH), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "created_at": _iso(self.created_at),
            "revoked_at": _iso(self.revoked_at),
            "active": self.revoked_at is None,
        }


class AuditEntry(Base):
    __tablename__ = "audit_log"
    __table_args__ = (Index(None, "entity_type", "entity_id"), Index(None, "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    actor: Mapped[str] = mapped_column(String(NAME_LENGTH))
    action: Mapped[str] = mapped_column(String(32))
    entity_type: Mapped[str] = mapped_column(String(32))
    # A stable id (rows can be renamed) and the name at the time, for people reading the log.
    entity_id: Mapped[str] = mapped_column(String(NAME_LENGTH))
    entity_name: Mapped[str] = mapped_column(String(NAME_LENGTH))
    before: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    after: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "at": _iso(self.at),
            "actor": self.actor,
            "action": self.action,
            "entity_type": self.entity_type,
            "entity_id": self.entity_id,
            "entity_name": self.entity_name,
            "before": self.before,
            "after": self.after,
        }
