"""The training recipe behind ``discount-train fit``: split, early-stop, evaluate, refit, export.

1. Hold out a test period by the format's protocol; carve a validation period from the rest.
2. Train each candidate configuration (a small grid over λ, α and c₀) on the pre-validation data,
   stopping when validation NDCG@10 stops improving; the best candidate fixes the configuration
   and the epoch count. Compare it with popularity on the same validation split.
3. Train the same recipe on all pre-test data and measure it on the hold-out: the reported
   metrics.
4. Refit on every interaction for the same epoch count and ship that model; the manifest says so.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core.artifact import CURRENT, MANIFEST, ArtifactError, current_version_dir
from trainer.config import OFFSET_GRID, ModelConfig
from trainer.data import Loaded
from trainer.evaluate import (
    Protocol,
    Split,
    evaluate,
    factor_scorer,
    interaction_matrix,
    ndcg10,
    popularity,
    popularity_scorer,
    purchases,
)
from trainer.export import write_artifact
from trainer.features import user_features
from trainer.model import Diverged, train

SHIPPED = (
    "refit on all interactions for the early-stopped epoch count; metrics come from the same "
    "recipe trained on the data before the hold-out period"
)


@dataclass(frozen=True)
class FitOutcome:
    version_dir: Path
    metrics: dict[str, float]
    epochs: int
    loses_to_popularity: bool
    current: bool  # CURRENT names it now


def fingerprint(paths: tuple[Path, ...]) -> dict[str, str]:
    digests = {}
    for path in paths:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digests[str(path)] = digest.hexdigest()
    return digests


def select(
    candidates: list[ModelConfig], val: Split, say: Callable[[str], None]
) -> tuple[float, int, ModelConfig]:
    """Train each candidate on val's training part, stopping early on its NDCG@10: the best
    (the first of equals) with its score and epochs. A candidate that diverges is dropped, in
    a line; Diverged when every one does."""
    tried = []
    failed: Diverged | None = None
    for candidate in candidates:
        say(_describe(candidate))
        try:
            result = train(candidate, val.train, lambda f: ndcg10(factor_scorer(f), val), say)
        except Diverged as e:
            if len(candidates) > 1:
                say(f"  dropped: {e}")
            failed = e
            continue
        tried.append((max(h["val_ndcg@10"] for h in result.history), result.epochs, candidate))
    if not tried:
        assert failed is not None
        raise failed
    return max(tried, key=lambda t: t[0])


def fit(
    loaded: Loaded,
    protocol: Protocol,
    candidates: list[ModelConfig],
    out: Path,
    log: Callable[[str], None] | None = None,
    current: bool = True,
) -> FitOutcome:
    """Choose, measure and write a version into the model store out; with current, make it
    CURRENT where it may take over (below), else leave CURRENT to `discountctl models`."""
    say = log if log is not None else (lambda line: print(line, file=sys.stderr))
    dataset = loaded.dataset
    hold = protocol.split(dataset)
    val = protocol.inner(dataset, hold)
    metrics: dict[str, float] = {}
    loses = False
    compared = candidates
    if len(val.eval_users):
        say(f"validation: {val.description}, {len(val.eval_users):,} users")
        best, epochs, config = select(candidates, val, say)
        chosen_by = "best validation NDCG@10"
        say(f"chosen: {_describe(config)}, {epochs} epochs, val NDCG@10 {best:.4f}")
        baseline = ndcg10(popularity_scorer(val.bought), val)
        metrics.update({"val_ndcg@10": best, "val_popularity_ndcg@10": baseline})
        loses = best <= baseline
        metrics["loses_to_popularity"] = float(loses)  # only where measured: 0 would claim a win
        if loses:
            say(
                f"WARNING: the model LOSES to popularity on its validation split "
                f"(NDCG@10 {best:.4f} vs {baseline:.4f}); recommendations may be worse than "
                "a bestseller list. Try more data, other --factors/--regularization"
                + ("/--alpha." if config.objective == "ials" else ".")
            )
    else:
        config = candidates[0]
        epochs = config.max_epochs
        compared = []
        chosen_by = f"first of {len(candidates)} candidates given, untested: no validation users"
        say(
            f"WARNING: no validation users ({val.description}); training {epochs} epochs blind "
            f"with the first candidate given, {_describe(config)}"
            + (f"; {len(candidates) - 1} other candidate(s) not tried" if candidates[1:] else "")
        )
    metrics["epochs"] = float(epochs)

    if len(hold.eval_users):
        say(f"hold-out: {hold.description}, {len(hold.eval_users):,} users")
        held = train(config, hold.train, epochs=epochs, log=lambda _: None)
        for name, value in evaluate(factor_scorer(held.factors), hold).items():
            metrics[f"test_{name}"] = value
        for name, value in evaluate(popularity_scorer(hold.bought), hold).items():
            if name != "users":
                metrics[f"test_popularity_{name}"] = value
        # The clean comparison: the hold-out chose nothing, while the validation figure above
        # is the best of every candidate and epoch, so it flatters the model.
        model_ndcg, baseline = metrics["test_ndcg@10"], metrics["test_popularity_ndcg@10"]
        loses_on_test = model_ndcg <= baseline
        metrics["loses_to_popularity_on_test"] = float(loses_on_test)
        if loses_on_test:
            say(
                f"WARNING: on the hold-out the model LOSES to popularity (NDCG@10 "
                f"{model_ndcg:.4f} vs {baseline:.4f}); recommendations may be worse than a "
                "bestseller list"
            )
        loses = loses or loses_on_test
    else:
        say(f"WARNING: no hold-out users ({hold.description}); no test metrics")

    say(f"final fit on all {len(dataset.interactions.user_index):,} interactions")
    everything = interaction_matrix(dataset, np.ones(len(dataset.interactions.user_index), bool))
    final = train(config, everything, epochs=epochs, log=lambda _: None)
    # The cold-start list is the bestsellers, not the most viewed.
    buyers = popularity(interaction_matrix(dataset, purchases(dataset)))
    order = np.argsort(-buyers, kind="stable").astype(np.int64)
    reference = int(dataset.interactions.timestamp.max())
    # A version that loses to popularity, or was never compared with it, does not take over
    # from one already serving: discountd follows CURRENT, so it would deploy within seconds.
    serving = _serving(out)
    validated = "loses_to_popularity" in metrics
    make_current = current and (serving is None or (validated and not loses))
    version_dir = write_artifact(
        out,
        dataset,
        final.factors,
        popularity=order,
        user_features=user_features(dataset),
        metrics=metrics,
        training={
            **config.resolved(),
            # BPR has no confidence: its config's α and c₀ are defaults it never reads.
            **({"alpha": None, "confidence_offset": None} if config.objective == "bpr" else {}),
            "epochs": epochs,
            "candidates": [_describe(c) for c in compared],  # compared on validation
            "chosen_by": chosen_by,
            "shipped_model": SHIPPED,
            "protocol": hold.description,
            "validation": val.description,
        },
        data=_data_summary(loaded, reference),
        make_current=make_current,
    )
    if not current:
        say(
            f"CURRENT left alone (--no-current); to serve it: `discountctl models register "
            f"{version_dir}` and `discountctl models promote {version_dir.name}`"
        )
    elif not make_current:
        why = (
            "it loses to popularity"
            if loses
            else "it was never compared with popularity (no validation users: trained blind)"
        )
        say(
            f"NOT made CURRENT: {why}, so {serving} keeps serving; to serve it "
            f"anyway, write {version_dir.name} into {out / CURRENT} (or `discountctl models "
            "register` and `promote` it)"
        )
    return FitOutcome(version_dir, metrics, epochs, loses, make_current)


def _serving(out: Path) -> str | None:
    """The version out's CURRENT names, if it names one that is there."""
    try:
        version = current_version_dir(out)
    except (ArtifactError, OSError):
        return None
    return version.name if (version / MANIFEST).is_file() else None


def _describe(config: ModelConfig) -> str:
    described = (
        f"{config.objective}: factors={config.factors} regularization={config.regularization:g}"
    )
    if config.objective == "bpr":  # no confidence, so no α or c₀
        return described
    return f"{described} alpha={config.alpha:g} confidence_offset={config.confidence_offset:g}"


def grid(
    base: ModelConfig,
    regularization: tuple[float, ...],
    alpha: tuple[float, ...],
    offset: tuple[float, ...] = OFFSET_GRID,
) -> list[ModelConfig]:
    """Candidates to choose from on the validation split: a shop's size decides the best λ."""
    return [
        replace(base, regularization=r, alpha=a, confidence_offset=c)
        # dict.fromkeys: a value given twice is one candidate, not two identical trainings.
        for c in dict.fromkeys(offset)
        for r in dict.fromkeys(regularization)
        for a in dict.fromkeys(alpha)
    ]


def _data_summary(loaded: Loaded, reference: int) -> dict[str, Any]:
    return {
        "fingerprint_sha256": fingerprint(loaded.sources),
        "cleaning": loaded.summary(),
        "reference_time": datetime.fromtimestamp(reference, UTC).isoformat(),
        "cost_assumption": (
            f"{int(loaded.dataset.catalog.cost_assumed.sum())} items without a cost: "
            f"cost = price × (1 − {loaded.default_margin})"
        ),
    }
