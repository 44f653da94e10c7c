"""Random-factor model versions of a given catalog size, for serving benchmarks.

Scores are random, so they say nothing about quality; the shapes (users, items, 64 factors,
categories, purchase histories) are those of a real export, so serving does the same work.
Versions are cached under var/bench/ by size and by the exporter's source (a changed graph
must not be measured on a stale export): the 1M-item export takes minutes.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.artifact import ArtifactError, current_version_dir
from trainer.dataset import Catalog, Dataset, Factors, Interactions

Feeds = dict[str, npt.NDArray[Any]]

FACTORS = 64
CATEGORIES = 20
PURCHASES_PER_USER = 8
TOP_K = 10  # what the benchmarks' Recommend asks for
EXCLUDED = 8  # items each benchmark user excludes
CACHE = Path("var/bench")


def user_id(n: int) -> str:
    return f"user-{n}"


def item_id(n: int) -> str:
    return f"item-{n}"


def random_shop(n_items: int, n_users: int, seed: int = 0) -> tuple[Dataset, Factors]:
    """The same dataset and factors for the same arguments (the ONNX-vs-PyTorch comparison
    rebuilds the factors of a cached version this way)."""
    rng = np.random.default_rng(seed)
    item = rng.normal(0.0, 0.1, (n_items, FACTORS)).astype(np.float32)
    user = rng.normal(0.0, 0.1, (n_users, FACTORS)).astype(np.float32)
    bias = rng.normal(0.0, 0.01, n_items).astype(np.float32)
    foldin = np.linalg.inv(item.T @ item + 0.1 * np.eye(FACTORS)).astype(np.float32)
    categories = [f"category-{c:02d}" for c in rng.integers(0, CATEGORIES, n_items)]
    prices = np.round(rng.uniform(5.0, 200.0, n_items), 2)
    catalog = Catalog(
        item_ids=[item_id(i) for i in range(n_items)],
        categories=categories,
        titles=[f"item {i}" for i in range(n_items)],
        prices=prices,
        costs=np.round(prices * 0.6, 2),
        cost_assumed=np.zeros(n_items, dtype=bool),
    )
    n = n_users * PURCHASES_PER_USER
    interactions = Interactions(
        user_index=np.repeat(np.arange(n_users, dtype=np.int64), PURCHASES_PER_USER),
        item_index=rng.integers(0, n_items, n).astype(np.int64),
        timestamp=1_700_000_000 + np.arange(n, dtype=np.int64),
        event=["purchase"] * n,
        quantity=np.ones(n, dtype=np.int64),
        price=np.full(n, np.nan),
    )
    dataset = Dataset([user_id(u) for u in range(n_users)], catalog, interactions)
    return dataset, Factors(user, item, bias, foldin)


def random_feeds(n_users: int, n_items: int, n_categories: int, batch: int) -> Feeds:
    """model.onnx's inputs for `batch` random known users, each excluding EXCLUDED random items,
    every category allowed, top TOP_K (the same for the same arguments)."""
    rng = np.random.default_rng(batch)
    return {
        "user_index": rng.integers(0, n_users, batch).astype(np.int64),
        "history_items": np.full((batch, 1), -1, dtype=np.int64),
        "exclude_items": rng.integers(0, n_items, (batch, EXCLUDED)).astype(np.int64),
        "category_mask": np.ones((batch, n_categories), dtype=np.float32),
        "k": np.array([TOP_K], dtype=np.int64),
    }


def eager_graph(n_items: int, n_users: int) -> tuple[Any, int]:
    """The graph of the version `cached(n_items, n_users)` holds, as a PyTorch module (the
    same factors: random_shop is seeded), and its number of categories."""
    # Imports torch: only where it is compared.
    from trainer.export import RecommenderGraph, item_categories

    dataset, factors = random_shop(n_items, n_users)
    item_category, n_categories = item_categories(dataset.catalog)
    return RecommenderGraph(factors, item_category).eval(), n_categories


def build(store: Path, n_items: int, n_users: int, seed: int = 0) -> Path:
    """Write one version into store (CURRENT points at it) and return its folder."""
    import torch

    from trainer.export import write_artifact  # imports torch: only where an artifact is built

    torch.set_num_threads(2)
    dataset, factors = random_shop(n_items, n_users, seed)
    counts = np.bincount(dataset.interactions.item_index, minlength=n_items)
    return write_artifact(
        store,
        dataset,
        factors,
        popularity=np.argsort(-counts, kind="stable").astype(np.int64),
        user_features={"order_count": [float(PURCHASES_PER_USER)] * n_users},
        metrics={},
        training={"factors": FACTORS, "seed": seed, "random": True},
        data={"source": f"bench/artifacts.py random factors, {n_items} items"},
    )


def cached(n_items: int, n_users: int, root: Path = CACHE) -> Path:
    """The store for this size, built on first use."""
    # The exporter's file, not the module: importing it imports torch, which the load
    # generator (bench.load imports this module for its ids) must run without.
    spec = importlib.util.find_spec("trainer.export")
    assert spec is not None and spec.origin is not None
    exporter = hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:12]
    store = root / f"items-{n_items}-users-{n_users}-export-{exporter}"
    try:
        current_version_dir(store)
    except ArtifactError:  # missing or half-built: build it afresh
        build(store, n_items, n_users)
    return store
