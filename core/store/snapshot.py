"""Read the store into the immutable offer Snapshot the pipeline (core.offers) prices from."""

from __future__ import annotations

import logging
from collections.abc import Collection
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


# Members per segment id, with the segment's version and creation time when they were read.
# Every change of a segment's members bumps its version (core.store.segments), so a reload
# reads again only the members of segments that changed: a segment of a million imported ids
# cost 1.5 s of every poll (SQLite), most of it building the set, on every worker.
MemberCache = dict[int, tuple[tuple[int, datetime], frozenset[str]]]


def spent_by_rule(session: Session, rule_ids: Collection[int]) -> dict[int, Decimal]:
    """Discount money redeemed under each of the rules: (base − final) × quantity of every
    redemption event joined to the offer it names. Issued but unredeemed offers cost nothing."""
    if not rule_ids:
        return {}
    quantity = func.coalesce(Event.quantity, 1)
    amount = func.sum((Offer.base_price - Offer.final_price) * quantity)
    query = (
        select(Offer.rule_id, amount)
        .join(Event, Event.offer_id == Offer.offer_id)
        .where(Event.type == "redemption", Offer.rule_id.in_(rule_ids))
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


def _members(session: Session, rows: list[Segment], cache: MemberCache) -> None:
    """Bring cache up to date for the segments in rows (and forget the others)."""
    stamp = {s.id: (s.version, s.created_at) for s in rows}
    stale = [i for i, at in stamp.items() if i not in cache or cache[i][0] != at]
    read: dict[int, set[str]] = {i: set() for i in stale}
    if stale:
        query = select(SegmentMember.segment_id, SegmentMember.user_id).where(
            SegmentMember.segment_id.in_(stale)
        )
        for segment_id, user_id in session.execute(query):
            read[segment_id].add(user_id)
    for i in [i for i in cache if i not in stamp]:
        del cache[i]
    cache.update({i: (stamp[i], frozenset(users)) for i, users in read.items()})


def load_snapshot(session: Session, now: datetime, members: MemberCache | None = None) -> Snapshot:
    """The store's rules, segments and running experiments as of now. members: the segment
    members a previous load read, kept by the caller to reload only what changed."""
    held: MemberCache = {} if members is None else members
    rows = list(session.scalars(select(Segment).order_by(Segment.priority, Segment.name)))
    _members(session, rows, held)
    segments = tuple(SegmentDef(s.name, s.priority, _condition(s), held[s.id][1]) for s in rows)
    rule_rows = list(session.scalars(select(Rule).order_by(Rule.priority.desc(), Rule.name)))
    spent = spent_by_rule(session, [r.id for r in rule_rows if r.budget is not None])
    rules = {r.id: _rule(r, spent) for r in rule_rows}
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
