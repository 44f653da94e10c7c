"""Policy evaluation in the market simulator: every policy against the truth and the oracle.

Per seed: draw a market, log a randomized experiment (discounts drawn uniformly from GRID) over the
first visits, fit the response model on it, then take the later visits as the evaluation
population. On it each policy's outcome is computed exactly from the true response curves, and two
bounds with it: ``bayes`` (trainer/posterior.py), the most a policy learned from the log can earn
in expectation, and the oracle, which knows every curve. Off-policy estimates (IPS, doubly robust)
of each policy's margin come from a randomized log of those same offers, so estimate and truth
measure the same thing.

Every policy chooses from GRID (classic policies' percents are rounded down onto it) because a
randomized log only supports the discounts it drew; rounding down never breaks a guardrail.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.files import replace_files
from core.optimal import choose
from core.policy import (
    Guardrails,
    Rule,
    allowed_percents,
    as_decimal,
    to_cents,
)
from core.response_history import HistoryTable
from trainer import ope
from trainer.config import EvalConfig
from trainer.dataset import Floats
from trainer.market import (
    GRID,
    Log,
    Market,
    Offers,
    make_market,
    make_offers,
    randomized_discounts,
    simulate,
)
from trainer.posterior import posterior_probabilities
from trainer.response import (
    Logged,
    ResponseData,
    epochs_run,
    evaluate,
    fit_rows,
    logged,
    predict,
)

Bools = npt.NDArray[np.bool_]
_GRID = np.asarray(GRID)
POLICY_ORDER = (
    "no_discount",
    "blanket_10",
    "tiered_topk",
    "threshold",
    "linear",
    "optimal",
    "bayes",
    "oracle",
)


@dataclass(frozen=True)
class Outcome:
    """Expected totals over the evaluation offers under the true response curves."""

    conversions: float
    revenue: float
    discount_spend: float
    margin: float
    mean_discount: float  # average discount offered, bought or not


def guardrails(config: EvalConfig) -> Guardrails:
    return Guardrails.of(config.max_discount_pct, config.min_margin_pct)


def allowed_discounts(price: Floats, cost: Floats, limits: Guardrails) -> Bools:
    """[offers, GRID]: which grid discounts keep each offer within the guardrails, priced the way
    the server prices (core.policy); computed per distinct (price, cost) pair."""
    pairs, inverse = np.unique(np.column_stack([price, cost]), axis=0, return_inverse=True)
    percents = [Decimal(str(round(d * 100, 2))) for d in GRID]
    table = np.array(
        [
            allowed_percents(to_cents(float(p)), as_decimal(float(c), "cost"), percents, limits)
            for p, c in pairs
        ],
        dtype=bool,
    ).reshape(len(pairs), len(GRID))
    return table[inverse.ravel()]


def classic_rules(train: Offers, limits: Guardrails) -> dict[str, Rule]:
    """The hand-written rules a shop would start with; score cut-offs from the training log."""
    q25, q75 = (float(q) for q in np.quantile(train.cf_score, [0.25, 0.75]))
    slope = 15.0 / (q75 - q25)  # 0% at the lower quartile, 15% at the upper, clipped to [0, 20]
    return {
        "blanket_10": Rule("tiered_topk", {"k1": 1, "d1": 10, "d2": 10}, limits),
        "tiered_topk": Rule("tiered_topk", {"k1": 2, "d1": 15, "d2": 5}, limits),
        "threshold": Rule("threshold", {"t": round(q75, 4), "d": 15}, limits),
        "linear": Rule(
            "linear",
            {"a": round(slope, 4), "b": round(-slope * q25, 4), "min": 0, "max": 20},
            limits,
        ),
    }


def rule_discounts(rule: Rule, offers: Offers) -> Floats:
    """The rule's discount per offer, priced by core.policy and rounded down onto GRID."""
    ranks = [int(r) + 1 for r in offers.rank]  # the simulator counts from 0, policies from 1
    return ope.rule_discounts(rule, offers.price, offers.cost, ranks, offers.cf_score, _GRID)


def best_discounts(probability: Floats, price: Floats, cost: Floats, allowed: Bools) -> Floats:
    """Per offer, the allowed grid discount with the largest expected margin P(buy|d)·(p(1−d)−c);
    ties go to the smaller discount. The same choice discountd makes (core.optimal)."""
    best: Floats = np.asarray(GRID)[choose(probability, price, cost, GRID, allowed).column]
    return best


def true_probabilities(market: Market, offers: Offers) -> Floats:
    n = len(offers)
    columns = [market.purchase_probability(offers.user, offers.item, np.full(n, d)) for d in GRID]
    return np.column_stack(columns).astype(np.float64)


def outcome(true_p: Floats, offers: Offers, discount: Floats) -> Outcome:
    column = np.searchsorted(np.asarray(GRID), discount)
    p = true_p[np.arange(len(discount)), column]
    final = offers.price * (1 - discount)
    return Outcome(
        conversions=float(p.sum()),
        revenue=float((p * final).sum()),
        discount_spend=float((p * offers.price * discount).sum()),
        margin=float((p * (final - offers.cost)).sum()),
        mean_discount=float(discount.mean()),
    )


def ips(log: Log, target: Floats) -> float:
    """Inverse-propensity estimate of the target policy's mean margin per offer."""
    return float(np.mean(ope.ips_terms(log.discount, log.propensity, log.margin(), target)))


def doubly_robust(log: Log, target: Floats, predicted: Floats) -> float:
    """Doubly robust estimate of the mean margin per offer; ``predicted`` is the model's P(buy)
    per offer and GRID column."""
    o = log.offers
    expected = ope.expected_margin(predicted, o.price, o.cost, _GRID)
    terms = ope.dr_terms(log.discount, log.propensity, log.margin(), target, expected, _GRID)
    return float(np.mean(terms))


def user_ids(market: Market, offers: Offers) -> npt.NDArray[np.str_]:
    """The user id of each offer, as the offer log writes it."""
    ids: npt.NDArray[np.str_] = np.asarray(market.user_ids, dtype=str)[offers.user]
    return ids


def offer_features(market: Market, offers: Offers) -> Floats:
    """The logged response-model inputs, in response_artifact.OFFER_FEATURES order."""
    return np.column_stack(
        [offers.cf_score, offers.price, offers.cost, market.user_features[offers.user]]
    )


def features(market: Market, offers: Offers, history: HistoryTable) -> Floats:
    """Response-model inputs in response_artifact.FEATURES order for offers outside the training
    log, with the users' rates from its history table, as discountd looks them up."""
    return np.column_stack(
        [offer_features(market, offers), history.lookup(user_ids(market, offers))]
    )


def training_data(market: Market, log: Log, seed: int) -> Logged:
    """The training log as `discount-train response` reads it: cross-fitted rates per row, the
    table from every row."""
    return logged(
        offer_features(market, log.offers),
        user_ids(market, log.offers),
        log.discount,
        log.bought,
        log.propensity,
        seed,
    )


def response_data(market: Market, log: Log, history: HistoryTable) -> ResponseData:
    """A log of offers outside the training log, with its users' rates from history."""
    return ResponseData(
        features(market, log.offers, history), log.discount, log.bought, log.propensity
    )


@dataclass(frozen=True)
class SeedResult:
    seed: int
    outcomes: dict[str, Outcome]
    ips: dict[str, float]  # mean margin per offer
    dr: dict[str, float]
    truth: dict[str, float]  # true mean margin per offer
    response_metrics: dict[str, float]
    offers: int


@dataclass(frozen=True)
class SeedData:
    """One seed's market, the randomized experiment logged over its first visits, and the
    offers of the later visits, which every policy prices."""

    market: Market
    train_log: Log
    evaluated: Offers


def draw(seed: int, config: EvalConfig) -> SeedData:
    """seed's market, training log and evaluation offers, the same for every run of seed."""
    market = make_market(replace(config.market, seed=seed))
    offers = make_offers(market, seed=seed)
    split = offers.visit < config.train_visits
    train = offers.take(np.flatnonzero(split))
    log = simulate(market, train, *randomized_discounts(len(train), seed), seed=seed)
    return SeedData(market, log, offers.take(np.flatnonzero(~split)))


def run_seed(
    seed: int, config: EvalConfig, progress: Callable[[str], None] = lambda _: None
) -> SeedResult:
    drawn = draw(seed, config)
    market, train_log, eval_offers = drawn.market, drawn.train_log, drawn.evaluated
    train_offers = train_log.offers
    limits = guardrails(config)
    eval_d, eval_prop = randomized_discounts(len(eval_offers), seed + 10_000)
    eval_log = simulate(market, eval_offers, eval_d, eval_prop, seed=seed + 10_000)
    train = training_data(market, train_log, seed)
    epochs = epochs_run(len(train.data), config.response)
    progress(
        f"seed {seed}: fitting the response model on {len(train_offers):,} logged offers "
        f"({epochs} epochs)"
    )
    model = fit_rows(train.data, replace(config.response, seed=seed))
    metrics = evaluate(model, response_data(market, eval_log, train.history))

    x = features(market, eval_offers, train.history)
    grid = np.tile(np.asarray(GRID), (len(eval_offers), 1))
    predicted = predict(model, x, grid)
    true_p = true_probabilities(market, eval_offers)
    allowed = allowed_discounts(eval_offers.price, eval_offers.cost, limits)

    progress(f"seed {seed}: pricing {len(eval_offers):,} offers under each policy")
    discounts: dict[str, Floats] = {"no_discount": np.zeros(len(eval_offers))}
    for name, rule in classic_rules(train_offers, limits).items():
        discounts[name] = rule_discounts(rule, eval_offers)
    discounts["optimal"] = best_discounts(predicted, eval_offers.price, eval_offers.cost, allowed)
    progress(f"seed {seed}: the Bayes bound, each shopper's posterior under the true prior")
    posterior = posterior_probabilities(market, train_log, eval_offers, seed=seed)
    discounts["bayes"] = best_discounts(posterior, eval_offers.price, eval_offers.cost, allowed)
    discounts["oracle"] = best_discounts(true_p, eval_offers.price, eval_offers.cost, allowed)

    outcomes = {name: outcome(true_p, eval_offers, d) for name, d in discounts.items()}
    n = len(eval_offers)
    return SeedResult(
        seed=seed,
        outcomes=outcomes,
        ips={name: ips(eval_log, d) for name, d in discounts.items()},
        dr={name: doubly_robust(eval_log, d, predicted) for name, d in discounts.items()},
        truth={name: o.margin / n for name, o in outcomes.items()},
        response_metrics=metrics,
        offers=n,
    )


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean and a 95% t-interval over seeds; one seed has no interval (low and high None)."""
    return ope.mean_interval(np.asarray(values, dtype=np.float64))


def summarize(results: list[SeedResult]) -> dict[str, Any]:
    """Per policy: per-1,000-offer outcomes, share of the oracle's incremental margin over no
    discount, and the off-policy estimates' relative errors; each with a 95% interval."""
    policies: dict[str, Any] = {}
    for name in POLICY_ORDER:
        per_seed: dict[str, list[float]] = {}
        for r in results:
            o = r.outcomes[name]
            scale = 1000.0 / r.offers
            lift = r.outcomes["oracle"].margin - r.outcomes["no_discount"].margin
            values = {
                "conversions_per_1000": o.conversions * scale,
                "revenue_per_1000": o.revenue * scale,
                "discount_spend_per_1000": o.discount_spend * scale,
                "margin_per_1000": o.margin * scale,
                "mean_discount": o.mean_discount,
                "share_of_oracle_lift": (o.margin - r.outcomes["no_discount"].margin) / lift,
                "ips_error": r.ips[name] / r.truth[name] - 1,
                "dr_error": r.dr[name] / r.truth[name] - 1,
            }
            for key, value in values.items():
                per_seed.setdefault(key, []).append(value)
        policies[name] = {key: interval(v) for key, v in per_seed.items()}
        policies[name]["dr_max_abs_error"] = max(abs(e) for e in per_seed["dr_error"])
        policies[name]["ips_max_abs_error"] = max(abs(e) for e in per_seed["ips_error"])
    metrics: dict[str, list[float]] = {}
    for r in results:
        for key, value in r.response_metrics.items():
            metrics.setdefault(key, []).append(value)
    return {
        "seeds": [r.seed for r in results],
        "offers_per_seed": [r.offers for r in results],
        "policies": policies,
        "response_model_holdout": {k: interval(v) for k, v in metrics.items()},
    }


def run(
    config: EvalConfig, progress: Callable[[str], None] = lambda _: None
) -> tuple[list[SeedResult], dict[str, Any]]:
    results = [run_seed(seed, config, progress) for seed in config.seeds]
    return results, summarize(results)


def config_summary(config: EvalConfig) -> Mapping[str, Any]:
    return {**asdict(config), "grid": list(GRID)}


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as an aligned text table (means, with 95% intervals for the key figures)."""

    def ci(v: Mapping[str, float | None], fmt: str) -> str:
        low, high = v["low"], v["high"]
        spread = "n/a" if low is None or high is None else f"[{low:{fmt}}, {high:{fmt}}]"
        return f"{v['mean']:{fmt}} {spread}"

    lines = [
        f"{'policy':12s} {'conv/1k':>8s} {'revenue/1k':>11s} {'spend/1k':>9s} {'margin/1k':>10s}"
        f"  {'share of oracle lift (95% CI)':31s} {'IPS err':>8s} {'DR err':>8s} {'|DR| max':>8s}"
    ]
    for name, p in summary["policies"].items():
        lines.append(
            f"{name:12s} {p['conversions_per_1000']['mean']:8.1f}"
            f" {p['revenue_per_1000']['mean']:11.1f} {p['discount_spend_per_1000']['mean']:9.1f}"
            f" {p['margin_per_1000']['mean']:10.1f}  {ci(p['share_of_oracle_lift'], '+.3f'):31s}"
            f" {p['ips_error']['mean']:+8.2%} {p['dr_error']['mean']:+8.2%}"
            f" {p['dr_max_abs_error']:8.2%}"
        )
    m = summary["response_model_holdout"]
    lines.append(
        f"response model on held-out log: log-loss {m['log_loss']['mean']:.4f}, "
        f"ECE {m['ece']['mean']:.4f}, AUC {m['auc']['mean']:.4f} "
        f"(base rate {m['base_rate']['mean']:.4f}); seeds {summary['seeds']}"
    )
    return "\n".join(lines)


def plot_margin_vs_spend(summary: Mapping[str, Any], path: Path) -> None:
    """Margin against discount spend per 1,000 offers, one point per policy, 95% CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, p in summary["policies"].items():
        x, y = p["discount_spend_per_1000"], p["margin_per_1000"]
        ax.errorbar(
            x["mean"],
            y["mean"],
            xerr=_bar(x),
            yerr=_bar(y),
            fmt="o",
            capsize=3,
        )
        ax.annotate(name, (x["mean"], y["mean"]), xytext=(6, 4), textcoords="offset points")
    none = summary["policies"]["no_discount"]["margin_per_1000"]["mean"]
    ax.axhline(none, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("discount spend per 1,000 offers")
    ax.set_ylabel("expected margin per 1,000 offers")
    ax.set_title(f"Market simulator, {len(summary['seeds'])} seeds (95% intervals)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_files({path: fig.savefig})
    plt.close(fig)


def _bar(v: Mapping[str, Any]) -> list[list[float]] | None:
    """An error bar from the mean to each end of the interval; none with one seed."""
    if v["low"] is None:
        return None
    return [[v["mean"] - v["low"]], [v["high"] - v["mean"]]]
