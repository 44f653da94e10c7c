"""Load one model version: verify it, open its graphs in ONNX Runtime (the top-k graph on the
requested device, the named-item graph on the CPU), check their signatures against the manifest,
warm them up, and precompute the lookups Recommend and GetOffers need (with a store, the
catalog's prices and costs and the users' features too).

A version that fails any step raises ArtifactError and is never served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from core.artifact import MODEL_OUTPUTS, ArtifactError, Manifest, load_manifest
from core.catalog import category_vocabulary
from core.shop import ShopFacts, load_shop_facts
from server.errors import DeviceUnavailable

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
OUTPUT_NAMES = [name for name, _, _ in MODEL_OUTPUTS]
Ints = npt.NDArray[np.int64]
# ONNX Runtime spells element types its own way.
ORT_TYPES = {"int64": "tensor(int64)", "float32": "tensor(float)"}


@dataclass(frozen=True)
class ModelVersion:
    """A verified, warm model version and its lookups. Immutable: a reload builds a new one."""

    path: Path
    manifest: Manifest
    session: ort.InferenceSession
    provider: str
    score_session: ort.InferenceSession
    user_ids: list[str]
    user_index: dict[str, int]
    item_ids: list[str]
    item_index: dict[str, int]
    item_categories: list[str]
    categories: list[str]  # category_mask column order
    category_index: dict[str, int]
    popularity: Ints  # item indices, most bought first
    popularity_rank: Ints  # per item, its position in popularity; -1 when absent
    history_indptr: Ints
    history_indices: Ints
    # Per item, whether anyone bought it in training (the artifact records purchases only): an
    # item nobody bought is most often a new arrival, with no factors to fold a user in from.
    bought_in_training: npt.NDArray[np.bool_]
    # Prices, costs and user features for GetOffers; None when loaded without them.
    facts: ShopFacts | None = None

    @property
    def version(self) -> str:
        return self.manifest.version

    def purchased(self, user: int) -> Ints:
        """Item indices the user bought in training."""
        return self.history_indices[self.history_indptr[user] : self.history_indptr[user + 1]]

    def run(
        self,
        user_index: Ints,
        history_items: Ints,
        exclude_items: Ints,
        category_mask: npt.NDArray[np.float32],
        k: int,
    ) -> tuple[Ints, npt.NDArray[np.float32]]:
        feeds = {
            "user_index": user_index,
            "history_items": history_items,
            "exclude_items": exclude_items,
            "category_mask": category_mask,
            "k": np.array([k], dtype=np.int64),
        }
        items, scores = self.session.run(OUTPUT_NAMES, feeds)
        return items, scores

    def score(self, user_index: Ints, history_items: Ints, items: Ints) -> npt.NDArray[np.float32]:
        """Scores of the named items (-1 pads and scores -inf), as run() would score them
        without filters: one dot product per item instead of the whole catalog and a sort."""
        feeds = {"user_index": user_index, "history_items": history_items, "items": items}
        scores: npt.NDArray[np.float32] = self.score_session.run(None, feeds)[0]
        return scores


def providers_for(device: str) -> list[str]:
    """ONNX Runtime providers to ask for, best first."""
    if device == "cpu":
        return [CPU]
    if CUDA not in ort.get_available_providers():
        if device == "cuda":
            raise DeviceUnavailable(
                "--device cuda: this onnxruntime build has no CUDA provider; "
                "install onnxruntime-gpu or use --device auto"
            )
        return [CPU]
    return [CUDA, CPU]


def load_version(path: Path, device: str, threads: int = 0, facts: bool = False) -> ModelVersion:
    """Verify and load the version folder at path, ready to serve; threads: ONNX Runtime's
    intra-op threads (0: one per core); facts: also read what pricing needs (GetOffers)."""
    manifest = load_manifest(path)  # refuses a manifest that does not seal every file read here
    users = _read_json(path, "users.json")
    items = _read_json(path, "items.json")
    popularity = np.asarray(_read_json(path, "popularity.json"), dtype=np.int64)
    try:
        with np.load(path / "user_history.npz") as history:
            indptr = history["indptr"].astype(np.int64)
            indices = history["indices"].astype(np.int64)
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable user_history.npz ({e})") from None
    item_ids = [str(i) for i in items["item_id"]]
    item_categories = [str(c) for c in items["category"]]
    categories = category_vocabulary(item_categories)
    _check_consistent(path, manifest, users, item_ids, item_categories, categories, popularity)
    if len(indptr) != manifest.n_users + 1 or (indices.size and indices.max() >= len(item_ids)):
        raise ArtifactError(f"{path}: user_history.npz does not fit {manifest.n_users} users")
    session, provider = open_session(path / "model.onnx", device, threads)
    signature = manifest.signature()
    check_signature(path / "model.onnx", session, signature)
    # A few dot products: one thread, on the CPU, is the fastest place for them.
    score_session, _ = open_session(path / "score.onnx", "cpu", 1)
    check_signature(path / "score.onnx", score_session, signature["score"])
    model = ModelVersion(
        path=path,
        manifest=manifest,
        session=session,
        provider=provider,
        score_session=score_session,
        user_ids=[str(u) for u in users],
        user_index={str(u): i for i, u in enumerate(users)},
        item_ids=item_ids,
        item_index={item: i for i, item in enumerate(item_ids)},
        item_categories=item_categories,
        categories=categories,
        category_index={c: i for i, c in enumerate(categories)},
        popularity=popularity,
        popularity_rank=_ranks(popularity, len(item_ids)),
        history_indptr=indptr,
        history_indices=indices,
        bought_in_training=np.bincount(indices, minlength=len(item_ids)) > 0,
        facts=load_shop_facts(path) if facts else None,
    )
    _warm_up(model)
    return model


def open_session(model_file: Path, device: str, threads: int) -> tuple[ort.InferenceSession, str]:
    """An ONNX Runtime session on the device asked for, and the provider really active."""
    wanted = providers_for(device)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    # Idle ONNX Runtime threads spin by default, burning the CPU the event loop needs between
    # runs: without the spin Recommend took 45% less CPU per call (docs/BENCHMARKS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(model_file), options, providers=wanted)
    except Exception as e:  # ORT raises its own untyped errors for any unreadable model
        raise ArtifactError(f"{model_file}: ONNX Runtime cannot load it ({e})") from None
    # ORT falls back to CPU silently when CUDA fails to initialise: trust only what is active.
    active = session.get_providers()[0]
    if device == "cuda" and active != CUDA:
        raise DeviceUnavailable(
            f"--device cuda: ONNX Runtime could not start CUDA and fell back to {active}; "
            "check the NVIDIA driver and CUDA libraries (--log-level debug shows ONNX Runtime's "
            "reason), or use --device auto"
        )
    if device == "auto" and CUDA in wanted and active != CUDA:
        log.warning(
            "CUDA provider failed to start; serving on %s (ONNX Runtime's own reason is logged "
            "with --log-level debug)",
            active,
        )
    return session, active


def _ranks(popularity: Ints, n_items: int) -> Ints:
    rank = np.full(n_items, -1, dtype=np.int64)
    rank[popularity] = np.arange(len(popularity))
    return rank


def check_signature(graph: Path, session: ort.InferenceSession, expected: dict[str, Any]) -> None:
    """The graph's inputs and outputs are those the manifest promises (names, types, shapes)."""
    for kind, actual in (("inputs", session.get_inputs()), ("outputs", session.get_outputs())):
        want = [(s["name"], ORT_TYPES[s["type"]], s["shape"]) for s in expected[kind]]
        have = [(a.name, a.type, list(a.shape)) for a in actual]
        if have != want:
            raise ArtifactError(
                f"{graph.parent}: {graph.name} {kind} are {have}, the manifest promises {want}; "
                "re-export the model with this build's trainer"
            )


def _warm_up(model: ModelVersion) -> None:
    """One real inference per graph (a known user and a folded-in one) before the version may
    serve."""
    known = 0 if model.manifest.n_users else -1
    try:
        items, scores = model.run(
            np.array([known, -1], dtype=np.int64),
            np.array([[-1], [0]], dtype=np.int64),
            np.array([[-1], [-1]], dtype=np.int64),
            np.ones((2, len(model.categories)), dtype=np.float32),
            1,
        )
        named = model.score(
            np.array([known, -1], dtype=np.int64),
            np.array([[-1], [0]], dtype=np.int64),
            np.array([[0], [-1]], dtype=np.int64),
        )
    except Exception as e:  # ORT's runtime errors are untyped
        raise ArtifactError(f"{model.path}: warm-up inference failed ({e})") from None
    shapes = {"top_items": items.shape, "top_scores": scores.shape, "item_scores": named.shape}
    wrong = {name: shape for name, shape in shapes.items() if shape != (2, 1)}
    if wrong:
        raise ArtifactError(f"{model.path}: warm-up returned shapes {wrong}, expected (2, 1)")


def _check_consistent(
    path: Path,
    manifest: Manifest,
    users: list[Any],
    item_ids: list[str],
    item_categories: list[str],
    categories: list[str],
    popularity: Ints,
) -> None:
    counts = {
        "users.json": (len(users), manifest.n_users),
        "items.json item_id": (len(item_ids), manifest.n_items),
        "items.json category": (len(item_categories), manifest.n_items),
        "categories": (len(categories), manifest.n_categories),
    }
    for what, (have, want) in counts.items():
        if have != want:
            raise ArtifactError(f"{path}: {what} has {have} entries, the manifest says {want}")
    if popularity.size and (popularity.min() < 0 or popularity.max() >= len(item_ids)):
        raise ArtifactError(f"{path}: popularity.json names items outside the catalog")


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable {name} ({e})") from None
