"""Shared fixtures: a tiny shop with two taste clusters, exported as a real model artifact."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from hypothesis import settings
from server_thread import ServerThread

from discount.v1 import discount_pb2_grpc
from trainer.dataset import Catalog, Dataset, Factors, Interactions

# CI (CI=true) runs every property test on the same examples each time: a red build then means a
# change broke something, and a newly found counterexample shows up in a developer's run instead.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

DIM = 4
T = TypeVar("T")
TASTES = ("garden", "kitchen")


@dataclass(frozen=True)
class TinyShop:
    """Users 0..n/2-1 like garden items, the rest kitchen items; the factors say exactly that,
    so the right answer of every recommendation is known."""

    dataset: Dataset
    factors: Factors
    taste_of_user: list[str]
    taste_of_item: list[str]


def make_tiny_shop(
    n_users: int = 40, n_items: int = 30, seed: int = 0, flip: bool = False
) -> TinyShop:
    """flip=True swaps which taste each user has: a second model version with other answers."""
    rng = np.random.default_rng(seed)
    item_taste = [TASTES[0] if i < n_items // 2 else TASTES[1] for i in range(n_items)]
    user_taste = [TASTES[0] if u < n_users // 2 else TASTES[1] for u in range(n_users)]
    if flip:
        user_taste = [TASTES[1] if t == TASTES[0] else TASTES[0] for t in user_taste]
    axis = {TASTES[0]: 0, TASTES[1]: 1}
    item = rng.normal(0.0, 0.05, (n_items, DIM)).astype(np.float32)
    for i, taste in enumerate(item_taste):
        item[i, axis[taste]] += 1.0
    user = rng.normal(0.0, 0.05, (n_users, DIM)).astype(np.float32)
    for u, taste in enumerate(user_taste):
        user[u, axis[taste]] += 2.0
    item_bias = rng.normal(0.0, 0.01, n_items).astype(np.float32)
    foldin = np.linalg.inv(item.T @ item + 0.1 * np.eye(DIM)).astype(np.float32)
    # Each user bought three items of their taste: these are the purchases the server excludes.
    users, items = [], []
    for u, taste in enumerate(user_taste):
        own = [i for i, t in enumerate(item_taste) if t == taste]
        for i in rng.choice(own, 3, replace=False):
            users.append(u)
            items.append(int(i))
    n = len(users)
    catalog = Catalog(
        item_ids=[f"{i:05d}" for i in range(n_items)],  # leading zeros: ids are strings
        categories=list(item_taste),
        titles=[f"{t} item {i}" for i, t in enumerate(item_taste)],
        prices=np.full(n_items, 10.0),
        costs=np.full(n_items, 6.0),
        cost_assumed=np.zeros(n_items, dtype=bool),
    )
    interactions = Interactions(
        user_index=np.array(users, dtype=np.int64),
        item_index=np.array(items, dtype=np.int64),
        timestamp=1_700_000_000 + np.arange(n, dtype=np.int64) * 3600,
        event=["purchase"] * n,
        quantity=np.ones(n, dtype=np.int64),
        price=np.full(n, np.nan),
    )
    dataset = Dataset([f"user-{u}" for u in range(n_users)], catalog, interactions)
    return TinyShop(
        dataset, Factors(user, item, item_bias, foldin), list(user_taste), list(item_taste)
    )


def write_tiny_artifact(store: Path, shop: TinyShop, make_current: bool = True) -> Path:
    from trainer.export import write_artifact  # imports torch: only where an artifact is built

    n_users = len(shop.dataset.user_ids)
    counts = np.bincount(shop.dataset.interactions.item_index, minlength=len(shop.dataset.catalog))
    return write_artifact(
        store,
        shop.dataset,
        shop.factors,
        popularity=np.argsort(-counts, kind="stable").astype(np.int64),
        user_features={"order_count": [3.0] * n_users},
        metrics={"ndcg@10": 0.5, "recall@10": 0.25},
        training={"factors": DIM, "seed": 0},
        data={"source": "tests/conftest.py tiny shop"},
        make_current=make_current,
    )


@pytest.fixture(scope="session")
def tiny_shop() -> TinyShop:
    return make_tiny_shop()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, tiny_shop: TinyShop) -> Path:
    """A model store holding one version of the tiny shop, with CURRENT pointing at it.
    Read-only for tests; copy it (shutil.copytree) to change it."""
    import torch

    torch.set_num_threads(1)
    store = tmp_path_factory.mktemp("model-store")
    write_tiny_artifact(store, tiny_shop)
    return store


# Store fixtures (SQLite and PostgreSQL backends) live in tests/pg.py.
pytest_plugins = ["pg"]


@pytest.fixture(scope="session")
def flipped_version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, different version of the tiny shop (every user's taste swapped), not current.
    Copy it into a store to test switching versions."""
    store = tmp_path_factory.mktemp("flipped-store")
    return write_tiny_artifact(store, make_tiny_shop(flip=True), make_current=False)


class RunningServer(ServerThread):
    """A real discountd on a model store, not waiting for its first load (tests watch health go
    from NOT_SERVING to SERVING), with a channel and stub."""

    def __init__(self, model_dir: Path, poll_interval: float = 0.0, **settings: Any) -> None:
        from server.settings import Settings

        resolved = Settings(
            model_dir=model_dir,
            device="cpu",
            host="127.0.0.1",
            port=0,
            poll_interval=poll_interval,
            **settings,
        )
        super().__init__(resolved, wait_loaded=False)
        self.channel = grpc.insecure_channel(self.target)
        self.stub = discount_pb2_grpc.DiscountServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        super().close()


@pytest.fixture
def serve() -> Iterator[Callable[..., RunningServer]]:
    """Start servers on given model dirs; all are stopped after the test."""
    started: list[RunningServer] = []

    def start(model_dir: Path, poll_interval: float = 0.0, **settings: Any) -> RunningServer:
        running = RunningServer(model_dir, poll_interval, **settings)
        started.append(running)
        return running

    yield start
    for running in started:
        running.close()
