"""The response model's uplift variant, checked on real data: the Hillstrom e-mail experiment.

Treatment is "got an e-mail" (Mens or Womens E-Mail) against "No E-Mail"; outcomes are a site
visit and a purchase (conversion) in the two weeks after. The model is the response model with a
binary treatment in place of the discount: ``logit = base(x) + t · softplus(lift(x))``, so the
treatment can only raise the purchase probability, and a customer's uplift is
``P(y | x, t=1) − P(y | x, t=0)``. Customers are ranked by it; Qini and uplift@30% measure the
ranking on a held-out half.

By default ``base`` and ``lift`` are linear in the standardized features: on Hillstrom an MLP
body like the response model's (2 × 32, the earlier default) overfits the uplift (a weak signal
in 11 features) and ranked customers worse on visits in most splits (docs/BENCHMARKS.md);
``hidden > 0`` restores it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import torch
from torch import Tensor, nn

from trainer.config import UpliftConfig
from trainer.data import DATASETS, DataError, read_table
from trainer.dataset import Floats
from trainer.model import seed_everything
from trainer.response import Standardize, epochs_run, fit_logistic

HILLSTROM = DATASETS / "hillstrom/hillstrom.csv"
OUTCOMES = ("visit", "conversion")
NUMERIC = ("recency", "history", "mens", "womens", "newbie")
CATEGORICAL = ("zip_code", "channel")
CONTROL = "No E-Mail"
SEGMENTS = ("Mens E-Mail", "Womens E-Mail", CONTROL)


class UpliftError(Exception):
    """Data the uplift benchmark cannot use; the message says what is wrong."""


@dataclass(frozen=True)
class Experiment:
    features: Floats  # customers × feature columns (numeric, then one-hot categories)
    columns: list[str]
    treatment: npt.NDArray[np.int64]  # 1 = got an e-mail
    outcomes: dict[str, npt.NDArray[np.int64]]


def load_hillstrom(path: Path = HILLSTROM) -> Experiment:
    """The experiment in a Hillstrom file, read as every file of a shop's is
    (trainer.data.read_table); UpliftError says what is wrong and where the dataset is."""
    needed = (*NUMERIC, *CATEGORICAL, "segment", *OUTCOMES)
    try:
        frame = read_table(path, needed, as_text=False)
    except DataError as e:
        raise UpliftError(f"{e}; pass --data PATH to hillstrom.csv") from None
    if frame.empty:
        raise UpliftError(f"{path}: a header and no customers; is it Hillstrom's?")
    # Anything but Hillstrom's own segments would silently count as an e-mail.
    segment = frame["segment"].fillna("").astype(str)
    unknown = sorted(set(segment) - set(SEGMENTS))
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:5]) + (", …" if unknown[5:] else "")
        raise UpliftError(
            f"{path}: segment {shown} is not one of {', '.join(SEGMENTS)}; fix or drop those rows"
        )
    numbers = frame[[*NUMERIC, *OUTCOMES]].apply(pd.to_numeric, errors="coerce")
    _refuse_rows(path, ~np.isfinite(numbers[list(NUMERIC)]), "missing or not a number")
    _refuse_rows(path, ~numbers[list(OUTCOMES)].isin((0, 1)), "not 0 or 1")
    encoded = pd.get_dummies(frame[list(CATEGORICAL)], dtype=np.float64)
    x = pd.concat([numbers[list(NUMERIC)], encoded], axis=1)
    return Experiment(
        features=x.to_numpy(dtype=np.float64),
        columns=list(x.columns),
        treatment=(segment != CONTROL).to_numpy().astype(np.int64),
        outcomes={o: numbers[o].to_numpy().astype(np.int64) for o in OUTCOMES},
    )


def _refuse_rows(path: Path, bad: pd.DataFrame, what: str) -> None:
    rows = bad.any(axis=1).to_numpy()
    if rows.any():
        columns = ", ".join(str(c) for c in bad.columns[bad.any(axis=0).to_numpy()])
        raise UpliftError(
            f"{path}: {int(rows.sum())} row(s) where {columns} is {what}, e.g. line "
            f"{int(np.argmax(rows)) + 2}; fix or drop them"
        )


def split(experiment: Experiment, seed: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """A 50/50 split stratified by treatment and both outcomes, fixed by the seed."""
    strata = (
        experiment.treatment * 4
        + experiment.outcomes["visit"] * 2
        + experiment.outcomes["conversion"]
    )
    rng = np.random.default_rng(seed)
    train, test = [], []
    for stratum in np.unique(strata):
        rows = rng.permutation(np.flatnonzero(strata == stratum))
        half = len(rows) // 2
        train.append(rows[:half])
        test.append(rows[half:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def check_split(path: Path, experiment: Experiment, seed: int) -> None:
    """Refuse a split whose half lacks an arm, or an outcome's class within an arm: every model
    fits on one half and is scored on the other, and TwoModels fits one model per arm."""
    missing = []
    for half, rows in zip(("fit", "score"), split(experiment, seed), strict=True):
        for arm, name in ((1, "e-mailed"), (0, CONTROL)):
            in_arm = rows[experiment.treatment[rows] == arm]
            if not len(in_arm):
                missing.append(f"no {name} customer in the {half} half")
                continue
            for outcome in OUTCOMES:
                present = set(experiment.outcomes[outcome][in_arm].tolist())
                missing += [
                    f"no {outcome} = {v} among {name} in the {half} half"
                    for v in (0, 1)
                    if v not in present
                ]
    if missing:
        raise UpliftError(
            f"{path}: split seed {seed} leaves {'; '.join(missing)}; each half needs e-mailed "
            f"and {CONTROL} customers, each with visit and conversion both 0 and 1"
        )


class UpliftNet(nn.Module):
    def __init__(self, scale: Standardize, hidden: int) -> None:
        super().__init__()
        self.scale = scale
        self.body: nn.Module = nn.Identity()
        width = hidden or len(scale.mean)
        if hidden:
            self.body = nn.Sequential(
                nn.Linear(len(scale.mean), hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
            )
        self.base = nn.Linear(width, 1)
        self.lift = nn.Linear(width, 1)

    def logits(self, x: Tensor, treatment: Tensor) -> Tensor:
        h = self.body(self.scale(x))
        out: Tensor = self.base(h) + treatment * nn.functional.softplus(self.lift(h))
        return out

    def uplift(self, x: Tensor) -> Tensor:
        ones = torch.ones(len(x), 1)
        return torch.sigmoid(self.logits(x, ones)) - torch.sigmoid(self.logits(x, 0 * ones))


def _prepare(x: Floats) -> Tensor:
    # Spend in the past year is heavy-tailed; the log keeps a few big spenders from dominating.
    out = x.copy()
    out[:, 1] = np.log1p(np.clip(out[:, 1], 0, None))
    return torch.from_numpy(out.astype(np.float32))


def fit_uplift(
    x: Floats, treatment: npt.NDArray[np.int64], y: npt.NDArray[np.int64], config: UpliftConfig
) -> UpliftNet:
    # One thread, as for the response model: no faster for a model this small, and the same sums
    # (so the same ranking) on any machine.
    seed_everything(config.seed, threads=1)
    features = _prepare(x)
    model = UpliftNet(Standardize(features), config.hidden)
    t = torch.from_numpy(treatment.astype(np.float32)).unsqueeze(1)
    return fit_logistic(model, features, t, y, config)


def predict_uplift(model: UpliftNet, x: Floats) -> Floats:
    with torch.no_grad():
        return np.asarray(model.uplift(_prepare(x)).numpy()[:, 0], dtype=np.float64)


def baselines(seed: int) -> dict[str, Any]:
    """scikit-uplift's ClassTransformation and TwoModels, each over two scikit-learn learners."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklift.models import ClassTransformation, TwoModels

    def logistic() -> Any:
        return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))

    def boosting() -> Any:
        return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)

    return {
        "ClassTransformation(logistic)": ClassTransformation(logistic()),
        "ClassTransformation(boosting)": ClassTransformation(boosting()),
        "TwoModels(logistic)": TwoModels(logistic(), logistic(), method="vanilla"),
        "TwoModels(boosting)": TwoModels(boosting(), boosting(), method="vanilla"),
    }


def require_baselines() -> None:
    """Import what baselines() and scores() import when first called, raising ImportError: they
    come from the dev extra, and a missing one must be said before minutes of fitting, not after
    the first model."""
    baselines(0)
    import sklift.metrics  # noqa: F401


def scores(
    y: npt.NDArray[np.int64], uplift: Floats, treatment: npt.NDArray[np.int64]
) -> dict[str, float]:
    """Qini coefficient (area between the Qini curve and random, over the perfect model's) and
    uplift@30%: treated minus control outcome rate among the 30% with the highest uplift."""
    from sklift.metrics import qini_auc_score, uplift_at_k

    with warnings.catch_warnings():
        # scikit-uplift 0.5.1 calls scikit-learn's deprecated stable_cumsum; results unaffected.
        warnings.simplefilter("ignore", FutureWarning)
        return {
            "qini": float(qini_auc_score(y, uplift, treatment)),
            "uplift_at_30": float(uplift_at_k(y, uplift, treatment, strategy="overall", k=0.3)),
        }


def benchmark(experiment: Experiment, seed: int, config: UpliftConfig) -> dict[str, Any]:
    """Per outcome: Qini coefficient and uplift@30% of the response model's uplift variant and of
    each baseline, all fitted on the same training half and scored on the same test half."""
    train, test = split(experiment, seed)
    x, t = experiment.features, experiment.treatment
    report: dict[str, Any] = {
        "seed": seed,
        "train_rows": len(train),
        "test_rows": len(test),
        "treated_share_test": float(t[test].mean()),
        "config": asdict(config),
        # config's epochs is what was asked for; small data runs more (min_steps).
        "epochs_run": epochs_run(len(train), config),
        "outcomes": {},
    }
    for outcome in OUTCOMES:
        y = experiment.outcomes[outcome]
        rows: dict[str, dict[str, float]] = {}
        model = fit_uplift(x[train], t[train], y[train], replace_seed(config, seed))
        rows[f"response model, uplift variant ({_body(config)})"] = scores(
            y[test], predict_uplift(model, x[test]), t[test]
        )
        for name, baseline in baselines(seed).items():
            baseline.fit(x[train], y[train], t[train])
            rows[name] = scores(
                y[test], np.asarray(baseline.predict(x[test]), dtype=np.float64), t[test]
            )
        report["outcomes"][outcome] = rows
    return report


def format_table(reports: list[dict[str, Any]]) -> str:
    """One block per outcome: each method's Qini and uplift@30% per split seed, and their mean."""
    lines = []
    seeds = [r["seed"] for r in reports]
    for outcome in OUTCOMES:
        lines.append(f"{outcome} (split seeds {seeds}):")
        lines.append(f"  {'method':44s} {'Qini':>8s} {'uplift@30%':>11s}  per seed (Qini)")
        for name in reports[0]["outcomes"][outcome]:
            qini = [r["outcomes"][outcome][name]["qini"] for r in reports]
            at30 = [r["outcomes"][outcome][name]["uplift_at_30"] for r in reports]
            per_seed = " ".join(f"{q:+.4f}" for q in qini)
            lines.append(f"  {name:44s} {np.mean(qini):+8.4f} {np.mean(at30):+11.4f}  {per_seed}")
    return "\n".join(lines)


def _body(config: UpliftConfig) -> str:
    return f"2 × {config.hidden} MLP" if config.hidden else "linear"


def replace_seed(config: UpliftConfig, seed: int) -> UpliftConfig:
    return UpliftConfig(**{**asdict(config), "seed": seed})
