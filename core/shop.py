"""What pricing needs from a model version besides the graph: catalog prices and costs, and
the user features the trainer shipped (``items.json``, ``user_features.json``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.artifact import ArtifactError
from core.features import FEATURE_NAMES
from core.offer_token import MAX_PRICE


@dataclass(frozen=True)
class ShopFacts:
    prices: dict[str, float | None]
    costs: dict[str, float | None]
    # Items whose cost the trainer assumed from its default margin (DESIGN: assumed and
    # reported): offers priced against one say COST_ASSUMED.
    assumed_costs: frozenset[str]
    categories: dict[str, str]
    user_features: dict[str, dict[str, float | str]]


# The most an offer token carries and the store's offer log holds (Offer.base_price,
# NUMERIC(12, 2)): an item priced above it would get a token for an offer the log can never
# store, outside budgets and reports. Not derived from the column: the model's loader (and
# bench.gpu on a machine without SQLAlchemy) imports this module, not the store's tables;
# tests/test_offers_server.py checks the two agree. `discount-train fit` holds items to it too.
MAX_AMOUNT = float(MAX_PRICE)


def _money(value: Any) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= MAX_AMOUNT else None


def load_shop_facts(version_dir: Path) -> ShopFacts:
    """Read the facts of a version that load_manifest already verified."""
    try:
        items = json.loads((version_dir / "items.json").read_text())
        ids = [str(i) for i in items["item_id"]]
        n = len(ids)
        prices = items.get("price") or [None] * n
        costs = items.get("cost") or [None] * n
        assumed = items.get("cost_assumed") or [False] * n
        categories = items.get("category") or [""] * n
        features_path = version_dir / "user_features.json"
        raw = json.loads(features_path.read_text()) if features_path.exists() else {}
        users = json.loads((version_dir / "users.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{version_dir}: unreadable catalog or user features ({e})") from None
    lists = {"price": prices, "cost": costs, "cost_assumed": assumed, "category": categories}
    uneven = [
        f"{name} ({len(c) if isinstance(c, list) else 'not a list'})"
        for name, c in lists.items()
        if not isinstance(c, list) or len(c) != n
    ]
    if uneven:
        raise ArtifactError(
            f"{version_dir}: items.json has {n} item ids but not as many {', '.join(uneven)}"
        )
    try:
        columns = [str(c) for c in raw.get("columns", [])]
        known = [(i, c) for i, c in enumerate(columns) if c in FEATURE_NAMES]
        features = {
            str(user): {c: row[i] for i, c in known}
            for user, row in zip(users, raw.get("rows", []), strict=False)
        }
    except (AttributeError, IndexError, KeyError, TypeError) as e:
        raise ArtifactError(f"{version_dir}: malformed user_features.json ({e!r})") from None
    return ShopFacts(
        prices={i: _money(p) for i, p in zip(ids, prices, strict=True)},
        costs={i: _money(c) for i, c in zip(ids, costs, strict=True)},
        assumed_costs=frozenset(i for i, a in zip(ids, assumed, strict=True) if a),
        categories={i: str(c) for i, c in zip(ids, categories, strict=True)},
        user_features=features,
    )
