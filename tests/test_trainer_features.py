"""User features on hand-written purchase histories."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.features import FEATURE_NAMES
from trainer.data import load_files
from trainer.features import user_features


def test_features_by_hand(tmp_path: Path) -> None:
    (tmp_path / "items.csv").write_text(
        "item_id,category,price\nA,garden,2.0\nB,kitchen,10.0\nC,kitchen,1.0\n"
    )
    (tmp_path / "i.csv").write_text(
        "user_id,item_id,timestamp,event,quantity,price\n"
        "u1,A,2024-01-01T10:00:00Z,purchase,3,1.5\n"  # paid 1.5, not the catalog's 2.0
        "u1,B,2024-01-01T18:00:00Z,purchase,1,\n"  # same day: same order; catalog price 10
        "u1,C,2024-01-11T10:00:00Z,purchase,2,1.0\n"
        "u2,A,2024-01-06T10:00:00Z,view,1,\n"  # a view is not an order
        "u2,A,2024-01-21T10:00:00Z,purchase,1,2.0\n"
    )
    ds = load_files(tmp_path / "i.csv", tmp_path / "items.csv").dataset
    f = user_features(ds)
    assert tuple(f) == FEATURE_NAMES
    u1, u2 = ds.user_ids.index("u1"), ds.user_ids.index("u2")
    assert f["days_since_first_order"][u1] == 20.0
    assert f["days_since_last_order"][u1] == 10.0
    assert f["order_count"][u1] == 2.0
    assert f["lifetime_value"][u1] == pytest.approx(3 * 1.5 + 10.0 + 2 * 1.0)
    assert f["avg_basket"][u1] == pytest.approx(16.5 / 2)
    assert f["favourite_category"][u1] == "kitchen"  # two kitchen purchases, one garden
    assert f["days_since_first_order"][u2] == 0.0
    assert f["order_count"][u2] == 1.0
    assert f["favourite_category"][u2] == "garden"
