"""The randomized-discount log a response model learns from: two CSV files, one shape.

`discountctl offers export` writes it from the store, `discount-train simulate` from the market
simulator, and `discount-train response` and `estimate-policy` read it (docs/DISCOUNTS.md,
section 1). One definition, so the writers cannot drift apart.
"""

from __future__ import annotations

from core.features import NUMERIC_FEATURES

LOGS = ("offers.csv", "events.csv")
# Per offer: who was offered what, at which rank and model score, price and unit cost, the
# discount shown (a fraction), its propensity and the user's numeric features.
OFFER_COLUMNS: tuple[str, ...] = (
    "offer_id",
    "user_id",
    "item_id",
    "rank",
    "cf_score",
    "price",
    "cost",
    "discount",
    "propensity",
    *NUMERIC_FEATURES,
)
# Events in the RecordEvents shape.
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id",
    "type",
    "user_id",
    "item_id",
    "offer_id",
    "revenue",
    "quantity",
    "timestamp",
)
