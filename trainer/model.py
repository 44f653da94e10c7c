"""Matrix factorization for implicit feedback, in PyTorch: iALS (the default) or BPR.

iALS (Hu, Koren & Volinsky 2008) minimises Σ c_ui (p_ui − x_uᵀy_i)² + λ(‖X‖² + ‖Y‖²) with
p_ui = 1 for every observed pair, c_ui = c₀ + α·log(1 + w_ui) and w_ui the summed event weight.
Each half-epoch solves every user's (then every item's) least-squares system with a few
conjugate-gradient steps warm-started from the previous solution, vectorised over all rows at
once: the same scheme as the ``implicit`` library, with the same cost per epoch.

BPR (Rendle et al. 2009) is kept because the objective was chosen by measurement
(docs/TRAINING.md) and a shop's data may favour it.
"""

from __future__ import annotations

import math
import os
import random
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from trainer.config import ModelConfig
from trainer.dataset import Factors


class Diverged(Exception):
    """Training produced factors that are not finite numbers; nothing was written."""


def diverged(config: ModelConfig) -> Diverged:
    settings = f"{config.objective}, regularization {config.regularization:g}"
    if config.objective == "ials":  # BPR has no α
        settings += f", alpha {config.alpha:g}"
    return Diverged(f"training diverged: the factors are not finite ({settings})")


def _finite(factors: Factors) -> bool:
    arrays = (factors.user, factors.item, factors.item_bias, factors.foldin)
    return all(np.isfinite(a).all() for a in arrays)


@dataclass(frozen=True)
class TrainResult:
    factors: Factors
    epochs: int  # epochs the returned factors were trained for
    history: list[dict[str, float]]  # per epoch: epoch, loss, and val_ndcg@10 when validated


def seed_everything(seed: int, threads: int) -> None:
    """One place for every source of randomness and nondeterminism on CPU."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def train(
    config: ModelConfig,
    matrix: sp.csr_matrix,
    validate: Callable[[Factors], float] | None = None,
    log: Callable[[str], None] | None = None,
    epochs: int | None = None,
) -> TrainResult:
    """Fit on a users × items weight matrix.

    With ``validate``, stop once validation NDCG@10 has not improved for ``patience`` epochs and
    return the best epoch's factors; without it, train exactly ``epochs`` (or max_epochs).
    """
    say = log if log is not None else (lambda line: print(line, file=sys.stderr))
    seed_everything(config.seed, config.threads)
    step = _IALS(config, matrix) if config.objective == "ials" else _BPR(config, matrix)
    total = epochs if epochs is not None else config.max_epochs
    best: tuple[float, int, Factors] | None = None
    history: list[dict[str, float]] = []
    for epoch in range(1, total + 1):
        loss = step.epoch()
        # Stop at the first epoch that breaks: training on would only print nan losses, and
        # numpy's overflow warnings from scoring them.
        if not (math.isfinite(loss) and step.finite()):
            raise diverged(config)
        record = {"epoch": float(epoch), "loss": loss}
        line = f"epoch {epoch:3d}  loss {loss:.5f}"
        if validate is not None:
            factors = step.factors()
            if not _finite(factors):
                raise diverged(config)
            score = validate(factors)
            record["val_ndcg@10"] = score
            line += f"  val NDCG@10 {score:.4f}"
            if best is None or score > best[0]:
                best = (score, epoch, factors)
        history.append(record)
        say(line)
        if best is not None and epoch - best[1] >= config.patience:
            say(f"early stop: no better validation NDCG@10 since epoch {best[1]}")
            break
    if best is not None:  # checked as they were scored
        return TrainResult(best[2], best[1], history)
    # Caught here: the export check compares ONNX with PyTorch, where nan matches nan; and the
    # fold-in inverse can overflow where the factors did not.
    factors = step.factors()
    if not _finite(factors):
        raise diverged(config)
    return TrainResult(factors, total, history)


class _IALS:
    def __init__(self, config: ModelConfig, matrix: sp.csr_matrix) -> None:
        self.config = config
        n_users, n_items = matrix.shape
        by_user = sp.csr_matrix(matrix, dtype=np.float64)
        by_user.sort_indices()
        by_item = by_user.T.tocsr()
        by_item.sort_indices()
        self.by_user = _Pattern(by_user, config)
        self.by_item = _Pattern(by_item, config)
        gen = torch.Generator().manual_seed(config.seed)
        self.x = torch.randn(n_users, config.factors, generator=gen) * config.init_scale
        self.y = torch.randn(n_items, config.factors, generator=gen) * config.init_scale
        self.eye = torch.eye(config.factors)

    def epoch(self) -> float:
        self._solve(self.x, self.y, self.by_user)
        self._solve(self.y, self.x, self.by_item)
        return self._loss()

    def _solve(self, x: torch.Tensor, y: torch.Tensor, pattern: _Pattern) -> None:
        """A few CG steps on (YᵀY + Yᵀ(C−I)Y + λI) x_r = YᵀC p_r for every row r, in place."""
        gram = y.T @ y + self.config.regularization * self.eye
        y_t = y.T.contiguous()

        def apply(v: torch.Tensor) -> torch.Tensor:
            # Σ_i (c_ri − 1)(v_r·y_i) y_i over each row's observed items, as SDDMM then SpMM.
            dots = torch.sparse.sampled_addmm(pattern.ones, v, y_t, beta=0.0)
            return v @ gram + pattern.with_values(dots.values() * pattern.extra) @ y

        r = pattern.conf @ y - apply(x)
        p = r.clone()
        rs_old = (r * r).sum(dim=1)
        for _ in range(self.config.cg_steps):
            ap = apply(p)
            denom = (p * ap).sum(dim=1)
            a = torch.where(denom > 0, rs_old / denom.clamp_min(1e-30), torch.zeros_like(denom))
            x += a[:, None] * p
            r -= a[:, None] * ap
            rs_new = (r * r).sum(dim=1)
            beta = torch.where(rs_old > 0, rs_new / rs_old.clamp_min(1e-30), 0.0)
            p = r + beta[:, None] * p
            rs_old = rs_new

    def finite(self) -> bool:
        return bool(torch.isfinite(self.x).all() and torch.isfinite(self.y).all())

    def _loss(self) -> float:
        """Weighted squared error over all pairs plus the penalty, per observed pair."""
        pattern = self.by_user
        pred = torch.sparse.sampled_addmm(pattern.ones, self.x, self.y.T.contiguous(), beta=0.0)
        p = pred.values()
        observed = (pattern.conf.values() * (1.0 - p) ** 2 - p**2).sum()
        # Σ over every pair of pred², of which the observed part was subtracted above.
        everything = ((self.x @ (self.y.T @ self.y)) * self.x).sum()
        penalty = self.config.regularization * (self.x.pow(2).sum() + self.y.pow(2).sum())
        return float((observed + everything + penalty) / max(1, len(p)))

    def factors(self) -> Factors:
        return _factors(self.x, self.y, torch.zeros(self.y.shape[0]), self.config.regularization)


class _Pattern:
    """One side's observed pairs as torch CSR: confidences, confidences − 1, and ones."""

    def __init__(self, matrix: sp.csr_matrix, config: ModelConfig) -> None:
        self.crow = torch.from_numpy(matrix.indptr.astype(np.int64))
        self.col = torch.from_numpy(matrix.indices.astype(np.int64))
        self.shape = matrix.shape
        # A huge α overflows here; the inf confidences make the factors nan in the first epoch,
        # where train() stops with Diverged, so numpy's overflow warnings would only be noise.
        with np.errstate(over="ignore"):
            conf = config.confidence_offset + config.alpha * np.log1p(matrix.data)
            conf = torch.from_numpy(conf.astype(np.float32))
        with warnings.catch_warnings():
            # torch warns once per process that sparse CSR is "beta"; the ops used here are not.
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.conf = self.with_values(conf)
        self.extra = conf - 1.0
        self.ones = self.with_values(torch.ones_like(conf))

    def with_values(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(
            self.crow, self.col, values, self.shape, check_invariants=False
        )


class _BPR:
    def __init__(self, config: ModelConfig, matrix: sp.csr_matrix) -> None:
        self.config = config
        n_users, n_items = matrix.shape
        coo = matrix.tocoo()
        self.users = torch.from_numpy(coo.row.astype(np.int64))
        self.items = torch.from_numpy(coo.col.astype(np.int64))
        self.n_items = n_items
        self.gen = torch.Generator().manual_seed(config.seed)
        self.x = torch.nn.Parameter(torch.randn(n_users, config.factors, generator=self.gen) * 0.1)
        self.y = torch.nn.Parameter(torch.randn(n_items, config.factors, generator=self.gen) * 0.1)
        self.b = torch.nn.Parameter(torch.zeros(n_items))
        self.optimizer = torch.optim.Adam([self.x, self.y, self.b], lr=config.learning_rate)

    def epoch(self) -> float:
        order = torch.randperm(len(self.users), generator=self.gen)
        negatives = torch.randint(0, self.n_items, (len(self.users),), generator=self.gen)
        total = 0.0
        reg = self.config.regularization
        for start in range(0, len(order), self.config.batch_size):
            idx = order[start : start + self.config.batch_size]
            u, i, j = self.users[idx], self.items[idx], negatives[idx]
            xu, yi, yj = self.x[u], self.y[i], self.y[j]
            diff = (xu * (yi - yj)).sum(dim=1) + self.b[i] - self.b[j]
            penalty = reg * (xu.pow(2).sum() + yi.pow(2).sum() + yj.pow(2).sum()) / len(idx)
            loss = -torch.nn.functional.logsigmoid(diff).mean() + penalty
            self.optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            self.optimizer.step()
            total += float(loss.detach()) * len(idx)
        return total / max(1, len(order))

    def finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in (self.x, self.y, self.b))

    def factors(self) -> Factors:
        with torch.no_grad():
            return _factors(self.x, self.y, self.b, self.config.regularization)


def _factors(x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor, reg: float) -> Factors:
    with torch.no_grad():
        item = y.detach().double()
        foldin = torch.linalg.inv(item.T @ item + reg * torch.eye(item.shape[1], dtype=item.dtype))
        return Factors(
            user=x.detach().numpy().astype(np.float32, copy=True),
            item=item.numpy().astype(np.float32, copy=True),
            item_bias=bias.detach().numpy().astype(np.float32, copy=True),
            foldin=foldin.numpy().astype(np.float32),
        )
