"""User features: computed by the trainer, shipped in the artifact, used by segment conditions.

One list, so that the trainer, the segment validator and the server agree on names and types.
"""

from __future__ import annotations

# Numeric features: segment conditions compare them with <, <=, >, >=, ==, !=.
NUMERIC_FEATURES: tuple[str, ...] = (
    "days_since_first_order",
    "days_since_last_order",
    "order_count",
    "lifetime_value",
    "avg_basket",
)
# Categorical features: compared with == / != / in.
CATEGORICAL_FEATURES: tuple[str, ...] = ("favourite_category",)
FEATURE_NAMES: tuple[str, ...] = NUMERIC_FEATURES + CATEGORICAL_FEATURES

# What a user with no history looks like, so that "new customer" segments match unknown users.
NEW_USER: dict[str, float | str] = {
    "days_since_first_order": 0.0,
    "days_since_last_order": 0.0,
    "order_count": 0.0,
    "lifetime_value": 0.0,
    "avg_basket": 0.0,
    "favourite_category": "",
}
