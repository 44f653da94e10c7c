"""Hold-out splits and ranking metrics, exactly as the benchmark protocol defines them.

Online Retail: one global time split; MovieLens: each user's last 20 % of ratings. A shop's own
data gets a global time split that holds out the last tenth of its interactions. Every split can
split its training part again the same way, so validation never sees the hold-out period.

Metrics for the top-K of each evaluated user (items the user bought in training excluded):
Recall@K = hits / min(K, #relevant); NDCG@K binary, ideal over min(K, #relevant);
HitRate@K = share of users with a hit; coverage@K = distinct items recommended / catalog size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from trainer.dataset import Dataset, Factors, Floats, Ints

Bools = npt.NDArray[np.bool_]
# Scores for a batch of users: (len(users), n_items), higher is better.
Scorer = Callable[[Ints], npt.NDArray[np.floating]]

ONLINE_RETAIL_CUTOFF = int(datetime(2011, 11, 9, tzinfo=UTC).timestamp())
# Views and clicks say less about taste than a purchase does.
EVENT_WEIGHTS = {"purchase": 1.0, "cart": 0.5, "click": 0.25, "view": 0.1}
KS = (10, 50)


@dataclass(frozen=True)
class Split:
    train_rows: Bools  # which interaction rows the model may learn from
    train: sp.csr_matrix  # users × items, summed event weights of train_rows
    relevant: sp.csr_matrix  # users × items, 1 where an evaluated user's item is relevant
    description: str
    # users × items, 1 where a user purchased the item in train_rows: a view is no purchase, so
    # it counts in no baseline, history or exclusion (discountd excludes only purchases too).
    bought: sp.csr_matrix

    @property
    def eval_users(self) -> Ints:
        return np.flatnonzero(np.diff(self.relevant.indptr) > 0).astype(np.int64)


@dataclass(frozen=True)
class Protocol:
    """How to hold out: a global time cutoff, or each user's last ``fraction`` of interactions."""

    kind: str  # "time" | "user_last"
    cutoff: int | None = None  # Unix seconds, for "time"; None: the last tenth of interactions
    fraction: float = 0.2
    relevant_must_be_new: bool = True  # relevant excludes items the user bought before

    def split(self, dataset: Dataset, rows: Bools | None = None) -> Split:
        inter = dataset.interactions
        rows = np.ones(len(inter.user_index), dtype=bool) if rows is None else rows
        if self.kind == "time":
            cutoff = self.cutoff
            if cutoff is None:
                cutoff = int(np.quantile(inter.timestamp[rows], 0.9))
            train_rows = rows & (inter.timestamp < cutoff)
            test_rows = rows & (inter.timestamp >= cutoff)
            when = datetime.fromtimestamp(cutoff, UTC).strftime("%Y-%m-%d %H:%M")
            description = f"global time split at {when} UTC"
        else:
            train_rows, test_rows = _user_last(dataset, rows, self.fraction)
            description = f"each user's last {self.fraction:.0%} of interactions (at least 1)"
        return _make_split(dataset, train_rows, test_rows, self.relevant_must_be_new, description)

    def inner(self, dataset: Dataset, split: Split) -> Split:
        """A validation split carved from split's training rows only."""
        if self.kind == "time":
            ts = dataset.interactions.timestamp
            test_start = int(ts[~split.train_rows].min()) if (~split.train_rows).any() else None
            last = int(ts.max())
            if test_start is not None:
                # A validation window as long as the hold-out window, just before it, holding
                # at least the last timestamp before it: with dates only, the hold-out is often
                # one day, a window of length zero.
                cutoff = test_start - (last - test_start)
                if split.train_rows.any():
                    cutoff = min(cutoff, int(ts[split.train_rows].max()))
                return Protocol("time", cutoff, self.fraction, self.relevant_must_be_new).split(
                    dataset, split.train_rows
                )
        return self.split(dataset, split.train_rows)


def protocol_for(format_name: str) -> Protocol:
    if format_name == "online-retail":
        return Protocol("time", ONLINE_RETAIL_CUTOFF)
    if format_name == "movielens":
        return Protocol("user_last", relevant_must_be_new=False)
    return Protocol("time")


def interaction_matrix(dataset: Dataset, rows: Bools) -> sp.csr_matrix:
    inter = dataset.interactions
    weights = np.array([EVENT_WEIGHTS[e] for e in inter.event], dtype=np.float32)
    matrix = sp.csr_matrix(
        (weights[rows], (inter.user_index[rows], inter.item_index[rows])),
        shape=(len(dataset.user_ids), len(dataset.catalog)),
        dtype=np.float32,
    )
    matrix.sum_duplicates()
    return matrix


def purchases(dataset: Dataset) -> Bools:
    """Which interaction rows are purchases."""
    return np.array([e == "purchase" for e in dataset.interactions.event], dtype=bool)


def _user_last(dataset: Dataset, rows: Bools, fraction: float) -> tuple[Bools, Bools]:
    inter = dataset.interactions
    idx = np.flatnonzero(rows)
    # Stable sort by (user, timestamp): ties keep file order.
    order = idx[np.lexsort((inter.timestamp[idx], inter.user_index[idx]))]
    users = inter.user_index[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    counts = np.diff(np.r_[starts, len(order)])
    n_test = np.maximum(1, np.round(counts * fraction).astype(np.int64))
    position = np.arange(len(order)) - np.repeat(starts, counts)
    is_test = position >= np.repeat(counts - n_test, counts)
    test_rows = np.zeros_like(rows)
    test_rows[order[is_test]] = True
    return rows & ~test_rows, test_rows


def _make_split(
    dataset: Dataset, train_rows: Bools, test_rows: Bools, must_be_new: bool, description: str
) -> Split:
    bought_rows = purchases(dataset)
    test = interaction_matrix(dataset, test_rows & bought_rows)
    test.data[:] = 1.0
    bought = interaction_matrix(dataset, train_rows & bought_rows)
    bought.data[:] = 1.0
    has_train = (np.diff(bought.indptr) > 0).astype(np.float32)
    keep = sp.diags(has_train) @ test  # evaluated users bought something before
    if must_be_new:
        keep = keep - keep.multiply(bought)
        # Items nobody bought in training cannot be recommended by any model.
        known = (np.diff(bought.tocsc().indptr) > 0).astype(np.float32)
        keep = keep @ sp.diags(known)
    relevant = sp.csr_matrix(keep, dtype=np.float32)
    relevant.eliminate_zeros()
    relevant.sort_indices()
    return Split(
        train_rows=train_rows,
        train=interaction_matrix(dataset, train_rows),
        relevant=relevant,
        description=description,
        bought=bought,
    )


def factor_scorer(factors: Factors) -> Scorer:
    def score(users: Ints) -> npt.NDArray[np.floating]:
        return factors.user[users] @ factors.item.T + factors.item_bias

    return score


def popularity(train: sp.csr_matrix) -> Floats:
    """Distinct users per item in train (given a split's bought, distinct buyers): the
    baseline every model must beat."""
    binary = train.copy()
    binary.data[:] = 1.0
    return np.asarray(binary.sum(axis=0)).ravel().astype(np.float64)


def popularity_scorer(train: sp.csr_matrix) -> Scorer:
    return _same_for_everyone(popularity(train))


def _same_for_everyone(counts: Floats) -> Scorer:
    def score(users: Ints) -> npt.NDArray[np.floating]:
        return np.broadcast_to(counts, (len(users), len(counts)))

    return score


def recent_popularity_scorer(dataset: Dataset, split: Split, days: int) -> Scorer:
    """Distinct buyers per item in the last ``days`` days of the split's training rows, ties
    (most items, over a short window) broken by all-time buyers: the baseline a shop whose
    bestsellers change beats least easily."""
    inter = dataset.interactions
    end = int(inter.timestamp[split.train_rows].max())
    recent_rows = split.train_rows & purchases(dataset) & (inter.timestamp >= end - days * 86_400)
    total = popularity(split.bought)
    return _same_for_everyone(
        popularity(interaction_matrix(dataset, recent_rows)) * (total.max() + 1) + total
    )


def top_k(scorer: Scorer, users: Ints, exclude: sp.csr_matrix, k: int, batch: int = 1024) -> Ints:
    """The k best items per user, best first, never an excluded one."""
    out = np.empty((len(users), k), dtype=np.int64)
    for start in range(0, len(users), batch):
        chunk = users[start : start + batch]
        scores = np.array(scorer(chunk), dtype=np.float64)
        mask = exclude[chunk]
        scores[np.repeat(np.arange(len(chunk)), np.diff(mask.indptr)), mask.indices] = -np.inf
        # A stable sort breaks ties by item index, at the k-th place too (popularity ties a
        # lot; a partial sort kept an arbitrary few of the items tied there).
        out[start : start + len(chunk)] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return out


def ranking_metrics(recommended: Ints, relevant: list[set[int]], n_items: int) -> dict[str, float]:
    """Metrics of ranked lists (one row per user) against each user's relevant set."""
    if len(relevant) == 0:
        return {}
    hits = np.array(
        [[item in rel for item in row] for row, rel in zip(recommended, relevant, strict=True)]
    )
    n_rel = np.array([len(rel) for rel in relevant], dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, 12))
    ideal = np.array([discounts[: int(min(10, n))].sum() for n in n_rel])
    metrics = {
        f"recall@{k}": float(np.mean(hits[:, :k].sum(axis=1) / np.minimum(k, n_rel)))
        for k in KS
        if k <= recommended.shape[1]
    }
    top10 = hits[:, :10]
    metrics["ndcg@10"] = float(np.mean((top10 * discounts[: top10.shape[1]]).sum(axis=1) / ideal))
    metrics["hit_rate@10"] = float(np.mean(top10.any(axis=1)))
    metrics["coverage@10"] = len(np.unique(recommended[:, :10])) / n_items
    metrics["users"] = float(len(relevant))
    return metrics


def evaluate(scorer: Scorer, split: Split, k: int = max(KS)) -> dict[str, float]:
    users = split.eval_users
    if len(users) == 0:
        return {}
    # A catalog smaller than k gives shorter lists (bought items still excluded: -inf last).
    recommended = top_k(scorer, users, split.bought, min(k, split.train.shape[1]))
    rel = split.relevant
    relevant = [set(rel.indices[rel.indptr[u] : rel.indptr[u + 1]].tolist()) for u in users]
    return ranking_metrics(recommended, relevant, split.train.shape[1])


def ndcg10(scorer: Scorer, split: Split) -> float:
    return evaluate(scorer, split, k=10).get("ndcg@10", 0.0)
