"""A synthetic shop whose purchases come from a known model, for the demo and for tests.

Each user has a taste: a sparse distribution over categories (Dirichlet with a small
concentration, so most users care for one or two). A purchase picks a category from the user's
taste, or, with probability ``noise``, from the shop at large; within the category an item is
picked by its popularity (Zipf-like). Users shop in a few baskets spread over a year.
Everything is drawn from one seeded generator, so a seed always gives the same shop.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from core.files import replace_files
from trainer.config import CATEGORIES, SynthConfig
from trainer.dataset import Floats, Ints

# Fixed, for a seed to give the same shop, and a year that is over (it ends 2026-10-31): fit drops
# rows dated after its own time, and none of these ever will be.
START = int(datetime(2025, 11, 1, tzinfo=UTC).timestamp())
PERIOD_DAYS = 365
DAY = 86_400


@dataclass(frozen=True)
class Shop:
    interactions: pd.DataFrame
    items: pd.DataFrame
    taste: Floats  # users × categories: the true taste each user was drawn with
    item_category: Ints  # category index of every item


def make_shop(config: SynthConfig) -> Shop:
    rng = np.random.default_rng(config.seed)
    n_cat = len(CATEGORIES)
    item_category = np.concatenate(
        [np.arange(n_cat), rng.integers(0, n_cat, config.items - n_cat)]
    ).astype(np.int64)
    popularity = 1.0 / np.arange(1, config.items + 1) ** 0.8
    popularity = popularity[rng.permutation(config.items)]
    base_price = rng.lognormal(np.log(12.0), 0.3, n_cat)
    price = np.round(base_price[item_category] * rng.lognormal(0.0, 0.5, config.items), 2)
    price = np.maximum(price, 0.5)
    cost = np.round(price * rng.uniform(0.45, 0.75, config.items), 2)

    in_category = [np.flatnonzero(item_category == c) for c in range(n_cat)]
    within = [popularity[idx] / popularity[idx].sum() for idx in in_category]
    shop_mix = np.array([popularity[idx].sum() for idx in in_category])
    shop_mix /= shop_mix.sum()
    taste = rng.dirichlet(np.full(n_cat, config.taste_concentration), config.users)

    rows: list[tuple[int, int, int, int]] = []
    for user in range(config.users):
        n_baskets = 1 + rng.poisson(config.baskets)
        first_day = rng.integers(0, PERIOD_DAYS)
        days = np.sort(rng.integers(first_day, PERIOD_DAYS, n_baskets))
        mix = (1.0 - config.noise) * taste[user] + config.noise * shop_mix
        for day in days:
            second = int(rng.integers(8 * 3600, 22 * 3600))
            for _ in range(1 + rng.poisson(config.basket_size)):
                cat = rng.choice(n_cat, p=mix)
                item = int(in_category[cat][rng.choice(len(in_category[cat]), p=within[cat])])
                qty = 1 + int(rng.poisson(0.5))
                rows.append((user, item, START + int(day) * DAY + second, qty))

    # An item drawn twice for one basket is one line with both units, as a shop's export has
    # it: fit drops exact duplicate lines.
    table = (
        pd.DataFrame(rows, columns=["user", "item", "ts", "qty"])
        .groupby(["user", "item", "ts"], sort=False, as_index=False)["qty"]
        .sum()
        .to_numpy(dtype=np.int64)
    )
    user_ids = np.array([f"U{u:05d}" for u in range(config.users)])
    item_ids = np.array([f"{i:06d}" for i in range(config.items)])
    interactions = pd.DataFrame(
        {
            "user_id": user_ids[table[:, 0]],
            "item_id": item_ids[table[:, 1]],
            "timestamp": pd.to_datetime(table[:, 2], unit="s", utc=True).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
            "event": "purchase",
            "quantity": table[:, 3],
            "price": price[table[:, 1]],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": [f"{CATEGORIES[c]} item {i}" for i, c in enumerate(item_category)],
            "category": [CATEGORIES[c] for c in item_category],
            "price": price,
            "cost": cost,
            "stock": rng.integers(0, 200, config.items),
        }
    )
    return Shop(interactions, items, taste, item_category)


SHOP_FILES = ("interactions.csv", "items.csv")  # what write_shop writes


def write_shop(shop: Shop, out: Path) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    interactions, items = (out / name for name in SHOP_FILES)
    replace_files(
        {
            interactions: lambda tmp: shop.interactions.to_csv(tmp, index=False),
            items: lambda tmp: shop.items.to_csv(tmp, index=False),
        }
    )
    return interactions, items
