"""Off-policy estimates of a discount policy's margin from a randomized log.

A log whose discounts were drawn at random, with the probability of each drawn one (its
propensity), says what another policy would have earned on the same offers: inverse propensity
(IPS) reweights the offers where the logged discount is the one the policy would have given;
doubly robust (DR) starts from a response model's expected margin under the policy and corrects
it by the propensity-weighted error of that model where the log agrees. Both are unbiased when
the propensities are right; DR has the lower variance when the model is good.

Shared by the simulator's evaluation (trainer.policy_eval, where the truth is known) and
`discount-train estimate-policy` (a shop's own log, trainer.shop_estimate, where it is not).
Policies must choose from the log's discounts: a discount the experiment never drew has no
offer to reweight, so rule_discounts rounds down onto the grid, which never breaks a guardrail.
Discounts closer than SAME are one discount: a percent has two decimals (core.policy), so two
different ones are 0.0001 apart as fractions, and a log's 0.05000001 or 0.0999999 is float noise
on 5% or 10%, not a discount of its own.
"""

from __future__ import annotations

import contextlib
import gc
import math
from collections.abc import Iterator, Sequence
from decimal import Decimal

import numpy as np
from scipy import stats

from core.policy import Candidate, Rule, grid_choices, price_items
from trainer.dataset import Floats

SAME = 0.00005  # half the step between two-decimal percents, as fractions
# Offers priced in one call of core.policy.price_items: large enough that an `optimal` rule's
# one choice per call and the guardrails kept per call pay, small enough that a log of millions
# does not hold all its Candidates and PricedItems at once.
_SLICE = 65_536


def ips_terms(logged: Floats, propensity: Floats, margin: Floats, target: Floats) -> Floats:
    """Per offer, the IPS term; their mean estimates the target's mean margin per offer."""
    terms: Floats = np.isclose(logged, target) / propensity * margin
    return terms


def expected_margin(probability: Floats, price: Floats, cost: Floats, grid: Floats) -> Floats:
    """[offers, grid]: P(buy | d) times the margin at d, per offer and grid discount."""
    margin: Floats = probability * (price[:, None] * (1 - grid[None, :]) - cost[:, None])
    return margin


def dr_terms(
    logged: Floats,
    propensity: Floats,
    margin: Floats,
    target: Floats,
    expected: Floats,
    grid: Floats,
) -> Floats:
    """Per offer, the doubly robust term; ``expected`` is expected_margin under the model.
    ``logged`` and ``target`` hold grid values."""
    rows = np.arange(len(logged))
    q_target = expected[rows, np.searchsorted(grid, target)]
    q_logged = expected[rows, np.searchsorted(grid, logged)]
    terms: Floats = q_target + np.isclose(logged, target) / propensity * (margin - q_logged)
    return terms


def onto_grid(discount: Floats, grid: Floats) -> Floats:
    """Each discount rounded down onto the grid (which holds 0)."""
    snapped: Floats = grid[np.searchsorted(grid, discount + SAME, side="right") - 1]
    return snapped


def off_grid(discounts: Sequence[float], grid: Floats) -> list[float]:
    """The discounts that are not on the grid."""
    return [d for d in discounts if not (np.abs(grid - d) < SAME).any()]


def rule_discounts(
    rule: Rule,
    price: Floats,
    cost: Floats,
    rank: Sequence[int],
    score: Floats,
    grid: Floats,
    probability: Floats | None = None,
) -> Floats:
    """The rule's discount per offer as discountd prices it (core.policy), rounded down onto
    grid. ``probability`` [offers, grid] is the response model's P(buy) for an `optimal` rule,
    read at the rule's own choices (which must lie on the grid)."""
    choices = grid_choices(rule.params) if rule.policy == "optimal" else ()
    columns = [int(np.searchsorted(grid, float(c) / 100 - SAME)) for c in choices]
    answers = (
        [None] * len(price)
        if probability is None or not choices
        else list(map(tuple, probability[:, columns].tolist()))
    )
    # A log holds a few hundred prices and costs: each pair becomes Decimals once, not once per
    # offer, and the offers of a pair share them (core.policy then prices a percent at a pair
    # once). Pairs by their bits: -0.0 and 0.0 are two Decimals.
    pairs = np.column_stack([price, cost]).astype(np.float64)
    _, first, which = np.unique(
        pairs.view(np.int64), axis=0, return_index=True, return_inverse=True
    )
    money = [(Decimal(str(price[k])), Decimal(str(cost[k]))) for k in first]
    pair = which.ravel().tolist()
    ranks, scores = [int(r) for r in rank], score.tolist()
    pct = np.empty(len(price))
    # A slice at a time, with the cycle collector off: the Candidates and PricedItems form no
    # cycles, and its passes over them took twice as long as pricing them (refcounts free them).
    with _without_cycle_collection():
        for start in range(0, len(price), _SLICE):
            at = range(start, min(start + _SLICE, len(price)))
            candidates = [
                Candidate(str(k), *money[pair[k]], ranks[k], scores[k], answers[k]) for k in at
            ]
            priced = price_items(rule, candidates)
            pct[at.start : at.stop] = [float(item.discount_pct) for item in priced]
    return onto_grid(pct / 100, grid)


@contextlib.contextmanager
def _without_cycle_collection() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def mean_interval(terms: Floats) -> dict[str, float | None]:
    """The mean of per-offer terms and its 95% t-interval (the normal one for a large log, wider
    for a few offers); one offer has none (low and high None)."""
    mean = float(terms.mean())
    if len(terms) < 2:
        return {"mean": mean, "low": None, "high": None}
    spread = float(terms.std(ddof=1)) / math.sqrt(len(terms))
    half = float(stats.t.ppf(0.975, len(terms) - 1)) * spread
    return {"mean": mean, "low": mean - half, "high": mean + half}
