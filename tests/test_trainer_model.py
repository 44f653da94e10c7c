"""The factor model on synthetic shops whose right answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from trainer.config import CATEGORIES, ModelConfig, SynthConfig
from trainer.data import load_files
from trainer.dataset import Dataset
from trainer.evaluate import Protocol, factor_scorer, ndcg10, popularity_scorer
from trainer.model import train
from trainer.synth import Shop, make_shop, write_shop

# Users who buy almost only from one or two categories: collaborative filtering must win.
STRONG = SynthConfig(users=400, items=80, seed=3, taste_concentration=0.05, noise=0.0)
FAST = ModelConfig(factors=16, regularization=10.0, alpha=1.0, max_epochs=8, seed=1)


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def strong(tmp_path_factory: pytest.TempPathFactory) -> tuple[Shop, Dataset]:
    shop = make_shop(STRONG)
    interactions, items = write_shop(shop, tmp_path_factory.mktemp("strong"))
    return shop, load_files(interactions, items).dataset


def test_training_is_deterministic_by_seed(strong: tuple[Shop, Dataset]) -> None:
    _, ds = strong
    split = Protocol("time").split(ds)
    for objective in ("ials", "bpr"):
        config = ModelConfig(objective=objective, factors=8, max_epochs=2, seed=5)
        a = train(config, split.train, log=quiet).factors
        b = train(config, split.train, log=quiet).factors
        reseeded = ModelConfig(objective=objective, factors=8, max_epochs=2, seed=6)
        other = train(reseeded, split.train, log=quiet).factors
        np.testing.assert_array_equal(a.user, b.user)
        np.testing.assert_array_equal(a.item, b.item)
        np.testing.assert_array_equal(a.foldin, b.foldin)
        assert not np.array_equal(a.item, other.item)


def test_beats_popularity_on_a_shop_with_strong_tastes(strong: tuple[Shop, Dataset]) -> None:
    _, ds = strong
    protocol = Protocol("time")
    hold = protocol.split(ds)
    val = protocol.inner(ds, hold)
    lines: list[str] = []
    result = train(FAST, val.train, lambda f: ndcg10(factor_scorer(f), val), lines.append)
    model = ndcg10(factor_scorer(result.factors), val)
    baseline = ndcg10(popularity_scorer(val.bought), val)
    assert model > 1.5 * baseline
    # Progress per epoch on the log, and the returned factors are the best epoch's.
    assert lines[0].startswith("epoch   1  loss ") and "val NDCG@10" in lines[0]
    assert model == pytest.approx(max(h["val_ndcg@10"] for h in result.history))


def test_fold_in_of_a_new_user_recommends_their_taste(strong: tuple[Shop, Dataset]) -> None:
    _, ds = strong
    factors = train(FAST, Protocol("time").split(ds).train, log=quiet).factors
    category = np.array([CATEGORIES.index(c) for c in ds.catalog.categories])
    for taste in range(len(CATEGORIES)):
        members = np.flatnonzero(category == taste)
        history = members[:3]
        vector = factors.foldin @ factors.item[history].sum(axis=0)
        scores = factors.item @ vector + factors.item_bias
        scores[history] = -np.inf
        top = np.argsort(-scores)[:5]
        wanted = min(5, len(members) - len(history))
        assert (category[top] == taste).sum() >= wanted - 1, (CATEGORIES[taste], top)


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="objective must be one of"):
        ModelConfig(objective="svd")
    with pytest.raises(ValueError, match="at least 1"):
        ModelConfig(factors=0)
