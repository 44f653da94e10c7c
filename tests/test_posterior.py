"""The Bayes bound: a posterior that learns each shopper from the log under the market's prior."""

from __future__ import annotations

import numpy as np

from trainer.config import MarketConfig
from trainer.market import (
    GRID,
    Behaviour,
    behaviour_log_likelihood,
    draw_shoppers,
    make_market,
    make_offers,
    randomized_discounts,
    simulate,
)
from trainer.policy_eval import true_probabilities
from trainer.posterior import PRIOR_DRAWS, posterior_probabilities


def test_order_history_gives_calibrated_odds_of_each_behaviour() -> None:
    """Posterior behaviour odds from the features alone match how often each behaviour occurs,
    overall and among the shoppers it is surest of, as they do only if the likelihood is the
    one the market draws features from."""
    market = make_market(MarketConfig(n_users=20_000, n_items=10, seed=5))
    log_odds = behaviour_log_likelihood(market.user_features) + np.log(
        np.asarray(market.config.behaviour_shares)
    )
    odds = np.exp(log_odds - log_odds.max(axis=1, keepdims=True))
    odds /= odds.sum(axis=1, keepdims=True)
    behaviour = market.shoppers.behaviour
    for b in Behaviour:
        count = float((behaviour == b).sum())
        assert abs(odds[:, b].sum() - count) < 4 * np.sqrt(count), b
    surest = odds.max(axis=1)
    for low, high in ((0.5, 0.8), (0.8, 0.95), (0.95, 1.0)):
        band = (surest >= low) & (surest < high)
        right = (odds.argmax(axis=1) == behaviour)[band].mean()
        assert abs(right - surest[band].mean()) < 0.02, (low, high)


def test_the_posterior_closes_in_on_a_shopper_the_longer_the_log() -> None:
    config = MarketConfig(n_users=30, n_items=200, visits=61, seed=2)
    market = make_market(config)
    offers = make_offers(market, seed=2)
    new = offers.take(np.flatnonzero(offers.visit == 0))
    truth = true_probabilities(market, new)
    errors = []
    for visits in (1, 60):
        logged = offers.take(np.flatnonzero((offers.visit >= 1) & (offers.visit <= visits)))
        log = simulate(market, logged, *randomized_discounts(len(logged), seed=2), seed=2)
        predicted = posterior_probabilities(market, log, new, samples=400)
        # A mixture of curves that never fall never falls (give or take float32 sums).
        assert (np.diff(predicted, axis=1) >= -1e-5).all()
        assert ((predicted > 0) & (predicted < 1)).all()
        errors.append(np.abs(predicted - truth).mean())
    short, long = errors
    assert long < 0.5 * short
    assert long < 0.02
    assert predicted.shape == (len(new), len(GRID))


def test_each_offer_gets_its_own_shoppers_posterior_whatever_the_log_looks_like() -> None:
    """Against the textbook computation, one offer at a time in float64: over several chunks
    of shoppers, with uneven log rows, shoppers the log never saw, and evaluated offers for
    some shoppers only, in no order. The prior must weigh in too: 8 rows per shopper do not
    swamp it, as the long log above does."""
    config = MarketConfig(n_users=140, n_items=200, visits=4, seed=7)
    market = make_market(config)
    offers = make_offers(market, seed=7)
    rng = np.random.default_rng(1)
    kept = np.flatnonzero((offers.visit < 3) & (rng.random(len(offers)) < 0.4))
    kept = kept[offers.user[kept] % 9 != 0]  # some shoppers never in the log
    logged = offers.take(kept)
    log = simulate(market, logged, *randomized_discounts(len(logged), seed=7), seed=7)
    last = np.flatnonzero(offers.visit == 3)
    new = offers.take(rng.permutation(last[offers.user[last] % 3 != 1]))
    samples = 60
    predicted = posterior_probabilities(market, log, new, samples=samples, seed=11)

    behaviours = np.repeat(np.arange(len(Behaviour)), samples)
    prior = draw_shoppers(behaviours, np.random.default_rng([11, PRIOR_DRAWS]))
    history = behaviour_log_likelihood(market.user_features)
    shares = np.log(np.asarray(config.behaviour_shares))

    def curve(user: int, item: int, discount: float) -> np.ndarray:
        base = prior.base_logit(market.relevance[user, item], market.prices[item])
        return 1 / (1 + np.exp(-(base + prior.lift(np.full(len(behaviours), discount)))))

    for k in range(len(new)):
        user = new.user[k]
        log_weight = shares[behaviours] + history[user, behaviours]
        for r in np.flatnonzero(log.offers.user == user):
            p = curve(user, log.offers.item[r], log.discount[r])
            log_weight += np.log(p if log.bought[r] else 1 - p)
        weight = np.exp(log_weight - log_weight.max())
        expected = [weight @ curve(user, new.item[k], d) / weight.sum() for d in GRID]
        np.testing.assert_allclose(predicted[k], expected, atol=1e-5)
    assert set(new.user) - set(log.offers.user)  # the case of a shopper without history ran
