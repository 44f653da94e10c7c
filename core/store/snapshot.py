"""Read the store into the immutable offer Snapshot the pipeline (core.offers) prices from."""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.offers import ExperimentDef, RuleDef, SegmentDef, Snapshot, VariantDef
from core.policy import Guardrails, PolicyError
from core.policy import Rule as Pricing
from core.segments import Condition, ConditionError, parse_condition
from core.store.experiments import Experiments
from core.store.rules import Rules
from core.store.segments import Segments
from core.store.tables import (
    Event,
    Offer,
    Rule,
    Segment,
    SegmentMember,
)

log = logging.getLogger(__name__)


# How long before a load a redemption's row is taken as committed: received_at is stamped
# before its transaction commits (as server.purchases.OVERLAP, whose reasoning this shares).
SETTLE = timedelta(seconds=60)
# How often the settled spend is summed from scratch anyway: a redemption whose offer row was
# stored later than SETTLE after it (an offer log that waited for the store, offers spilled at
# a shutdown), or that another host stamped with a clock running behind this one's, is missed by
# the carried sums until then.
RESUM = timedelta(minutes=10)


@dataclass
class Held:
    """What one load keeps for the next, so that a reload reads what changed rather than
    everything: the caller keeps one per process (server.snapshot).

    members: per segment id, its (version, created_at) and members when read. Every change of a
    segment's members bumps its version (core.store.segments): a segment of a million imported
    ids cost 1.35 s of every poll (SQLite) read again each time.
    settled: per budgeted rule, the discount money redeemed up to settled_at; a load adds the
    redemptions received since, so a budget's cost follows the recent redemptions, not all of
    them."""

    members: dict[int, tuple[tuple[int, datetime], frozenset[str]]] = field(default_factory=dict)
    settled: dict[int, Decimal] = field(default_factory=dict)
    settled_at: datetime | None = None
    summed_at: datetime | None = None  # when settled was last summed from scratch


def spent_by_rule(
    session: Session,
    rule_ids: Collection[int],
    after: datetime | None = None,
    until: datetime | None = None,
) -> dict[int, Decimal]:
    """Discount money redeemed under each of the rules (received in (after, until] when given):
    (base − final) × quantity of every redemption event joined to the offer it names. Issued
    but unredeemed offers cost nothing."""
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
    if after is not None:
        query = query.where(Event.received_at > after)
    if until is not None:
        query = query.where(Event.received_at <= until)
    return {
        int(rule_id): Decimal(str(total)).quantize(Decimal("0.01"))
        for rule_id, total in session.execute(query)
        if rule_id is not None and total is not None
    }


def _spent(session: Session, rule_ids: list[int], held: Held, now: datetime) -> dict[int, Decimal]:
    """spent_by_rule of the budgeted rules, from held's settled sums and what came since."""
    settle = now - SETTLE
    last = held.settled_at
    anew = (
        last is None
        or settle < last
        or any(r not in held.settled for r in rule_ids)
        or held.summed_at is None
        or now - held.summed_at >= RESUM
    )
    if anew:
        # The first load, a clock set back, a rule newly budgeted, or RESUM since the last sum
        # from scratch: every rule from scratch.
        added = spent_by_rule(session, rule_ids, until=settle)
        held.settled = dict.fromkeys(rule_ids, Decimal(0))
        held.summed_at = now
    else:
        added = spent_by_rule(session, rule_ids, after=last, until=settle)
        held.settled = {r: held.settled[r] for r in rule_ids}
    for rule, amount in added.items():
        held.settled[rule] += amount
    held.settled_at = settle
    recent = spent_by_rule(session, rule_ids, after=settle)
    return {r: held.settled[r] + recent.get(r, Decimal(0)) for r in rule_ids}


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


def _rule(row: Rule, spent: dict[int, Decimal], owned: set[int]) -> RuleDef:
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
        experiment_only=row.id in owned,
    )


def _members(session: Session, rows: list[Segment], held: Held) -> None:
    """Bring held.members up to date for the segments in rows (and forget the others)."""
    cache = held.members
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


def load_snapshot(session: Session, now: datetime, held: Held | None = None) -> Snapshot:
    """The store's rules, segments and running experiments as of now. held: what a previous
    load of this caller kept, to read only what changed since (updated here)."""
    kept = Held() if held is None else held
    rows = Segments(session).list_all()
    _members(session, rows, kept)
    members = kept.members
    segments = tuple(SegmentDef(s.name, s.priority, _condition(s), members[s.id][1]) for s in rows)
    rule_rows = Rules(session).list_all()
    spent = _spent(session, [r.id for r in rule_rows if r.budget is not None], kept, now)
    owned = set(Experiments(session).holders())
    rules = {r.id: _rule(r, spent, owned) for r in rule_rows}
    experiments = tuple(
        ExperimentDef(
            e.key,
            e.salt,
            tuple(
                VariantDef(v.name, v.weight, tuple(rules[r.id] for r in v.in_order()))
                for v in e.variants
            ),
            e.target_segment.name if e.target_segment is not None else None,
        )
        for e in Experiments(session).running()
    )
    return Snapshot(segments, tuple(rules.values()), experiments)
