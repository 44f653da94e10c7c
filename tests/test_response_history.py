"""Shoppers' past responses as features: bands, smoothing, cross-fitting and the shipped table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.artifact import ArtifactError
from core.response_history import (
    BANDS,
    FOLDS,
    HistoryTable,
    band_of,
    cross_fitted_rates,
    folds,
    smoothed_rates,
)

# Three shoppers, hand-counted. Band rates: none 1/3 (a: 1, 0; b: 0), small 1/2 (a 5%: 1,
# b 10%: 0), medium 1/2 (b 20%: 1, c 15%: 0), large 1/2 (a 30%: 0, c 25%: 1).
USERS = ["a", "a", "a", "a", "b", "b", "b", "c", "c"]
DISCOUNTS = [0.0, 0.0, 0.05, 0.30, 0.0, 0.10, 0.20, 0.25, 0.15]
BOUGHT = [1, 0, 1, 0, 0, 0, 1, 1, 0]
PRIOR = (1 / 3, 1 / 2, 1 / 2, 1 / 2)


def test_every_discount_falls_in_exactly_one_band() -> None:
    d = [0, 0.02, 0.025, 0.05, 0.1, 0.12, 0.125, 0.15, 0.2, 0.225, 0.25, 0.3, 0.99]
    assert band_of(d).tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    for outside in (-0.01, 1.0):
        with pytest.raises(ValueError, match=r"fractions in \[0, 1\)"):
            band_of([outside])


def test_rates_are_shrunk_towards_the_band_rate_by_two_offers() -> None:
    table = smoothed_rates(USERS, DISCOUNTS, BOUGHT)
    assert table.prior == pytest.approx(PRIOR)
    # (purchases + 2 · band rate) / (offers + 2); a band the user was never offered: its rate.
    assert table.rates("a") == pytest.approx(((1 + 2 / 3) / 4, 2 / 3, 1 / 2, 1 / 3))
    assert table.rates("b") == pytest.approx((2 / 9, 1 / 3, 2 / 3, 1 / 2))
    assert table.rates("c") == pytest.approx((1 / 3, 1 / 2, 1 / 3, 2 / 3))
    assert table.rates("stranger") == pytest.approx(PRIOR)
    np.testing.assert_allclose(
        table.lookup(["c", "stranger", "a"]),
        [table.rates("c"), PRIOR, table.rates("a")],
    )


def test_a_band_nobody_was_offered_takes_the_overall_rate() -> None:
    table = smoothed_rates(["a", "a", "b", "b"], [0.0, 0.05, 0.0, 0.05], [1, 1, 0, 0])
    assert table.prior == pytest.approx((0.5, 0.5, 0.5, 0.5))
    assert table.rates("a")[2:] == pytest.approx((0.5, 0.5))


def _log(seed: int, rows: int = 400, users: int = 20) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    ids = np.array([f"u{u}" for u in rng.integers(0, users, rows)])
    discounts = rng.choice([0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3], rows)
    return ids, discounts, rng.random(rows) < 0.3


def test_cross_fitting_keeps_every_row_out_of_its_own_features() -> None:
    """Flip one row's outcome: its own features and its fold's stay as they were, and every
    row of every other fold changes in that row's band (the band rate moved)."""
    ids, discounts, bought = _log(0)
    before = cross_fitted_rates(ids, discounts, bought, seed=3)
    fold = folds(len(ids), seed=3)
    for row in (0, 17, 399):
        flipped = bought.copy()
        flipped[row] = not flipped[row]
        after = cross_fitted_rates(ids, discounts, flipped, seed=3)
        changed = (after != before).any(axis=1)
        assert not changed[row]
        np.testing.assert_array_equal(changed, fold != fold[row])
        band = band_of(discounts[row : row + 1])[0]
        others = np.flatnonzero(changed)
        assert (after[others, band] != before[others, band]).all()
        assert (after[:, np.arange(BANDS) != band] == before[:, np.arange(BANDS) != band]).all()


@pytest.mark.parametrize("users", [20, 300])
def test_a_row_gets_its_users_rates_from_the_other_folds(users: int) -> None:
    """Bit for bit; with 300 shoppers, many have offers in one fold alone, which get the other
    folds' prior."""
    ids, discounts, bought = _log(1, users=users)
    rates = cross_fitted_rates(ids, discounts, bought, seed=5)
    fold = folds(len(ids), seed=5)
    unseen = 0
    for f in range(FOLDS):
        out = fold != f
        table = smoothed_rates(ids[out], discounts[out], bought[out])
        np.testing.assert_array_equal(rates[fold == f], table.lookup(ids[fold == f]))
        unseen += len(set(ids[fold == f]) - set(table.user_ids))
    assert (unseen > 10) == (users == 300)


def test_folds_are_balanced_and_drawn_from_the_seed() -> None:
    assert np.bincount(folds(103, seed=0)).tolist() == [21, 21, 21, 20, 20]
    assert np.array_equal(folds(103, seed=0), folds(103, seed=0))
    assert not np.array_equal(folds(103, seed=0), folds(103, seed=1))


def test_table_round_trips_and_a_bad_file_is_refused(tmp_path: Path) -> None:
    table = smoothed_rates(USERS, DISCOUNTS, BOUGHT)
    path = tmp_path / "history.json"
    table.save(path)
    again = HistoryTable.load(path)
    assert again.user_ids == table.user_ids and again.prior == table.prior
    np.testing.assert_array_equal(again.table, table.table)
    assert again.rates("b") == table.rates("b")

    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "band_edges": [0, 0.05, 1]}))
    with pytest.raises(ArtifactError, match="discount bands differ"):
        HistoryTable.load(path)
    path.write_text(json.dumps({**raw, "users": {"a": [0.1, 0.2, 1.5, 0.0]}}))
    with pytest.raises(ArtifactError, match=r"in \[0, 1\]"):
        HistoryTable.load(path)
    path.write_text(json.dumps({**raw, "users": {"a": [0.1, 0.2]}}))
    with pytest.raises(ArtifactError, match="malformed"):
        HistoryTable.load(path)
    path.write_text("{")
    with pytest.raises(ArtifactError, match="unreadable"):
        HistoryTable.load(path)
