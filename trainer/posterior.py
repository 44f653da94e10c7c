"""The most any policy can earn from the experiment's log: Bayes-optimal discounts under the
simulator's own prior.

A learned response model sees a shopper through their order history and a few dozen randomized
offers. Given exactly those, plus what no model is given (the prior the simulator draws shoppers
from and every item's true relevance), the posterior over the shopper's hidden parameters predicts
their response as well as anything can, and choosing each discount by it earns the largest
expected margin, over markets the simulator draws, of any policy that prices the same offers
from the same grid using the same log: what a learned model sees beyond it (other shoppers' rows,
the CF scores) says nothing about this shopper once the prior and the true relevance are known.
Its share of the oracle's lift is therefore a ceiling for `optimal` (importance sampling can only
lower it); the oracle is higher still because it knows each shopper's parameters exactly, which
no log of this length reveals.

The posterior is taken by importance sampling: ``samples`` shoppers drawn from the prior for each
behaviour, weighted for every real shopper by the likelihood of their order history and of what
they bought in the log.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
from scipy.special import expit

from trainer.dataset import Floats
from trainer.market import (
    GRID,
    Behaviour,
    Log,
    Market,
    Offers,
    Shoppers,
    behaviour_log_likelihood,
    draw_shoppers,
)

# 1,000 prior shoppers in all: on seed 0 of evaluate-policy the policy's share is 0.802 with them
# and 0.803 with 4,000; the median shopper's effective sample size is about 215 of 1,000.
SAMPLES_PER_BEHAVIOUR = 250
PRIOR_DRAWS = 5  # its random stream's purpose: trainer.market uses 1 to 3, trainer.replay 4
_USERS_PER_CHUNK = 50  # bounds memory: chunk rows × samples × GRID floats at a time


def posterior_probabilities(
    market: Market, log: Log, offers: Offers, samples: int = SAMPLES_PER_BEHAVIOUR, seed: int = 0
) -> Floats:
    """[offers, GRID]: each offer's posterior-predictive P(buy | discount), given the market's
    prior, the shopper's order history and the shopper's rows in the log."""
    behaviours = np.repeat(np.arange(len(Behaviour)), samples)
    drawn = draw_shoppers(behaviours, np.random.default_rng([seed, PRIOR_DRAWS]))
    # One sample per row, so that broadcasting against rows gives [samples, rows].
    prior = Shoppers(*(getattr(drawn, f.name)[:, None] for f in fields(drawn)))
    shares = np.asarray(market.config.behaviour_shares)
    # Each sample stands for its behaviour's share of the population.
    log_prior = (
        np.log(shares / samples)[behaviours]
        + behaviour_log_likelihood(market.user_features)[:, behaviours]
    )
    lift = prior.lift(np.asarray(GRID)[None, :])  # samples × GRID
    log_column = np.searchsorted(np.asarray(GRID), log.discount)

    out = np.empty((len(offers), len(GRID)))
    users = np.unique(offers.user)
    for start in range(0, len(users), _USERS_PER_CHUNK):
        chunk = users[start : start + _USERS_PER_CHUNK]
        rows = np.flatnonzero(np.isin(log.offers.user, chunk))
        logit = _base_logit(market, prior, log.offers.take(rows)) + lift[:, log_column[rows]]
        # log P(what the shopper did) = −log(1 + e^(∓logit)), summed over each shopper's rows
        outcome = -np.logaddexp(0.0, np.where(log.bought[rows], -logit, logit))
        owner = chunk[:, None] == log.offers.user[rows][None, :]  # chunk × rows
        log_post = owner.astype(np.float64) @ outcome.T + log_prior[chunk]
        weight = np.exp(log_post - log_post.max(axis=1, keepdims=True))
        weight /= weight.sum(axis=1, keepdims=True)  # chunk × samples

        targets = np.flatnonzero(np.isin(offers.user, chunk))
        # rows × GRID × samples, in float32: the bulk of the work, and 1e-7 is precise enough.
        base = _base_logit(market, prior, offers.take(targets)).T.astype(np.float32)
        p = base[:, None, :] + lift.T.astype(np.float32)[None, :, :]
        expit(p, out=p)
        row_weight = weight[np.searchsorted(chunk, offers.user[targets])].astype(np.float32)
        out[targets] = (p @ row_weight[:, :, None])[:, :, 0]
    return out


def _base_logit(market: Market, prior: Shoppers, offers: Offers) -> Floats:
    """[samples, offers]: each prior sample's no-discount log-odds for these offers, with their
    true relevance and price."""
    relevance = market.relevance[offers.user, offers.item]
    return prior.base_logit(relevance[None, :], offers.price[None, :])
