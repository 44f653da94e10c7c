"""Discount policies: parameter validation and the serving math that turns a rule into prices.

Pure code, shared by the store (validation at rule create/update), the server (``GetOffers``)
and ``discountctl rules simulate``; it never imports grpc or SQLAlchemy.

Money is ``Decimal`` and rounded the same way everywhere:

- a base price is rounded half-up to cents once, on entry (``to_cents``);
- the margin floor, cost × (1 + min_margin/100), is rounded *up* to cents (``floor_price``);
- a discount percent has two decimals, rounded *down*, and is capped by the guardrails;
- the final price is base × (1 − percent/100) rounded *up* to cents (``price_after``).

Rounding both the floor and the final price up means no rounding step can push a price below the
margin floor or a discount above the maximum; the shop, not the customer, absorbs at most a cent.
Every offer satisfies ``final_price == price_after(base_price, discount_pct)``.
"""

from __future__ import annotations

import decimal
import functools
import itertools
import math
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_CEILING, ROUND_DOWN, ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any

import numpy as np

from core.optimal import choose
from core.records import record

POLICIES: tuple[str, ...] = ("tiered_topk", "threshold", "linear", "optimal", "randomized")

# The rank policies give an item the model did not rank: after every ranked one.
UNRANKED = 1_000_000

CENT = Decimal("0.01")
HUNDRED = Decimal(100)
# Enough digits that the prices and percents of float-derived inputs are computed exactly.
_EXACT = decimal.Context(prec=80)
# The margin floor's arithmetic. cost × (1 + min_margin/100) is not always exact in 80 digits
# (a min margin of 1e-300% needs 300): rounded up, a floor is never below what the rule asks.
_UP = decimal.Context(prec=80, rounding=ROUND_CEILING)


class PolicyError(Exception):
    """A rule's policy or parameters are not valid; the message names the field and the fix."""


def _number(policy: str, params: Mapping[str, Any], name: str) -> float:
    value = params[name]
    # bool is an int subclass; a JSON `true` is never a meant number.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PolicyError(f"{policy}: parameter {name!r} must be a finite number, got {value!r}")
    return float(value)


def _percent(policy: str, params: Mapping[str, Any], name: str) -> float:
    value = _number(policy, params, name)
    if not 0 <= value < 100:
        raise PolicyError(
            f"{policy}: parameter {name!r} is a discount percent and must be in [0, 100), "
            f"got {value!r}"
        )
    return value


def _tiered_topk(params: Mapping[str, Any]) -> dict[str, Any]:
    k1 = params["k1"]
    if isinstance(k1, bool) or not isinstance(k1, int) or k1 < 1:
        raise PolicyError(f"tiered_topk: parameter 'k1' must be an integer >= 1, got {k1!r}")
    d1 = _percent("tiered_topk", params, "d1")
    d2 = _percent("tiered_topk", params, "d2")
    if d2 > d1:
        raise PolicyError(
            f"tiered_topk: parameter 'd2' ({d2:g}) must not exceed 'd1' ({d1:g}); "
            "the top items get the larger discount"
        )
    return {"k1": k1, "d1": d1, "d2": d2}


def _threshold(params: Mapping[str, Any]) -> dict[str, Any]:
    return {"t": _number("threshold", params, "t"), "d": _percent("threshold", params, "d")}


def _linear(params: Mapping[str, Any]) -> dict[str, Any]:
    low = _percent("linear", params, "min")
    high = _percent("linear", params, "max")
    if low > high:
        raise PolicyError(f"linear: parameter 'min' ({low:g}) must not exceed 'max' ({high:g})")
    return {
        "a": _number("linear", params, "a"),
        "b": _number("linear", params, "b"),
        "min": low,
        "max": high,
    }


def _grid(policy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    grid = params["grid"]
    if not isinstance(grid, list | tuple) or not grid:
        raise PolicyError(
            f"{policy}: parameter 'grid' must be a non-empty list of candidate discount "
            f"percents, got {grid!r}; write a list, e.g. grid=[5,10,15,20]"
        )
    values = [_percent(policy, {f"grid[{i}]": v}, f"grid[{i}]") for i, v in enumerate(grid)]
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise PolicyError(
            f"{policy}: parameter 'grid' must be sorted ascending without repeats, got {grid!r}"
        )
    return {"grid": values}


_VALIDATORS = {
    "tiered_topk": (("k1", "d1", "d2"), _tiered_topk),
    "threshold": (("t", "d"), _threshold),
    "linear": (("a", "b", "min", "max"), _linear),
    "optimal": (("grid",), lambda params: _grid("optimal", params)),
    "randomized": (("grid",), lambda params: _grid("randomized", params)),
}


def validate_params(policy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check a policy's parameters and return them normalized (percents as float, k1 as int).

    Raises PolicyError naming the first bad parameter and what is allowed. Unknown and missing
    parameters are refused, so a typo never silently falls back to a default.
    """
    if policy not in _VALIDATORS:
        raise PolicyError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not isinstance(params, Mapping):
        raise PolicyError(f"{policy}: parameters must be an object, got {params!r}")
    names, validator = _VALIDATORS[policy]
    unknown = sorted(str(k) for k in params if k not in names)
    if unknown:
        raise PolicyError(
            f"{policy}: unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(names)}"
        )
    missing = [n for n in names if n not in params]
    if missing:
        raise PolicyError(
            f"{policy}: missing parameter(s) {', '.join(missing)}; required: {', '.join(names)}"
        )
    return validator(params)


# The discount percents of each policy's parameters (a grid's are each of its values).
_PERCENTS = {"tiered_topk": ("d1", "d2"), "threshold": ("d",), "linear": ("min", "max")}


def check_percents(policy: str, params: Mapping[str, Any]) -> None:
    """Refuse a discount percent with more than two decimals. Pricing takes a percent to two
    decimals, rounded down: d1=15.009 would price 15.00% while the rule shows 15.009, and a
    grid's 10 and 10.001 would be one choice (0.004, the no discount that is always one).
    Checked when a rule is written, not in validate_params: a rule stored before keeps
    pricing as it did."""
    named = [(f"parameter {name!r}", params[name]) for name in _PERCENTS.get(policy, ())]
    if policy in ("optimal", "randomized"):
        named += [("grid percent", value) for value in params["grid"]]
    for what, value in named:
        exact = as_decimal(value, what)
        if exact != exact.quantize(CENT):
            raise PolicyError(
                f"{policy}: {what} {value!r} has more decimals than the two offers are priced "
                f"at (it would price as {_percent_down(exact)}%); give at most two"
            )


def check_draws(policy: str, params: Mapping[str, Any], limits: Guardrails) -> None:
    """Refuse a `randomized` rule whose max discount leaves it no percent above 0 to draw: every
    offer would get none (propensity 1), a log no response model learns anything from."""
    if policy != "randomized":
        return
    if not any(0 < pct <= limits.max_discount_pct for pct in grid_choices(params)):
        raise PolicyError(
            f"randomized: no percent of grid {list(params['grid'])} is above 0 and within the "
            f"max discount ({float(limits.max_discount_pct):g}%), so every offer would get none; "
            "give the grid such a percent, or raise the max discount"
        )


class Reason(StrEnum):
    """Why an offer has the discount it has; sent to callers as these exact strings."""

    NO_RULE = "NO_RULE"
    POLICY_TIERED_TOP = "POLICY_TIERED_TOP"
    POLICY_TIERED_REST = "POLICY_TIERED_REST"
    POLICY_THRESHOLD_MET = "POLICY_THRESHOLD_MET"
    POLICY_THRESHOLD_NOT_MET = "POLICY_THRESHOLD_NOT_MET"
    POLICY_LINEAR = "POLICY_LINEAR"
    # The discount with the largest expected margin under the response model; followed by
    # EXPECTED_UPLIFT_CENTS=<n> (see uplift_code).
    POLICY_OPTIMAL = "POLICY_OPTIMAL"
    # An `optimal` rule applies but no response model is loaded, or it gave no probability in
    # [0, 1]: no discount (fail closed).
    NO_RESPONSE_MODEL = "NO_RESPONSE_MODEL"
    # Drawn uniformly among the grid's discounts the guardrails allow, to learn what a discount
    # does; followed by CHOICES=<n>, the number drawn from (the offer's propensity is 1/n).
    POLICY_RANDOMIZED = "POLICY_RANDOMIZED"
    # The policy needs a model score and the item has none (e.g. unknown to the model).
    NO_SCORE = "NO_SCORE"
    GUARDRAIL_MAX_DISCOUNT = "GUARDRAIL_MAX_DISCOUNT"
    GUARDRAIL_MARGIN_FLOOR = "GUARDRAIL_MARGIN_FLOOR"
    # The margin floor is above the base price: the item is already sold below the floor.
    LOSS_LEADER_NO_DISCOUNT = "LOSS_LEADER_NO_DISCOUNT"
    # The discount was too small to change the price by a cent.
    ROUNDED_TO_NO_DISCOUNT = "ROUNDED_TO_NO_DISCOUNT"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"


def as_decimal(value: Decimal | float | int | str, what: str) -> Decimal:
    """A finite Decimal from a number or numeric string; PolicyError naming ``what`` if not."""
    if isinstance(value, bool):
        raise PolicyError(f"{what} must be a number, got {value!r}")
    try:
        # str() first: a float becomes its shortest repr (0.1 -> "0.1"), not its binary expansion.
        result = value if isinstance(value, Decimal) else Decimal(str(value))
    except decimal.InvalidOperation:
        raise PolicyError(f"{what} must be a number, got {value!r}") from None
    if not result.is_finite():
        raise PolicyError(f"{what} must be a finite number, got {value!r}")
    return result


def to_cents(amount: Decimal | float | int | str) -> Decimal:
    """An amount of money rounded half-up to cents, the way catalog prices enter pricing."""
    return as_decimal(amount, "amount").quantize(CENT, rounding=ROUND_HALF_UP)


def floor_price(cost: Decimal, min_margin_pct: Decimal) -> Decimal:
    """The lowest price a discount may reach: cost × (1 + min_margin/100), rounded up to cents."""
    return _floor(cost, _floor_factor(min_margin_pct))


def _floor_factor(min_margin_pct: Decimal) -> Decimal:
    return _UP.add(1, _UP.divide(min_margin_pct, HUNDRED))


def _floor(cost: Decimal, factor: Decimal) -> Decimal:
    floor = _UP.multiply(cost, factor)
    if floor.adjusted() > _UP.prec - 3:
        # Too large to quantize in 80 digits (a min margin of 1e80%), and with at most 80 digits
        # already a whole number of cents: far above any price.
        return floor
    return floor.quantize(CENT, rounding=ROUND_CEILING, context=_UP)


def price_after(base_price: Decimal, discount_pct: Decimal) -> Decimal:
    """The price after a discount: base × (1 − percent/100), rounded up to cents."""
    exact = _EXACT.divide(_EXACT.multiply(base_price, HUNDRED - discount_pct), HUNDRED)
    return exact.quantize(CENT, rounding=ROUND_CEILING, context=_EXACT)


def _percent_down(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_DOWN, context=_EXACT)


@dataclass(frozen=True)
class Guardrails:
    """Limits every discount of a rule obeys, whatever its policy says.

    ``max_discount_pct`` in [0, 100); ``min_margin_pct`` >= 0, the margin over cost a discounted
    price keeps (10 means a final price of at least cost × 1.10).
    """

    max_discount_pct: Decimal
    min_margin_pct: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        if not self.max_discount_pct.is_finite() or not 0 <= self.max_discount_pct < 100:
            raise PolicyError(
                f"guardrail max_discount_pct must be in [0, 100), got {self.max_discount_pct}"
            )
        if not self.min_margin_pct.is_finite() or self.min_margin_pct < 0:
            raise PolicyError(
                f"guardrail min_margin_pct must be a number >= 0 (percent over cost), "
                f"got {self.min_margin_pct}"
            )

    @classmethod
    def of(
        cls, max_discount_pct: Decimal | float | int, min_margin_pct: Decimal | float | int = 0
    ) -> Guardrails:
        """Guardrails from plain numbers (JSON, CLI flags, database floats)."""
        return cls(
            as_decimal(max_discount_pct, "guardrail max_discount_pct"),
            as_decimal(min_margin_pct, "guardrail min_margin_pct"),
        )


@dataclass(frozen=True)
class Rule:
    """A policy with validated parameters and its guardrails; what pricing needs of a rule."""

    policy: str
    params: Mapping[str, Any]
    guardrails: Guardrails

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", validate_params(self.policy, self.params))


@record
class Candidate:
    """An item to price: catalog price and cost, and the model's view of it for this user.

    ``rank`` is 1-based in the user's recommendations (UNRANKED: not among them); ``score``
    is None when the model has none (an item it does not know). ``purchase_probability`` is
    the response model's P(buy) at each of ``grid_choices`` of the rule (None: no response
    model).
    """

    item_id: str
    base_price: Decimal
    cost: Decimal
    rank: int
    score: float | None = None
    purchase_probability: tuple[float, ...] | None = None


@record
class PricedItem:
    """One item's offer: ``final_price == price_after(base_price, discount_pct)`` always."""

    item_id: str
    base_price: Decimal
    discount_pct: Decimal
    final_price: Decimal
    # Reason values, and for `optimal` the uplift code (uplift_code).
    reasons: tuple[str, ...] = ()
    # The probability the policy had of giving this discount: 1 but for `randomized`.
    propensity: float = 1.0
    # The percents a `randomized` rule drew among (empty: nothing was drawn): the budget step
    # needs them to keep the propensity exact when it withdraws a draw.
    drawn_from: tuple[Decimal, ...] = ()

    @property
    def discount_amount(self) -> Decimal:
        return self.base_price - self.final_price


# A policy's proposal: the discount, its reason codes and the percents it was drawn among (empty
# unless drawn; its propensity is 1 over their number).
_Proposal = tuple[Decimal, tuple[str, ...], tuple[Decimal, ...]]
_PolicyFn = Callable[[Rule, Candidate], _Proposal]
# A policy's proposals for the items of one call, in their order.
_Proposer = Callable[[Rule, Sequence[Candidate]], list[_Proposal]]
# A `randomized` rule's draw for an item (by id): an index in [0, n), each equally likely.
Draw = Callable[[str, int], int]


def fresh_draw(item_id: str, n: int) -> int:
    """A draw from the system's random source, unseeded: no shopper can predict it (a seeded
    generator's next draws follow from those seen)."""
    return secrets.randbelow(n)


@functools.lru_cache(maxsize=256)
def _param_percent(value: float) -> Decimal:
    """A validated percent parameter as a Decimal: a rule's few percents, converted once each
    rather than once per item priced."""
    return as_decimal(value, "percent")


def _tiered_topk_discount(rule: Rule, item: Candidate) -> _Proposal:
    params = rule.params
    if item.rank < UNRANKED and item.rank <= params["k1"]:
        return _param_percent(params["d1"]), (Reason.POLICY_TIERED_TOP,), ()
    return _param_percent(params["d2"]), (Reason.POLICY_TIERED_REST,), ()


def _threshold_discount(rule: Rule, item: Candidate) -> _Proposal:
    if item.score is None or not math.isfinite(item.score):
        return Decimal(0), (Reason.NO_SCORE,), ()
    if item.score >= rule.params["t"]:
        return _param_percent(rule.params["d"]), (Reason.POLICY_THRESHOLD_MET,), ()
    return Decimal(0), (Reason.POLICY_THRESHOLD_NOT_MET,), ()


def _linear_discount(rule: Rule, item: Candidate) -> _Proposal:
    params = rule.params
    if item.score is None or not math.isfinite(item.score):
        return Decimal(0), (Reason.NO_SCORE,), ()
    # a·score + b may overflow to ±inf; clipping still lands it inside [min, max].
    raw = params["a"] * item.score + params["b"]
    clipped = min(max(raw, params["min"]), params["max"])
    return as_decimal(clipped, "linear discount"), (Reason.POLICY_LINEAR,), ()


def grid_choices(params: Mapping[str, Any]) -> tuple[Decimal, ...]:
    """The percents an `optimal` or `randomized` rule chooses among: its grid, and 0 (no discount
    is always a choice, the baseline of the expected uplift and the control of a draw),
    ascending."""
    return _choices(tuple(params["grid"]))


@functools.lru_cache(maxsize=256)
def _choices(grid: tuple[float, ...]) -> tuple[Decimal, ...]:
    """grid_choices of a grid, worked out once per grid rather than once per item priced: it
    was 7 of the 19 us a `randomized` offer took to price, and of the 28 of an `optimal` one."""
    percents = {_percent_down(as_decimal(p, "grid")) for p in grid}
    return tuple(sorted(percents | {Decimal("0.00")}))


def allowed_percents(
    base: Decimal, cost: Decimal, percents: Sequence[Decimal], limits: Guardrails
) -> list[bool]:
    """Which candidate percents keep an offer at ``base`` (in cents) within the guardrails as
    pricing enforces them: at most the maximum discount, a rounded price at or above the margin
    floor, never above base. 0 is always allowed; another percent only when it takes at least a
    cent off (the price is rounded up to cents): else the shopper sees the base price, and a
    response model's P(buy) at that discount describes no offer."""
    floor = floor_price(cost, limits.min_margin_pct)
    return [
        pct == 0
        or (
            pct <= limits.max_discount_pct
            and floor <= base
            and floor <= price_after(base, pct) < base
        )
        for pct in percents
    ]


def uplift_code(uplift: float) -> str:
    """The reason code carrying an `optimal` offer's expected margin uplift over no discount,
    in whole cents per offer (P(buy) times margin, so it may be fractional before rounding)."""
    return f"EXPECTED_UPLIFT_CENTS={round(uplift * 100)}"


def _optimal_discounts(rule: Rule, items: Sequence[Candidate]) -> list[_Proposal]:
    """Each item's `optimal` proposal, chosen for all the items the model answered for in one
    call of core.optimal.choose (row by row, so each is what it is alone): a call per item was
    most of the time a 960,000-offer `estimate-policy` took to price such a rule."""
    choices = grid_choices(rule.params)
    proposals: list[_Proposal] = []
    answered: list[int] = []  # the positions of the items the model prices
    for n, item in enumerate(items):
        probability = item.purchase_probability
        if item.score is None or not math.isfinite(item.score):
            proposals.append((Decimal(0), (Reason.NO_SCORE,), ()))
        # A NaN would win argmax and make the uplift code raise; a value outside [0, 1] is no
        # probability either: without a usable answer from the model, no discount.
        elif (
            probability is None
            or len(probability) != len(choices)
            or not all(0 <= p <= 1 for p in probability)
        ):
            proposals.append((Decimal(0), (Reason.NO_RESPONSE_MODEL,), ()))
        else:
            proposals.append((Decimal(0), (), ()))  # chosen below
            answered.append(n)
    if not answered:
        return proposals
    # What an item's choice reads of its price and cost depends on their values alone (both
    # positive: a 0 could be -0.0), and a log repeats them.
    known: dict[tuple[Decimal, Decimal], tuple[float, float, list[bool]]] = {}
    rows, bases, costs, allowed = [], [], [], []
    for n in answered:
        item = items[n]
        key = (item.base_price, item.cost)
        money = known.get(key)
        if money is None:
            base = to_cents(item.base_price)
            # The floor from the catalog's cost as _Guard computes it, not the cost rounded to
            # cents: a choice allowed against a lower floor would be moved off the grid by the
            # floor guardrail.
            ok = allowed_percents(base, item.cost, choices, rule.guardrails)
            money = (float(base), float(to_cents(item.cost)), ok)
            if item.base_price > 0 and item.cost > 0:
                known[key] = money
        rows.append(item.purchase_probability)
        bases.append(money[0])
        costs.append(money[1])
        allowed.append(money[2])
    picked = choose(
        np.array(rows, dtype=np.float64),
        np.array(bases),
        np.array(costs),
        [float(p) / 100 for p in choices],
        np.array(allowed),
    )
    for n, column, uplift in zip(
        answered, picked.column.tolist(), picked.uplift.tolist(), strict=True
    ):
        proposals[n] = (choices[column], (Reason.POLICY_OPTIMAL, uplift_code(uplift)), ())
    return proposals


def _randomized_discount(rule: Rule, item: Candidate, draw: Draw) -> _Proposal:
    """A percent drawn uniformly among the rule's choices that the guardrails allow this item,
    so every logged discount is one pricing shows unchanged and its propensity is exact."""
    choices = grid_choices(rule.params)
    allowed = allowed_percents(to_cents(item.base_price), item.cost, choices, rule.guardrails)
    open_ = [pct for pct, ok in zip(choices, allowed, strict=True) if ok]
    drawn = open_[draw(item.item_id, len(open_))]
    return drawn, (Reason.POLICY_RANDOMIZED, f"CHOICES={len(open_)}"), tuple(open_)


def _each(propose: _PolicyFn) -> _Proposer:
    """A policy that proposes for one item at a time, in the items' order."""
    return lambda rule, items: [propose(rule, item) for item in items]


_PROPOSERS: dict[str, _Proposer] = {
    "tiered_topk": _each(_tiered_topk_discount),
    "threshold": _each(_threshold_discount),
    "linear": _each(_linear_discount),
    "optimal": _optimal_discounts,
}


def bad_rank(rank: object) -> str:
    """What is wrong with a rank that is not one, in the words of every refusal of a rank (of an
    item to price here, of a logged offer in trainer.shop_estimate)."""
    return f"rank {rank!r} is not a whole number >= 1 (1 is the model's best item)"


def _check_candidate(item: Candidate) -> None:
    for what, value in (("base_price", item.base_price), ("cost", item.cost)):
        if not value.is_finite() or value < 0:
            raise PolicyError(f"item {item.item_id!r}: {what} must be >= 0, got {value}")
    if item.rank < 1:
        raise PolicyError(f"item {item.item_id!r}: {bad_rank(item.rank)}")


def _floor_bound_percent(base: Decimal, floor: Decimal) -> Decimal:
    """The percent to show when the margin floor binds (requires 0 <= floor <= base, base > 0).

    First the lowest price any two-decimal percent reaches without going below the floor: a
    percent p keeps the rounded-up price >= floor exactly when base × (1 − p/100) > floor − 0.01.
    Then the smallest percent that gives that price, so the shown percent does not overstate
    what the customer saves.
    """
    limit = _EXACT.divide(_EXACT.multiply(base - floor + CENT, HUNDRED), base)
    largest = _percent_down(limit)
    if largest == limit:
        largest -= CENT
    lowest_price = price_after(base, largest)
    smallest = _EXACT.divide(_EXACT.multiply(base - lowest_price, HUNDRED), base)
    return smallest.quantize(CENT, rounding=ROUND_CEILING, context=_EXACT)


# Items in a price_items call from which it keeps what the guardrails gave a price and cost.
_REMEMBER_FROM = 256

# An item's base price in cents, the percent shown, the final price and the reasons the
# guardrails add, from its policy's percent, base price and cost.
_Guarded = tuple[Decimal, Decimal, Decimal, tuple[Reason, ...]]


class _Guard:
    """A rule's guardrails for the items of one price_items call. What it works out for a price
    and cost it keeps for the call's other items: a log of 960,000 offers holds a few hundred
    items, and pricing each afresh was most of the time `estimate-policy` took."""

    def __init__(self, rule: Rule, remember: bool) -> None:
        # Remembering costs hashing Decimals: twice the time of a GetOffers answer's few
        # different items, where it finds nothing to reuse.
        self.remember = remember
        self.limits = rule.guardrails
        # The guardrails as pricing uses them.
        self.max_pct = _percent_down(rule.guardrails.max_discount_pct)
        self.floor_factor = _floor_factor(rule.guardrails.min_margin_pct)
        self.seen: dict[tuple[Decimal, Decimal, Decimal], _Guarded] = {}
        self.bases: dict[Decimal, Decimal] = {}
        self.floors: dict[Decimal, Decimal] = {}

    def price(self, item: Candidate, proposal: _Proposal) -> PricedItem:
        """One item under its policy's proposal."""
        proposed, policy_reasons, drawn_from = proposal
        if self.remember and proposed > 0 and item.base_price > 0:
            # Both positive, the outcome depends on their values alone (at 0 it could be -0.00,
            # which a kept 0.00 would not show). Kept under the policy's percent, which most
            # policies repeat as one object whose hash Python keeps, and under the percent
            # rounded, which repeats where a `linear` one, new each time, does not.
            key = (proposed, item.base_price, item.cost)
            guarded = self.seen.get(key)
            if guarded is None:
                pct = _percent_down(proposed)
                rounded = (pct, item.base_price, item.cost)
                guarded = self.seen.get(rounded)
                if guarded is None:
                    guarded = self.seen[rounded] = self.outcome(pct, item.base_price, item.cost)
                self.seen[key] = guarded
        else:
            guarded = self.outcome(proposed, item.base_price, item.cost)
        base, pct, final, reasons = guarded
        propensity = 1 / len(drawn_from) if drawn_from else 1.0
        return PricedItem(
            item.item_id, base, pct, final, (*policy_reasons, *reasons), propensity, drawn_from
        )

    def outcome(self, proposed: Decimal, base_price: Decimal, cost: Decimal) -> _Guarded:
        """A policy's percent for an item at base_price and cost, under the guardrails."""
        keep = self.remember and base_price > 0
        base = self.bases.get(base_price) if keep else None
        if base is None:
            base = to_cents(base_price)
            if keep:
                self.bases[base_price] = base
        pct = _percent_down(proposed)
        reasons = []
        if pct > self.limits.max_discount_pct:
            pct = self.max_pct
            reasons.append(Reason.GUARDRAIL_MAX_DISCOUNT)
        final = base
        if pct > 0:
            # A floor is compared, never shown: the cost's value is all it depends on.
            floor = self.floors.get(cost) if self.remember else None
            if floor is None:
                floor = _floor(cost, self.floor_factor)
                if self.remember:
                    self.floors[cost] = floor
            final = price_after(base, pct)
            if floor > base:
                pct, final = Decimal(0), base
                reasons.append(Reason.LOSS_LEADER_NO_DISCOUNT)
            elif final < floor:
                pct = _floor_bound_percent(base, floor)
                final = price_after(base, pct)
                reasons.append(Reason.GUARDRAIL_MARGIN_FLOOR)
        if pct > 0 and final == base:
            pct = Decimal(0)
            reasons.append(Reason.ROUNDED_TO_NO_DISCOUNT)
        return base, pct.quantize(CENT), final, tuple(reasons)


def no_discount(item: Candidate, reason: Reason = Reason.NO_RULE) -> PricedItem:
    """The offer when no rule applies: the base price, and the reason there is no discount."""
    base = to_cents(item.base_price)
    return PricedItem(item.item_id, base, Decimal("0.00"), base, (reason,))


def price_items(
    rule: Rule | None, items: Iterable[Candidate], draw: Draw = fresh_draw
) -> list[PricedItem]:
    """Price items under one rule (None: no rule applies, so no discount — fail closed).

    A `randomized` rule draws each item's discount with ``draw``, in the items' order (tests
    enumerate every draw through it). Nothing needs to replay a draw: the offer log keeps what
    was shown and the propensity it had, all that IPS and a response model read. discountd
    passes a draw that stays the same for a shopper, item and rule
    (core.assignment.draw_index), so asking again does not draw again; the default draws
    afresh each call (`rules simulate`).

    Raises PolicyError, before pricing any, for an item whose price or cost is negative or not
    finite, or whose rank is below 1.
    """
    if rule is None:
        return [no_discount(item) for item in items]
    items = list(items)
    for item in items:
        _check_candidate(item)
    propose = (
        _each(functools.partial(_randomized_discount, draw=draw))
        if rule.policy == "randomized"
        else _PROPOSERS[rule.policy]
    )
    guard = _Guard(rule, remember=len(items) >= _REMEMBER_FROM)
    proposals = propose(rule, items)
    return [guard.price(item, proposal) for item, proposal in zip(items, proposals, strict=True)]


def apply_budget(items: Sequence[PricedItem], remaining: Decimal | None) -> list[PricedItem]:
    """Withdraw discounts the rule's remaining budget cannot pay for (None: no budget).

    Items are considered in order; each discount that fits is granted and reduces what is left,
    one that does not fit is replaced by the base price. A spent or negative budget therefore
    grants nothing (fail closed). The caller decides what counts as spent (e.g. issued or
    redeemed discounts) and passes what is left. A drawn item that shows no discount gets the
    propensity of none under the budget (_none_shown).
    """
    if remaining is None:
        return list(items)
    left = remaining
    out = []
    for item in items:
        amount = item.discount_amount
        if item.drawn_from and not 0 < amount <= left:
            # It shows none: so would the draw of any percent the budget left cannot pay for.
            item = replace(item, propensity=_none_shown(item, left))
        if amount <= 0:
            out.append(item)
        elif amount <= left:
            left -= amount
            out.append(item)
        else:
            out.append(
                replace(
                    item,
                    discount_pct=Decimal("0.00"),
                    final_price=item.base_price,
                    reasons=(*item.reasons, Reason.BUDGET_EXHAUSTED),
                )
            )
    return out


def _none_shown(item: PricedItem, left: Decimal) -> float:
    """The propensity of no discount for a drawn item with ``left`` to spend: no discount shows
    for the draw of 0 and for that of every percent the budget cannot pay for (1 once spent)."""
    base = item.base_price
    none = sum(pct == 0 or base - price_after(base, pct) > left for pct in item.drawn_from)
    return none / len(item.drawn_from)
