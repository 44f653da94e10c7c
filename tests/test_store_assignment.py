"""Experiment assignment: deterministic across processes, shares within a point of weights."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.assignment import BUCKETS, WeightsError, bucket, check_weights, variant_index

# Cut points in [0, 100] split the total into weights that always sum to 100.
weights_lists = st.lists(st.integers(0, 100), max_size=4).map(
    lambda cuts: [b - a for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), 100], strict=True)]
)


@given(st.text(max_size=20), st.text(max_size=20), weights_lists)
def test_assignment_is_a_function_of_salt_and_user(
    salt: str, user: str, weights: list[int]
) -> None:
    i = variant_index(salt, user, weights)
    assert 0 <= bucket(salt, user) < BUCKETS
    assert weights[i] > 0
    assert variant_index(salt, user, weights) == i


def test_same_answers_in_a_fresh_process() -> None:
    users = [f"u{n}" for n in range(200)]
    here = [bucket("salt-1", u) for u in users]
    code = (
        "from core.assignment import bucket;"
        "print(','.join(str(bucket('salt-1', f'u{n}')) for n in range(200)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert [int(x) for x in out.split(",")] == here


def test_shares_follow_weights_over_100k_users() -> None:
    weights = [10, 30, 60]
    counts = Counter(variant_index("exp-salt", str(u), weights) for u in range(100_000))
    for i, w in enumerate(weights):
        assert abs(counts[i] / 1000 - w) < 1.0, (i, counts[i])


def test_salt_separates_experiments() -> None:
    a = [variant_index("a", str(u), [50, 50]) for u in range(2000)]
    b = [variant_index("b", str(u), [50, 50]) for u in range(2000)]
    agreement = sum(x == y for x, y in zip(a, b, strict=True)) / 2000
    assert 0.45 < agreement < 0.55


@pytest.mark.parametrize(
    ("weights", "fragment"),
    [
        ([], "at least one"),
        ([50, 40], "sum to 100, got 90"),
        ([101, -1], "in [0, 100]"),
        ([50.0, 50], "integers"),
    ],
)
def test_bad_weights_are_refused(weights: list[int], fragment: str) -> None:
    with pytest.raises(WeightsError) as info:
        check_weights(weights)
    assert fragment in str(info.value)
