"""The model artifact: a directory per version, described and sealed by manifest.json.

Layout of a model store (``--model-dir``)::

    MODEL_DIR/
      CURRENT                 # one line: the name of the version folder to serve
      20261128-172400-ab12cd/
        manifest.json         # see Manifest; sha256 of every other file
        model.onnx            # top-k over the catalog: see MODEL_INPUTS / MODEL_OUTPUTS
        score.onnx            # scores of named items: see SCORE_INPUTS / SCORE_OUTPUTS
        users.json            # list of user ids; position = user index in the graph
        items.json            # {"item_id": [...], "category": [...], "title": [...],
                              #  "price": [...], "cost": [...]}; position = item index
        popularity.json       # item indices, most popular first
        user_history.npz      # CSR of training items per user: indptr, indices (int64)
        user_features.json    # {"reference_time": ..., "columns": [...], "rows": [[...]]}

A trainer writes a version into a temporary sibling directory and renames it into place, so a
reader never sees half a version. Readers call ``load_manifest`` which refuses a version whose
files do not match their recorded sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import json_input

MANIFEST = "manifest.json"
CURRENT = "CURRENT"
FORMAT_VERSION = 2  # 2: score.onnx
# What a reader opens unconditionally: a manifest that does not seal them describes no version
# that can serve (user_features.json is optional, and sealed like every other file when there).
REQUIRED_FILES = (
    "model.onnx",
    "score.onnx",
    "users.json",
    "items.json",
    "popularity.json",
    "user_history.npz",
)
# Read when present: a folder holding one the manifest leaves out would be read unverified.
OPTIONAL_FILES = ("user_features.json",)

# A graph's signature: (name, element type, shape) per input or output; symbolic dimensions
# are strings.
Signature = tuple[tuple[str, str, tuple[int | str, ...]], ...]
# user_index: index of a trained user, or -1 for a user the model has not seen.
# history_items: item indices to fold an unseen user in from; -1 pads.
# exclude_items: item indices never to return; -1 pads.
# category_mask: 1.0 where the category may be returned, 0.0 where not.
# k: how many items to return (a one-element tensor).
MODEL_INPUTS: Signature = (
    ("user_index", "int64", ("batch",)),
    ("history_items", "int64", ("batch", "history")),
    ("exclude_items", "int64", ("batch", "excluded")),
    ("category_mask", "float32", ("batch", "categories")),
    ("k", "int64", (1,)),
)
# Filtered-out items score -inf; a reader drops non-finite scores.
MODEL_OUTPUTS: Signature = (
    ("top_items", "int64", ("batch", "k")),
    ("top_scores", "float32", ("batch", "k")),
)
# score.onnx: the same user vector and scores for the items named in `items` only (-1 pads and
# scores -inf), without filters or a sort, so pricing 20 named items never scores the whole
# catalog. It holds its own copy of the factors: the price is one more copy of them on disk and
# in memory, against a GEMM and a sort over the catalog per GetOffers call.
SCORE_INPUTS: Signature = (
    ("user_index", "int64", ("batch",)),
    ("history_items", "int64", ("batch", "history")),
    ("items", "int64", ("batch", "candidates")),
)
SCORE_OUTPUTS: Signature = (("item_scores", "float32", ("batch", "candidates")),)


class ArtifactError(Exception):
    """A model version is missing, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class Manifest:
    version: str
    created_at: str
    files: dict[str, str]
    n_users: int
    n_items: int
    n_categories: int
    metrics: dict[str, float] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def signature(self) -> dict[str, Any]:
        """model.onnx's inputs and outputs, and score.onnx's under "score"."""
        return {
            **signature_json(MODEL_INPUTS, MODEL_OUTPUTS),
            "score": signature_json(SCORE_INPUTS, SCORE_OUTPUTS),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "version": self.version,
            "created_at": self.created_at,
            "n_users": self.n_users,
            "n_items": self.n_items,
            "n_categories": self.n_categories,
            "metrics": self.metrics,
            "training": self.training,
            "data": self.data,
            "signature": self.signature(),
            "files": self.files,
        }


def signature_json(inputs: Signature, outputs: Signature) -> dict[str, Any]:
    """A graph's signature as manifests record it."""
    return {
        "inputs": [{"name": n, "type": t, "shape": list(s)} for n, t, s in inputs],
        "outputs": [{"name": n, "type": t, "shape": list(s)} for n, t, s in outputs],
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(version_dir: Path, manifest: Manifest) -> Manifest:
    """Record the sha256 of every file in version_dir and write manifest.json."""
    files = {
        p.name: sha256_file(p)
        for p in sorted(version_dir.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    sealed = Manifest(**{**manifest.__dict__, "files": files})
    (version_dir / MANIFEST).write_text(json.dumps(sealed.to_json(), indent=2) + "\n")
    return sealed


def load_manifest(version_dir: Path, verify: bool = True) -> Manifest:
    """Read a version's manifest; with verify, check every file's sha256 and the signature."""
    path = version_dir / MANIFEST
    try:
        raw = json_input.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{version_dir}: no {MANIFEST}; not a model version") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable manifest: {e}") from None
    if isinstance(raw, dict) and raw.get("kind") == "response":
        raise ArtifactError(
            f"{version_dir}: a response model (`discount-train response`), not a model version "
            "of `discount-train fit`; discountd takes it as --response-model-dir"
        )
    try:
        manifest = Manifest(
            version=str(raw["version"]),
            created_at=str(raw["created_at"]),
            files={str(k): str(v) for k, v in raw["files"].items()},
            n_users=int(raw["n_users"]),
            n_items=int(raw["n_items"]),
            n_categories=int(raw["n_categories"]),
            metrics={str(k): float(v) for k, v in raw.get("metrics", {}).items()},
            training=dict(raw.get("training", {})),
            data=dict(raw.get("data", {})),
            format_version=int(raw.get("format_version", FORMAT_VERSION)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({e!r})") from None
    if not verify:
        return manifest
    if manifest.format_version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {manifest.format_version}, this build reads {FORMAT_VERSION}; "
            "train and export it again with this build's `discount-train fit`"
        )
    if raw.get("signature") != manifest.signature():
        raise ArtifactError(f"{path}: model signature differs from what this build serves")
    unsealed = [name for name in REQUIRED_FILES if name not in manifest.files]
    if unsealed:
        raise ArtifactError(f"{path}: does not list {', '.join(unsealed)}")
    verify_files(version_dir, manifest.files)
    return manifest


def verify_files(folder: Path, files: dict[str, str]) -> None:
    """Every file a manifest lists is a plain name in folder and matches its recorded sha256,
    and no file a reader opens is there unlisted: a reader opens only sealed bytes. (Other
    files, a README or an editor's backup, are nobody's input and are left alone.)"""
    for name in files:
        if name in ("", ".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise ArtifactError(f"{folder}: manifest lists {name!r}, not a file of the folder")
    read = (*REQUIRED_FILES, *OPTIONAL_FILES)
    unlisted = [name for name in read if name not in files and (folder / name).exists()]
    if unlisted:
        raise ArtifactError(
            f"{folder}: {', '.join(unlisted)} not listed in the manifest; remove it, or export "
            "the version again"
        )
    for name, expected in files.items():
        file = folder / name
        if not file.is_file():
            raise ArtifactError(f"{folder}: {name} listed in the manifest is missing")
        if sha256_file(file) != expected:
            raise ArtifactError(f"{folder}: {name} does not match its sha256 in the manifest")


def current_version_dir(model_dir: Path) -> Path:
    """The version folder CURRENT names; a model_dir that is itself a version is served as is."""
    if (model_dir / MANIFEST).is_file():
        return model_dir
    pointer = model_dir / CURRENT
    try:
        name = pointer.read_text().strip()
    except FileNotFoundError:
        raise ArtifactError(
            f"{model_dir}: neither a model version nor a store with a {CURRENT} file; "
            "train one with `discount-train fit --out DIR`"
        ) from None
    except UnicodeDecodeError:
        raise ArtifactError(
            f"{pointer}: not UTF-8 text; it must hold the name of a version folder"
        ) from None
    if not name or "/" in name or name in (".", ".."):
        raise ArtifactError(f"{pointer}: must name a version folder, got {name!r}")
    return model_dir / name


def set_current(model_dir: Path, version: str) -> None:
    """Point CURRENT at version atomically (write a temp file, then rename). The temp file's
    name is unique: a trainer and `discountctl models promote` may switch the same store at
    once, and with one shared name one could rename the other's half-written file into place."""
    fd, tmp = tempfile.mkstemp(prefix=f".{CURRENT}-", suffix=".tmp", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(version + "\n")
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a server may run as another user
        os.replace(tmp, model_dir / CURRENT)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
