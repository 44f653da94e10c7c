"""The synthetic shop: deterministic by seed, in the documented columns, tastes as drawn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from trainer.cli import main
from trainer.config import CATEGORIES, SynthConfig
from trainer.synth import make_shop


def test_same_seed_same_shop_other_seed_other_shop() -> None:
    a = make_shop(SynthConfig(users=50, items=20, seed=1))
    b = make_shop(SynthConfig(users=50, items=20, seed=1))
    c = make_shop(SynthConfig(users=50, items=20, seed=2))
    pd.testing.assert_frame_equal(a.interactions, b.interactions)
    pd.testing.assert_frame_equal(a.items, b.items)
    assert not a.interactions.equals(c.interactions)


def test_purchases_follow_the_drawn_tastes() -> None:
    shop = make_shop(SynthConfig(users=300, items=60, seed=0, noise=0.0))
    user = shop.interactions["user_id"].str[1:].astype(int).to_numpy()
    item = shop.interactions["item_id"].astype(int).to_numpy()
    bought = shop.item_category[item]
    # With no noise a purchase's category is drawn from the buyer's taste, so the mean taste
    # weight of bought categories is E[Σθ²] = (α+1)/(8α+1) ≈ 0.46, not the 1/8 of a uniform pick.
    assert shop.taste[user, bought].mean() == pytest.approx(1.2 / 2.6, abs=0.05)
    assert (shop.items["cost"] < shop.items["price"]).all()
    assert set(shop.items["category"]) == set(CATEGORIES)


def test_cli_writes_both_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["synth", "--out", str(tmp_path), "--users", "30", "--items", "12", "--seed", "4"]
    )
    assert result.exit_code == 0, result.output
    inter = pd.read_csv(tmp_path / "interactions.csv", dtype=str)
    items = pd.read_csv(tmp_path / "items.csv", dtype=str)
    assert list(inter.columns) == ["user_id", "item_id", "timestamp", "event", "quantity", "price"]
    assert list(items.columns) == ["item_id", "title", "category", "price", "cost", "stock"]
    assert inter["user_id"].nunique() == 30 and len(items) == 12
    assert items["item_id"].iloc[0] == "000000"  # leading zeros survive the round trip
    assert set(inter["item_id"]) <= set(items["item_id"])
    assert np.all(pd.to_datetime(inter["timestamp"]).notna())


def test_cli_refuses_too_few_items(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["synth", "--out", str(tmp_path), "--items", "3"])
    assert result.exit_code == 2
    assert "--items" in result.output


def test_the_shop_year_is_over_so_fit_keeps_every_row() -> None:
    """fit drops rows dated more than a day after its own time: a shop must never have one."""
    shop = make_shop(SynthConfig(users=400, items=20, seed=3))
    latest = pd.to_datetime(shop.interactions["timestamp"]).max()
    assert latest < pd.Timestamp("2026-11-01", tz="UTC")
