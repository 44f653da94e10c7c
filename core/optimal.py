"""The `optimal` policy's choice, shared by discountd and the trainer's policy evaluation.

Per offer, among the candidate discounts the guardrails allow, pick the one with the largest
expected margin P(buy | d) · (price · (1 − d) − cost); ties go to the smaller discount. No
discount is always allowed (core.policy.allowed_percents says which others are), so an offer
whose floor rules out every candidate still has a choice, and a discount too small to take a
cent off the price is none. The expected uplift is that margin minus the margin at no
discount.

numpy only: the server scores probabilities with ONNX Runtime, the trainer with torch, and both
choose here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]
Ints = npt.NDArray[np.int64]


def expected_margin(probability: Floats, price: Floats, cost: Floats, grid: Floats) -> Floats:
    """[offers, grid]: P(buy | d) · (price · (1 − d) − cost), ``grid`` in fractions (0.1 = 10%)."""
    margin = price[:, None] * (1 - grid[None, :]) - cost[:, None]
    value: Floats = probability * margin
    return value


@dataclass(frozen=True)
class Choice:
    column: Ints  # per offer, the chosen grid column
    uplift: Floats  # expected margin of the choice minus that of no discount


def choose(
    probability: Floats, price: Floats, cost: Floats, grid: Sequence[float], allowed: Bools
) -> Choice:
    """The argmax of expected margin over allowed columns; ``grid`` ascending, in fractions,
    and containing 0 (the baseline of the uplift)."""
    fractions = np.asarray(grid, dtype=np.float64)
    value = expected_margin(probability, price, cost, fractions)
    # argmax returns the first maximum: on an ascending grid, the smaller discount.
    column = np.argmax(np.where(allowed, value, -np.inf), axis=1).astype(np.int64)
    rows = np.arange(len(column))
    zero = int(np.flatnonzero(fractions == 0)[0])
    uplift: Floats = value[rows, column] - value[:, zero]
    return Choice(column, uplift)
