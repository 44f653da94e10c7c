"""Read the store into the immutable offer Snapshot the pipeline (core.offers) prices from."""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.offers import ExperimentDef, RuleDef, SegmentDef, Snapshot, VariantDef
from core.policy import Guardrails, PolicyError
from core.policy import Rule as Pricing
from core.segments import Condition, ConditionError, parse_condition
from core.store.experiments import Experiments
from core.store.tables import (
    Event,
    ModelVersion,
    Offer,
    Rule,
    Segment,
    SegmentMember,
)

log = logging.getLogger(__name__)


def spent_by_rule(session: Session) -> dict[int, Decimal]:
    """Discount money redeemed under each rule: (base − final) × quantity of every redemption
    event joined to the offer it names. Issued but unredeemed offers cost nothing."""
    quantity = func.coalesce(Event.quantity, 1)
    amount = func.sum((Offer.base_price - Offer.final_price) * quantity)
    query = (
        select(Offer.rule_id, amount)
        .join(Event, Event.offer_id == Offer.offer_id)
        .where(Event.type == "redemption", Offer.rule_id.is_not(None))
        .group_by(Offer.rule_id)
    )
    return {
        int(rule_id): Decimal(str(total)).quantize(Decimal("0.01"))
        for rule_id, total in session.execute(query)
        if rule_id is not None and total is not None
    }


def _pricing(row: Rule) -> Pricing | None:
    try:
        pricing = Pricing(
            row.policy, row.params, Guardrails.of(row.max_discount_pct, row.min_margin_pct)
        )
    except PolicyError as e:
        log.error("rule %r cannot be served and will not apply: %s", row.name, e)
        return None
    return pricing


def _condition(segment: Segment) -> Condition | None:
    try:
        return None if segment.condition is None else parse_condition(segment.condition)
    except ConditionError as e:
        # Without members, a segment that cannot be read holds nobody: fail closed.
        log.error("segment %r cannot be read and holds nobody: %s", segment.name, e)
        return None


def _rule(row: Rule, spent: dict[int, Decimal]) -> RuleDef:
    return RuleDef(
        id=row.id,
        name=row.name,
        pricing=_pricing(row),
        priority=row.priority,
        segment=row.segment.name if row.segment is not None else None,
        categories=frozenset(row.categories),
        item_ids=frozenset(row.item_ids),
        enabled=row.enabled,
        valid_from=row.valid_from,
        valid_until=row.valid_until,
        budget=None if row.budget is None else Decimal(str(row.budget)),
        spent=spent.get(row.id, Decimal(0)),
    )


def load_snapshot(session: Session, now: datetime) -> Snapshot:
    members: dict[int, set[str]] = {}
    for segment_id, user_id in session.execute(
        select(SegmentMember.segment_id, SegmentMember.user_id)
    ):
        members.setdefault(segment_id, set()).add(user_id)
    segments = tuple(
        SegmentDef(
            s.name,
            s.priority,
            _condition(s),
            frozenset(members.get(s.id, ())),
        )
        for s in session.scalars(select(Segment).order_by(Segment.priority, Segment.name))
    )
    spent = spent_by_rule(session)
    rules = {
        r.id: _rule(r, spent)
        for r in session.scalars(select(Rule).order_by(Rule.priority.desc(), Rule.name))
    }
    experiments = tuple(
        ExperimentDef(
            e.key,
            e.salt,
            tuple(
                VariantDef(v.name, v.weight, None if v.rule_id is None else rules[v.rule_id])
                for v in e.variants
            ),
            e.target_segment.name if e.target_segment is not None else None,
        )
        for e in Experiments(session).running()
    )
    active = session.scalar(select(ModelVersion.version).where(ModelVersion.status == "active"))
    return Snapshot(segments, tuple(rules.values()), experiments, active, now)
