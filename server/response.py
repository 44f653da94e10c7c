"""The response model in discountd: P(buy | offer, discount) for the `optimal` policy.

Loaded at start from ``--response-model-dir`` (a folder `discount-train response` wrote,
verified by core.response_artifact), and again whenever a new one is swapped into that folder
(``stamp`` moves; server.app checks at every model poll and SIGHUP). GetOffers calls it at
most once per request, with a row per `optimal` item and the union of those rules' candidate
discounts as columns (core.offers).
The user's response rates come from the history table shipped in the same folder; a user it does
not know gets every band's overall rate.
It runs on the CPU whatever ``--device`` says: a small MLP over a few rows gains nothing from a
GPU transfer.

A discount larger than any the model was trained on is scored as the largest it was
(core.response_artifact.as_trained), so a rule's grid reaching past the experiment's cannot buy
uplift from noise.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core import response_artifact
from core.artifact import MANIFEST, ArtifactError
from core.offers import Features, ItemInput, Probabilities
from core.response_history import HistoryTable
from server.model import check_signature, open_session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResponseModel:
    path: Path
    version: str
    session: ort.InferenceSession
    history: HistoryTable
    grid: tuple[float, ...]  # the discounts of the training log (fractions)

    @classmethod
    def load(cls, path: Path) -> ResponseModel:
        """Verify the folder and open its graph; ArtifactError says what is wrong."""
        manifest = response_artifact.load(path)
        graph = path / response_artifact.GRAPH
        # One thread: GetOffers runs it over a few rows, where waking a pool of threads would
        # cost more than the run.
        session, _ = open_session(graph, "cpu", 1)
        check_signature(graph, session, response_artifact.signature())
        history = HistoryTable.load(path / response_artifact.HISTORY)
        model = cls(path, manifest.version, session, history, tuple(manifest.grid))
        try:
            probability = model(
                "", {}, [ItemInput("warm-up", "", 10.0, 5.0, 1, 0.0)], list(manifest.grid)
            )
        except Exception as e:  # ONNX Runtime's errors have no common base; a graph it cannot run
            raise ArtifactError(f"{graph}: warm-up inference failed ({e})") from None
        if probability is None or not np.isfinite(probability).all():
            raise ArtifactError(f"{graph}: warm-up inference gave no finite probabilities")
        return model

    def __call__(
        self, user_id: str, user: Features, items: Sequence[ItemInput], grid: Sequence[float]
    ) -> Probabilities | None:
        offers = [
            (float(i.score or 0.0), float(i.price or 0.0), float(i.cost or 0.0)) for i in items
        ]
        rows = response_artifact.feature_rows(user, self.history.rates(user_id), offers)
        discounts = np.tile(response_artifact.as_trained(grid, self.grid), (len(items), 1))
        [probability] = self.session.run(None, {"features": rows, "discounts": discounts})
        return np.asarray(probability, dtype=np.float64)


Stamp = tuple[int, int, int] | None


def stamp(path: Path) -> Stamp:
    """What changes when `discount-train response` swaps a new model into path (the folder is
    replaced whole, so its manifest is a new file); None while there is none."""
    try:
        st = (path / MANIFEST).stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class NoResponseModel:
    """Stands in when no response model is loaded: `optimal` rules grant nothing, and the first
    time one applies the log says why, once per process."""

    def __init__(self) -> None:
        self._told = threading.Event()

    def __call__(
        self, user_id: str, user: Features, items: Sequence[ItemInput], grid: Sequence[float]
    ) -> Probabilities | None:
        if not self._told.is_set():
            self._told.set()
            log.warning(
                "an `optimal` rule applies but no response model is loaded: its offers get no "
                "discount (reason NO_RESPONSE_MODEL); start discountd with --response-model-dir "
                "(a folder `discount-train response` wrote)"
            )
        return None
