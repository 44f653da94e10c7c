"""Policy parameters and the serving math: guardrails hold for every rule, price and cost."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.policy import (
    POLICIES,
    UNRANKED,
    Candidate,
    Guardrails,
    PolicyError,
    PricedItem,
    Reason,
    Rule,
    apply_budget,
    check_percents,
    floor_price,
    grid_choices,
    no_discount,
    price_after,
    price_items,
    to_cents,
    validate_params,
)

NAMES = {
    "tiered_topk": ("k1", "d1", "d2"),
    "threshold": ("t", "d"),
    "linear": ("a", "b", "min", "max"),
    "optimal": ("grid",),
    "randomized": ("grid",),
}

# Everything a JSON document (or a careless caller) could put in a parameter.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=150),
    st.floats(min_value=-10, max_value=150),
    st.floats(allow_nan=True, allow_infinity=True),
    st.just("5"),
)
values = st.one_of(scalars, st.lists(scalars, max_size=3))


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_pct(v: Any) -> bool:
    return _is_num(v) and 0 <= v < 100


def expected_valid(policy: str, params: dict[str, Any]) -> bool:
    """An independent statement of the valid space, written from the issue's wording."""
    if set(params) != set(NAMES[policy]):
        return False
    p = params
    if policy == "tiered_topk":
        k1_ok = isinstance(p["k1"], int) and not isinstance(p["k1"], bool) and p["k1"] >= 1
        return k1_ok and _is_pct(p["d1"]) and _is_pct(p["d2"]) and p["d2"] <= p["d1"]
    if policy == "threshold":
        return _is_num(p["t"]) and _is_pct(p["d"])
    if policy == "linear":
        return (
            _is_num(p["a"])
            and _is_num(p["b"])
            and _is_pct(p["min"])
            and _is_pct(p["max"])
            and p["min"] <= p["max"]
        )
    grid = p["grid"]
    return (
        isinstance(grid, list)
        and len(grid) > 0
        and all(_is_pct(v) for v in grid)
        and all(a < b for a, b in itertools.pairwise(grid))
    )


@st.composite
def any_params(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    policy = draw(st.sampled_from(POLICIES))
    keys = draw(st.sets(st.sampled_from((*NAMES[policy], "k2", "d3", "x")), max_size=5))
    # Mostly the right keys, so that the value checks get exercised, not just the key checks.
    if draw(st.booleans()):
        keys = set(NAMES[policy])
    return policy, {k: draw(values) for k in sorted(keys)}


@st.composite
def valid_params(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    policy = draw(st.sampled_from(POLICIES))
    pct = st.one_of(
        st.integers(min_value=0, max_value=99),
        st.floats(min_value=0, max_value=100, exclude_max=True),
    )
    num = st.floats(allow_nan=False, allow_infinity=False)
    if policy == "tiered_topk":
        d1, d2 = sorted((draw(pct), draw(pct)), reverse=True)
        return policy, {"k1": draw(st.integers(min_value=1, max_value=1000)), "d1": d1, "d2": d2}
    if policy == "threshold":
        return policy, {"t": draw(num), "d": draw(pct)}
    if policy == "linear":
        low, high = sorted((draw(pct), draw(pct)))
        return policy, {"a": draw(num), "b": draw(num), "min": low, "max": high}
    grid = sorted(draw(st.sets(pct.map(float), min_size=1, max_size=20)))
    return policy, {"grid": grid}


@given(any_params())
def test_validate_params_accepts_exactly_the_valid_space(case: tuple[str, dict[str, Any]]) -> None:
    policy, params = case
    if expected_valid(policy, params):
        normalized = validate_params(policy, params)
        assert normalized == params
        assert validate_params(policy, normalized) == normalized
    else:
        with pytest.raises(PolicyError, match=policy):
            validate_params(policy, params)


@given(valid_params())
def test_every_valid_parameter_set_is_accepted(case: tuple[str, dict[str, Any]]) -> None:
    policy, params = case
    assert expected_valid(policy, params)
    assert validate_params(policy, params) == params


@pytest.mark.parametrize(
    ("policy", "params", "message"),
    [
        ("tiered_topk", {"k1": 0, "d1": 10, "d2": 5}, "'k1' must be an integer >= 1"),
        ("tiered_topk", {"k1": 2.0, "d1": 10, "d2": 5}, "'k1' must be an integer >= 1"),
        ("tiered_topk", {"k1": 2, "d1": 10, "d2": 15}, r"'d2' \(15\) must not exceed 'd1' \(10\)"),
        ("tiered_topk", {"k1": 2, "d1": 100, "d2": 5}, r"'d1' .* must be in \[0, 100\)"),
        ("tiered_topk", {"k1": 2, "d1": 10}, "missing parameter.* d2"),
        ("threshold", {"t": 0.5, "d": -1}, r"'d' .* must be in \[0, 100\)"),
        ("threshold", {"t": float("nan"), "d": 5}, "'t' must be a finite number"),
        ("threshold", {"t": True, "d": 5}, "'t' must be a finite number"),
        ("linear", {"a": 1, "b": 0, "min": 20, "max": 10}, r"'min' \(20\) must not exceed 'max'"),
        ("linear", {"a": 1, "b": 0, "min": 0, "max": 10, "c": 1}, "unknown parameter.* c"),
        ("optimal", {"grid": []}, "non-empty list"),
        ("optimal", {"grid": [5, 0]}, "sorted ascending without repeats"),
        ("optimal", {"grid": [0, 100]}, r"'grid\[1\]'"),
        ("randomized", {"grid": [10, 5]}, "randomized: parameter 'grid' must be sorted"),
        ("discount_all", {}, "unknown policy 'discount_all'; choose one of tiered_topk"),
    ],
)
def test_messages_name_the_parameter_and_the_allowed_values(
    policy: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        validate_params(policy, params)


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(("optimal", "randomized")),
    grid=st.lists(
        st.one_of(
            st.floats(0, 99.99, allow_nan=False),
            # Percents a hair apart, around two-decimal ones: where two would price as one.
            st.integers(0, 9999).map(lambda c: c / 100)
            | st.tuples(st.integers(0, 9999), st.floats(-1e-3, 1e-2)).map(
                lambda t: max(0.0, t[0] / 100 + t[1])
            ),
        ),
        min_size=1,
        max_size=6,
        unique=True,
    ).map(sorted),
)
def test_a_grid_a_rule_may_be_written_with_holds_as_many_choices_as_it_shows(
    policy: str, grid: list[float]
) -> None:
    """grid_choices (what pricing chooses among) is the grid and none: one choice per percent the
    admin wrote, and none counted once."""
    try:
        params = validate_params(policy, {"grid": grid})
        check_percents(policy, params)
    except PolicyError:
        return
    assert len(grid_choices(params)) == len(grid) + (0 not in grid)


POLICY_REASONS = {
    Reason.POLICY_TIERED_TOP,
    Reason.POLICY_TIERED_REST,
    Reason.POLICY_THRESHOLD_MET,
    Reason.POLICY_THRESHOLD_NOT_MET,
    Reason.POLICY_LINEAR,
    Reason.NO_SCORE,
}


def policy_percent(rule: Rule, item: Candidate) -> float:
    """What the policy asks for before guardrails, restated from DESIGN.md."""
    p = rule.params
    if rule.policy == "tiered_topk":
        return float(p["d1"] if item.rank <= p["k1"] else p["d2"])
    if item.score is None:
        return 0.0
    if rule.policy == "threshold":
        return float(p["d"]) if item.score >= p["t"] else 0.0
    return float(min(max(p["a"] * item.score + p["b"], p["min"]), p["max"]))


money = st.integers(min_value=0, max_value=100_000_000).map(lambda m: Decimal(m) / 1000)
percent = st.integers(min_value=0, max_value=99_999).map(lambda m: Decimal(m) / 1000)


@st.composite
def served_rules(draw: st.DrawFn) -> Rule:
    policy, params = draw(valid_params().filter(lambda c: c[0] not in ("optimal", "randomized")))
    margin = draw(st.decimals(min_value=0, max_value=60, places=2))
    # Drawn maxima lean small and cap nearly every discount: a loose one half the time, so that
    # discounts no guardrail touches are common too.
    max_pct = draw(percent | st.just(Decimal("99.99")))
    return Rule(policy, params, Guardrails(max_pct, margin))


@st.composite
def candidates(draw: st.DrawFn) -> list[Candidate]:
    n = draw(st.integers(min_value=1, max_value=6))
    scores = st.one_of(st.none(), st.floats(min_value=-1e6, max_value=1e6))
    items = []
    for rank in range(1, n + 1):
        base = draw(money)
        # Costs near the price, so that the margin floor binds often, not just the loss leaders.
        ratio = Decimal(draw(st.integers(min_value=0, max_value=12_000))) / 10_000
        items.append(Candidate(f"i{rank}", base, base * ratio, rank, draw(scores)))
    return items


@given(served_rules(), candidates())
def test_guardrails_hold_for_every_rule_price_and_cost(rule: Rule, items: list[Candidate]) -> None:
    priced = price_items(rule, items)
    assert [p.item_id for p in priced] == [c.item_id for c in items]
    g = rule.guardrails
    for item, offer in zip(items, priced, strict=True):
        base = to_cents(item.base_price)
        floor = floor_price(item.cost, g.min_margin_pct)
        assert offer.base_price == base
        assert Decimal(0) <= offer.final_price <= base
        assert Decimal(0) <= offer.discount_pct <= g.max_discount_pct
        assert offer.discount_pct.as_tuple().exponent == -2
        assert offer.final_price.as_tuple().exponent == -2
        # One rounding everywhere: the price is exactly what the percent gives.
        assert offer.final_price == price_after(base, offer.discount_pct)
        assert offer.discount_pct <= Decimal(str(policy_percent(rule, item)))
        if offer.discount_pct > 0:
            assert offer.final_price >= floor
            assert offer.final_price < base
        else:
            assert offer.final_price == base
        if floor > base:
            assert offer.discount_pct == 0
        assert offer.reasons[0] in POLICY_REASONS


@given(served_rules(), candidates())
def test_an_unconstrained_discount_is_exactly_what_the_policy_asks(
    rule: Rule, items: list[Candidate]
) -> None:
    g = rule.guardrails
    for item, offer in zip(items, price_items(rule, items), strict=True):
        wanted = Decimal(str(policy_percent(rule, item))).quantize(Decimal("0.01"), "ROUND_DOWN")
        # Unconstrained, judged here rather than from the reasons pricing gives: within the
        # maximum, at or above the margin floor, and a price that moves.
        price = price_after(to_cents(item.base_price), wanted)
        floor = floor_price(item.cost, g.min_margin_pct)
        if wanted <= g.max_discount_pct and floor <= price < to_cents(item.base_price):
            assert (offer.discount_pct, offer.final_price) == (wanted, price)
            assert len(offer.reasons) == 1, offer.reasons
        if len(offer.reasons) == 1:
            assert offer.discount_pct == wanted


@given(
    st.integers(min_value=1, max_value=10_000_000),
    st.integers(min_value=0, max_value=12_000),
    st.integers(min_value=0, max_value=5_000),
)
def test_margin_floor_keeps_the_largest_discount_it_allows(
    base_cents: int, ratio: int, margin_bp: int
) -> None:
    base = Decimal(base_cents) / 100
    cost = (base * ratio / 10_000).quantize(Decimal("0.0001"))
    margin = Decimal(margin_bp) / 100
    rule = Rule("tiered_topk", {"k1": 1, "d1": 90, "d2": 0}, Guardrails(Decimal(95), margin))
    offer = price_items(rule, [Candidate("x", base, cost, 1)])[0]
    floor = floor_price(cost, margin)
    if offer.discount_pct == 90 or offer.reasons[-1] == Reason.ROUNDED_TO_NO_DISCOUNT:
        assert offer.final_price >= floor
        return
    if floor > base:
        assert offer.reasons[-1] == Reason.LOSS_LEADER_NO_DISCOUNT
        return
    assert offer.reasons[-1] == Reason.GUARDRAIL_MARGIN_FLOOR
    assert offer.final_price >= floor
    # No larger percent reaches a lower price that the floor allows ...
    step = Decimal("0.01")
    for n in range(1, 101):
        lower = price_after(base, offer.discount_pct + n * step)
        assert lower == offer.final_price or lower < floor
    # ... and no smaller percent gives the same price: the shown percent does not overstate.
    if offer.discount_pct > 0:
        assert price_after(base, offer.discount_pct - step) > offer.final_price


def _rule(policy: str, params: dict[str, Any], max_pct: str = "99", margin: str = "0") -> Rule:
    return Rule(policy, params, Guardrails(Decimal(max_pct), Decimal(margin)))


def _price(
    rule: Rule, base: str, cost: str, rank: int = 1, score: float | None = None
) -> PricedItem:
    return price_items(rule, [Candidate("x", Decimal(base), Decimal(cost), rank, score)])[0]


TIERED = {"k1": 2, "d1": 20, "d2": 5}


def test_an_unranked_item_is_never_in_the_top_tier_however_large_k1() -> None:
    """Unranked items sit at UNRANKED, so a k1 as large gave them d1 too."""
    for k1 in (UNRANKED, 10**12):
        rule = _rule("tiered_topk", {**TIERED, "k1": k1})
        assert _price(rule, "10.00", "1", rank=UNRANKED).discount_pct == Decimal("5.00")
        assert _price(rule, "10.00", "1", rank=1000).discount_pct == Decimal("20.00")


def test_tiered_topk_gives_the_top_k1_items_d1_and_the_rest_d2() -> None:
    rule = _rule("tiered_topk", TIERED)
    items = [Candidate(f"i{r}", Decimal("10.00"), Decimal("1"), r) for r in (1, 2, 3, 4)]
    offers = price_items(rule, items)
    assert [o.discount_pct for o in offers] == [Decimal("20.00")] * 2 + [Decimal("5.00")] * 2
    assert [o.final_price for o in offers] == [Decimal("8.00")] * 2 + [Decimal("9.50")] * 2
    assert [o.reasons for o in offers] == [(Reason.POLICY_TIERED_TOP,)] * 2 + [
        (Reason.POLICY_TIERED_REST,)
    ] * 2


def test_prices_round_up_to_cents() -> None:
    # 10% off 9.99 is 8.991: the shop keeps the fraction of a cent.
    offer = _price(_rule("tiered_topk", TIERED | {"d1": 10}), "9.99", "0")
    assert (offer.discount_pct, offer.final_price) == (Decimal("10.00"), Decimal("9.00"))


def test_max_discount_caps_the_policy() -> None:
    offer = _price(_rule("tiered_topk", TIERED, max_pct="15"), "10.00", "1")
    assert offer.discount_pct == Decimal("15.00")
    assert offer.final_price == Decimal("8.50")
    assert offer.reasons == (Reason.POLICY_TIERED_TOP, Reason.GUARDRAIL_MAX_DISCOUNT)


def test_margin_floor_lowers_the_discount_to_what_the_margin_allows() -> None:
    # Floor = 7.00 × 1.10 = 7.70; 20% off 10.00 would be 8.00, fine; 30% would be 7.00.
    rule = _rule("tiered_topk", TIERED | {"d1": 30}, margin="10")
    offer = _price(rule, "10.00", "7.00")
    assert offer.discount_pct == Decimal("23.00")
    assert offer.final_price == Decimal("7.70")
    assert offer.reasons == (Reason.POLICY_TIERED_TOP, Reason.GUARDRAIL_MARGIN_FLOOR)
    # Floor 5.00 × 1.10 = 5.50 exactly: reached, at the smallest percent that gives it.
    offer = _price(_rule("tiered_topk", TIERED | {"d1": 50}, margin="10"), "9.99", "5.00")
    assert (offer.discount_pct, offer.final_price) == (Decimal("44.95"), Decimal("5.50"))


def test_floor_rounds_up_so_rounding_never_breaks_it() -> None:
    assert floor_price(Decimal("3.33"), Decimal("10")) == Decimal("3.67")  # 3.663
    offer = _price(_rule("tiered_topk", TIERED | {"d1": 90}, margin="10"), "5.00", "3.33")
    assert offer.final_price >= Decimal("3.67")
    assert offer.final_price == price_after(Decimal("5.00"), offer.discount_pct)


def test_a_loss_leader_gets_no_discount() -> None:
    offer = _price(_rule("tiered_topk", TIERED), "4.00", "5.00")
    assert (offer.discount_pct, offer.final_price) == (Decimal("0.00"), Decimal("4.00"))
    assert offer.reasons == (Reason.POLICY_TIERED_TOP, Reason.LOSS_LEADER_NO_DISCOUNT)


def test_a_discount_below_a_cent_is_reported_as_none() -> None:
    offer = _price(_rule("tiered_topk", TIERED | {"d1": 1, "d2": 0}), "0.05", "0")
    assert (offer.discount_pct, offer.final_price) == (Decimal("0.00"), Decimal("0.05"))
    assert offer.reasons[-1] == Reason.ROUNDED_TO_NO_DISCOUNT


def test_threshold_and_linear_use_the_score_and_refuse_to_guess_without_one() -> None:
    threshold = _rule("threshold", {"t": 0.5, "d": 12})
    assert _price(threshold, "10.00", "0", score=0.5).discount_pct == Decimal("12.00")
    assert _price(threshold, "10.00", "0", score=0.49).reasons == (Reason.POLICY_THRESHOLD_NOT_MET,)
    linear = _rule("linear", {"a": 10, "b": 2, "min": 5, "max": 25})
    assert _price(linear, "10.00", "0", score=1.0).discount_pct == Decimal("12.00")
    assert _price(linear, "10.00", "0", score=-3.0).discount_pct == Decimal("5.00")
    assert _price(linear, "10.00", "0", score=1e300).discount_pct == Decimal("25.00")
    for rule in (threshold, linear):
        offer = _price(rule, "10.00", "0", score=None)
        assert (offer.discount_pct, offer.reasons) == (Decimal("0.00"), (Reason.NO_SCORE,))


def test_no_rule_means_no_discount() -> None:
    items = [Candidate("a", Decimal("3.456"), Decimal("1"), 1)]
    assert price_items(None, items) == [
        PricedItem("a", Decimal("3.46"), Decimal("0.00"), Decimal("3.46"), (Reason.NO_RULE,))
    ]
    assert no_discount(items[0], Reason.BUDGET_EXHAUSTED).reasons == (Reason.BUDGET_EXHAUSTED,)


def test_optimal_without_a_response_model_fails_closed() -> None:
    rule = _rule("optimal", {"grid": [0, 5, 10]})
    [priced] = price_items(rule, [Candidate("a", Decimal(10), Decimal(0), 1, score=1.0)])
    assert priced.discount_pct == 0 and priced.reasons == (Reason.NO_RESPONSE_MODEL,)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (Candidate("a", Decimal(-1), Decimal(0), 1), "item 'a': base_price must be >= 0"),
        (Candidate("a", Decimal(1), Decimal("-0.5"), 1), "item 'a': cost must be >= 0"),
        (
            Candidate("a", Decimal(1), Decimal(0), 0),
            r"item 'a': rank 0 is not a whole number >= 1 \(1 is the model's best item\)",
        ),
    ],
)
def test_bad_items_are_refused(item: Candidate, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        price_items(_rule("tiered_topk", TIERED), [item])


@pytest.mark.parametrize(
    ("max_pct", "margin", "message"),
    [
        (100, 0, r"max_discount_pct must be in \[0, 100\)"),
        (-1, 0, r"max_discount_pct must be in \[0, 100\)"),
        (10, -5, "min_margin_pct must be a number >= 0"),
        (float("nan"), 0, "max_discount_pct must be a finite number"),
        (True, 0, "max_discount_pct must be a number"),
    ],
)
def test_bad_guardrails_are_refused(max_pct: Any, margin: Any, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Guardrails.of(max_pct, margin)


def test_rule_normalizes_its_parameters_and_refuses_bad_ones() -> None:
    assert _rule("tiered_topk", TIERED).params == {"k1": 2, "d1": 20.0, "d2": 5.0}
    with pytest.raises(PolicyError, match="'k1'"):
        _rule("tiered_topk", TIERED | {"k1": 0})


@given(
    st.lists(st.integers(min_value=0, max_value=500), max_size=8),
    st.one_of(st.none(), st.integers(min_value=-100, max_value=1500)),
)
def test_budget_never_grants_more_than_is_left(cents: list[int], remaining: int | None) -> None:
    items = [
        PricedItem(f"i{n}", Decimal(5), Decimal(0), Decimal(5) - Decimal(c) / 100, ())
        for n, c in enumerate(cents)
    ]
    left = None if remaining is None else Decimal(remaining) / 100
    out = apply_budget(items, left)
    assert [o.item_id for o in out] == [i.item_id for i in items]
    if left is None:
        assert out == items
        return
    granted = sum((o.discount_amount for o in out), Decimal(0))
    assert granted <= max(left, Decimal(0))
    for before, after in zip(items, out, strict=True):
        assert after == before or (
            after.final_price == after.base_price
            and after.discount_pct == 0
            and after.reasons[-1] == Reason.BUDGET_EXHAUSTED
        )


def test_budget_grants_in_order_and_fails_closed_when_spent() -> None:
    rule = _rule("tiered_topk", TIERED)
    items = [Candidate(f"i{r}", Decimal("10.00"), Decimal("1"), r) for r in (1, 2, 3)]
    offers = price_items(rule, items)  # discounts 2.00, 2.00, 0.50
    assert [o.discount_amount for o in apply_budget(offers, Decimal("2.60"))] == [
        Decimal("2.00"),
        Decimal(0),
        Decimal("0.50"),
    ]
    assert all(o.discount_pct == 0 for o in apply_budget(offers, Decimal(0)))


# Minimum margins as discountctl stores them (any float >= 0), the tiny and the absurd included.
extreme_margins = st.one_of(
    st.floats(min_value=0, max_value=200),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    st.sampled_from([5e-324, 1e-300, 1e-79, 1e80, 1.7976931348623157e308]),
)
# Catalog amounts with more decimals than cents, up to the largest price the offer log holds.
amounts = st.one_of(
    st.decimals(min_value=0, max_value=100, places=2),
    st.decimals(min_value=0, max_value=Decimal("9999999999.99"), places=2),
    st.decimals(min_value=0, max_value=Decimal("9999999999.99"), places=6),
    st.sampled_from([Decimal(0), Decimal("0.01"), Decimal("0.005"), Decimal("9999999999.99")]),
)
# What a response model may answer, probabilities or not.
answers = st.floats(min_value=0, max_value=1) | st.sampled_from(
    [float("nan"), float("inf"), -float("inf"), -0.1, 1.5]
)


@st.composite
def any_rule(draw: st.DrawFn) -> Rule:
    policy, params = draw(valid_params())
    max_pct = draw(st.floats(min_value=0, max_value=100, exclude_max=True) | st.just(0))
    return Rule(policy, params, Guardrails.of(max_pct, draw(extreme_margins)))


@st.composite
def any_candidates(draw: st.DrawFn, rule: Rule) -> list[Candidate]:
    items = []
    choices = len(grid_choices(rule.params)) if rule.policy == "optimal" else 0
    for rank in range(1, draw(st.integers(1, 4)) + 1):
        base = draw(amounts)
        # Often near the price, so that the floor binds, and often whole cents, where a floor
        # rounded down to the cost itself would show.
        ratio = draw(st.decimals(min_value=0, max_value=2, places=2))
        cost = draw(amounts | st.sampled_from([base * ratio, to_cents(base * ratio)]))
        score = draw(st.none() | st.floats(allow_nan=False) | st.just(float("nan")))
        p = draw(st.none() | st.lists(answers, min_size=choices, max_size=choices).map(tuple))
        items.append(Candidate(f"i{rank}", base, cost, draw(st.integers(1, 2_000_000)), score, p))
    return items


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_policy_keeps_the_exact_floor_and_never_raises_a_price(data: st.DataObject) -> None:
    """Checked in exact rational arithmetic, not with the rounding helpers under test: a
    discounted price is at least cost × (1 + min_margin/100), whatever the margin's size."""
    rule = data.draw(any_rule())
    items = data.draw(any_candidates(rule))
    g = rule.guardrails
    factor = 1 + Fraction(g.min_margin_pct) / 100
    for item, offer in zip(items, price_items(rule, items), strict=True):
        assert offer.base_price == to_cents(item.base_price)
        assert offer.final_price == price_after(offer.base_price, offer.discount_pct)
        assert 0 <= offer.discount_pct <= g.max_discount_pct
        assert offer.final_price <= offer.base_price
        if offer.discount_pct > 0:
            assert Fraction(offer.final_price) >= Fraction(item.cost) * factor
            assert offer.final_price < offer.base_price
        else:
            assert offer.final_price == offer.base_price
        if offer.reasons[0] in (Reason.NO_SCORE, Reason.NO_RESPONSE_MODEL):
            assert offer.discount_pct == 0
        if rule.policy == "optimal" and offer.reasons[0] == Reason.POLICY_OPTIMAL:
            p = item.purchase_probability
            assert p is not None and all(0 <= v <= 1 for v in p)
        if rule.policy == "randomized":
            # Drawn among what the guardrails allow: pricing shows the draw unchanged.
            assert offer.reasons[0] == Reason.POLICY_RANDOMIZED and len(offer.reasons) == 2
            assert offer.discount_pct in grid_choices(rule.params)
            assert offer.propensity == 1 / int(offer.reasons[1].removeprefix("CHOICES="))
        else:
            assert offer.propensity == 1


@pytest.mark.parametrize(
    ("margin", "final", "reason"),
    [
        # 6.00 × (1 + 1e-302) is above 6.00: a floor of 6.00 would let the margin fall to zero.
        (1e-300, "6.01", Reason.GUARDRAIL_MARGIN_FLOOR),
        (5e-324, "6.01", Reason.GUARDRAIL_MARGIN_FLOOR),
        # A floor with more digits than pricing's arithmetic holds is still above the price.
        (1e80, "10.00", Reason.LOSS_LEADER_NO_DISCOUNT),
        (1.7976931348623157e308, "10.00", Reason.LOSS_LEADER_NO_DISCOUNT),
    ],
)
def test_the_margin_floor_holds_for_the_tiniest_and_largest_margins(
    margin: float, final: str, reason: Reason
) -> None:
    rule = Rule("tiered_topk", {"k1": 1, "d1": 50, "d2": 0}, Guardrails.of(60, margin))
    [offer] = price_items(rule, [Candidate("x", Decimal("10.00"), Decimal("6.00"), 1)])
    assert (offer.final_price, offer.reasons[-1]) == (Decimal(final), reason)


def test_randomized_draws_each_allowed_discount_alike_and_logs_its_propensity() -> None:
    # 20% would take 10.00 below the floor of 8.80 (cost 8.00, margin 10%); 25% is over the max.
    rule = Rule("randomized", {"grid": [5, 10, 20, 25]}, Guardrails.of(22, 10))
    item = Candidate("x", Decimal("10.00"), Decimal("8.00"), 1)
    draws = price_items(rule, [item] * 3000)
    counts = {pct: 0 for pct in (Decimal("0.00"), Decimal("5.00"), Decimal("10.00"))}
    for offer in draws:
        counts[offer.discount_pct] += 1
        assert offer.reasons == (Reason.POLICY_RANDOMIZED, "CHOICES=3")
        assert offer.propensity == pytest.approx(1 / 3)
    # Each of the three is drawn with probability 1/3: at 3000 draws a count outside 1000 ± 150
    # is a 1e-11 event, so a failure here means a biased draw, not bad luck.
    assert all(850 < n < 1150 for n in counts.values()), counts


def test_randomized_offers_only_no_discount_to_an_item_below_its_floor() -> None:
    rule = Rule("randomized", {"grid": [5, 10]}, Guardrails.of(50, 30))
    [offer] = price_items(rule, [Candidate("x", Decimal("10.00"), Decimal("9.00"), 1)])
    assert (offer.discount_pct, offer.propensity) == (Decimal("0.00"), 1.0)
    assert offer.reasons == (Reason.POLICY_RANDOMIZED, "CHOICES=1")


def test_under_a_budget_no_discount_is_as_likely_as_the_choices_that_show_none() -> None:
    """A drawn discount the budget cannot pay for shows none: none is then shown for the draw of
    0 and of every such choice, and its propensity is theirs together, not 1 (as if nothing had
    been drawn) nor 1/n (as if only 0 showed none)."""
    # Choices 0, 10% (1.00 off) and 50% (5.00 off): 2.00 left pays for 10% only.
    rule = Rule("randomized", {"grid": [10, 50]}, Guardrails.of(60))
    item = Candidate("x", Decimal("10.00"), Decimal("1.00"), 1)
    shown: dict[Decimal, set[float]] = {}
    for offer in price_items(rule, [item] * 300):
        [budgeted] = apply_budget([offer], Decimal("2.00"))
        shown.setdefault(budgeted.discount_pct, set()).add(budgeted.propensity)
        if offer.discount_pct == 50:
            assert budgeted.reasons[-1] == Reason.BUDGET_EXHAUSTED
    assert shown == {Decimal("0.00"): {2 / 3}, Decimal("10.00"): {1 / 3}}
    # Spent, it shows none whatever was drawn: nothing was random.
    spent = apply_budget(price_items(rule, [item] * 30), Decimal("0.00"))
    assert {(o.discount_pct, o.propensity) for o in spent} == {(Decimal("0.00"), 1.0)}
    # Within one answer the budget left shrinks as it grants: after the first 50%, 1.00 is left.
    fifty = [o for o in price_items(rule, [item] * 60) if o.discount_pct == 50][:2]
    granted, withdrawn = apply_budget(fifty, Decimal("6.00"))
    assert (granted.discount_pct, granted.propensity) == (Decimal("50.00"), 1 / 3)
    assert (withdrawn.discount_pct, withdrawn.propensity) == (Decimal("0.00"), 2 / 3)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_a_batch_is_priced_as_each_of_its_items_alone(data: st.DataObject) -> None:
    """GetOffers prices a request's items together and estimate-policy a whole log at once:
    work shared across items (an `optimal` rule's choice, the guardrails of a price, cost and
    percent seen before) leaves every offer as it would be priced alone, to the sign and digits
    of each Decimal (repr, where == would call 0.00 and -0.00 one)."""
    rule = data.draw(any_rule())
    items = data.draw(any_candidates(rule))
    others = data.draw(any_candidates(rule))
    # The items' prices again under other ranks, scores and answers, with their costs and not.
    batch = [
        *items,
        *(
            replace(o, base_price=i.base_price, cost=i.cost)
            for o, i in zip(others, items, strict=False)
        ),
        *(replace(o, base_price=i.base_price) for o, i in zip(others, items, strict=False)),
    ]

    def draw(item_id: str, n: int) -> int:
        return len(item_id) % n

    alone = [repr(price_items(rule, [item], draw)[0]) for item in batch]
    assert [repr(o) for o in price_items(rule, batch, draw)] == alone
    # A call of a few hundred items keeps what the guardrails gave each price and cost.
    many = 300 // len(batch) + 1
    assert [repr(o) for o in price_items(rule, batch * many, draw)] == alone * many


@st.composite
def randomized_cases(draw: st.DrawFn) -> tuple[Rule, list[Candidate], Decimal | None]:
    """A `randomized` rule, a few items and a budget small enough to bind: small prices and
    percents of a few choices, where rounding, the floor, the maximum and the budget meet."""
    percents = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("99.99"), places=2)
    grid = draw(st.lists(percents, min_size=1, max_size=4, unique=True).map(sorted))
    loose = st.sampled_from([Decimal("99.99"), Decimal(50), Decimal("30.5")])
    limits = Guardrails(
        draw(loose | st.decimals(min_value=0, max_value=Decimal("99.99"), places=3)),
        draw(st.just(Decimal(0)) | st.decimals(min_value=0, max_value=50, places=2)),
    )
    rule = Rule("randomized", {"grid": [float(p) for p in grid]}, limits)
    items = []
    for rank in range(1, draw(st.integers(1, 3)) + 1):
        # Prices of a few units, where a percent is cents, and below one, where it rounds away.
        cheap = st.decimals(min_value=0, max_value=1, places=3)
        base = draw(st.decimals(min_value=1, max_value=20, places=2) | cheap)
        # Mostly well below the price, so that several choices are open; sometimes near it.
        ratio = draw(st.decimals(min_value=0, max_value=Decimal("0.5"), places=2))
        ratio = draw(st.just(ratio) | st.decimals(min_value=0, max_value=Decimal("1.2"), places=2))
        items.append(Candidate(f"i{rank}", base, base * ratio, rank))
    budget = st.decimals(min_value=-1, max_value=3, places=2)
    return rule, items, draw(st.none() | budget)


def _replaying(draws: tuple[int, ...]) -> Callable[[str, int], int]:
    """A draw that gives draws, in order."""
    replayed = iter(draws)
    return lambda item, n: next(replayed)


@settings(max_examples=400, deadline=None)
@given(randomized_cases())
def test_a_logged_propensity_is_the_probability_of_the_shown_discount_given_what_came_before(
    case: tuple[Rule, list[Candidate], Decimal | None],
) -> None:
    """Every sequence of draws enumerated, each as likely as the draw makes it: an offer's
    propensity is the probability that, after the draws of the items before it in the answer
    (what its budget left depends on), it shows the discount it shows, whatever the guardrails,
    the cent rounding and the budget did to the draw."""
    rule, items, budget = case
    sizes: list[int] = []

    def first(item: str, n: int) -> int:
        sizes.append(n)
        return 0

    price_items(rule, items, draw=first)
    # The choices of an item do not depend on the draws before it: one size per item.
    assert len(sizes) == len(items)
    outcomes = []
    for draws in itertools.product(*(range(n) for n in sizes)):
        offers = apply_budget(price_items(rule, items, draw=_replaying(draws)), budget)
        outcomes.append((draws, offers))
    for i in range(len(items)):
        # Conditioned on the draws before item i: each of those prefixes is followed by the same
        # number of sequences, so counting them gives item i's probabilities.
        after: dict[tuple[int, ...], list[PricedItem]] = {}
        for draws, offers in outcomes:
            after.setdefault(draws[:i], []).append(offers[i])
        for shown in after.values():
            for offer in shown:
                same = sum(o.discount_pct == offer.discount_pct for o in shown)
                assert offer.propensity == float(Fraction(same, len(shown))), (i, offer)
