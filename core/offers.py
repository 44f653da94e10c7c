"""The offer pipeline, pure: features → segment → experiment → rule → prices → reason codes.

``discountd`` (GetOffers) and ``discountctl rules simulate`` both call ``decide`` on a
``Snapshot`` of the store, so the admin's answer is the server's answer. Nothing here touches
the database, the model or grpc: callers bring the snapshot, the user's features and the items
with their catalog prices and model ranks.

Choices, stated once:
- the user's segment is the first segment, by ascending priority, whose condition or member list
  holds the user; it names the user in the response and in offer logs;
- scope checks (a rule's segment, an experiment's target segment) ask whether the user is *in*
  that segment, not whether it is the first one matched, so adding a broad low-priority segment
  never silently takes users out of a rule;
- among running experiments the first started whose target holds the user decides; only its
  variant's rules (none: no discount) compete for an item, as open rules do below, even where
  another rule has higher priority, so the experiment measures what it says;
- each item gets the highest-priority live rule whose scope (segment included) covers it, of the
  variant's rules in an experiment and of the open ones without; equal priorities go by name;
- a rule with a budget grants discounts only while the discounts redeemed under it (as of the
  snapshot) plus those granted in this answer stay within the budget;
- items under `optimal` rules are scored by the caller's response model in one call per answer
  (every such item, the union of the rules' candidate discounts); without one they get none.

server.offers issues the decisions as signed offers; core.store.offers stores those offers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

import numpy as np
import numpy.typing as npt

from core import policy
from core.assignment import variant_index
from core.features import CATEGORICAL_FEATURES, FEATURE_NAMES, NEW_USER, NUMERIC_FEATURES
from core.records import record
from core.segments import Condition, evaluate

Features = Mapping[str, float | str]
Probabilities = npt.NDArray[np.float64]


class Why(StrEnum):
    """Pipeline reason codes; with core.policy.Reason they make up an offer's reason codes."""

    SEGMENT_MATCHED = "SEGMENT_MATCHED"
    NO_SEGMENT = "NO_SEGMENT"
    EXPERIMENT_VARIANT = "EXPERIMENT_VARIANT"
    # The user's variant has no rule: no discount, by design (usually the control).
    VARIANT_NO_DISCOUNT = "VARIANT_NO_DISCOUNT"
    # None of the variant's rules applies: each is disabled, outside its validity window, or
    # does not cover the user (its segment) or the item.
    VARIANT_RULE_NOT_APPLICABLE = "VARIANT_RULE_NOT_APPLICABLE"
    RULE_HIGHEST_PRIORITY = "RULE_HIGHEST_PRIORITY"
    # No rule open to everyone covers the item, but a rule an experiment holds for its variant
    # does, and this user is not in that variant: no discount.
    RULE_HELD_BY_EXPERIMENT = "RULE_HELD_BY_EXPERIMENT"
    RANKED = "RANKED"
    # The item has no rank for this user: not among their recommendations (past the first
    # server.recommend.MAX_LIMIT, or excluded as bought), or one the model has no score for
    # (e.g. an item it was not trained on). A score, if any, still prices it.
    NOT_RANKED = "NOT_RANKED"
    # The catalog has no price or no cost for the item, so no discount can be checked safely.
    NO_PRICE = "NO_PRICE"
    # The serving model's catalog does not hold the item (one added since it was trained): no
    # price is known, so no offer; the rest of the basket is priced as usual.
    UNKNOWN_ITEM = "UNKNOWN_ITEM"
    NO_COST = "NO_COST"
    # The rule priced against a cost the trainer assumed from its default margin: the margin
    # floor holds only as far as that margin does.
    COST_ASSUMED = "COST_ASSUMED"


class FeatureError(ValueError):
    """A context override that names a feature but cannot be read as one."""

    def __init__(self, name: str, description: str) -> None:
        self.name = name
        super().__init__(description)


@dataclass(frozen=True)
class SegmentDef:
    name: str
    priority: int
    condition: Condition | None  # None: a member list
    members: frozenset[str] = frozenset()

    def holds(self, user_id: str, features: Features) -> bool:
        if self.condition is None:
            return user_id in self.members
        return evaluate(self.condition, features)


def in_window(valid_from: datetime | None, valid_until: datetime | None, now: datetime) -> bool:
    """Whether now lies in a rule's validity window (from inclusive, until exclusive; None:
    open), as the server judges it; discountctl's notes judge it the same way."""
    return (valid_from is None or valid_from <= now) and (valid_until is None or now < valid_until)


@dataclass(frozen=True)
class RuleDef:
    id: int
    name: str
    # None: the stored parameters cannot be read by this build; such a rule never applies.
    pricing: policy.Rule | None
    priority: int = 0
    segment: str | None = None
    categories: frozenset[str] = frozenset()  # empty: every category
    item_ids: frozenset[str] = frozenset()  # empty: every item
    enabled: bool = True
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    budget: Decimal | None = None
    spent: Decimal = Decimal(0)
    # A variant of an experiment not yet stopped prices with it: it prices only through that
    # experiment's variant, never as an ordinary rule, so a draft or paused experiment gives its
    # treatment to nobody rather than to everyone, control included.
    experiment_only: bool = False

    def live(self, now: datetime) -> bool:
        return (
            self.enabled
            and self.pricing is not None
            and in_window(self.valid_from, self.valid_until, now)
        )

    def covers(self, item: ItemInput) -> bool:
        if self.categories and item.category not in self.categories:
            return False
        return not self.item_ids or item.item_id in self.item_ids

    def remaining(self) -> Decimal | None:
        return None if self.budget is None else self.budget - self.spent


@dataclass(frozen=True)
class VariantDef:
    name: str
    weight: int
    # Highest priority first, as Snapshot.rules; none: no discount.
    rules: tuple[RuleDef, ...] = ()


@dataclass(frozen=True)
class ExperimentDef:
    key: str
    salt: str
    variants: tuple[VariantDef, ...]
    target_segment: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything the pipeline reads from the store, as of one load. Immutable: a refresh
    builds a new one, so a request never sees half an update."""

    segments: tuple[SegmentDef, ...] = ()  # ascending priority
    rules: tuple[RuleDef, ...] = ()  # descending priority
    experiments: tuple[ExperimentDef, ...] = ()  # running ones, the first started first

    def segment(self, name: str) -> SegmentDef | None:
        return next((s for s in self.segments if s.name == name), None)


@record
class ItemInput:
    """An item to price: catalog facts and the model's rank/score for this user."""

    item_id: str
    category: str
    price: float | None
    cost: float | None
    rank: int  # 1-based in the user's recommendations; 0: not among them
    score: float | None
    cost_assumed: bool = False  # the trainer assumed the cost from its default margin
    known: bool = True  # in the serving model's catalog


# A `randomized` rule's draw for a rule (by id): the Draw core.policy prices its items with.
RuleDraw = Callable[[int], policy.Draw]

# The response model: P(buy) for each item (rows) at each discount (columns, fractions: 0.1 is
# 10%) for this user (id, to look up their past responses, and features); None when there is no
# model, so `optimal` grants nothing.
Respond = Callable[[str, Features, Sequence[ItemInput], Sequence[float]], Probabilities | None]


@record
class ItemDecision:
    item_id: str
    rank: int
    priced: policy.PricedItem
    rule: RuleDef | None
    reasons: tuple[str, ...]

    @property
    def priced_ok(self) -> bool:
        """False when the catalog lacks the item or its price: the offer cannot be signed."""
        return Why.NO_PRICE not in self.reasons and Why.UNKNOWN_ITEM not in self.reasons


@dataclass(frozen=True)
class Decision:
    segment: str | None
    experiment_key: str | None
    variant: str | None
    items: tuple[ItemDecision, ...]


def resolve_features(base: Features | None, context: Mapping[str, str]) -> dict[str, float | str]:
    """The user's features: the artifact's row (new-user values when none), then any context
    key that names a feature. Other context keys (e.g. channel) are free-form and ignored here.
    """
    features: dict[str, float | str] = dict(NEW_USER)
    if base is not None:
        features.update({k: v for k, v in base.items() if k in FEATURE_NAMES})
    for name, raw in context.items():
        if name in NUMERIC_FEATURES:
            try:
                value = float(raw)
            except ValueError:
                raise FeatureError(name, f"{name} must be a number, got {raw!r}") from None
            if not math.isfinite(value):
                raise FeatureError(name, f"{name} must be a finite number, got {raw!r}")
            features[name] = value
        elif name in CATEGORICAL_FEATURES:
            features[name] = raw
    return features


def _segment_of(snapshot: Snapshot, user_id: str, features: Features) -> SegmentDef | None:
    return next((s for s in snapshot.segments if s.holds(user_id, features)), None)


def _in_segment(snapshot: Snapshot, name: str | None, user_id: str, features: Features) -> bool:
    if name is None:
        return True
    segment = snapshot.segment(name)
    # A segment the snapshot does not know holds nobody: fail closed.
    return segment is not None and segment.holds(user_id, features)


def _experiment_of(
    snapshot: Snapshot, user_id: str, features: Features
) -> tuple[ExperimentDef, VariantDef] | None:
    for experiment in snapshot.experiments:
        if _in_segment(snapshot, experiment.target_segment, user_id, features):
            weights = [v.weight for v in experiment.variants]
            return experiment, experiment.variants[variant_index(experiment.salt, user_id, weights)]
    return None


def _rank_reason(item: ItemInput) -> Why:
    return Why.RANKED if item.rank > 0 and item.score is not None else Why.NOT_RANKED


def _candidate(item: ItemInput, probability: tuple[float, ...] | None = None) -> policy.Candidate:
    return policy.Candidate(
        item.item_id,
        policy.as_decimal(item.price or 0, f"price of {item.item_id}"),
        policy.as_decimal(item.cost or 0, f"cost of {item.item_id}"),
        item.rank if item.rank > 0 else policy.UNRANKED,
        item.score,
        probability,
    )


def _purchase_probabilities(
    groups: Sequence[tuple[RuleDef, list[int]]],
    items: Sequence[ItemInput],
    user_id: str,
    features: Features,
    respond: Respond | None,
) -> dict[int, tuple[float, ...]]:
    """Per item position under an `optimal` rule, P(buy) at each of the rule's choices, from
    one response-model call; items without a model score are left out (NO_SCORE)."""
    choices: dict[int, tuple[Decimal, ...]] = {}
    rows: list[int] = []
    for rule, positions in groups:
        assert rule.pricing is not None  # live() checked it
        if rule.pricing.policy == "optimal":
            choices[rule.id] = policy.grid_choices(rule.pricing.params)
            rows += [n for n in positions if _scored(items[n])]
    if not rows or respond is None:
        return {}
    union = sorted(set().union(*choices.values()))
    probability = respond(
        user_id, features, [items[n] for n in rows], [float(c) / 100 for c in union]
    )
    if probability is None:
        return {}
    row_of = {n: r for r, n in enumerate(rows)}
    column = {c: k for k, c in enumerate(union)}
    out: dict[int, tuple[float, ...]] = {}
    for rule, positions in groups:
        if rule.id in choices:
            columns = [column[c] for c in choices[rule.id]]
            for n in positions:
                if n in row_of:
                    out[n] = tuple(float(p) for p in probability[row_of[n], columns])
    return out


def _scored(item: ItemInput) -> bool:
    return item.score is not None and math.isfinite(item.score)


def _usable_rules(
    snapshot: Snapshot,
    rules: Sequence[RuleDef],
    user_id: str,
    features: Features,
    now: datetime,
) -> list[RuleDef]:
    """Of rules (the open ones, or a variant's), those live now whose segment holds this user,
    highest priority first: which of them prices an item then depends on the item alone, so
    segments are evaluated once per request rather than once per item and rule. Open rules an
    experiment holds are among them only so that an item they alone cover can say so."""
    return [
        rule
        for rule in rules
        if rule.live(now) and _in_segment(snapshot, rule.segment, user_id, features)
    ]


def _rule_for(
    variant: VariantDef | None, usable: Sequence[RuleDef], item: ItemInput
) -> tuple[RuleDef | None, Why | None]:
    """The rule that prices item: the first of usable that covers it. The experiment decides
    which rules compete, never whom a rule may reach: a variant's rule scoped to a segment still
    prices only that segment's users."""
    if variant is not None and not variant.rules:
        return None, Why.VARIANT_NO_DISCOUNT
    held = False
    for rule in usable:
        if rule.covers(item):
            if variant is not None:
                return rule, None  # EXPERIMENT_VARIANT says why
            if not rule.experiment_only:
                return rule, Why.RULE_HIGHEST_PRIORITY
            held = True
    if variant is not None:
        return None, Why.VARIANT_RULE_NOT_APPLICABLE
    return None, Why.RULE_HELD_BY_EXPERIMENT if held else None


def decide(
    snapshot: Snapshot,
    user_id: str,
    features: Features,
    items: Sequence[ItemInput],
    now: datetime,
    respond: Respond | None = None,
    draw: RuleDraw | None = None,
) -> Decision:
    """Price ``items`` for one user, in their order. Fails closed: whatever is missing means no
    discount, and the reason codes say which. ``draw`` gives `randomized` rules their draws
    (None: fresh ones, core.policy.fresh_draw)."""
    segment = _segment_of(snapshot, user_id, features)
    assigned = _experiment_of(snapshot, user_id, features)
    head: list[str] = [Why.SEGMENT_MATCHED if segment else Why.NO_SEGMENT]
    if assigned is not None:
        head.append(Why.EXPERIMENT_VARIANT)
    variant = assigned[1] if assigned is not None else None
    competing = snapshot.rules if variant is None else variant.rules
    usable = _usable_rules(snapshot, competing, user_id, features, now)
    decided: list[ItemDecision | None] = [None] * len(items)
    under_rule: dict[int, tuple[RuleDef, list[int]]] = {}
    reasons: list[tuple[str, ...]] = []
    for n, item in enumerate(items):
        why: list[str] = [*head, _rank_reason(item)]
        rule, rule_reason = (
            (None, Why.NO_PRICE if item.known else Why.UNKNOWN_ITEM)
            if item.price is None
            else _rule_for(variant, usable, item)
        )
        if rule_reason is not None:
            why.append(rule_reason)
        if rule is not None and item.cost is None:
            rule = None
            why.append(Why.NO_COST)
        elif rule is not None and item.cost_assumed:
            why.append(Why.COST_ASSUMED)
        reasons.append(tuple(why))
        if rule is None:
            priced = policy.no_discount(_candidate(item))
            # Without a cost a rule that applies grants nothing, and NO_COST says so: NO_RULE
            # ("no rule applies") would contradict the rule reason before it.
            tail = () if Why.NO_COST in why else priced.reasons
            decided[n] = ItemDecision(item.item_id, item.rank, priced, None, (*why, *tail))
        else:
            under_rule.setdefault(rule.id, (rule, []))[1].append(n)
    groups = list(under_rule.values())
    probabilities = _purchase_probabilities(groups, items, user_id, features, respond)
    for rule, positions in groups:
        assert rule.pricing is not None  # live() checked it
        priced_items = policy.price_items(
            rule.pricing,
            [_candidate(items[n], probabilities.get(n)) for n in positions],
            policy.fresh_draw if draw is None else draw(rule.id),
        )
        budgeted = policy.apply_budget(priced_items, rule.remaining())
        for n, priced in zip(positions, budgeted, strict=True):
            decided[n] = ItemDecision(
                items[n].item_id, items[n].rank, priced, rule, (*reasons[n], *priced.reasons)
            )
    experiment = assigned[0] if assigned is not None else None
    return Decision(
        segment.name if segment else None,
        experiment.key if experiment else None,
        variant.name if variant else None,
        tuple(d for d in decided if d is not None),
    )
