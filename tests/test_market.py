"""The market simulator: known response curves, reproducible logs in the RecordEvents shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from core.response_log import EVENT_COLUMNS, OFFER_COLUMNS
from trainer.config import MarketConfig
from trainer.market import (
    GRID,
    Behaviour,
    make_market,
    make_offers,
    randomized_discounts,
    simulate,
    write_logs,
)

# The event types write_logs writes (its columns: core.response_log).
EVENT_TYPES = ("impression", "purchase", "redemption")

CONFIG = MarketConfig(n_users=300, n_items=60, visits=2, seed=3)
MARKET = make_market(CONFIG)


def _users_of(behaviour: Behaviour) -> np.ndarray:
    return np.flatnonzero(MARKET.shoppers.behaviour == behaviour)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, CONFIG.n_users - 1),
    st.integers(0, CONFIG.n_items - 1),
    st.floats(0, 0.5),
    st.floats(0, 0.5),
)
def test_purchase_probability_never_falls_when_the_discount_grows(
    user: int, item: int, a: float, b: float
) -> None:
    low, high = sorted((a, b))
    u, i = np.array([user]), np.array([item])
    p_low = MARKET.purchase_probability(u, i, np.array([low]))[0]
    p_high = MARKET.purchase_probability(u, i, np.array([high]))[0]
    assert 0 < p_low <= p_high < 1


def test_each_behaviour_has_its_own_response_curve() -> None:
    item = np.array([0])
    for behaviour in (Behaviour.NEVER, Behaviour.REGARDLESS):
        u = _users_of(behaviour)[:1]
        curve = [MARKET.purchase_probability(u, item, np.array([d]))[0] for d in GRID]
        assert np.ptp(curve) == 0, behaviour
    u = _users_of(Behaviour.LARGE_ONLY)[:1]
    threshold = MARKET.shoppers.threshold[u[0]]
    below = MARKET.purchase_probability(u, item, np.array([threshold - 0.05]))[0]
    none = MARKET.purchase_probability(u, item, np.array([0.0]))[0]
    at = MARKET.purchase_probability(u, item, np.array([threshold]))[0]
    assert below - none < 0.15 * none  # a discount under the threshold does little
    assert at > 2 * none
    u = _users_of(Behaviour.GRADED)[:1]
    curve = [MARKET.purchase_probability(u, item, np.array([d]))[0] for d in GRID]
    assert all(np.diff(curve) > 0)


def test_same_seed_same_market_and_logs_other_seed_other_logs(tmp_path: Path) -> None:
    def logs(seed: int, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
        market = make_market(CONFIG)
        offers = make_offers(market, seed=seed)
        log = simulate(market, offers, *randomized_discounts(len(offers), seed), seed=seed)
        offers_path, events_path = write_logs(market, log, folder)
        return pd.read_csv(offers_path), pd.read_csv(events_path)

    first, again, other = logs(1, tmp_path / "a"), logs(1, tmp_path / "b"), logs(2, tmp_path / "c")
    pd.testing.assert_frame_equal(first[0], again[0])
    pd.testing.assert_frame_equal(first[1], again[1])
    assert not first[0]["discount"].equals(other[0]["discount"])


def test_logs_have_the_record_events_shape_and_agree_with_the_outcomes(tmp_path: Path) -> None:
    offers = make_offers(MARKET, seed=0)
    discount, propensity = randomized_discounts(len(offers), 0)
    log = simulate(MARKET, offers, discount, propensity, seed=0)
    offers_path, events_path = write_logs(MARKET, log, tmp_path)
    offer_log = pd.read_csv(offers_path, dtype={"offer_id": str})
    events = pd.read_csv(events_path, dtype={"offer_id": str})

    assert tuple(offer_log.columns) == OFFER_COLUMNS
    assert tuple(events.columns) == EVENT_COLUMNS
    assert set(events["type"]) == set(EVENT_TYPES)
    assert events["event_id"].is_unique
    assert set(offer_log["discount"]).issubset(GRID)
    assert np.allclose(offer_log["propensity"], 1 / len(GRID))
    counts = events["type"].value_counts()
    assert counts["impression"] == len(offers)
    assert counts["purchase"] == log.bought.sum()
    assert counts["redemption"] == (log.bought & (discount > 0)).sum()
    purchases = events[events["type"] == "purchase"].merge(offer_log, on="offer_id")
    assert np.allclose(
        purchases["revenue"], np.round(purchases["price"] * (1 - purchases["discount"]), 2)
    )
    assert (purchases["quantity"] == 1).all()
    assert events["timestamp"].is_monotonic_increasing


def test_observed_purchase_rate_matches_the_true_probabilities() -> None:
    offers = make_offers(MARKET, seed=5, visits=10)
    discount, propensity = randomized_discounts(len(offers), 5)
    log = simulate(MARKET, offers, discount, propensity, seed=5)
    p = MARKET.purchase_probability(offers.user, offers.item, discount)
    standard_error = np.sqrt((p * (1 - p)).sum()) / len(p)
    assert abs(log.bought.mean() - p.mean()) < 4 * standard_error


def test_offers_come_from_each_users_top_candidates_ranked_by_cf_score() -> None:
    offers = make_offers(MARKET, seed=0)
    top = np.argsort(-MARKET.cf_score, axis=1)[:, : CONFIG.candidates]
    for k in range(0, len(offers), 97):
        assert offers.item[k] in top[offers.user[k]]
    first = (offers.visit == 0) & (offers.user == 0)
    assert list(offers.rank[first]) == list(range(CONFIG.offers_per_user))
    assert all(np.diff(offers.cf_score[first]) <= 0)
