"""Where `optimal`'s gap to the oracle lies (docs/BENCHMARKS.md, "Policies in the market
simulator"): the response model of `discount-train evaluate-policy`, trained per seed on the same
market, log and settings, with other per-shopper columns in place of the four response rates.

- rates: the four response rates, as `discount-train response` ships them; reproduces the
  `optimal` row of evaluate-policy;
- truth: each shopper's true parameters (behaviour, intercept, discount strength, threshold,
  price elasticity), what the oracle knows;
- truth+relevance: those, with each offer's true relevance in place of its CF score.

Prints each seed's share of the oracle's incremental margin over no discount, and the mean;
--bayes adds the `bayes` row (trainer/posterior.py), --users sizes the population.

    python -m bench.policy_gap --columns rates --columns truth --users 24000 --bayes
"""

from __future__ import annotations

from dataclasses import replace

import click
import numpy as np

from trainer.config import EvalConfig
from trainer.dataset import Floats
from trainer.market import GRID, Log, Market, Offers
from trainer.policy_eval import (
    allowed_discounts,
    best_discounts,
    draw,
    features,
    guardrails,
    offer_features,
    outcome,
    training_data,
    true_probabilities,
)
from trainer.posterior import posterior_probabilities
from trainer.response import ResponseData, fit_rows, predict

COLUMNS = ("rates", "truth", "truth+relevance")


def truth(market: Market) -> Floats:
    """users × 8: behaviour one-hot, intercept, strength, threshold (capped: 1.0 means none) and
    price elasticity."""
    s = market.shoppers
    return np.column_stack(
        [
            np.eye(4)[s.behaviour],
            s.intercept,
            s.strength,
            np.minimum(s.threshold, 0.4),
            s.price_elasticity,
        ]
    )


def inputs(
    kind: str, market: Market, log: Log, evaluated: Offers, seed: int
) -> tuple[ResponseData, Floats]:
    """Training rows and the evaluated offers' inputs, with kind's per-shopper columns."""
    if kind == "rates":
        logged = training_data(market, log, seed)
        return logged.data, features(market, evaluated, logged.history)
    shoppers = truth(market)

    def offer(offers: Offers) -> Floats:
        x = offer_features(market, offers)
        if kind == "truth+relevance":
            x[:, 0] = market.relevance[offers.user, offers.item]
        return np.column_stack([x, shoppers[offers.user]])

    o = log.offers
    return ResponseData(offer(o), log.discount, log.bought, log.propensity), offer(evaluated)


def shares(seed: int, config: EvalConfig, kinds: tuple[str, ...], bayes: bool) -> dict[str, float]:
    """Each kind's (and bayes's) share of the oracle's lift on seed, as evaluate-policy draws it."""
    drawn = draw(seed, config)  # as evaluate-policy draws it
    market, log, evaluated = drawn.market, drawn.train_log, drawn.evaluated
    true_p = true_probabilities(market, evaluated)
    allowed = allowed_discounts(evaluated.price, evaluated.cost, guardrails(config))

    def margin(p: Floats) -> float:
        chosen = best_discounts(p, evaluated.price, evaluated.cost, allowed)
        return outcome(true_p, evaluated, chosen).margin

    none = outcome(true_p, evaluated, np.zeros(len(evaluated))).margin
    lift = margin(true_p) - none
    grid = np.tile(np.asarray(GRID), (len(evaluated), 1))
    out = {}
    for kind in kinds:
        data, x = inputs(kind, market, log, evaluated, seed)
        model = fit_rows(data, replace(config.response, seed=seed))
        out[kind] = (margin(predict(model, x, grid)) - none) / lift
    if bayes:
        out["bayes"] = (
            margin(posterior_probabilities(market, log, evaluated, seed=seed)) - none
        ) / lift
    return out


@click.command(help=__doc__)
@click.option("--columns", "kinds", type=click.Choice(COLUMNS), multiple=True, default=COLUMNS)
@click.option(
    "--seed", "seeds", type=int, multiple=True, default=(0, 1, 2, 3, 4), show_default=True
)
@click.option(
    "--users", type=click.IntRange(min=100), default=EvalConfig().market.n_users, show_default=True
)
@click.option("--bayes", is_flag=True, help="Also the bayes row (about 10 s per 1,000 shoppers).")
def main(kinds: tuple[str, ...], seeds: tuple[int, ...], users: int, bayes: bool) -> None:
    base = EvalConfig()
    config = replace(base, market=replace(base.market, n_users=users))
    rows = []
    for seed in seeds:
        rows.append(shares(seed, config, kinds, bayes))
        click.echo(f"seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in rows[-1].items()))
    means = ", ".join(f"{k} {np.mean([r[k] for r in rows]):.4f}" for k in rows[0])
    click.echo(f"mean over seeds {list(seeds)}, {users:,} shoppers: {means}")


if __name__ == "__main__":
    main()
