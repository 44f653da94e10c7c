"""Policy parameters and the serving math: guardrails hold for every rule, price and cost."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.policy import POLICIES, PolicyError, validate_params

NAMES = {
    "tiered_topk": ("k1", "d1", "d2"),
    "threshold": ("t", "d"),
    "linear": ("a", "b", "min", "max"),
    "optimal": ("grid",),
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
        ("discount_all", {}, "unknown policy 'discount_all'; choose one of tiered_topk"),
    ],
)
def test_messages_name_the_parameter_and_the_allowed_values(
    policy: str, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(PolicyError, match=message):
        validate_params(policy, params)
