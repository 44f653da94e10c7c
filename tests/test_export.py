"""ONNX export and the model artifact: graph semantics, parity with PyTorch, the sealed layout."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from core.artifact import CURRENT, load_manifest, set_current
from core.catalog import category_vocabulary
from tests.conftest import TinyShop, make_tiny_shop
from trainer.dataset import Factors
from trainer.export import (
    BLOCKED,
    INPUT_NAMES,
    MAX_CATEGORIES_IN_GEMM,
    OUTPUT_NAMES,
    TOP_K_BLOCK,
    TWO_STAGE_MIN_ITEMS,
    RecommenderGraph,
    export_onnx,
    export_score_onnx,
    write_artifact,
)

N_CATEGORIES = 2


@pytest.fixture(scope="module")
def version_dir(model_store: Path) -> Path:
    return model_store / (model_store / CURRENT).read_text().strip()


@pytest.fixture(scope="module")
def session(version_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def score_session(version_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(version_dir / "score.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def graph(tiny_shop: TinyShop) -> RecommenderGraph:
    categories = tiny_shop.dataset.catalog.categories
    vocabulary = category_vocabulary(categories)
    item_category = np.array([vocabulary.index(c) for c in categories], dtype=np.int64)
    return RecommenderGraph(tiny_shop.factors, item_category).eval()


def run(session: ort.InferenceSession, inputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    items, scores = session.run(OUTPUT_NAMES, dict(zip(INPUT_NAMES, inputs, strict=True)))
    return items, scores


def run_both(
    session: ort.InferenceSession, graph: RecommenderGraph, inputs: list[np.ndarray]
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    items, scores = run(session, inputs)
    with torch.no_grad():
        t_items, t_scores = graph(*(torch.from_numpy(a) for a in inputs))
    return (items, scores), (t_items.numpy(), t_scores.numpy())


def feed(
    user_index: list[int],
    history: list[list[int]] | None = None,
    exclude: list[list[int]] | None = None,
    mask: list[list[float]] | None = None,
    k: int = 10,
) -> list[np.ndarray]:
    batch = len(user_index)
    return [
        np.array(user_index, dtype=np.int64),
        np.array(history or [[-1]] * batch, dtype=np.int64),
        np.array(exclude or [[-1]] * batch, dtype=np.int64),
        np.array(mask or [[1.0] * N_CATEGORIES] * batch, dtype=np.float32),
        np.array([k], dtype=np.int64),
    ]


def test_artifact_is_sealed_complete_and_current(model_store: Path, version_dir: Path) -> None:
    manifest = load_manifest(version_dir)
    assert manifest.version == version_dir.name
    assert (manifest.n_users, manifest.n_items, manifest.n_categories) == (40, 30, 2)
    assert set(manifest.files) == {
        "model.onnx",
        "score.onnx",
        "users.json",
        "items.json",
        "popularity.json",
        "user_history.npz",
        "user_features.json",
    }
    assert manifest.metrics == {"ndcg@10": 0.5, "recall@10": 0.25}
    assert not [p for p in model_store.iterdir() if p.name.startswith(".")], "staging left behind"
    items = json.loads((version_dir / "items.json").read_text())
    assert items["item_id"][:2] == ["00000", "00001"]
    features = json.loads((version_dir / "user_features.json").read_text())
    assert features["columns"] == ["order_count"] and len(features["rows"]) == 40


def test_concurrent_switches_of_current_never_fail_or_tear(tmp_path: Path) -> None:
    """A trainer and `discountctl models promote` may point one store's CURRENT at once: each
    switch succeeds, and a reader only ever sees a whole version name."""
    errors: list[BaseException] = []
    seen: set[str] = set()

    def switch(version: str) -> None:
        for _ in range(500):
            try:
                set_current(tmp_path, version)
            except OSError as e:
                errors.append(e)

    def read() -> None:
        for _ in range(1000):
            with contextlib.suppress(FileNotFoundError):
                seen.add((tmp_path / CURRENT).read_text())

    threads = [threading.Thread(target=switch, args=(v,)) for v in ("v1", "v2")]
    threads.append(threading.Thread(target=read))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert seen <= {"v1\n", "v2\n"}
    assert [p.name for p in tmp_path.iterdir()] == [CURRENT]


def test_user_history_holds_each_users_purchases(tiny_shop: TinyShop, version_dir: Path) -> None:
    history = np.load(version_dir / "user_history.npz")
    indptr, indices = history["indptr"], history["indices"]
    inter = tiny_shop.dataset.interactions
    for user in range(len(tiny_shop.dataset.user_ids)):
        bought = sorted(set(inter.item_index[inter.user_index == user].tolist()))
        assert indices[indptr[user] : indptr[user + 1]].tolist() == bought


def test_graph_passes_the_full_onnx_check_with_the_contract_signature(
    version_dir: Path, session: ort.InferenceSession
) -> None:
    onnx.checker.check_model(onnx.load(str(version_dir / "model.onnx")), full_check=True)
    signature = load_manifest(version_dir).signature()
    assert [(i.name, i.type, i.shape) for i in session.get_inputs()] == [
        (i["name"], f"tensor({'float' if i['type'] == 'float32' else i['type']})", i["shape"])
        for i in signature["inputs"]
    ]
    assert [o.name for o in session.get_outputs()] == OUTPUT_NAMES


def test_the_same_factors_export_to_the_same_bytes(
    version_dir: Path, tiny_shop: TinyShop, tmp_path: Path
) -> None:
    """Wherever and however often they are exported: no exporter's stack traces (this
    checkout's paths) and no per-process counters in the graph."""
    categories = tiny_shop.dataset.catalog.categories
    vocabulary = category_vocabulary(categories)
    item_category = np.array([vocabulary.index(c) for c in categories], dtype=np.int64)
    export_onnx(tiny_shop.factors, item_category, len(vocabulary), tmp_path / "model.onnx")
    export_score_onnx(tiny_shop.factors, item_category, tmp_path / "score.onnx")
    for graph in ("model.onnx", "score.onnx"):
        exported = (version_dir / graph).read_bytes()
        assert b"trainer/export.py" not in exported
        assert (tmp_path / graph).read_bytes() == exported, graph


def test_only_a_batch_that_filters_categories_multiplies_by_them(version_dir: Path) -> None:
    """The category one-hot is read inside the If's filtering branch alone: a batch with no
    category filtered scores with a GEMM over the factors and the bias only."""
    graph = onnx.load(str(version_dir / "model.onnx")).graph
    onehot = [t.name for t in graph.initializer if 2 in t.dims and 30 in t.dims]
    (branching,) = [n for n in graph.node if n.op_type == "If"]
    branches = {a.name: {i for n in a.g.node for i in n.input} for a in branching.attribute}
    top_level = {i for n in graph.node for i in n.input}
    assert len(onehot) == 1 and onehot[0] not in top_level | branches["else_branch"]


@settings(max_examples=40, deadline=None)
@given(
    users=hnp.arrays(np.int64, st.integers(1, 6), elements=st.integers(-1, 39)),
    history_len=st.integers(0, 6),
    exclude_len=st.integers(0, 6),
    k=st.integers(1, 40),
    data=st.data(),
)
def test_onnx_runtime_matches_pytorch(
    session: ort.InferenceSession,
    graph: RecommenderGraph,
    users: np.ndarray,
    history_len: int,
    exclude_len: int,
    k: int,
    data: st.DataObject,
) -> None:
    batch = len(users)
    items_in = hnp.arrays(np.int64, (batch, history_len), elements=st.integers(-1, 29))
    excl_in = hnp.arrays(np.int64, (batch, exclude_len), elements=st.integers(-1, 29))
    mask_in = hnp.arrays(np.float32, (batch, N_CATEGORIES), elements=st.sampled_from([0.0, 1.0]))
    inputs = [
        users,
        data.draw(items_in),
        data.draw(excl_in),
        data.draw(mask_in),
        np.array([k], dtype=np.int64),
    ]
    (items, scores), (t_items, t_scores) = run_both(session, graph, inputs)
    assert items.shape == (batch, min(k, 30))
    finite = np.isfinite(t_scores)
    assert np.array_equal(finite, np.isfinite(scores))
    np.testing.assert_allclose(scores[finite], t_scores[finite], atol=1e-4)
    assert np.array_equal(items[finite], t_items[finite])


def test_excluded_and_masked_items_are_never_returned(session: ort.InferenceSession) -> None:
    excluded = [0, 1, 2, 3, -1, 3]
    only_kitchen = [[0.0, 1.0]]  # vocabulary is sorted: garden, kitchen
    items, scores = run(session, feed([0], exclude=[excluded], k=30))
    returned = items[0][np.isfinite(scores[0])].tolist()
    assert len(returned) == 26 and not set(returned) & {0, 1, 2, 3}
    items, scores = run(session, feed([0], mask=only_kitchen, k=30))
    assert sorted(items[0][np.isfinite(scores[0])].tolist()) == list(range(15, 30))


def test_unseen_user_is_folded_in_from_history(
    session: ort.InferenceSession, tiny_shop: TinyShop
) -> None:
    garden_history = [[0, 4, 7, -1]]
    kitchen_history = [[20, 25, -1, -1]]
    items, _ = run(session, feed([-1, -1], history=garden_history + kitchen_history, k=5))
    assert {tiny_shop.taste_of_item[i] for i in items[0]} == {"garden"}
    assert {tiny_shop.taste_of_item[i] for i in items[1]} == {"kitchen"}


def test_known_users_get_their_taste(session: ort.InferenceSession, tiny_shop: TinyShop) -> None:
    items, _ = run(session, feed([0, 39], k=10))
    assert {tiny_shop.taste_of_item[i] for i in items[0]} == {tiny_shop.taste_of_user[0]}
    assert {tiny_shop.taste_of_item[i] for i in items[1]} == {tiny_shop.taste_of_user[39]}


def test_write_artifact_refuses_factors_that_do_not_fit_the_dataset(tmp_path: Path) -> None:
    shop = make_tiny_shop()
    small = make_tiny_shop(n_users=10)
    with pytest.raises(ValueError, match=r"factors\.user has shape \(10, 4\), expected \(40, 4\)"):
        write_artifact(
            tmp_path,
            shop.dataset,
            small.factors,
            popularity=np.arange(30),
            user_features={},
            metrics={},
            training={},
            data={},
        )
    assert list(tmp_path.iterdir()) == []


def test_a_batch_answers_as_each_user_would_alone(session: ort.InferenceSession) -> None:
    users = [0, 5, -1, 39, -1]
    history = [[-1, -1], [-1, -1], [3, 4], [-1, -1], [22, -1]]
    exclude = [[1, -1], [-1, -1], [3, -1], [25, 26], [-1, -1]]
    masks = [[1.0, 1.0], [0.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]]
    items, scores = run(session, feed(users, history, exclude, masks, k=8))
    for row in range(len(users)):
        alone_items, alone_scores = run(
            session, feed([users[row]], [history[row]], [exclude[row]], [masks[row]], k=8)
        )
        assert alone_items[0].tolist() == items[row].tolist()
        np.testing.assert_allclose(alone_scores[0], scores[row], atol=1e-6)


def test_score_graph_passes_the_full_onnx_check_with_the_contract_signature(
    version_dir: Path, score_session: ort.InferenceSession
) -> None:
    onnx.checker.check_model(onnx.load(str(version_dir / "score.onnx")), full_check=True)
    signature = load_manifest(version_dir).signature()["score"]
    assert [(i.name, i.shape) for i in score_session.get_inputs()] == [
        (i["name"], i["shape"]) for i in signature["inputs"]
    ]
    assert [o.name for o in score_session.get_outputs()] == ["item_scores"]


@settings(max_examples=40, deadline=None)
@given(
    users=hnp.arrays(np.int64, st.integers(1, 5), elements=st.integers(-1, 39)),
    history_len=st.integers(1, 5),
    named_len=st.integers(0, 8),
    data=st.data(),
)
def test_named_item_scores_are_the_top_k_graphs_scores(
    session: ort.InferenceSession,
    score_session: ort.InferenceSession,
    users: np.ndarray,
    history_len: int,
    named_len: int,
    data: st.DataObject,
) -> None:
    """GetOffers ranks named items with score.onnx: every finite score must be the one the
    top-k graph gives that item unfiltered, and padding must score -inf."""
    batch = len(users)
    history = data.draw(hnp.arrays(np.int64, (batch, history_len), elements=st.integers(-1, 29)))
    named = data.draw(hnp.arrays(np.int64, (batch, named_len), elements=st.integers(-1, 29)))
    (scores,) = score_session.run(
        None, {"user_index": users, "history_items": history, "items": named}
    )
    items, top = run(session, feed(users.tolist(), history.tolist(), k=30))
    full = np.full((batch, 30), np.nan, dtype=np.float32)
    np.put_along_axis(full, items, top, axis=1)
    expected = np.where(named >= 0, np.take_along_axis(full, named.clip(min=0), axis=1), -np.inf)
    assert scores.shape == (batch, named_len)
    np.testing.assert_allclose(scores, expected, atol=1e-5)


MANY = MAX_CATEGORIES_IN_GEMM + 22  # categories of a catalog whose filter is gathered per item


@pytest.fixture(scope="module")
def many_categories(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Factors, np.ndarray, ort.InferenceSession, onnx.ModelProto]:
    """A 400-item catalog in MANY categories, exported (with the exporter's own parity check)."""
    rng = np.random.default_rng(3)
    n_items, n_users, dim = 400, 20, 8
    item = rng.normal(0.0, 1.0, (n_items, dim)).astype(np.float32)
    factors = Factors(
        rng.normal(0.0, 1.0, (n_users, dim)).astype(np.float32),
        item,
        rng.normal(0.0, 0.1, n_items).astype(np.float32),
        np.linalg.inv(item.T @ item + np.eye(dim)).astype(np.float32),
    )
    item_category = rng.integers(0, MANY, n_items)
    item_category[:MANY] = np.arange(MANY)  # every category has an item
    path = tmp_path_factory.mktemp("many") / "model.onnx"
    export_onnx(factors, item_category, MANY, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return factors, item_category, session, onnx.load(str(path))


def test_many_categories_do_not_widen_the_item_rows(
    many_categories: tuple[Factors, np.ndarray, ort.InferenceSession, onnx.ModelProto],
) -> None:
    """Past MAX_CATEGORIES_IN_GEMM the graph holds a category per item, not a one-hot column
    per category: the model stays the size of its factors."""
    factors, _, _, model = many_categories
    shapes = [tuple(t.dims) for t in model.graph.initializer]
    n_items, dim = factors.item.shape
    assert {(n_items, dim + 1), (dim + 1, n_items)} & set(shapes)
    assert not [s for s in shapes if dim + 1 + MANY in s]


@settings(max_examples=40, deadline=None)
@given(
    users=hnp.arrays(np.int64, st.integers(1, 6), elements=st.integers(0, 19)),
    k=st.integers(1, 50),
    data=st.data(),
)
def test_many_categories_filter_and_rank_as_the_reference(
    many_categories: tuple[Factors, np.ndarray, ort.InferenceSession, onnx.ModelProto],
    users: np.ndarray,
    k: int,
    data: st.DataObject,
) -> None:
    factors, item_category, session, _ = many_categories
    batch = len(users)
    mask = data.draw(hnp.arrays(np.float32, (batch, MANY), elements=st.sampled_from([0.0, 1.0])))
    exclude = data.draw(hnp.arrays(np.int64, (batch, 5), elements=st.integers(-1, 399)))
    items, scores = session.run(
        OUTPUT_NAMES,
        dict(
            zip(
                INPUT_NAMES,
                [users, np.full((batch, 1), -1), exclude, mask, np.array([k])],
                strict=True,
            )
        ),
    )
    expected = factors.user[users] @ factors.item.T + factors.item_bias
    expected[mask[:, item_category] == 0] = -np.inf
    for row in range(batch):
        expected[row, exclude[row][exclude[row] >= 0]] = -np.inf
    order = np.argsort(-expected, axis=1, kind="stable")[:, :k]
    want = np.take_along_axis(expected, order, axis=1)
    finite = np.isfinite(want)
    assert np.array_equal(np.isfinite(scores), finite)
    assert np.array_equal(items[finite], order[finite])
    np.testing.assert_allclose(scores[finite], want[finite], rtol=1e-5, atol=1e-5)


LARGE = TWO_STAGE_MIN_ITEMS + 37  # a large catalog, not a whole number of top-k blocks


@pytest.fixture(scope="module")
def large_catalog(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Factors, np.ndarray, ort.InferenceSession]:
    """A catalog that takes its top k in two stages, with small integer factors: every score
    is an exact small integer in NumPy and in ONNX Runtime alike, so scores tie all over the
    catalog, within blocks and across them."""
    rng = np.random.default_rng(5)
    dim, n_users = 4, 20
    item = rng.integers(-2, 3, (LARGE, dim)).astype(np.float32)
    factors = Factors(
        rng.integers(-2, 3, (n_users, dim)).astype(np.float32),
        item,
        rng.integers(-3, 4, LARGE).astype(np.float32),
        np.linalg.inv(item.T @ item + np.eye(dim)).astype(np.float32),
    )
    item_category = rng.integers(0, 3, LARGE)
    assert RecommenderGraph(factors, item_category).two_stage
    path = tmp_path_factory.mktemp("large") / "model.onnx"
    export_onnx(factors, item_category, 3, path)
    return (
        factors,
        item_category,
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]),
    )


@settings(max_examples=40, deadline=None)
@given(
    users=hnp.arrays(np.int64, st.integers(1, 4), elements=st.integers(0, 19)),
    # Few items, or nearly the whole catalog (down to its excluded items, and past its end).
    k=st.one_of(
        st.integers(1, 3 * TOP_K_BLOCK), st.integers(LARGE - 300, LARGE), st.just(LARGE + 10)
    ),
    data=st.data(),
)
def test_two_stage_top_k_is_one_top_k_ties_and_all(
    large_catalog: tuple[Factors, np.ndarray, ort.InferenceSession],
    users: np.ndarray,
    k: int,
    data: st.DataObject,
) -> None:
    """The same items in the same order as one stable sort of the whole catalog: higher score
    first, the lower index among equal scores, filtered items (BLOCKED) after every other and
    excluded ones (-inf) last; never a padding item."""
    factors, item_category, session = large_catalog
    batch = len(users)
    mask = data.draw(hnp.arrays(np.float32, (batch, 3), elements=st.sampled_from([0.0, 1.0])))
    exclude = data.draw(hnp.arrays(np.int64, (batch, 40), elements=st.integers(-1, LARGE - 1)))
    feeds = [users, np.full((batch, 1), -1), exclude, mask, np.array([k])]
    items, scores = session.run(OUTPUT_NAMES, dict(zip(INPUT_NAMES, feeds, strict=True)))
    expected = factors.user[users] @ factors.item.T + factors.item_bias
    expected[mask[:, item_category] == 0] = BLOCKED
    for row in range(batch):
        expected[row, exclude[row][exclude[row] >= 0]] = -np.inf
    order = np.argsort(-expected, axis=1, kind="stable")[:, : min(k, LARGE)]
    want = np.take_along_axis(expected, order, axis=1)
    assert np.array_equal(items, order)
    assert np.array_equal(scores, np.where(want > BLOCKED / 2, want, -np.inf))
