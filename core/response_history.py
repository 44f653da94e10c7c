"""Each shopper's own past responses to randomized discounts: smoothed purchase rates per band.

Order history only hints at how a shopper treats discounts; what they did when a randomized
experiment showed them none, a small, a medium or a large one says it directly. The response
model takes these four rates as features, the trainer ships the table it computed from the whole
log, and discountd looks a user up in it (core.response_artifact). Kept free of torch.

A rate is shrunk towards the band's overall rate,
``(purchases + PRIOR_STRENGTH · band_rate) / (offers + PRIOR_STRENGTH)``, so that one lucky offer
does not make a shopper look like a bargain hunter, and a shopper never offered a band (or never
seen at all) gets the band's rate.

Training rows must not see their own outcome in their features, or the model learns to read the
label off the rate: ``cross_fitted_rates`` gives each row the rates computed without its fold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from core.artifact import ArtifactError

Floats = npt.NDArray[np.float64]
# Band k holds discounts in [BAND_EDGES[k], BAND_EDGES[k + 1]): no discount; 5–10%; 15–20%;
# 25–30% on the usual 5-point grid, with edges between grid steps so that any discount in [0, 1)
# falls in exactly one band.
BAND_EDGES: tuple[float, ...] = (0.0, 0.025, 0.125, 0.225, 1.0)
RATE_FEATURES: tuple[str, ...] = (
    "response_rate_none",
    "response_rate_small",
    "response_rate_medium",
    "response_rate_large",
)
BANDS = len(RATE_FEATURES)
PRIOR_STRENGTH = 2.0
FOLDS = 5
FORMAT = "response-history/1"


def band_of(discounts: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """The band of each discount (a fraction in [0, 1))."""
    d = np.asarray(discounts, dtype=np.float64)
    if not ((d >= BAND_EDGES[0]) & (d < BAND_EDGES[-1])).all():
        raise ValueError("discounts must be fractions in [0, 1), e.g. 0.15 for 15%")
    return np.searchsorted(np.asarray(BAND_EDGES[1:-1]), d, side="right").astype(np.int64)


@dataclass(frozen=True, eq=False)
class HistoryTable:
    """Smoothed purchase rates per user and band; ``prior`` is every band's overall rate."""

    prior: tuple[float, ...]
    user_ids: tuple[str, ...]
    table: Floats  # len(user_ids) × BANDS
    # Built once per table, so that a lookup is a dict probe.
    _index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {u: k for k, u in enumerate(self.user_ids)})

    def rates(self, user_id: str) -> tuple[float, ...]:
        """The user's rates in RATE_FEATURES order; a user the log never saw gets the prior."""
        row = self._index.get(user_id)
        return self.prior if row is None else tuple(float(r) for r in self.table[row])

    def lookup(self, user_ids: Sequence[str] | npt.NDArray[Any]) -> Floats:
        """``rates`` for many rows at once: [len(user_ids), BANDS]."""
        unknown = len(self.user_ids)
        rows = np.fromiter(
            (self._index.get(str(u), unknown) for u in user_ids), np.int64, len(user_ids)
        )
        return np.vstack([self.table, np.asarray(self.prior)[None, :]])[rows]

    def save(self, path: Path) -> None:
        rows = dict(zip(self.user_ids, self.table.tolist(), strict=True))
        body = {
            "format": FORMAT,
            "band_edges": list(BAND_EDGES),
            "prior_strength": PRIOR_STRENGTH,
            "columns": list(RATE_FEATURES),
            "prior": list(self.prior),
            "users": rows,
        }
        path.write_text(json.dumps(body, separators=(",", ":")) + "\n")

    @classmethod
    def load(cls, path: Path) -> HistoryTable:
        """Read a table ``save`` wrote; ArtifactError when it is not one this build reads."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"{path}: unreadable response history: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ArtifactError(f"{path}: not a response history this build reads ({FORMAT})")
        if raw.get("band_edges") != list(BAND_EDGES) or raw.get("columns") != list(RATE_FEATURES):
            raise ArtifactError(f"{path}: discount bands differ from this build's {BAND_EDGES}")
        try:
            users: dict[str, list[float]] = raw["users"]
            prior = tuple(float(r) for r in raw["prior"])
            table = np.array(list(users.values()), dtype=np.float64).reshape(len(users), BANDS)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactError(f"{path}: malformed response history ({e!r})") from None
        every = [*prior, *table.ravel()]
        if len(prior) != BANDS or not all(0.0 <= r <= 1.0 for r in every):
            raise ArtifactError(f"{path}: rates must be {BANDS} numbers in [0, 1] per user")
        return cls(prior, tuple(str(u) for u in users), table)


def smoothed_rates(
    user_ids: Sequence[str] | npt.NDArray[Any], discounts: npt.ArrayLike, bought: npt.ArrayLike
) -> HistoryTable:
    """Per user and band, ``(purchases + PRIOR_STRENGTH · band_rate) / (offers +
    PRIOR_STRENGTH)`` over the logged offers. A band nobody was offered takes the log's overall
    purchase rate as its band rate: nothing better is known."""
    users, codes = np.unique(np.asarray(user_ids, dtype=str), return_inverse=True)
    band = band_of(discounts)
    y = np.asarray(bought, dtype=np.float64)
    if not (len(codes) == len(band) == len(y)):
        raise ValueError("user_ids, discounts and bought must have one entry per offer")
    prior, table, _ = _smoothed(codes.ravel(), len(users), band, y)
    return HistoryTable(tuple(float(p) for p in prior), tuple(str(u) for u in users), table)


def _smoothed(
    codes: npt.NDArray[np.intp], users: int, band: npt.NDArray[np.int64], y: Floats
) -> tuple[Floats, Floats, npt.NDArray[np.int64]]:
    """smoothed_rates' prior and table for offers by user code (of users), and the offers per
    user and band. Purchase counts sum exactly, so a user without offers changes no rate."""
    cell = codes * BANDS + band
    offers = np.bincount(cell, minlength=users * BANDS).reshape(users, BANDS)
    purchases = np.bincount(cell, y, minlength=users * BANDS).reshape(users, BANDS)
    overall = float(y.mean()) if len(y) else 0.0
    per_band = offers.sum(axis=0)
    prior = np.where(per_band > 0, purchases.sum(axis=0) / np.maximum(per_band, 1), overall)
    table = (purchases + PRIOR_STRENGTH * prior) / (offers + PRIOR_STRENGTH)
    return prior, table, offers


def folds(rows: int, seed: int, k: int = FOLDS) -> npt.NDArray[np.int64]:
    """A fold in [0, k) per row, balanced and shuffled, the same for the same seed."""
    fold: npt.NDArray[np.int64] = np.random.default_rng([seed, 7]).permutation(rows) % k
    return fold


def cross_fitted_rates(
    user_ids: Sequence[str] | npt.NDArray[Any],
    discounts: npt.ArrayLike,
    bought: npt.ArrayLike,
    seed: int,
    k: int = FOLDS,
) -> Floats:
    """Per logged row, its user's rates computed from the other folds only, so that no row's
    features contain its own outcome: [rows, BANDS]."""
    # The users sorted once, not per fold, and looked up by code, not by a dict probe per row:
    # on a 960,000-offer log, cross-fitting 0.95 s -> 0.25 s.
    users, codes = np.unique(np.asarray(user_ids, dtype=str), return_inverse=True)
    codes = codes.ravel()
    band = band_of(discounts)
    y = np.asarray(bought, dtype=np.float64)
    fold = folds(len(codes), seed, k)
    out = np.empty((len(codes), BANDS), dtype=np.float64)
    for f in range(k):
        inside = fold == f
        if inside.any():
            others = ~inside
            prior, table, offers = _smoothed(codes[others], len(users), band[others], y[others])
            # As smoothed_rates(others).lookup: a user without offers in the other folds gets
            # those folds' prior.
            seen = offers.sum(axis=1) > 0
            out[inside] = np.vstack([table, prior[None, :]])[
                np.where(seen[codes[inside]], codes[inside], len(users))
            ]
    return out
