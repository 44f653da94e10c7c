"""Export a trained factor model to ONNX and write a sealed, versioned model artifact.

model.onnx follows core.artifact.MODEL_INPUTS / MODEL_OUTPUTS: the user vector, scoring,
exclusions, the category filter and top-k all run inside it, so the server only feeds indices.
score.onnx (SCORE_INPUTS / SCORE_OUTPUTS) scores named items with the same user vector.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from core.artifact import (
    MODEL_INPUTS,
    MODEL_OUTPUTS,
    SCORE_INPUTS,
    SCORE_OUTPUTS,
    Manifest,
    Signature,
    seal,
    set_current,
)
from core.catalog import category_vocabulary
from trainer.dataset import Catalog, Dataset, Factors, Ints

INPUT_NAMES = [name for name, _, _ in MODEL_INPUTS]
OUTPUT_NAMES = [name for name, _, _ in MODEL_OUTPUTS]
SCORE_TOLERANCE = 1e-4


class ExportError(Exception):
    """The exported graph failed the ONNX checker or disagrees with PyTorch."""


# A blocked category's penalty: finite, because it is multiplied inside the filter's GEMM
# (where 0 · -inf would be NaN), and far below any real score; top-k turns it into -inf.
BLOCKED = -1e30
# Up to this many categories the category filter is one more GEMM over a one-hot column per
# category; past it, a per-item gather costs less than the columns. Measured when the columns
# still sat in the score GEMM (one ORT thread, 100k items, batch 16): 20 categories 6.1 ms
# against 10.6 ms gathered, 128 about even (9.0 against 9.4 ms), 300 categories 20.9 against
# 8.5 ms and a model file five times the size.
MAX_CATEGORIES_IN_GEMM = 128
# Catalogs of at least TWO_STAGE_MIN_ITEMS items take their top k in two stages: the largest
# score of each block of TOP_K_BLOCK items, the k blocks with the largest, then the top k of
# those blocks' items (RecommenderGraph._top_k). One top-k over 100k items cost as much as half
# the score GEMM (ONNX Runtime, one thread, batch 16: 0.96 ms against 1.63); the block maxima
# and the two small top-ks cost ~0.4 ms.
TOP_K_BLOCK = 128
TWO_STAGE_MIN_ITEMS = 4096


class RecommenderGraph(nn.Module):
    """score(u, i) = user[u]·item[i] + item_bias[i], filtered, then top-k.

    An unseen user (index -1) gets the least-squares fold-in vector foldin @ Σ item[h] over its
    history items, so cold-start users go through the same graph as known ones.

    The item bias rides in the score GEMM: each item row carries it after its factors and the
    user side carries 1 for it (as the GEMM's addend it cost a broadcast copy of the batch ×
    catalog scores first: runs of 16 and 32 users were 11-14% slower).

    The category filter costs only the batches that filter (an If in ONNX): the user side
    carries BLOCKED for each category a caller filters out, times a one-hot of the item's
    category (MAX_CATEGORIES_IN_GEMM categories at most; past that, gathered per item), added
    to the scores. In the score GEMM itself, as it once was, its columns made every batch
    20% slower at 100k items and 20 categories (65 columns against 85).
    """

    user: Tensor
    item_rows: Tensor  # items (padded to whole blocks) × (factors + 1): factors, then the bias
    item_bias: Tensor
    foldin: Tensor
    item_onehot: Tensor | None  # items × categories, up to MAX_CATEGORIES_IN_GEMM
    item_category: Tensor | None  # set when the filter is gathered instead

    def __init__(self, factors: Factors, item_category: Ints) -> None:
        super().__init__()
        self.n_items, self.n_factors = factors.item.shape
        self.two_stage = self.n_items >= TWO_STAGE_MIN_ITEMS
        # Two stages need whole blocks: padding items score -inf (a -inf bias), so they rank
        # after every real item, excluded ones included, and are never returned.
        padding = -self.n_items % TOP_K_BLOCK if self.two_stage else 0
        item_rows = np.hstack([factors.item, factors.item_bias[:, None]])
        item_rows = np.pad(item_rows, ((0, padding), (0, 0)))
        item_rows[self.n_items :, -1] = -np.inf
        item_category = np.pad(item_category, (0, padding))
        n_categories = int(item_category.max(initial=0)) + 1
        if n_categories <= MAX_CATEGORIES_IN_GEMM:
            onehot = np.eye(n_categories, dtype=np.float32)[item_category]
            self.register_buffer("item_onehot", torch.from_numpy(onehot))
            self.item_category = None
        else:
            self.item_onehot = None
            self.register_buffer("item_category", torch.from_numpy(item_category.astype(np.int64)))
        for name, array in (
            ("user", factors.user),
            ("item_rows", item_rows),
            ("item_bias", factors.item_bias),
            ("foldin", factors.foldin),
        ):
            self.register_buffer(name, torch.from_numpy(np.ascontiguousarray(array, np.float32)))

    def forward(
        self,
        user_index: Tensor,
        history_items: Tensor,
        exclude_items: Tensor,
        category_mask: Tensor,
        k: Tensor,
    ) -> tuple[Tensor, Tensor]:
        scores = self.catalog_scores(user_index, history_items, exclude_items, category_mask)
        # cast, not int(): int() makes torch.export guard on the data-dependent k (and print
        # the whole graph while doing so); .item() already yields an unbacked SymInt.
        count = cast(int, torch.clamp(k, max=self.n_items).item())
        top_scores, top_items = self._top_k(scores, count)
        return top_items, torch.where(top_scores > BLOCKED / 2, top_scores, float("-inf"))

    def catalog_scores(
        self,
        user_index: Tensor,
        history_items: Tensor,
        exclude_items: Tensor,
        category_mask: Tensor,
    ) -> Tensor:
        """Every item's score for each row, filtered (BLOCKED) and excluded (-inf); padding
        items, after the catalog's, score -inf."""
        vector = self.user_vector(user_index, history_items)
        user_side = torch.cat([vector, torch.ones_like(vector[:, :1])], dim=1)
        blocked = torch.where(category_mask > 0, 0.0, BLOCKED)
        # The buffers go in as operands, transposed once: each branch transposing its own
        # would hand torch.cond two views of one tensor, which it refuses.
        item_filter = self.item_category if self.item_onehot is None else self.item_onehot.T
        assert item_filter is not None
        scores: Tensor = torch.cond(
            blocked.ne(0).any(),
            self._filtered_scores,
            self._scores,
            (user_side, blocked, self.item_rows.T, item_filter),
        )
        # scatter_add rather than scatter: padding and repeats hit the same slot, and scatter
        # with duplicate indices has no defined winner. Padding (-1) adds 0.
        excluded = torch.where(exclude_items >= 0, float("-inf"), 0.0)
        return scores.scatter_add(1, exclude_items.clamp(min=0), excluded)

    def _top_k(self, scores: Tensor, count: int) -> tuple[Tensor, Tensor]:
        """torch.topk over the catalog, in two stages for a large one. Exact, ties included:
        an item of the top k outranks every item of a block whose maximum is below it, so its
        block is among the count blocks with the largest maxima (ties between blocks go to
        the lower block, whose items have the lower indices); taken in catalog order, the
        blocks' items keep one top-k's preference for the lower index. (ONNX's TopK prefers
        the lower index among equal scores, so padding items, which tie with excluded ones at
        -inf, are never returned; PyTorch's topk promises no order among ties, and discountd
        drops every -inf result before it names an item.)"""
        if not self.two_stage:
            return torch.topk(scores, count, dim=1)
        rows, blocks = scores.shape[0], scores.shape[1] // TOP_K_BLOCK
        maxima = scores.reshape(rows, blocks, TOP_K_BLOCK).amax(dim=2)
        # sym_min, not min(): count is data-dependent, and comparing it would make export guard.
        n_blocks = cast(int, torch.sym_min(count, blocks))  # type: ignore[no-untyped-call]
        _, chosen = torch.topk(maxima, n_blocks, dim=1)
        chosen = torch.sort(chosen, dim=1).values
        flat = chosen + torch.arange(rows, device=chosen.device).unsqueeze(1) * blocks
        candidates = scores.reshape(rows * blocks, TOP_K_BLOCK)[flat].reshape(rows, -1)
        top_scores, at = torch.topk(candidates, count, dim=1)
        items = chosen.gather(1, at // TOP_K_BLOCK) * TOP_K_BLOCK + at % TOP_K_BLOCK
        return top_scores, items

    def _scores(
        self, user_side: Tensor, blocked: Tensor, rows_t: Tensor, item_filter: Tensor
    ) -> Tensor:
        return user_side @ rows_t

    def _filtered_scores(
        self, user_side: Tensor, blocked: Tensor, rows_t: Tensor, item_filter: Tensor
    ) -> Tensor:
        """The scores plus BLOCKED for each item of a category the row filters out;
        item_filter is the one-hot's transpose, or each item's category."""
        if self.item_onehot is not None:
            return user_side @ rows_t + blocked @ item_filter
        # Rows of the transposed mask, not columns of the mask: a gather along the last axis
        # copies element by element (16 ms at batch 16 and 100k items, against ~3).
        return user_side @ rows_t + blocked.T[item_filter].T

    def factors_of(self, items: Tensor) -> Tensor:
        """Item factor rows of these indices (any shape), without the bias column."""
        return self.item_rows[items][..., : self.n_factors]

    def user_vector(self, user_index: Tensor, history_items: Tensor) -> Tensor:
        known = (user_index >= 0).unsqueeze(-1)
        trained = self.user[user_index.clamp(min=0)]
        # Padding (-1) is clamped to a real index, then zeroed out by the weight.
        weight = (history_items >= 0).unsqueeze(-1).to(self.item_rows.dtype)
        history_sum = (self.factors_of(history_items.clamp(min=0)) * weight).sum(dim=1)
        folded = history_sum @ self.foldin.T
        return torch.where(known, trained, folded)


class ScoreGraph(RecommenderGraph):
    """The scores RecommenderGraph gives the named items (-1 pads and scores -inf), with no
    filter and no sort: what GetOffers needs to rank the items a page shows."""

    def forward(  # type: ignore[override]
        self, user_index: Tensor, history_items: Tensor, items: Tensor
    ) -> Tensor:
        vector = self.user_vector(user_index, history_items)
        named = items.clamp(min=0)
        scores = torch.bmm(self.factors_of(named), vector.unsqueeze(-1)).squeeze(-1)
        scores = scores + self.item_bias[named]
        return torch.where(items >= 0, scores, float("-inf"))


def item_categories(catalog: Catalog) -> tuple[Ints, int]:
    """Each item's index in the category vocabulary the server builds too, and its size."""
    vocabulary = category_vocabulary(catalog.categories)
    position = {name: i for i, name in enumerate(vocabulary)}
    return np.array([position[c] for c in catalog.categories], dtype=np.int64), len(vocabulary)


def export_onnx(factors: Factors, item_category: Ints, n_categories: int, path: Path) -> None:
    """Export the top-k graph to path, pass the full ONNX check, and prove parity with ONNX
    Runtime."""
    module = RecommenderGraph(factors, item_category).eval()
    example = _example_inputs(factors, n_categories, batch=4, seed=0)
    batch = torch.export.Dim("batch")
    dynamic = {
        "user_index": {0: batch},
        "history_items": {0: batch, 1: torch.export.Dim("history")},
        "exclude_items": {0: batch, 1: torch.export.Dim("excluded")},
        "category_mask": {0: batch},
        "k": None,
    }
    export_checked(module, example, path, MODEL_INPUTS, MODEL_OUTPUTS, dynamic)
    check_parity(module, path, factors, n_categories)


def export_score_onnx(factors: Factors, item_category: Ints, path: Path) -> None:
    """Export the named-item graph to path, pass the full ONNX check, and prove parity with
    PyTorch's scores."""
    module = ScoreGraph(factors, item_category).eval()
    batch = torch.export.Dim("batch")
    dynamic = {
        "user_index": {0: batch},
        "history_items": {0: batch, 1: torch.export.Dim("history")},
        "items": {0: batch, 1: torch.export.Dim("candidates")},
    }
    export_checked(
        module, _score_inputs(factors, batch=4, seed=0), path, SCORE_INPUTS, SCORE_OUTPUTS, dynamic
    )
    check_score_parity(module, path, factors)


def check_score_parity(module: ScoreGraph, path: Path, factors: Factors, rows: int = 64) -> None:
    """ONNX Runtime's named-item scores against PyTorch's full score rows, read at those items:
    the same -inf padding, and finite scores within SCORE_TOLERANCE."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    user_index, history, items = _score_inputs(factors, batch=rows, seed=1)
    names = [name for name, _, _ in SCORE_INPUTS]
    (onnx_scores,) = session.run(None, dict(zip(names, (user_index, history, items), strict=True)))
    with torch.no_grad():
        vector = module.user_vector(torch.from_numpy(user_index), torch.from_numpy(history))
        item = module.item_rows[: module.n_items, : module.n_factors]
        full = (vector @ item.T + module.item_bias).numpy()
    expected = np.where(items >= 0, np.take_along_axis(full, items.clip(min=0), axis=1), -np.inf)
    finite = np.isfinite(expected)
    if onnx_scores.shape != expected.shape or not np.array_equal(finite, np.isfinite(onnx_scores)):
        raise ExportError("score.onnx pads differently from PyTorch")
    max_diff = float(np.abs(onnx_scores[finite] - expected[finite]).max(initial=0.0))
    if max_diff > SCORE_TOLERANCE:
        raise ExportError(f"score.onnx differs from PyTorch by up to {max_diff:.2e}")


def check_parity(
    module: RecommenderGraph, path: Path, factors: Factors, n_categories: int, rows: int = 64
) -> None:
    """Run random users (trained and folded-in, with exclusions and category masks) through
    PyTorch and ONNX Runtime, once with some categories filtered out and once with none (the
    graph's two branches); the top-k must agree and scores stay within SCORE_TOLERANCE."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    filtered = _example_inputs(factors, n_categories, batch=rows, seed=1)
    unfiltered = [*filtered[:3], np.ones_like(filtered[3]), filtered[4]]
    max_diff = 0.0
    for inputs in (filtered, unfiltered):
        feeds = dict(zip(INPUT_NAMES, inputs, strict=True))
        onnx_items, onnx_scores = session.run(OUTPUT_NAMES, feeds)
        with torch.no_grad():
            torch_inputs = [torch.from_numpy(a) for a in inputs]
            torch_items, torch_scores = (t.numpy() for t in module(*torch_inputs))
            all_scores = _full_scores(module, torch_inputs)
        if onnx_items.shape != torch_items.shape:
            raise ExportError(f"ONNX returns shape {onnx_items.shape}, PyTorch {torch_items.shape}")
        finite = np.isfinite(torch_scores)
        if not np.array_equal(finite, np.isfinite(onnx_scores)):
            raise ExportError("ONNX and PyTorch disagree on which results are filtered out")
        diff = np.abs(onnx_scores[finite] - torch_scores[finite])
        max_diff = max(max_diff, float(diff.max()) if diff.size else 0.0)
        if max_diff > SCORE_TOLERANCE:
            raise ExportError(f"ONNX scores differ from PyTorch by up to {max_diff:.2e}")
        # A different item at a position is only a tie: its PyTorch score must match there.
        at_same = onnx_items == torch_items
        rows_idx = np.nonzero(finite & ~at_same)
        picked = all_scores[rows_idx[0], onnx_items[rows_idx]]
        if np.any(np.abs(picked - torch_scores[rows_idx]) > SCORE_TOLERANCE):
            raise ExportError("ONNX top-k items differ from PyTorch's beyond ties")


def _full_scores(module: RecommenderGraph, inputs: list[Tensor]) -> np.ndarray[Any, Any]:
    scores = module.catalog_scores(*inputs[:4])[:, : module.n_items]
    # As the graph's outputs have them: filtered items at -inf.
    return torch.where(scores > BLOCKED / 2, scores, float("-inf")).numpy()


def _example_inputs(
    factors: Factors, n_categories: int, *, batch: int, seed: int
) -> list[np.ndarray[Any, Any]]:
    """Half trained users, half unseen users with a history; random exclusions and masks."""
    rng = np.random.default_rng(seed)
    n_users, n_items = factors.user.shape[0], factors.item.shape[0]
    user_index = rng.integers(0, max(n_users, 1), batch).astype(np.int64)
    user_index[batch // 2 :] = -1
    if n_users == 0:
        user_index[:] = -1
    history = rng.integers(0, n_items, (batch, 5)).astype(np.int64)
    history[rng.random(history.shape) < 0.3] = -1
    exclude = rng.integers(0, n_items, (batch, 3)).astype(np.int64)
    exclude[rng.random(exclude.shape) < 0.3] = -1
    mask = (rng.random((batch, n_categories)) < 0.7).astype(np.float32)
    mask[: batch // 4] = 1.0
    k = np.array([min(10, n_items)], dtype=np.int64)
    return [user_index, history, exclude, mask, k]


def _score_inputs(factors: Factors, *, batch: int, seed: int) -> list[np.ndarray[Any, Any]]:
    """The top-k graph's users and histories, with random named items and some padding."""
    user_index, history, *_ = _example_inputs(factors, 1, batch=batch, seed=seed)
    rng = np.random.default_rng(seed + 100)
    items = rng.integers(0, factors.item.shape[0], (batch, 7)).astype(np.int64)
    items[rng.random(items.shape) < 0.2] = -1
    return [user_index, history, items]


def export_checked(
    module: nn.Module,
    example: Sequence[np.ndarray[Any, Any]],
    path: Path,
    inputs: Signature,
    outputs: Signature,
    dynamic: dict[str, Any],
) -> None:
    """torch.onnx.export (dynamo) under the contract's input/output names and dimension names,
    then the full ONNX check; ExportError when the checker refuses the graph."""
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    # The exporter warns about optional torchvision ops and dim-name sharing; neither applies.
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(torch.from_numpy(a) for a in example),
                str(path),
                input_names=[name for name, _, _ in inputs],
                output_names=[name for name, _, _ in outputs],
                dynamic_shapes=dynamic,
                external_data=False,
                verbose=False,
            )
    finally:
        registry_log.setLevel(level)
    model = onnx.load(str(path))
    _name_dimensions(model, inputs, outputs)
    _drop_stack_traces(model.graph)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"exported graph fails the ONNX checker: {e}") from None
    onnx.save(model, str(path))


def _drop_stack_traces(graph: onnx.GraphProto) -> None:
    """Remove the exporter's per-node metadata (the Python stack that made each node): it
    names this checkout's paths and, inside an If's branches, a counter that grows with every
    export in the process, so the same factors would give different bytes."""
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:
            if attribute.HasField("g"):
                _drop_stack_traces(attribute.g)
            for subgraph in attribute.graphs:
                _drop_stack_traces(subgraph)


def _name_dimensions(model: onnx.ModelProto, inputs: Signature, outputs: Signature) -> None:
    """Give the graph's inputs and outputs the contract's dimension names (the exporter
    invents its own, e.g. "u0" for k), so the server can compare signatures exactly."""
    for values, contract in ((model.graph.input, inputs), (model.graph.output, outputs)):
        by_name = {name: shape for name, _, shape in contract}
        for value in values:
            dims = value.type.tensor_type.shape.dim
            for dim, wanted in zip(dims, by_name[value.name], strict=True):
                if isinstance(wanted, str):
                    dim.dim_param = wanted
                else:
                    dim.dim_value = wanted


def write_artifact(
    store_dir: Path,
    dataset: Dataset,
    factors: Factors,
    *,
    popularity: Ints,
    user_features: dict[str, list[float] | list[str]],
    metrics: dict[str, float],
    training: dict[str, Any],
    data: dict[str, Any],
    make_current: bool = True,
) -> Path:
    """Write a sealed model version into store_dir and return its folder.

    Everything is written to a hidden temporary folder inside store_dir and renamed into place,
    so a server polling the store never sees half a version.
    """
    catalog = dataset.catalog
    n_users, n_items = len(dataset.user_ids), len(catalog)
    _check_shapes(factors, n_users, n_items, popularity, user_features)
    store_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=store_dir))
    try:
        item_category, n_categories = item_categories(catalog)
        export_onnx(factors, item_category, n_categories, staging / "model.onnx")
        export_score_onnx(factors, item_category, staging / "score.onnx")
        _write_json(staging / "users.json", list(dataset.user_ids))
        _write_json(
            staging / "items.json",
            {
                "item_id": list(catalog.item_ids),
                "category": list(catalog.categories),
                "title": list(catalog.titles),
                "price": [_finite_or_none(p) for p in catalog.prices],
                "cost": [_finite_or_none(c) for c in catalog.costs],
                "cost_assumed": [bool(a) for a in catalog.cost_assumed],
            },
        )
        _write_json(staging / "popularity.json", [int(i) for i in popularity])
        indptr, indices = purchase_history(dataset)
        np.savez(staging / "user_history.npz", indptr=indptr, indices=indices)
        _write_json(
            staging / "user_features.json",
            {
                "reference_time": _reference_time(dataset),
                "columns": list(user_features),
                "rows": [[column[u] for column in user_features.values()] for u in range(n_users)],
            },
        )
        created = datetime.now(UTC)
        version = f"{created:%Y%m%d-%H%M%S}-{_short_hash(staging, created)}"
        seal(
            staging,
            Manifest(
                version=version,
                created_at=created.isoformat(timespec="seconds"),
                files={},
                n_users=n_users,
                n_items=n_items,
                n_categories=n_categories,
                metrics=dict(metrics),
                training=dict(training),
                data=dict(data),
            ),
        )
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; a server may run as another user
        final = store_dir / version
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if make_current:
        set_current(store_dir, version)
    return final


def purchase_history(dataset: Dataset) -> tuple[Ints, Ints]:
    """CSR (indptr, indices) of the distinct items each user purchased in training."""
    inter = dataset.interactions
    n_users, n_items = len(dataset.user_ids), len(dataset.catalog)
    purchased = np.array([e == "purchase" for e in inter.event], dtype=bool)
    pairs = np.unique(
        inter.user_index[purchased].astype(np.int64) * n_items
        + inter.item_index[purchased].astype(np.int64)
    )
    users, items = pairs // n_items, pairs % n_items
    indptr = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(users, minlength=n_users), out=indptr[1:])
    return indptr, items.astype(np.int64)


def _check_shapes(
    factors: Factors,
    n_users: int,
    n_items: int,
    popularity: Ints,
    user_features: dict[str, list[float] | list[str]],
) -> None:
    dim = factors.item.shape[1]
    expected = {
        "user": (n_users, dim),
        "item": (n_items, dim),
        "item_bias": (n_items,),
        "foldin": (dim, dim),
    }
    for name, shape in expected.items():
        actual = getattr(factors, name).shape
        if actual != shape:
            raise ValueError(f"factors.{name} has shape {actual}, expected {shape}")
    if popularity.size and (popularity.min() < 0 or popularity.max() >= n_items):
        raise ValueError(f"popularity holds item indices outside 0..{n_items - 1}")
    for column, values in user_features.items():
        if len(values) != n_users:
            raise ValueError(f"user feature {column!r} has {len(values)} rows for {n_users} users")


def _reference_time(dataset: Dataset) -> str | None:
    """Features such as days_since_last_order are measured from the last training event."""
    stamps = dataset.interactions.timestamp
    if stamps.size == 0:
        return None
    return datetime.fromtimestamp(int(stamps.max()), UTC).isoformat()


def _short_hash(folder: Path, created: datetime) -> str:
    digest = hashlib.sha256(created.isoformat().encode())
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:6]


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, allow_nan=False, ensure_ascii=False) + "\n")
