"""``make bench-quality``: recommendation quality on Online Retail and MovieLens 100K.

Popularity, this project's model, and the ``implicit`` library's ALS and BPR, each on the same
hold-out (trainer.evaluate's protocol). Every model's hyper-parameters and iteration count are
chosen on the same validation split, carved from the training period only; the chosen setting is
then trained on the full training period, timed, and measured on the hold-out. The table goes
into the "Recommendation quality" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

from bench.doc import write_section
from trainer.config import ALPHA_GRID, BPR_REGULARIZATION_GRID, REGULARIZATION_GRID, ModelConfig
from trainer.data import Loaded, load_movielens, load_online_retail
from trainer.dataset import Dataset, Factors
from trainer.evaluate import (
    Protocol,
    Split,
    evaluate,
    factor_scorer,
    ndcg10,
    popularity_scorer,
    protocol_for,
    recent_popularity_scorer,
)
from trainer.fit import grid, select
from trainer.model import train

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## Recommendation quality"
RECENT_DAYS = (7, 14, 30, 90)  # recent popularity's windows, one chosen on validation
IMPLICIT_THREADS = 2
TIMED_RUNS = 3
PATIENCE = ModelConfig.patience
# Every factor model gets the same capacity as ours.
FACTORS = ModelConfig.factors
DATASETS: dict[str, Callable[[], Loaded]] = {
    "online-retail": load_online_retail,
    "movielens": load_movielens,
}
TITLES = {"online-retail": "UCI Online Retail", "movielens": "MovieLens 100K"}


@dataclass(frozen=True)
class Row:
    model: str
    params: str
    val_ndcg: float
    metrics: dict[str, float]
    train_seconds: float  # median of TIMED_RUNS fits (BPR: one) of the chosen setting
    selection_seconds: float  # the whole validation grid


class _EarlyStop(Exception):
    pass


def _quiet(_: str) -> None:
    pass


def _median_seconds(fn: Callable[[], Any], runs: int = TIMED_RUNS) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _ours(hold: Split, val: Split, objective: str, say: Callable[[str], None]) -> Row:
    base = ModelConfig(objective=objective)
    if objective == "ials":
        candidates = grid(base, REGULARIZATION_GRID, ALPHA_GRID)
    else:
        candidates = [replace(base, regularization=r) for r in BPR_REGULARIZATION_GRID]
    start = time.perf_counter()
    best, epochs, config = select(candidates, val, _quiet)
    selection = time.perf_counter() - start
    # BPR fits take tens of seconds and no target depends on their time: timed once.
    seconds, fitted = _median_seconds(
        lambda: train(config, hold.train, epochs=epochs, log=_quiet).factors,
        TIMED_RUNS if objective == "ials" else 1,
    )
    params = (
        f"λ={config.regularization:g}, α={config.alpha:g}, c₀={config.confidence_offset:g}, "
        f"{epochs} epochs"
    )
    if objective == "bpr":
        params = f"λ={config.regularization:g}, lr={config.learning_rate:g}, {epochs} epochs"
    say(f"  ours ({objective}): {params}, val NDCG@10 {best:.4f}")
    name = "this project (iALS, PyTorch)" if objective == "ials" else "this project, BPR objective"
    return Row(name, params, best, evaluate(factor_scorer(fitted), hold), seconds, selection)


def _implicit_factors(model: Any) -> Factors:
    user = np.asarray(model.user_factors, dtype=np.float32)
    item = np.asarray(model.item_factors, dtype=np.float32)
    dim = item.shape[1]
    return Factors(user, item, np.zeros(len(item), np.float32), np.eye(dim, dtype=np.float32))


def _implicit(hold: Split, val: Split, kind: str, say: Callable[[str], None]) -> Row:
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.cpu.bpr import BayesianPersonalizedRanking

    def make(params: dict[str, float], iterations: int) -> Any:
        if kind == "als":
            return AlternatingLeastSquares(
                factors=FACTORS,
                regularization=params["regularization"],
                alpha=params["alpha"],
                iterations=iterations,
                num_threads=IMPLICIT_THREADS,
                random_state=0,
            )
        return BayesianPersonalizedRanking(
            factors=FACTORS,
            learning_rate=params["learning_rate"],
            regularization=params["regularization"],
            iterations=iterations,
            num_threads=IMPLICIT_THREADS,
            random_state=0,
        )

    if kind == "als":
        # The same input signal as ours: log(1 + summed event weight); implicit weighs it α·x (our
        # c₀ = 0: implicit 0.7 scales the matrix by alpha, with no constant added).
        space = [
            {"regularization": r, "alpha": a}
            for r in (0.1, 1.0, 10.0, 30.0)
            for a in (1.0, 4.0, 10.0)
        ]
        max_iterations, every = 30, 1
    else:
        space = [{"learning_rate": lr, "regularization": 0.01} for lr in (0.01, 0.05)]
        max_iterations, every = 300, 10

    def signal(matrix: sp.csr_matrix) -> sp.csr_matrix:
        out = matrix.copy()
        out.data = np.log1p(out.data) if kind == "als" else np.ones_like(out.data)
        return out

    def validated(params: dict[str, float]) -> tuple[float, int]:
        """Best validation NDCG@10 over the iterations, and the iteration it was reached at.

        Stops like our trainer does: after PATIENCE evaluations without a better score.
        """
        model = make(params, max_iterations)
        scores: list[tuple[float, int]] = []

        def on_iteration(iteration: int, *_: Any) -> None:
            if (iteration + 1) % every == 0:
                factors = _implicit_factors(model)
                scores.append((ndcg10(factor_scorer(factors), val), iteration + 1))
                best_at = max(range(len(scores)), key=lambda i: scores[i][0])
                if len(scores) - 1 - best_at >= PATIENCE:
                    raise _EarlyStop

        with contextlib.suppress(_EarlyStop):
            model.fit(signal(val.train), show_progress=False, callback=on_iteration)
        return max(scores, key=lambda s: s[0])

    def fit_chosen() -> Factors:
        model = make(params, iterations)
        model.fit(signal(hold.train), show_progress=False)
        return _implicit_factors(model)

    # implicit asks for a single-threaded BLAS: its own threads do the parallel work.
    with threadpool_limits(1, "blas"):
        start = time.perf_counter()
        tried = [(*validated(p), p) for p in space]
        selection = time.perf_counter() - start
        score, iterations, params = max(tried, key=lambda t: t[0])
        seconds, fitted = _median_seconds(fit_chosen, TIMED_RUNS if kind == "als" else 1)
    text = ", ".join(f"{k}={v:g}" for k, v in params.items()) + f", {iterations} iterations"
    say(f"  implicit {kind}: {text}, val NDCG@10 {score:.4f}")
    name = f"implicit {'ALS' if kind == 'als' else 'BPR'} ({IMPLICIT_THREADS} threads)"
    return Row(name, text, score, evaluate(factor_scorer(fitted), hold), seconds, selection)


def _popularity(hold: Split, val: Split) -> Row:
    seconds, _ = _median_seconds(lambda: popularity_scorer(hold.bought))
    val_score = ndcg10(popularity_scorer(val.bought), val)
    return Row("popularity", "distinct buyers per item", val_score,
               evaluate(popularity_scorer(hold.bought), hold), seconds, 0.0)  # fmt: skip


def _recent_popularity(dataset: Dataset, hold: Split, val: Split) -> Row:
    """Popularity over the last days before the split, the window chosen on validation."""
    started = time.perf_counter()
    scored = {d: ndcg10(recent_popularity_scorer(dataset, val, d), val) for d in RECENT_DAYS}
    days = max(scored, key=lambda d: scored[d])  # the first of equals: the shortest window
    grid = time.perf_counter() - started
    seconds, scorer = _median_seconds(lambda: recent_popularity_scorer(dataset, hold, days))
    return Row("recent popularity", f"distinct buyers in the last {days} days (ties: all time)",
               scored[days], evaluate(scorer, hold), seconds, grid)  # fmt: skip


def run_dataset(name: str, say: Callable[[str], None]) -> tuple[list[Row], str]:
    loaded = DATASETS[name]()
    protocol: Protocol = protocol_for(name)
    hold = protocol.split(loaded.dataset)
    val = protocol.inner(loaded.dataset, hold)
    say(f"{name}: {hold.description}; {len(hold.eval_users)} test, {len(val.eval_users)} val users")
    rows = [
        _popularity(hold, val),
        _recent_popularity(loaded.dataset, hold, val),
        _ours(hold, val, "ials", say),
        _ours(hold, val, "bpr", say),
        _implicit(hold, val, "als", say),
        _implicit(hold, val, "bpr", say),
    ]
    setup = (
        f"{loaded.summary()['rows_kept']:,} interactions, {len(loaded.dataset.user_ids):,} users, "
        f"{len(loaded.dataset.catalog):,} items; hold-out: {hold.description}, "
        f"{len(hold.eval_users):,} evaluated users; validation: {val.description}, "
        f"{len(val.eval_users):,} users"
    )
    return rows, setup


def _table(name: str, rows: list[Row], setup: str) -> list[str]:
    ours = next(r for r in rows if r.model.startswith("this project (iALS"))
    baselines = [r for r in rows if not r.model.startswith("this project")]
    best = max(baselines, key=lambda r: r.metrics["ndcg@10"])
    als = next(r for r in rows if r.model.startswith("implicit ALS"))
    quality_ok = ours.metrics["ndcg@10"] >= best.metrics["ndcg@10"]
    time_ok = ours.train_seconds <= 2 * als.train_seconds
    lines = [
        f"### {TITLES[name]}",
        "",
        setup + ".",
        "",
        "| model | chosen on validation | val NDCG@10 | NDCG@10 | Recall@10 | Recall@50 "
        "| HitRate@10 | Coverage@10 | train s | grid s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        m = r.metrics
        lines.append(
            f"| {r.model} | {r.params} | {r.val_ndcg:.4f} | {m['ndcg@10']:.4f} | "
            f"{m['recall@10']:.4f} | {m['recall@50']:.4f} | {m['hit_rate@10']:.4f} | "
            f"{m['coverage@10']:.4f} | {r.train_seconds:.2f} | {r.selection_seconds:.1f} |"
        )
    lines += [
        "",
        f"- Target NDCG@10 ≥ best baseline ({best.model}, {best.metrics['ndcg@10']:.4f}): "
        f"**{'met' if quality_ok else 'MISSED'}** ({ours.metrics['ndcg@10']:.4f}).",
        f"- Target training time ≤ 2× implicit ALS ({als.train_seconds:.2f} s): "
        f"**{'met' if time_ok else 'MISSED'}** ({ours.train_seconds:.2f} s).",
        "",
    ]
    return lines


def _machine() -> str:
    import implicit
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, "
        f"torch {torch.__version__} (this project: {ModelConfig.threads} thread), "
        f"implicit {implicit.__version__} (CPU, {IMPLICIT_THREADS} threads, BLAS 1 thread), "
        f"numpy {np.__version__}"
    )


def render(results: dict[str, tuple[list[Row], str]], command: str) -> str:
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC with `{command}` on {_machine()}.",
        "Protocol: trainer/evaluate.py (docs/TRAINING.md). Every model's hyper-parameters and "
        "iteration count were chosen by validation NDCG@10 on a split carved from the training "
        "period; the chosen setting was then trained on the whole training period and measured "
        f"once on the hold-out. `train s` is the median of {TIMED_RUNS} such fits (BPR: one; "
        "wall clock, on a machine shared with other jobs: 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end); `grid s` is the whole validation search. "
        f"Every factor model has {FACTORS} factors. Recall@K is hits / min(K, #relevant), "
        "the truncated form (docs/TRAINING.md), so it reads higher than hits / #relevant. The "
        "hold-out scores users who bought before it, on items someone bought before it: new "
        "customers and new items are outside these figures. Recent popularity's window (7, 14, "
        "30 or 90 days before the split) is chosen on validation like every other setting.",
        "",
    ]
    for name, (rows, setup) in results.items():
        lines += _table(name, rows, setup)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/BENCHMARKS.md")
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    args = parser.parse_args(argv)

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = {name: run_dataset(name, say) for name in args.datasets}
    write_section(args.out, SECTION, render(results, "make bench-quality"))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
