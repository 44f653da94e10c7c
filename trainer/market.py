"""A market simulator with known response curves, to measure discount policies against the truth.

Shoppers have latent tastes (relevance of each item), a price sensitivity, and one of four
discount behaviours: they never react, react only to large discounts, buy regardless, or react in
proportion to the discount. Their observable features (order count, recency, basket, …) are noisy
signals of that behaviour, as in a real shop, so a learned model can find it only approximately.
Because the true ``P(buy | user, item, discount)`` is known, every policy's expected margin is
exact and an oracle that knows the curves gives the upper bound.

The simulator logs events in the shape the server's ``RecordEvents`` RPC takes and offers with the
columns ``discount-train response`` reads (as ``discountctl offers export`` writes them from the
store), under any policy, including a randomized one whose propensities make off-policy
evaluation possible.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import IntEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from core.features import NUMERIC_FEATURES
from core.files import replace_files
from core.response_log import LOGS
from trainer.config import MarketConfig
from trainer.dataset import Floats, Ints

# Candidate discounts (fractions of the base price): the randomized logging grid and the only
# discounts a policy may choose here, so that off-policy estimates have support for every choice.
GRID: tuple[float, ...] = (0.0, 0.05, 0.10, 0.15, 0.20, 0.25, 0.30)
# Each purpose draws from a stream of its own, SeedSequence([seed(s)..., purpose]); the market
# draws from the seed alone. Purposes are distinct and non-zero, since [seed, 0] is the seed's own
# stream. (Offers once drew from [seed, seed]: the market's stream for seed 0, the discount
# draws' for seed 1, the purchases' for 2; replay and core.response_history use 4 and 7.)
DISCOUNT_DRAWS, PURCHASE_DRAWS, OFFER_SAMPLING = 1, 2, 3
_START = 1_790_000_000  # 2026-09-21, Unix seconds: a fixed clock keeps logs reproducible.


class Behaviour(IntEnum):
    NEVER = 0  # a discount changes nothing
    LARGE_ONLY = 1  # reacts only above a personal threshold
    REGARDLESS = 2  # buys often, with or without a discount
    GRADED = 3  # the larger the discount, the likelier the purchase


@dataclass(frozen=True)
class Shoppers:
    """Each shopper's hidden response parameters: the truth a discount policy tries to learn."""

    behaviour: Ints
    intercept: Floats  # log-odds of buying a typical item at full price
    strength: Floats  # log-odds a discount adds, at most
    threshold: Floats  # LARGE_ONLY: discount at which the reaction sets in
    price_elasticity: Floats

    def take(self, rows: Ints) -> Shoppers:
        return Shoppers(*(getattr(self, f.name)[rows] for f in fields(self)))

    def lift(self, discounts: Floats) -> Floats:
        """Log-odds each shopper's discount adds; non-decreasing in the discount."""
        d = np.asarray(discounts, dtype=np.float64)
        b = self.behaviour
        return np.where(
            b == Behaviour.GRADED,
            self.strength * d / GRID[-1],
            np.where(
                b == Behaviour.LARGE_ONLY,
                self.strength * _sigmoid((d - self.threshold + 0.025) / 0.008),
                0.0,
            ),
        )

    def base_logit(self, relevance: Floats, prices: Floats) -> Floats:
        """Log-odds of buying an item of this relevance and price without a discount."""
        return self.intercept + relevance - self.price_elasticity * np.log(prices / 30.0)


def draw_shoppers(behaviour: Ints, rng: np.random.Generator) -> Shoppers:
    """The hidden parameters of shoppers with the given behaviours, from the market's prior."""
    n = len(behaviour)
    intercept = rng.normal(-4.3, 0.4, n)
    intercept[behaviour == Behaviour.REGARDLESS] += 1.8
    strength = np.zeros(n)
    graded = behaviour == Behaviour.GRADED
    strength[graded] = rng.uniform(0.8, 3.5, graded.sum())
    large = behaviour == Behaviour.LARGE_ONLY
    strength[large] = rng.uniform(1.5, 3.0, large.sum())
    threshold = np.where(large, rng.choice([0.15, 0.2, 0.25], n), 1.0)
    price_elasticity = rng.uniform(0.2, 1.0, n)
    return Shoppers(
        np.asarray(behaviour, dtype=np.int64), intercept, strength, threshold, price_elasticity
    )


@dataclass(frozen=True)
class Market:
    config: MarketConfig
    user_ids: list[str]
    item_ids: list[str]
    prices: Floats
    costs: Floats
    shoppers: Shoppers
    relevance: Floats  # users × items, standardized
    cf_score: Floats  # users × items: relevance as a CF model sees it
    user_features: Floats  # users × NUMERIC_FEATURES

    def purchase_probability(self, users: Ints, items: Ints, discounts: Floats) -> Floats:
        """True P(buy) of each (user, item, discount) row; non-decreasing in the discount."""
        return self.response(users, self.relevance[users, items], self.prices[items], discounts)

    def response(self, users: Ints, relevance: Floats, prices: Floats, discounts: Floats) -> Floats:
        """True P(buy) of these users for items of the given relevance and price: the same curve
        for items outside this market's catalog (a real shop's, replayed against discountd)."""
        shoppers = self.shoppers.take(users)
        return _sigmoid(shoppers.base_logit(relevance, prices) + shoppers.lift(discounts))


@dataclass(frozen=True)
class Offers:
    """Offers shown to users: one row each, in the order they were made."""

    offer_id: list[str]
    user: Ints
    item: Ints
    rank: Ints  # position among the offers shown in the same visit, 0 = best CF score
    visit: Ints
    cf_score: Floats
    price: Floats
    cost: Floats

    def __len__(self) -> int:
        return len(self.offer_id)

    def take(self, rows: Ints) -> Offers:
        return Offers(
            offer_id=[self.offer_id[i] for i in rows],
            user=self.user[rows],
            item=self.item[rows],
            rank=self.rank[rows],
            visit=self.visit[rows],
            cf_score=self.cf_score[rows],
            price=self.price[rows],
            cost=self.cost[rows],
        )


@dataclass(frozen=True)
class Log:
    """Offers with the discount each got, its propensity, and whether it was bought."""

    offers: Offers
    discount: Floats
    propensity: Floats  # probability the logging policy gave this discount to this offer
    bought: npt.NDArray[np.bool_]

    def margin(self) -> Floats:
        """Realized margin of every offer: final price minus cost when bought, else nothing."""
        return np.where(
            self.bought, self.offers.price * (1 - self.discount) - self.offers.cost, 0.0
        )


def _sigmoid(x: Floats) -> Floats:
    return 1.0 / (1.0 + np.exp(-x))


def make_market(config: MarketConfig) -> Market:
    """Draw a population of shoppers and a catalog; the same config always gives the same market."""
    rng = np.random.default_rng(config.seed)
    n_u, n_i = config.n_users, config.n_items
    behaviour = rng.choice(4, size=n_u, p=np.asarray(config.behaviour_shares))
    prices = np.round(np.exp(rng.normal(np.log(30.0), 0.6, n_i)), 2).astype(np.float64)
    margin_rate = rng.uniform(0.15, 0.6, n_i)
    costs = np.round(prices * (1 - margin_rate), 2)

    users = rng.normal(0, 1, (n_u, config.n_factors))
    items = rng.normal(0, 1, (n_i, config.n_factors))
    relevance = users @ items.T / np.sqrt(config.n_factors)
    relevance = (relevance - relevance.mean()) / relevance.std()
    cf_score = relevance + rng.normal(0, config.cf_noise, relevance.shape)

    shoppers = draw_shoppers(behaviour, rng)

    return Market(
        config=config,
        user_ids=[f"u{u:06d}" for u in range(n_u)],
        item_ids=[f"i{i:05d}" for i in range(n_i)],
        prices=prices,
        costs=costs,
        shoppers=shoppers,
        relevance=relevance,
        cf_score=cf_score,
        user_features=_user_features(behaviour, rng),
    )


# Order history by behaviour (NEVER, LARGE_ONLY, REGARDLESS, GRADED): loyal buyers order often
# and recently, bargain hunters have lapsed, graded responders have small baskets, non-reactors
# large ones. Orders are 1 + Poisson(ORDERS), days since the last order exponential with mean
# LAST_ORDER_DAYS, the basket log-normal around BASKET with log-sd BASKET_SPREAD.
ORDERS = np.array([4.0, 2.0, 12.0, 5.0])
LAST_ORDER_DAYS = np.array([40.0, 120.0, 12.0, 45.0])
BASKET = np.array([80.0, 40.0, 45.0, 25.0])
BASKET_SPREAD = 0.45


def _user_features(behaviour: Ints, rng: np.random.Generator) -> Floats:
    """Order history that hints at behaviour, in NUMERIC_FEATURES order."""
    n = len(behaviour)
    orders = rng.poisson(ORDERS[behaviour]) + 1
    last = rng.exponential(LAST_ORDER_DAYS[behaviour])
    first = last + orders * rng.exponential(30.0, n)
    basket = np.exp(rng.normal(np.log(BASKET[behaviour]), BASKET_SPREAD))
    columns = {
        "days_since_first_order": first,
        "days_since_last_order": last,
        "order_count": orders.astype(np.float64),
        "lifetime_value": orders * basket,
        "avg_basket": basket,
    }
    return np.round(np.column_stack([columns[name] for name in NUMERIC_FEATURES]), 2)


def behaviour_log_likelihood(user_features: Floats) -> Floats:
    """[users, 4]: log-density of each user's order history under each behaviour, up to a term
    the same for all four (days since the first order and lifetime value add nothing once order
    count, recency and basket are known)."""
    column = {name: user_features[:, k, None] for k, name in enumerate(NUMERIC_FEATURES)}
    extra_orders = column["order_count"] - 1
    last = column["days_since_last_order"]
    log_basket = np.log(np.maximum(column["avg_basket"], 0.01))
    poisson = extra_orders * np.log(ORDERS) - ORDERS  # less log(k!), the same for all four
    exponential = -np.log(LAST_ORDER_DAYS) - last / LAST_ORDER_DAYS
    log_normal = -0.5 * ((log_basket - np.log(BASKET)) / BASKET_SPREAD) ** 2
    total: Floats = poisson + exponential + log_normal
    return total


def make_offers(market: Market, seed: int, visits: int | None = None) -> Offers:
    """Each visit shows every user ``offers_per_user`` items sampled from their CF top list."""
    cfg = market.config
    rng = np.random.default_rng([cfg.seed, seed, OFFER_SAMPLING])
    n_visits = cfg.visits if visits is None else visits
    top = np.argsort(-market.cf_score, axis=1)[:, : cfg.candidates]
    per_visit = cfg.offers_per_user
    users, items, ranks, visit_ids = [], [], [], []
    for v in range(n_visits):
        keys = rng.random(top.shape)
        picked = np.sort(np.argsort(keys, axis=1)[:, :per_visit], axis=1)  # sorted: best CF first
        users.append(np.repeat(np.arange(cfg.n_users), per_visit))
        items.append(np.take_along_axis(top, picked, axis=1).ravel())
        ranks.append(np.tile(np.arange(per_visit), cfg.n_users))
        visit_ids.append(np.full(cfg.n_users * per_visit, v))
    user = np.concatenate(users)
    item = np.concatenate(items)
    n = len(user)
    return Offers(
        offer_id=[f"o{seed}-{k:08d}" for k in range(n)],
        user=user,
        item=item,
        rank=np.concatenate(ranks),
        visit=np.concatenate(visit_ids),
        cf_score=market.cf_score[user, item],
        price=market.prices[item],
        cost=market.costs[item],
    )


def randomized_discounts(n: int, seed: int, weights: Floats | None = None) -> tuple[Floats, Floats]:
    """A randomized logging policy: each discount drawn from GRID; returns (d, propensity)."""
    p = np.full(len(GRID), 1.0 / len(GRID)) if weights is None else weights / weights.sum()
    rng = np.random.default_rng([seed, DISCOUNT_DRAWS])
    choice = rng.choice(len(GRID), size=n, p=p)
    return np.asarray(GRID)[choice], p[choice]


def simulate(
    market: Market, offers: Offers, discount: Floats, propensity: Floats, seed: int
) -> Log:
    """Draw who buys under the given discounts."""
    p = market.purchase_probability(offers.user, offers.item, discount)
    bought = np.random.default_rng([seed, PURCHASE_DRAWS]).random(len(p)) < p
    return Log(offers=offers, discount=discount, propensity=propensity, bought=bought)


def offers_frame(market: Market, log: Log) -> pd.DataFrame:
    """The offer log: what was offered to whom, at which discount, with which propensity."""
    o = log.offers
    frame = pd.DataFrame(
        {
            "offer_id": o.offer_id,
            "user_id": np.asarray(market.user_ids)[o.user],
            "item_id": np.asarray(market.item_ids)[o.item],
            # discountd ranks from 1 (0: not ranked), and `discountctl offers export` writes
            # its ranks: counted from 0 here, each visit's best offer would read as unranked.
            "rank": o.rank + 1,
            "cf_score": np.round(o.cf_score, 4),
            "price": o.price,
            "cost": o.cost,
            "discount": log.discount,
            "propensity": log.propensity,
        }
    )
    for k, name in enumerate(NUMERIC_FEATURES):
        frame[name] = market.user_features[o.user, k]
    return frame


def events_frame(market: Market, log: Log) -> pd.DataFrame:
    """Events as RecordEvents receives them: an impression per offer, a purchase per bought
    offer (revenue at the discounted price), and a redemption where a discount was used."""
    o = log.offers
    n = len(o)
    when = _START + o.visit * 86_400 + np.arange(n) % 86_400
    final = np.round(o.price * (1 - log.discount), 2)
    offer_ids = np.asarray(o.offer_id)
    bought = log.bought
    redeemed = bought & (log.discount > 0)
    parts = []
    for kind, mask, revenue, delay in (
        ("impression", np.ones(n, dtype=bool), np.zeros(n), 0),
        ("purchase", bought, final, 60),
        ("redemption", redeemed, np.zeros(n), 60),
    ):
        ids = offer_ids[mask]
        parts.append(
            pd.DataFrame(
                {
                    "event_id": [f"{kind[:3]}-{i}" for i in ids],
                    "type": kind,
                    "user_id": np.asarray(market.user_ids)[o.user[mask]],
                    "item_id": np.asarray(market.item_ids)[o.item[mask]],
                    "offer_id": ids,
                    "revenue": revenue[mask],
                    "quantity": 1 if kind == "purchase" else 0,
                    "timestamp": when[mask] + delay,
                }
            )
        )
    return pd.concat(parts, ignore_index=True).sort_values("timestamp", kind="stable")


def write_logs(market: Market, log: Log, out: Path) -> tuple[Path, Path]:
    """Write offers.csv and events.csv into out; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    offers_path, events_path = (out / name for name in LOGS)
    replace_files(
        {
            offers_path: lambda tmp: offers_frame(market, log).to_csv(tmp, index=False),
            events_path: lambda tmp: events_frame(market, log).to_csv(tmp, index=False),
        }
    )
    return offers_path, events_path
