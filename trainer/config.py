"""The settings of the trainer's models and simulators, with their defaults: frozen dataclasses and
constants, and nothing heavier than the standard library. discount-train's options show these
defaults in --help, which must not load torch, pandas or scipy to print them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# The synthetic shop's (trainer/synth.py): every shop has an item in each.
CATEGORIES = ("kitchen", "garden", "toys", "books", "beauty", "sports", "music", "stationery")


@dataclass(frozen=True)
class SynthConfig:
    users: int = 2000
    items: int = 500
    seed: int = 0
    taste_concentration: float = 0.2  # Dirichlet α: small means users stick to few categories
    noise: float = 0.1  # share of purchases that ignore the user's taste
    baskets: float = 3.0  # mean baskets per user beyond the first
    basket_size: float = 2.0  # mean items per basket beyond the first

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < len(CATEGORIES):
            raise ValueError(f"need at least 1 user and {len(CATEGORIES)} items")


OBJECTIVES = ("ials", "bpr")


@dataclass(frozen=True)
class ModelConfig:
    objective: str = "ials"
    factors: int = 128
    regularization: float = 1.0  # λ
    alpha: float = 4.0  # iALS confidence scale
    # c = offset + α·log(1 + w): 1 is Hu et al.'s form, 0 the `implicit` library's (which trusts
    # a single purchase less); which fits better depends on the shop, so fit tries both.
    confidence_offset: float = 1.0
    max_epochs: int = 30
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    cg_steps: int = 3
    learning_rate: float = 0.01  # BPR (Adam)
    batch_size: int = 4096  # BPR
    init_scale: float = 0.01
    seed: int = 0
    # Several small sparse products per epoch: on a busy 2-core machine one thread beats two,
    # which lose most of their time waiting for each other.
    threads: int = 1

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}")
        if self.factors < 1 or self.max_epochs < 1:
            raise ValueError("factors and max_epochs must be at least 1")

    def resolved(self) -> dict[str, Any]:
        return asdict(self)


# The grid fit tries (trainer/fit.py), chosen on the validation split of each fit; these bracket
# what won on Online Retail, MovieLens 100K and the synthetic shop (docs/TRAINING.md).
REGULARIZATION_GRID = (10.0, 30.0)
# BPR's λ weighs a per-triple penalty, not iALS's whole-matrix one: the iALS values smother it
# (docs/BENCHMARKS.md measured BPR at this λ).
BPR_REGULARIZATION_GRID = (0.01,)
ALPHA_GRID = (1.0, 4.0)
OFFSET_GRID = (1.0, 0.0)
# The margin fit assumes for an item without a cost (trainer/data.py).
DEFAULT_MARGIN = 0.3


@dataclass(frozen=True)
class MarketConfig:
    """The market simulator's (trainer/market.py)."""

    n_users: int = 20_000
    n_items: int = 400
    n_factors: int = 8
    offers_per_user: int = 8  # offers shown to a user per visit
    candidates: int = 40  # offers come from the user's top candidates by CF score
    visits: int = 5
    # Shares of NEVER, LARGE_ONLY, REGARDLESS, GRADED.
    behaviour_shares: tuple[float, float, float, float] = (0.35, 0.2, 0.15, 0.3)
    cf_noise: float = 0.5  # the CF model's error on relevance, in relevance units
    seed: int = 0


@dataclass(frozen=True)
class ResponseConfig:
    """The response model's training (trainer/response.py)."""

    hidden: int = 64
    epochs: int = 20
    # Small logs get more epochs: too few optimizer steps leave the model uncalibrated.
    min_steps: int = 500
    # ... but no more than this many: past about 60 passes a small log is memorised, and its
    # `optimal` policy earned less (150 shoppers: 0.36 of the oracle's lift at 250 epochs, 0.57 at
    # 60; from about 600 shoppers on it binds no more; docs/DISCOUNTS.md).
    max_epochs: int | None = 60
    batch_size: int = 2048
    learning_rate: float = 1e-2
    weight_decay: float = 1e-5
    holdout: float = 0.2  # share of offers kept out of training to measure the model
    seed: int = 0
    threads: int = 1  # a model this small gains nothing from more, and loses on a busy machine


@dataclass(frozen=True)
class EvalConfig:
    """Policy evaluation in the market simulator (trainer/policy_eval.py)."""

    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    market: MarketConfig = field(default_factory=lambda: MarketConfig(n_users=8_000, visits=6))
    train_visits: int = 3  # visits logged for training; the rest form the evaluation population
    response: ResponseConfig = field(default_factory=ResponseConfig)
    max_discount_pct: float = 30.0
    min_margin_pct: float = 5.0


@dataclass(frozen=True)
class UpliftConfig:
    """The uplift benchmark's model (trainer/uplift.py)."""

    hidden: int = 0  # units in each of two hidden layers; 0: base and lift linear in the features
    epochs: int = 100
    min_steps: int = 300  # as in the response model: small data gets more epochs
    max_epochs: int | None = None  # uncapped: the response model's cap was not measured here
    batch_size: int = 1024
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0
