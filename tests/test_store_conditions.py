"""Segment conditions: the grammar, write-time validation and evaluation (never eval)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.features import CATEGORICAL_FEATURES, NEW_USER, NUMERIC_FEATURES
from core.segments import (
    All,
    AnyOf,
    ConditionError,
    Leaf,
    Not,
    evaluate,
    parse_condition,
    parse_expression,
    to_json,
)

numbers = st.floats(allow_nan=False, allow_infinity=False, width=32) | st.integers(-1000, 1000)
numeric_leaf = st.builds(
    lambda f, op, v: {"feature": f, "op": op, "value": v},
    st.sampled_from(NUMERIC_FEATURES),
    st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
    numbers,
)
categorical_leaf = st.builds(
    lambda f, op, v: {"feature": f, "op": op, "value": v if op != "in" else [v, v + "x"]},
    st.sampled_from(CATEGORICAL_FEATURES),
    st.sampled_from(["==", "!=", "in"]),
    st.text(max_size=10),
)


def condition_trees(leaves: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[Any]:
    """JSON conditions: leaves combined by all, any and not, up to 8 leaves."""
    return st.recursive(
        leaves,
        lambda children: (
            st.builds(lambda xs: {"all": xs}, st.lists(children, min_size=1, max_size=3))
            | st.builds(lambda xs: {"any": xs}, st.lists(children, min_size=1, max_size=3))
            | st.builds(lambda x: {"not": x}, children)
        ),
        max_leaves=8,
    )


conditions = condition_trees(numeric_leaf | categorical_leaf)
features = st.fixed_dictionaries(
    {f: st.floats(-1e6, 1e6) for f in NUMERIC_FEATURES}
    | {f: st.sampled_from(["", "Toys", "Garden"]) for f in CATEGORICAL_FEATURES}
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["all", "any", "not", "feature", "op", "value", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=10,
)


@given(conditions)
def test_valid_conditions_round_trip(raw: dict[str, Any]) -> None:
    parsed = parse_condition(raw)
    assert parse_condition(to_json(parsed)) == parsed


@given(json_values)
def test_arbitrary_json_is_accepted_or_refused_with_condition_error(raw: object) -> None:
    try:
        parse_condition(raw)
    except ConditionError as e:
        assert str(e)


@given(conditions, features)
def test_not_negates_and_all_any_agree_with_python(
    raw: dict[str, Any], user: dict[str, Any]
) -> None:
    c = parse_condition(raw)
    assert evaluate(Not(c), user) is (not evaluate(c, user))
    assert evaluate(All((c, c)), user) is evaluate(c, user)
    assert evaluate(AnyOf((c, Not(c))), user) is True


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"feature": "age", "op": "<", "value": 3}, "unknown feature 'age'"),
        ({"feature": "order_count", "op": "in", "value": [1]}, "operator 'in' does not apply"),
        ({"feature": "order_count", "op": "<", "value": "3"}, "compares with a number"),
        ({"feature": "order_count", "op": "<", "value": True}, "compares with a number"),
        ({"feature": "order_count", "op": "<", "value": float("nan")}, "finite number"),
        ({"feature": "favourite_category", "op": "<", "value": "a"}, "does not apply"),
        ({"feature": "favourite_category", "op": "in", "value": []}, "non-empty list"),
        ({"all": []}, "condition.all: expected a non-empty list"),
        ({"any": [{"feature": "x", "op": "<", "value": 1}]}, "condition.any[0]: unknown feature"),
        ({"all": [], "any": []}, "do not form a condition"),
        ("lifetime_value > 5", "expected an object"),
        (
            {"not": {"not": {"not": {"not": {"not": {"not": {"not": {"not": {"not": {}}}}}}}}}},
            "nested deeper",
        ),
    ],
)
def test_invalid_conditions_name_the_place_and_the_fix(raw: object, fragment: str) -> None:
    with pytest.raises(ConditionError, match=None) as info:
        parse_condition(raw)
    assert fragment in str(info.value)


def test_evaluate_segments_of_the_walk_through() -> None:
    new = parse_expression("days_since_first_order < 30")
    lapsed = parse_expression("days_since_last_order > 90")
    toys = parse_expression("favourite_category in Toys, Garden")
    customer = {
        "days_since_first_order": 400.0,
        "days_since_last_order": 120.0,
        "favourite_category": "Garden",
    }
    assert evaluate(new, NEW_USER) and not evaluate(lapsed, NEW_USER)
    assert not evaluate(new, customer) and evaluate(lapsed, customer)
    assert toys == Leaf("favourite_category", "in", ("Toys", "Garden"))
    assert evaluate(toys, customer)
    # Missing features take the new-user value instead of raising.
    assert evaluate(new, {})


def test_expression_that_looks_like_code_is_refused() -> None:
    with pytest.raises(ConditionError, match="cannot read"):
        parse_expression("__import__('os').system('true')")
    with pytest.raises(ConditionError, match="compares with a number"):
        parse_expression("order_count > __import__('os')")
