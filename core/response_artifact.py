"""The response-model artifact: a folder with ``response.onnx`` and a sealed ``manifest.json``.

Kept free of torch so that the server can read and verify it with ONNX Runtime alone.

Layout::

    RESPONSE_DIR/
      manifest.json           # kind "response", feature order, discount grid, metrics, sha256
      response.onnx           # features [batch, F], discounts [batch, candidates]
                              #   -> purchase_probability
      response_history.json   # per user, smoothed purchase rates in four discount bands
                              #   (core.response_history); the last four feature columns

The graph scores every candidate discount of every row in one inference: the server passes a
row per offer and the rule's whole discount grid as columns, and picks the best column. The
history table is the one the model's training features came from, so the server looks users up
in it rather than in anything newer the model never saw.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core import json_input
from core.artifact import (
    MANIFEST,
    ArtifactError,
    Signature,
    sha256_file,
    signature_json,
    verify_files,
)
from core.features import NUMERIC_FEATURES
from core.response_history import RATE_FEATURES

KIND = "response"
FORMAT_VERSION = 2
GRAPH = "response.onnx"
HISTORY = "response_history.json"
# What an offer log records per offer, in column order: the graph derives log price, margin
# rate and log-scaled order history itself, so the server passes what it already has.
OFFER_FEATURES: tuple[str, ...] = ("cf_score", "price", "cost", *NUMERIC_FEATURES)
# The graph's columns: the logged ones, then the user's response rates from the history table.
FEATURES: tuple[str, ...] = (*OFFER_FEATURES, *RATE_FEATURES)
INPUTS: Signature = (
    ("features", "float32", ("batch", len(FEATURES))),
    ("discounts", "float32", ("batch", "candidates")),  # fractions of the base price, 0.1 = 10%
)
OUTPUTS: Signature = (("purchase_probability", "float32", ("batch", "candidates")),)


@dataclass(frozen=True)
class ResponseManifest:
    version: str
    created_at: str
    grid: list[float]  # the discounts the model was trained on; past them, see as_trained
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "format_version": FORMAT_VERSION,
            "version": self.version,
            "created_at": self.created_at,
            "features": list(FEATURES),
            "grid": self.grid,
            "signature": signature(),
            "metrics": self.metrics,
            "training": self.training,
            "data": self.data,
            "files": self.files,
        }


def signature() -> dict[str, Any]:
    return signature_json(INPUTS, OUTPUTS)


def write(
    out: Path, manifest: ResponseManifest, write_files: Callable[[Path], dict[str, float]]
) -> ResponseManifest:
    """Write a response model folder whole: files go to a hidden sibling, are sealed, and
    the folder is swapped into place, so a reader never sees half a model. write_files returns
    metrics measured while writing (e.g. ONNX parity), which join the manifest's."""
    out = out.resolve()
    # The swap below deletes what is at out: never a model store, a data folder or a home.
    check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-incoming-", dir=out.parent))
    try:
        written = write_files(staging)
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        created = datetime.now(UTC)
        sealed = ResponseManifest(
            **{
                **manifest.__dict__,
                "version": manifest.version or f"response-{created:%Y%m%d-%H%M%S}",
                "created_at": created.isoformat(timespec="seconds"),
                "files": files,
                "metrics": {**manifest.metrics, **written},
            }
        )
        (staging / MANIFEST).write_text(json.dumps(sealed.to_json(), indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; a server may run as another user
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}-old-", dir=out.parent))
            old.rmdir()
            out.rename(old)
            try:
                staging.rename(out)
            except BaseException:
                old.rename(out)  # the previous model stays, rather than none at all
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return sealed


def check_out(out: Path) -> None:
    """Refuse an out whose contents write would lose: anything but a new or empty folder, or a
    response model folder holding only the model's own files. The CLI calls it before training
    too, so a wrong --out costs no minutes of work."""
    # The model replaces out whole: a shell standing in it would be left in a deleted folder.
    here = Path.cwd().resolve()
    if out.resolve() in (here, *here.parents):
        raise ArtifactError(
            f"{out}: is the current folder or holds it, which writing the model would replace; "
            "pass a folder of its own, e.g. --out response"
        )
    if not out.exists():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} is a file; pass a new or empty folder as --out")
    present = sorted(p.name for p in out.iterdir())
    if not present:
        return
    try:
        raw = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise ArtifactError(
            f"{out} exists and is not a response model folder; pass a new or empty --out"
        )
    listed = raw.get("files")
    own = {MANIFEST, GRAPH, HISTORY, *(listed if isinstance(listed, dict) else {})}
    others = [name for name in present if name not in own]
    if others:
        raise ArtifactError(
            f"{out} holds {', '.join(others[:3])}{', …' if len(others) > 3 else ''}, which the "
            "response model does not: a new model replaces the folder whole, so move them out "
            "first"
        )


def load(folder: Path) -> ResponseManifest:
    """Read and verify a response model folder: kind, format, signature and every sha256."""
    path = folder / MANIFEST
    try:
        raw = json_input.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{folder}: no {MANIFEST}; train one with `discount-train response --out DIR`"
        ) from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest: {e}") from None
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise ArtifactError(f"{path}: not a response model (kind {raw.get('kind')!r})")
    if raw.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {raw.get('format_version')}, this build reads "
            f"{FORMAT_VERSION}; train it again with this build's `discount-train response`"
        )
    if raw.get("signature") != signature() or raw.get("features") != list(FEATURES):
        raise ArtifactError(f"{path}: inputs or outputs differ from what this build expects")
    try:
        manifest = ResponseManifest(
            version=str(raw["version"]),
            created_at=str(raw["created_at"]),
            grid=[float(g) for g in raw["grid"]],
            files={str(k): str(v) for k, v in raw["files"].items()},
            metrics={str(k): float(v) for k, v in raw.get("metrics", {}).items()},
            training=dict(raw.get("training", {})),
            data=dict(raw.get("data", {})),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({e!r})") from None
    # Every discount is scored as at most the grid's largest (as_trained): an empty grid would
    # score them all as none, and `optimal` would quietly grant nothing.
    if not manifest.grid or not all(0 <= d < 1 for d in manifest.grid):
        raise ArtifactError(
            f"{path}: grid {manifest.grid} is not the discounts of a training log (at least one "
            "fraction in [0, 1)); train it again with `discount-train response`"
        )
    for name in (GRAPH, HISTORY):
        if name not in manifest.files:
            raise ArtifactError(f"{path}: does not list {name}")
    verify_files(folder, manifest.files)
    return manifest


def as_trained(discounts: npt.ArrayLike, grid: Sequence[float]) -> npt.NDArray[np.float32]:
    """The discounts to ask the graph about: each past the largest in the training log (the
    manifest's grid) as that largest. What a larger discount does was never observed, and the
    ramps that would carry it were never fitted, so at the same P(buy) and a lower price
    `optimal` never picks it (discountd and `discount-train estimate-policy` both score so)."""
    return np.minimum(np.asarray(discounts, dtype=np.float32), np.float32(max(grid)))


def feature_rows(
    user: Mapping[str, float | str],
    rates: Sequence[float],
    offers: Sequence[tuple[float, float, float]],
) -> npt.NDArray[np.float32]:
    """The graph's ``features`` input in FEATURES order: one row per (cf_score, price, cost)
    offer, followed by the user's numeric features (absent ones as a new user's 0) and their
    response rates (HistoryTable.rates)."""
    numeric = [float(user.get(name, 0.0)) for name in NUMERIC_FEATURES]
    return np.array([[*offer, *numeric, *rates] for offer in offers], dtype=np.float32).reshape(
        len(offers), len(FEATURES)
    )
