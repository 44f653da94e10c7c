"""Response model: P(purchase | user, item, discount), learned from randomized discount logs.

The logit is ``base(x) + Σ_k w_k(x) · φ_k(d)`` where every ``φ_k`` is a non-decreasing ramp of
the discount and every weight ``w_k(x) = softplus(·) ≥ 0``: the probability can never fall when
the discount grows, whatever the weights, so the ``optimal`` policy never meets a curve that
rewards a smaller discount with more purchases. Ramps at several thresholds let one shopper react
only to large discounts and another in proportion, which a single slope could not.

Besides the offer and the order history, the model sees each shopper's smoothed purchase rates in
four discount bands from the same randomized log (core.response_history). A training row gets the
rates computed without its own fold, so its label never leaks into its features; the artifact
ships the rates computed from every row, which is what the server looks users up in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pandas as pd
import torch
from scipy.stats import rankdata
from torch import Tensor, nn

from core import response_artifact
from core.features import NUMERIC_FEATURES
from core.response_artifact import (
    GRAPH,
    HISTORY,
    INPUTS,
    OFFER_FEATURES,
    OUTPUTS,
    ResponseManifest,
)
from core.response_history import (
    RATE_FEATURES,
    HistoryTable,
    cross_fitted_rates,
    smoothed_rates,
)
from trainer.config import ResponseConfig
from trainer.dataset import Floats
from trainer.export import ExportError, export_checked
from trainer.model import seed_everything
from trainer.offer_log import ResponseError, read_offer_log

# Ramp centres sit between the usual 5-point grid steps so that each step can carry its own jump.
RAMP_CENTRES: tuple[float, ...] = (0.025, 0.075, 0.125, 0.175, 0.225, 0.275)
RAMP_WIDTH = 0.01
# In P(buy): float32 kernels summing in another order differ by up to ~3e-5 on steep nets; an
# export bug (a wrong op, a lost mask) moves it by far more.
PARITY_TOLERANCE = 1e-4
MIN_STD = 1e-6  # a column's spread below which it counts as constant
# Column slices of FEATURES: the user's order history, then their response rates (to the end:
# bench/policy_gap.py passes other per-shopper columns there, to see what the model makes of them).
ORDERS = slice(len(OFFER_FEATURES) - len(NUMERIC_FEATURES), len(OFFER_FEATURES))
RATES = slice(len(OFFER_FEATURES), None)

# Told after each epoch: the epoch (from 1), how many run, and the epoch's mean training loss.
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class ResponseData:
    features: Floats  # rows × FEATURES
    discount: Floats
    bought: npt.NDArray[np.bool_]
    propensity: Floats

    def __len__(self) -> int:
        return len(self.discount)

    def take(self, rows: npt.NDArray[np.int64]) -> ResponseData:
        return ResponseData(
            self.features[rows], self.discount[rows], self.bought[rows], self.propensity[rows]
        )


@dataclass(frozen=True)
class Logged:
    """A randomized log ready to train on, and the history table to ship with its model."""

    data: ResponseData  # response rates cross-fitted: no row sees its own outcome
    history: HistoryTable  # rates from every row: what the server looks users up in
    foreign_purchases: int = 0  # purchases naming an offer of another user or item: not counted
    # Offers with propensity 1: their discount was not drawn at random (a deterministic policy's).
    fixed_discounts: int = 0


def logged(
    offer_features: Floats,
    user_ids: npt.NDArray[np.str_],
    discount: Floats,
    bought: npt.NDArray[np.bool_],
    propensity: Floats,
    seed: int,
    foreign_purchases: int = 0,
    fixed_discounts: int = 0,
) -> Logged:
    """Append each row's cross-fitted response rates (folds drawn from seed) to its logged
    features (OFFER_FEATURES), and compute the table to ship from all rows."""
    rates = cross_fitted_rates(user_ids, discount, bought, seed)
    return Logged(
        ResponseData(np.column_stack([offer_features, rates]), discount, bought, propensity),
        smoothed_rates(user_ids, discount, bought),
        foreign_purchases,
        fixed_discounts,
    )


def from_logs(offers: pd.DataFrame, events: pd.DataFrame, seed: int) -> Logged:
    """The offer log joined with its purchase events (read_offer_log), each offer's features
    with its cross-fitted response rates; seed draws the cross-fitting folds."""
    log = read_offer_log(offers, events)
    return logged(
        log.offer_features,
        log.user_ids,
        log.discount,
        log.bought,
        log.propensity,
        seed,
        foreign_purchases=log.foreign_purchases,
        fixed_discounts=log.fixed_discounts,
    )


class Standardize(nn.Module):
    """(x − mean) / std per column, as on the training rows. A column that did not vary there
    reads as 0 whatever its value: the model learned nothing about it, and dividing by a
    clamped spread sent any other value a million deviations out and P(buy) to 0 or 1."""

    mean: Tensor
    std: Tensor
    varied: Tensor

    def __init__(self, rows: Tensor) -> None:
        super().__init__()
        std = rows.std(0)
        self.register_buffer("mean", rows.mean(0))
        self.register_buffer("std", std.clamp(min=MIN_STD))
        self.register_buffer("varied", (std > MIN_STD).to(rows.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std * self.varied


class ResponseNet(nn.Module):
    """features [B, F] (raw, in FEATURES order), discounts [B, G] -> P(purchase) [B, G]."""

    centres: Tensor

    def __init__(self, scale: Standardize, hidden: int) -> None:
        super().__init__()
        self.scale = scale
        self.register_buffer("centres", torch.tensor(RAMP_CENTRES, dtype=torch.float32))
        self.body = nn.Sequential(
            nn.Linear(len(scale.mean), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )
        self.base = nn.Linear(hidden, 1)
        self.slopes = nn.Linear(hidden, len(RAMP_CENTRES) + 1)

    @staticmethod
    def derive(features: Tensor) -> Tensor:
        """CF score, log price, margin rate, log-scaled order history and the response rates
        from the raw columns. The rates are already in [0, 1] and evenly spread: they go in as
        they are."""
        price = features[:, 1:2].clamp(min=1e-3)
        margin_rate = (price - features[:, 2:3]) / price
        orders = torch.log1p(features[:, ORDERS].clamp(min=0.0))
        rates = features[:, RATES]
        return torch.cat([features[:, 0:1], torch.log(price), margin_rate, orders, rates], dim=1)

    def logits(self, features: Tensor, discounts: Tensor) -> Tensor:
        h = self.body(self.scale(self.derive(features)))
        weights = nn.functional.softplus(self.slopes(h))  # ≥ 0: the monotonicity guarantee
        d = discounts.unsqueeze(-1)
        ramps = torch.sigmoid((d - self.centres) / RAMP_WIDTH) - torch.sigmoid(
            -self.centres / RAMP_WIDTH
        )
        basis = torch.cat([d / 0.3, ramps], dim=-1)  # [B, G, K], each non-decreasing in d
        logits: Tensor = self.base(h) + (basis * weights.unsqueeze(1)).sum(-1)
        return logits

    def forward(self, features: Tensor, discounts: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(features, discounts))


@dataclass(frozen=True)
class Trained:
    model: ResponseNet
    train_rows: npt.NDArray[np.int64]
    holdout_rows: npt.NDArray[np.int64]
    metrics: dict[str, float]


def fit(data: ResponseData, config: ResponseConfig, progress: Progress | None = None) -> Trained:
    """Train on a random share of offers, measure on the rest; progress, if given, hears of
    each epoch (fit_logistic)."""
    if len(data) < 100 or data.bought.sum() < 10:
        raise ResponseError(
            f"only {len(data)} offers and {int(data.bought.sum())} purchases; a response model "
            "needs at least 100 offers with 10 purchases"
        )
    seed_everything(config.seed, config.threads)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(data))
    n_hold = max(1, int(len(data) * config.holdout))
    holdout_rows, train_rows = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    model = fit_rows(data.take(train_rows), config, progress)
    metrics = evaluate(model, data.take(holdout_rows))
    return Trained(model, train_rows, holdout_rows, metrics)


def fit_rows(
    data: ResponseData, config: ResponseConfig, progress: Progress | None = None
) -> ResponseNet:
    seed_everything(config.seed, config.threads)
    features = torch.from_numpy(data.features.astype(np.float32))
    model = ResponseNet(Standardize(ResponseNet.derive(features)), config.hidden)
    discount = torch.from_numpy(data.discount.astype(np.float32)).unsqueeze(1)
    return fit_logistic(model, features, discount, data.bought, config, progress)


class Schedule(Protocol):
    """The optimizer settings fit_logistic reads; ResponseConfig and UpliftConfig have them."""

    @property
    def epochs(self) -> int: ...
    @property
    def min_steps(self) -> int: ...
    @property
    def max_epochs(self) -> int | None: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def learning_rate(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def seed(self) -> int: ...


class LogisticNet(Protocol):
    base: nn.Linear

    def logits(self, x: Tensor, arm: Tensor) -> Tensor: ...

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True) -> Any: ...


NetT = TypeVar("NetT", bound=LogisticNet)


def epochs_run(rows: int, config: Schedule) -> int:
    """The epochs fit_logistic runs on rows: config.epochs, or more when they would take fewer
    than config.min_steps optimizer steps (too few leave the model uncalibrated), up to
    config.max_epochs (too many memorise a small log)."""
    per_epoch = math.ceil(rows / config.batch_size)
    extended = math.ceil(config.min_steps / per_epoch)
    if config.max_epochs is not None:
        extended = min(extended, config.max_epochs)
    return max(config.epochs, extended)


def fit_logistic(
    model: NetT,
    features: Tensor,
    arm: Tensor,
    outcome: npt.NDArray[Any],
    config: Schedule,
    progress: Progress | None = None,
) -> NetT:
    """Fit model.logits(features, arm) to a binary outcome: AdamW, one-cycle rate, seeded
    batches. The response model's arm is the discount, the uplift model's the treatment."""
    rate = float(np.clip(outcome.mean(), 1e-4, 1 - 1e-4))
    with torch.no_grad():  # start at the base rate rather than 50%: fewer steps to calibration
        model.base.bias.fill_(math.log(rate / (1 - rate)))
    target = torch.from_numpy(outcome.astype(np.float32)).unsqueeze(1)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    generator = torch.Generator().manual_seed(config.seed)
    n = len(outcome)
    epochs = epochs_run(n, config)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.learning_rate, epochs * math.ceil(n / config.batch_size)
    )
    model.train()
    for epoch in range(1, epochs + 1):
        total = torch.zeros(())
        for batch in torch.split(torch.randperm(n, generator=generator), config.batch_size):
            loss = nn.functional.binary_cross_entropy_with_logits(
                model.logits(features[batch], arm[batch]), target[batch]
            )
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            schedule.step()
            total += loss.detach() * len(batch)
        if progress is not None:
            progress(epoch, epochs, float(total) / n)
    model.train(False)
    return model


def predict(model: ResponseNet, features: Floats, discounts: Floats) -> Floats:
    """P(purchase) for each row (features) and each column of discounts [rows, candidates]."""
    with torch.no_grad():
        out = model(
            torch.from_numpy(features.astype(np.float32)),
            torch.from_numpy(np.asarray(discounts, dtype=np.float32)),
        )
    return np.asarray(out.numpy(), dtype=np.float64)


def evaluate(model: ResponseNet, data: ResponseData) -> dict[str, float]:
    p = predict(model, data.features, data.discount[:, None])[:, 0]
    y = data.bought
    return {
        "log_loss": log_loss(y, p),
        "ece": expected_calibration_error(y, p),
        "auc": auc(y, p),
        "base_rate": float(y.mean()),
        "rows": float(len(y)),
    }


def log_loss(y: npt.NDArray[np.bool_], p: Floats) -> float:
    q = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(np.where(y, np.log(q), np.log(1 - q))))


def expected_calibration_error(y: npt.NDArray[np.bool_], p: Floats, bins: int = 15) -> float:
    """Mean |observed rate − predicted| over equal-mass bins of the prediction, weighted by size."""
    order = np.argsort(p, kind="stable")
    gaps = [
        len(chunk) * abs(float(y[chunk].mean()) - float(p[chunk].mean()))
        for chunk in np.array_split(order, bins)
        if len(chunk)
    ]
    return float(sum(gaps) / len(p))


def auc(y: npt.NDArray[np.bool_], p: Floats) -> float:
    """Area under the ROC curve via the rank-sum (Mann–Whitney) identity; ties count half."""
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(p)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def export_onnx(model: ResponseNet, path: Path) -> float:
    """Export with a dynamic batch and candidate count, pass the full ONNX check, and prove
    parity with ONNX Runtime on random rows; returns the largest absolute difference."""
    model = model.eval()
    rng = np.random.default_rng(0)
    example = _example(rng, rows=4, candidates=3)
    dynamic = {
        "features": {0: torch.export.Dim("batch")},
        "discounts": {0: torch.export.Dim("batch"), 1: torch.export.Dim("candidates")},
    }
    try:
        export_checked(model, example, path, INPUTS, OUTPUTS, dynamic)
    except ExportError as e:
        raise ResponseError(f"response model: {e}") from None
    return check_parity(model, path)


def check_parity(model: ResponseNet, path: Path, rows: int = 257, candidates: int = 7) -> float:
    features, discounts = _example(np.random.default_rng(1), rows, candidates)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_p,) = session.run(None, {"features": features, "discounts": discounts})
    torch_p = predict(model, features.astype(np.float64), discounts.astype(np.float64))
    if onnx_p.shape != torch_p.shape:
        raise ResponseError(f"ONNX returns shape {onnx_p.shape}, PyTorch {torch_p.shape}")
    diff = float(np.max(np.abs(onnx_p - torch_p)))
    if diff > PARITY_TOLERANCE:
        raise ResponseError(f"ONNX and PyTorch differ by {diff:.2e} (> {PARITY_TOLERANCE:g})")
    return diff


def _example(
    rng: np.random.Generator, rows: int, candidates: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    price = rng.uniform(5, 100, rows)
    orders = rng.exponential(30.0, (rows, len(NUMERIC_FEATURES)))
    rates = rng.uniform(0, 1, (rows, len(RATE_FEATURES)))
    features = np.column_stack([rng.normal(0, 1, rows), price, price * 0.6, orders, rates])
    discounts = np.sort(rng.uniform(0, 0.3, (rows, candidates)), axis=1)
    return features.astype(np.float32), discounts.astype(np.float32)


def save(
    trained: Trained,
    out: Path,
    grid: list[float],
    config: ResponseConfig,
    data_summary: dict[str, Any],
    history: HistoryTable,
) -> ResponseManifest:
    """Export the model to ONNX, with the history table its features come from, into a sealed
    response folder at out."""

    def write_files(folder: Path) -> dict[str, float]:
        history.save(folder / HISTORY)
        return {"onnx_max_abs_diff": export_onnx(trained.model, folder / GRAPH)}

    manifest = ResponseManifest(
        version="",
        created_at="",
        grid=grid,
        # JSON has no NaN and the manifest's reader takes numbers only: a metric the hold-out
        # cannot measure (AUC without both outcomes) is left out.
        metrics={k: v for k, v in trained.metrics.items() if math.isfinite(v)},
        # "epochs" is what was asked for; small logs run more (min_steps).
        training={**asdict(config), "epochs_run": epochs_run(len(trained.train_rows), config)},
        data=data_summary,
    )
    return response_artifact.write(out, manifest, write_files)
