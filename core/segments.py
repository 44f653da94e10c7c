"""Segment conditions: structured JSON over the user features, validated at write time.

Grammar (stored as JSON, never evaluated as code)::

    condition := {"all": [condition, ...]} | {"any": [condition, ...]} | {"not": condition}
               | {"feature": NAME, "op": OP, "value": VALUE}

Numeric features take ``<  <=  >  >=  ==  !=`` with a finite number; categorical features take
``==  !=`` with a string, or ``in`` with a non-empty list of strings. Admins may also write a
leaf as text, ``lifetime_value >= 500`` (see ``parse_expression``).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from core.features import CATEGORICAL_FEATURES, FEATURE_NAMES, NEW_USER, NUMERIC_FEATURES

NUMERIC_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
CATEGORICAL_OPS: tuple[str, ...] = ("==", "!=", "in")
# Deep or huge trees are a mistake or an attack, never a segment a person wrote.
MAX_DEPTH = 8
MAX_NODES = 200


class ConditionError(ValueError):
    """A condition that does not follow the grammar; the message names where and why."""


@dataclass(frozen=True)
class Leaf:
    feature: str
    op: str
    value: float | str | tuple[str, ...]


@dataclass(frozen=True)
class All:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    items: tuple[Condition, ...]


@dataclass(frozen=True)
class Not:
    item: Condition


Condition = Leaf | All | AnyOf | Not


def parse_condition(raw: object) -> Condition:
    """Validate a JSON condition and return its typed form; raises ConditionError."""
    counter = [0]
    return _parse(raw, "condition", 0, counter)


def _parse(raw: object, where: str, depth: int, counter: list[int]) -> Condition:
    counter[0] += 1
    if counter[0] > MAX_NODES:
        raise ConditionError(f"condition has more than {MAX_NODES} parts; simplify it")
    if depth > MAX_DEPTH:
        raise ConditionError(f"{where}: nested deeper than {MAX_DEPTH} levels; simplify it")
    if not isinstance(raw, dict):
        raise ConditionError(
            f"{where}: expected an object with 'all', 'any', 'not' or 'feature', got {raw!r}"
        )
    keys = set(raw)
    if keys == {"all"} or keys == {"any"}:
        (key,) = keys
        items = raw[key]
        if not isinstance(items, list) or not items:
            raise ConditionError(f"{where}.{key}: expected a non-empty list of conditions")
        parsed = tuple(
            _parse(item, f"{where}.{key}[{i}]", depth + 1, counter) for i, item in enumerate(items)
        )
        return All(parsed) if key == "all" else AnyOf(parsed)
    if keys == {"not"}:
        return Not(_parse(raw["not"], f"{where}.not", depth + 1, counter))
    if keys == {"feature", "op", "value"}:
        return _leaf(raw["feature"], raw["op"], raw["value"], where)
    raise ConditionError(
        f"{where}: keys {sorted(map(str, keys))} do not form a condition; use exactly one of "
        "'all', 'any', 'not', or 'feature'+'op'+'value'"
    )


def _leaf(feature: object, op: object, value: object, where: str) -> Leaf:
    if feature not in FEATURE_NAMES:
        raise ConditionError(
            f"{where}: unknown feature {feature!r}; known: {', '.join(FEATURE_NAMES)}"
        )
    assert isinstance(feature, str)
    if feature in NUMERIC_FEATURES:
        # A list or object as op is unhashable: check the type before looking it up.
        if not isinstance(op, str) or op not in NUMERIC_OPS:
            raise ConditionError(
                f"{where}: operator {op!r} does not apply to numeric feature {feature!r}; "
                f"use one of {' '.join(NUMERIC_OPS)}"
            )
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConditionError(f"{where}: {feature} compares with a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer past the float range, e.g. 10**400 in the JSON
            number = math.inf
        if not math.isfinite(number):
            raise ConditionError(f"{where}: {feature} compares with a finite number, got {number}")
        return Leaf(feature, op, number)
    if op not in CATEGORICAL_OPS:
        raise ConditionError(
            f"{where}: operator {op!r} does not apply to categorical feature {feature!r}; "
            f"use one of {' '.join(CATEGORICAL_OPS)}"
        )
    if op == "in":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ConditionError(f"{where}: 'in' takes a non-empty list of strings, got {value!r}")
        return Leaf(feature, "in", tuple(value))
    if not isinstance(value, str):
        raise ConditionError(f"{where}: {feature} compares with a string, got {value!r}")
    return Leaf(feature, str(op), value)


def to_json(condition: Condition) -> dict[str, Any]:
    """The stored JSON form; parse_condition(to_json(c)) == c."""
    match condition:
        case All(items):
            return {"all": [to_json(c) for c in items]}
        case AnyOf(items):
            return {"any": [to_json(c) for c in items]}
        case Not(item):
            return {"not": to_json(item)}
        case Leaf(feature, op, value):
            return {
                "feature": feature,
                "op": op,
                "value": list(value) if isinstance(value, tuple) else value,
            }


def features_of(condition: Condition) -> set[str]:
    """The features a condition reads."""
    match condition:
        case All(items) | AnyOf(items):
            return set().union(*(features_of(c) for c in items))
        case Not(item):
            return features_of(item)
        case Leaf(feature, _, _):
            return {feature}


def evaluate(condition: Condition, features: Mapping[str, float | str]) -> bool:
    """Whether a user with these features is in the segment.

    A feature missing from ``features`` takes its new-user value, so an unknown user is judged
    like a customer with no history rather than raising.
    """
    match condition:
        case All(items):
            return all(evaluate(c, features) for c in items)
        case AnyOf(items):
            return any(evaluate(c, features) for c in items)
        case Not(item):
            return not evaluate(item, features)
        case Leaf(feature, op, value):
            actual = features.get(feature, NEW_USER[feature])
            if feature in CATEGORICAL_FEATURES:
                text = str(actual)
                if isinstance(value, tuple):
                    return text in value
                return (text == value) if op == "==" else (text != value)
            assert isinstance(value, float)
            return NUMERIC_OPS[op](float(actual), value)


_EXPRESSION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>|\bin\b)\s*(\S.*?)\s*$")
# A feature named inside a categorical value means two comparisons in one expression
# ("favourite_category != Toys and order_count > 2"), not a category of that name.
_FEATURE_WORD = re.compile(r"\b(?:" + "|".join(FEATURE_NAMES) + r")\b")


def parse_expression(text: str) -> Condition:
    """A leaf written as text: ``lifetime_value >= 500``, ``favourite_category == Toys``,
    ``favourite_category in Toys,Garden``. Categorical values are taken literally, less one pair
    of surrounding quotes, so ``'Toys'`` is Toys and ``""`` the empty (new-user) category."""
    m = _EXPRESSION.match(text)
    if not m:
        raise ConditionError(
            f"cannot read {text!r}; write FEATURE OP VALUE, e.g. 'days_since_first_order < 30'"
        )
    feature, op, raw = m.groups()
    value: object = raw
    # 'in' on a numeric feature is left to _leaf, which names the operator as the mistake.
    if feature in NUMERIC_FEATURES and op != "in":
        try:
            value = float(raw)
        except ValueError:
            raise ConditionError(
                f"{text!r}: {feature} compares with a number, got {raw!r}"
            ) from None
    elif feature in CATEGORICAL_FEATURES:
        if _FEATURE_WORD.search(raw):
            raise ConditionError(
                f"{text!r}: one comparison per expression; repeat --where to require all of "
                "them, or write --condition JSON for 'any' and 'not'"
            )
        if op == "in":
            value = [_text_value(v, text) for v in raw.split(",")]
        else:
            value = _text_value(raw, text)
    return _leaf(feature, op, value, repr(text))


def _text_value(raw: str, text: str) -> str:
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    if not value:
        # A stray comma would otherwise add the empty category, which every new user has.
        raise ConditionError(f'{text!r}: empty value; write "" to mean no category')
    return value
