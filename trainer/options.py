"""Option types the discount-train commands share: numbers that are refused in one line, before
any work, when they cannot mean anything."""

from __future__ import annotations

import math
from typing import Any

import click

# Shoppers or items one command may make: far above any shop here, below where numpy refuses an
# array's size outright; in between, discount-train says it ran out of memory (trainer/entry.py).
MAX_ROWS = 100_000_000
# numpy's and torch's generators take seeds in [0, 2**32): outside it they raise mid-run.
SEED = click.IntRange(0, 2**32 - 1)


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and ±inf: nan compares false with every bound, so a
    plain FloatRange lets it through, and a nan setting trains a model of nans."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number
