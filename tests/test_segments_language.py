"""The segment condition language as an admin writes it: `--where` text and `--condition` JSON,
fuzzed against a reference evaluator written here, and through discountctl."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from cli import ctl, row_counts
from hypothesis import given
from hypothesis import strategies as st
from test_store_conditions import condition_trees

from core.features import CATEGORICAL_FEATURES, FEATURE_NAMES, NEW_USER, NUMERIC_FEATURES
from core.offers import resolve_features
from core.segments import ConditionError, Leaf, evaluate, parse_condition, parse_expression

CATEGORY = "favourite_category"
REFERENCE_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
    "in": lambda actual, values: actual in values,
}


def reference(raw: Mapping[str, Any], user: Mapping[str, float | str]) -> bool:
    """The meaning of a JSON condition, read straight off the JSON."""
    if "all" in raw:
        return all(reference(c, user) for c in raw["all"])
    if "any" in raw:
        return any(reference(c, user) for c in raw["any"])
    if "not" in raw:
        return not reference(raw["not"], user)
    actual = user.get(raw["feature"], NEW_USER[raw["feature"]])
    return REFERENCE_OPS[raw["op"]](actual, raw["value"])


numbers = st.floats(-1e6, 1e6) | st.integers(-1000, 1000)
categories = st.sampled_from(["", "Toys", "Garden", "Children's"])
numeric_leaf = st.fixed_dictionaries(
    {
        "feature": st.sampled_from(NUMERIC_FEATURES),
        "op": st.sampled_from(["<", "<=", ">", ">=", "==", "!="]),
        "value": numbers,
    }
)
categorical_leaf = st.sampled_from(CATEGORICAL_FEATURES).flatmap(
    lambda f: (
        st.fixed_dictionaries(
            {"feature": st.just(f), "op": st.sampled_from(["==", "!="]), "value": categories}
        )
        | st.fixed_dictionaries(
            {"feature": st.just(f), "op": st.just("in"), "value": st.lists(categories, min_size=1)}
        )
    )
)
conditions = condition_trees(numeric_leaf | categorical_leaf)
# Some features left out: an unknown user, or one the artifact knows only in part.
users = st.fixed_dictionaries(
    {},
    optional={f: numbers.map(float) for f in NUMERIC_FEATURES}
    | {f: categories for f in CATEGORICAL_FEATURES},
)
junk = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4)
junk = junk | st.lists(junk, max_size=2) | st.dictionaries(st.text(max_size=2), junk, max_size=2)


@given(conditions, users)
def test_evaluation_agrees_with_the_reference(raw: dict[str, Any], user: dict[str, Any]) -> None:
    assert evaluate(parse_condition(raw), user) is reference(raw, user)


@given(conditions, users)
def test_features_typed_as_text_are_judged_like_the_numbers(
    raw: dict[str, Any], user: dict[str, Any]
) -> None:
    # `experiments assign --feature NAME=VALUE` and the server's context overrides read text.
    typed = resolve_features(None, {name: str(value) for name, value in user.items()})
    assert evaluate(parse_condition(raw), typed) is reference(raw, {**NEW_USER, **user})


@given(st.sampled_from(FEATURE_NAMES), junk, junk)
def test_any_json_in_a_leaf_is_accepted_or_refused_with_condition_error(
    feature: str, op: object, value: object
) -> None:
    try:
        parse_condition({"feature": feature, "op": op, "value": value})
    except ConditionError as e:
        assert str(e)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"feature": "order_count", "op": ["<"], "value": 1}, "operator ['<'] does not apply"),
        ({"feature": "order_count", "op": {"<": 1}, "value": 1}, "does not apply"),
        ({"feature": "lifetime_value", "op": ">=", "value": 10**400}, "finite number, got inf"),
        ({"feature": "lifetime_value", "op": ">=", "value": -(10**400)}, "finite number"),
    ],
)
def test_json_leaves_that_crashed_the_validator_are_refused(raw: object, fragment: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse_condition(raw)
    assert fragment in str(info.value)


@st.composite
def text_leaves(draw: st.DrawFn) -> tuple[str, Leaf]:
    """A leaf and one way an admin might type it."""
    space = draw(st.sampled_from(["", " ", "  "]))
    if draw(st.booleans()):
        feature = draw(st.sampled_from(NUMERIC_FEATURES))
        op = draw(st.sampled_from(["<", "<=", ">", ">=", "==", "!="]))
        number = draw(st.floats(allow_nan=False, allow_infinity=False))
        return f"{feature}{space}{op}{space}{number!r}", Leaf(feature, op, number)
    feature = draw(st.sampled_from(CATEGORICAL_FEATURES))
    # No newline (one line per expression), no comma (it separates 'in' values).
    plain = st.text(st.characters(blacklist_characters="\n,"), max_size=12).filter(
        lambda v: not any(f in v for f in FEATURE_NAMES)
    )
    values = draw(st.lists(plain, min_size=1, max_size=3))
    quoted = [f'"{v}"' for v in values]  # always quoted: keeps spaces, quotes and "" intact
    if len(values) > 1 or draw(st.booleans()):
        return f"{feature} in {', '.join(quoted)}", Leaf(feature, "in", tuple(values))
    op = draw(st.sampled_from(["==", "!="]))
    return f"{feature}{space}{op}{space}{quoted[0]}", Leaf(feature, op, values[0])


@given(text_leaves())
def test_text_expressions_read_back_as_the_leaf_they_spell(case: tuple[str, Leaf]) -> None:
    text, leaf = case
    assert parse_expression(text) == leaf


@pytest.mark.parametrize(
    ("text", "leaf"),
    [
        ("favourite_category == 'Toys'", Leaf("favourite_category", "==", "Toys")),
        ('favourite_category != "Toys"', Leaf("favourite_category", "!=", "Toys")),
        ('favourite_category == ""', Leaf("favourite_category", "==", "")),
        ("favourite_category == Children's", Leaf("favourite_category", "==", "Children's")),
        ("favourite_category in 'Toys', Garden", Leaf(CATEGORY, "in", ("Toys", "Garden"))),
    ],
)
def test_quotes_around_a_category_are_not_part_of_it(text: str, leaf: Leaf) -> None:
    assert parse_expression(text) == leaf


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        # Read as the category "Toys and order_count > 2", it held almost everyone.
        ("favourite_category != Toys and order_count > 2", "one comparison per expression"),
        ("favourite_category == Toys or favourite_category == Garden", "one comparison"),
        # A stray comma added the empty category, which every new user has.
        ("favourite_category in Toys,Garden,", 'write "" to mean no category'),
        ("favourite_category in Toys,,Garden", "empty value"),
        # Read as the category " ".
        ("favourite_category == ", "cannot read"),
        ("order_count in 1,2", "operator 'in' does not apply to numeric feature"),
    ],
)
def test_text_expressions_that_meant_something_else_are_refused(text: str, fragment: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse_expression(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "args",
    [
        ["--condition", json.dumps({"feature": "order_count", "op": ["<"], "value": 1})],
        ["--condition", '{"feature": "order_count", "op": "<", "value": 1' + "0" * 400 + "}"],
        ["--where", "favourite_category != Toys and order_count > 2"],
    ],
)
def test_cli_refuses_such_conditions_in_one_line(db_url: str, args: list[str]) -> None:
    before = row_counts(db_url)
    result = ctl(db_url, "segments", "create", "odd", *args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: invalid segment condition: ")
    assert row_counts(db_url) == before
