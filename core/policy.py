"""Discount policies: parameter validation and the serving math that turns a rule into prices.

Pure code, shared by the store (validation at rule create/update), the server (``GetOffers``)
and ``discountctl rules simulate``; it never imports grpc or SQLAlchemy.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

POLICIES: tuple[str, ...] = ("tiered_topk", "threshold", "linear", "optimal")


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


def _optimal(params: Mapping[str, Any]) -> dict[str, Any]:
    grid = params["grid"]
    if not isinstance(grid, list | tuple) or not grid:
        raise PolicyError(
            f"optimal: parameter 'grid' must be a non-empty list of candidate discount "
            f"percents, got {grid!r}"
        )
    values = [_percent("optimal", {f"grid[{i}]": v}, f"grid[{i}]") for i, v in enumerate(grid)]
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise PolicyError(
            f"optimal: parameter 'grid' must be sorted ascending without repeats, got {grid!r}"
        )
    return {"grid": values}


_VALIDATORS = {
    "tiered_topk": (("k1", "d1", "d2"), _tiered_topk),
    "threshold": (("t", "d"), _threshold),
    "linear": (("a", "b", "min", "max"), _linear),
    "optimal": (("grid",), _optimal),
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
