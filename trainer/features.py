"""User features for segment conditions, one value per trained user (names in core.features).

Measured at the data's last timestamp, not at training time, so that the same data always gives
the same features. An "order" is a distinct day with a purchase: interactions carry no order id.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.features import NUMERIC_FEATURES
from trainer.dataset import Dataset

DAY = 86_400


def user_features(dataset: Dataset) -> dict[str, list[float] | list[str]]:
    inter = dataset.interactions
    catalog = dataset.catalog
    n_users = len(dataset.user_ids)
    purchases = np.array([e == "purchase" for e in inter.event], dtype=bool)
    reference = int(inter.timestamp.max()) if len(inter.timestamp) else 0
    # A paid price where the data has one, else the catalog's current price.
    unit = np.where(np.isfinite(inter.price), inter.price, catalog.prices[inter.item_index]).astype(
        np.float64
    )
    rows = pd.DataFrame(
        {
            "user": inter.user_index[purchases],
            "day": inter.timestamp[purchases] // DAY,
            "ts": inter.timestamp[purchases],
            "spend": (inter.quantity * np.nan_to_num(unit))[purchases],
            "category": np.asarray(catalog.categories, dtype=object)[inter.item_index[purchases]],
        }
    )
    by_user = rows.groupby("user")
    first = by_user["ts"].min().reindex(range(n_users))
    last = by_user["ts"].max().reindex(range(n_users))
    orders = by_user["day"].nunique().reindex(range(n_users), fill_value=0)
    value = by_user["spend"].sum().reindex(range(n_users), fill_value=0.0)
    named = rows[rows["category"] != ""]
    # Most purchases wins; ties go to the alphabetically first category, for determinism.
    favourite = (
        named.groupby(["user", "category"])
        .size()
        .reset_index(name="n")
        .sort_values(["user", "n", "category"], ascending=[True, False, True])
        .drop_duplicates("user")
        .set_index("user")["category"]
        .reindex(range(n_users), fill_value="")
    )
    numeric = {
        "days_since_first_order": ((reference - first) / DAY).fillna(0.0),
        "days_since_last_order": ((reference - last) / DAY).fillna(0.0),
        "order_count": orders.astype(np.float64),
        "lifetime_value": value.astype(np.float64),
        "avg_basket": (value / orders.where(orders > 0)).fillna(0.0),
    }
    features: dict[str, list[float] | list[str]] = {
        name: [round(float(v), 4) for v in numeric[name]] for name in NUMERIC_FEATURES
    }
    features["favourite_category"] = [str(c) for c in favourite]
    return features
