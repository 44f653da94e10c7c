"""Metrics on hand-computed cases, the two hold-out protocols, and metric invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given
from hypothesis import strategies as st

from trainer.dataset import Catalog, Dataset, Interactions
from trainer.evaluate import (
    Protocol,
    evaluate,
    popularity_scorer,
    ranking_metrics,
    recent_popularity_scorer,
    top_k,
)

DCG = [1.0 / math.log2(i + 2) for i in range(10)]


def test_hand_computed_metrics() -> None:
    recommended = np.array(
        [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]
    )
    relevant = [{1, 5, 42}, {99}]
    m = ranking_metrics(recommended, relevant, n_items=100)
    # User 0: hits at ranks 2 and 6 of 3 relevant; user 1: nothing.
    assert m["recall@10"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["ndcg@10"] == pytest.approx(((DCG[1] + DCG[5]) / sum(DCG[:3]) + 0) / 2)
    assert m["hit_rate@10"] == 0.5
    assert m["coverage@10"] == pytest.approx(20 / 100)
    assert "recall@50" not in m  # only 10 recommended


def test_recall_divides_by_min_of_k_and_relevant() -> None:
    recommended = np.arange(50)[None, :]
    relevant = [set(range(0, 120, 2))]  # 60 relevant, 25 of them in the top 50, 5 in the top 10
    m = ranking_metrics(recommended, relevant, n_items=200)
    assert m["recall@10"] == pytest.approx(5 / 10)
    assert m["recall@50"] == pytest.approx(25 / 50)
    assert m["ndcg@10"] == pytest.approx(sum(DCG[0:10:2]) / sum(DCG))


def shop(
    rows: list[tuple[int, int, int]], n_users: int, n_items: int, events: list[str] | None = None
) -> Dataset:
    users, items, ts = (np.array(c, dtype=np.int64) for c in zip(*rows, strict=True))
    return Dataset(
        user_ids=[f"u{u}" for u in range(n_users)],
        catalog=Catalog(
            item_ids=[f"i{i}" for i in range(n_items)],
            categories=[""] * n_items,
            titles=[""] * n_items,
            prices=np.ones(n_items),
            costs=np.ones(n_items),
            cost_assumed=np.zeros(n_items, dtype=bool),
        ),
        interactions=Interactions(
            user_index=users,
            item_index=items,
            timestamp=ts,
            event=events or ["purchase"] * len(rows),
            quantity=np.ones(len(rows), dtype=np.int64),
            price=np.full(len(rows), np.nan),
        ),
    )


def test_time_split_relevance_rules() -> None:
    ds = shop(
        [
            (0, 0, 1), (0, 1, 2),  # user 0 before the cutoff
            (0, 0, 10),  # re-buys item 0: not relevant (bought before)
            (0, 2, 11),  # item 2 is new to user 0 and known in training: relevant
            (0, 3, 12),  # item 3 was never bought before the cutoff: not relevant
            (1, 2, 3),  # user 1 only trains
            (2, 1, 13),  # user 2 has no history: not evaluated
        ],
        n_users=3,
        n_items=4,
    )  # fmt: skip
    split = Protocol("time", cutoff=10).split(ds)
    assert split.eval_users.tolist() == [0]
    assert split.relevant[0].indices.tolist() == [2]
    assert split.train.nnz == 3
    # Training items are excluded from the ranking: user 0 gets 2, 3 and never 0 or 1.
    assert top_k(popularity_scorer(split.train), np.array([0]), split.train, 2).tolist() == [[2, 3]]
    # The validation window is as long as the hold-out (10..13) and just before it, but 7..10
    # holds no interaction: it reaches back to the last one before the hold-out, at 3.
    inner = Protocol("time", cutoff=10).inner(ds, split)
    assert inner.train_rows.tolist() == [True, True, False, False, False, False, False]
    assert inner.eval_users.tolist() == []


def test_a_view_is_no_purchase_in_relevance_exclusion_or_popularity() -> None:
    """TRAINING.md: bought before, bought after, someone bought and popularity are purchases."""
    rows_events = [
        ((1, 1, 1), "purchase"), ((2, 1, 2), "purchase"), ((3, 2, 3), "purchase"),
        ((1, 0, 4), "view"), ((2, 0, 4), "view"), ((3, 0, 4), "view"),  # item 0: most viewed
        ((1, 2, 5), "view"),  # user 1 looked at item 2 before buying it
        ((0, 2, 6), "view"),  # user 0 only looked before the cutoff
        ((1, 2, 11), "purchase"),  # new to user 1 as a purchase, bought by user 3: relevant
        ((1, 0, 12), "purchase"),  # nobody bought item 0 before: not relevant
        ((0, 2, 13), "purchase"),  # user 0 bought nothing before: not evaluated
    ]  # fmt: skip
    rows, events = zip(*rows_events, strict=True)
    split = Protocol("time", cutoff=10).split(shop(list(rows), 4, 3, list(events)))
    assert split.eval_users.tolist() == [1]
    assert split.relevant[1].indices.tolist() == [2]
    # Popularity counts buyers, not viewers; a viewed item may still be recommended.
    ranked = top_k(popularity_scorer(split.bought), np.array([1]), split.bought, 2)
    assert ranked.tolist() == [[2, 0]]
    assert evaluate(popularity_scorer(split.bought), split, k=2)["hit_rate@10"] == 1.0


def test_dates_only_still_leave_a_validation_window() -> None:
    """When the last day holds a tenth of the rows or more, the hold-out is that one day: a
    window of length zero, and a validation window as long held nothing."""
    day = 86_400
    rows = [(u, (u + d) % 7, d * day) for d in range(7) for u in range(10)]  # a new item a day
    ds = shop(rows, n_users=10, n_items=7)
    hold = Protocol("time").split(ds)
    assert hold.description == "global time split at 1970-01-07 00:00 UTC"
    inner = Protocol("time").inner(ds, hold)
    assert inner.description == "global time split at 1970-01-06 00:00 UTC"
    assert len(inner.eval_users) == 10


def test_user_last_fraction_holds_out_at_least_one_per_user() -> None:
    rows = [(0, i, i) for i in range(10)] + [(1, 0, 5), (1, 1, 6)]
    split = Protocol("user_last", relevant_must_be_new=False).split(shop(rows, 2, 10))
    assert split.relevant[0].indices.tolist() == [8, 9]
    assert split.relevant[1].indices.tolist() == [1]
    assert split.train_rows.sum() == 9


@given(st.lists(st.integers(0, 3), min_size=60, max_size=60), st.integers(1, 20))
def test_ties_go_to_the_lower_item_index_even_across_the_kth_place(
    scores: list[int], k: int
) -> None:
    """Popularity ties a lot (buyer counts); which of the items tied at the k-th place make the
    list must not depend on argpartition's internals, or the baseline's Recall@50 does."""
    s = np.array([scores], dtype=np.float64)
    exclude = sp.csr_matrix(([1.0], ([0], [7])), shape=(1, 60))
    got = top_k(lambda users: s[users], np.array([0]), exclude, k)
    s[0, 7] = -np.inf
    expected = sorted(range(60), key=lambda i: (-s[0, i], i))[:k]
    assert got.tolist() == [expected]
    flat = np.zeros((1, 3000))
    assert top_k(
        lambda users: flat[users], np.array([0]), sp.csr_matrix((1, 3000)), 10
    ).tolist() == [list(range(10))]


@given(
    st.lists(
        st.tuples(st.permutations(list(range(12))), st.sets(st.integers(0, 11), min_size=1)),
        min_size=1,
        max_size=8,
    )
)
def test_metrics_are_bounded_and_a_perfect_ranking_scores_one(
    cases: list[tuple[list[int], set[int]]],
) -> None:
    recommended = np.array([ranking[:10] for ranking, _ in cases])
    relevant = [rel for _, rel in cases]
    m = ranking_metrics(recommended, relevant, n_items=12)
    for name in ("recall@10", "ndcg@10", "hit_rate@10", "coverage@10"):
        assert 0.0 <= m[name] <= 1.0 + 1e-12
    assert m["hit_rate@10"] >= m["recall@10"] - 1e-12 or m["hit_rate@10"] == 1.0
    perfect = np.array([sorted(rel) + [i for i in range(12) if i not in rel] for rel in relevant])
    best = ranking_metrics(perfect[:, :10], relevant, n_items=12)
    assert best["ndcg@10"] == pytest.approx(1.0)
    assert best["recall@10"] == pytest.approx(1.0)
    assert m["ndcg@10"] <= best["ndcg@10"] + 1e-12


def test_evaluate_scores_only_users_with_relevant_items() -> None:
    ds = shop([(0, 0, 1), (0, 1, 20), (1, 0, 2), (1, 1, 3)], n_users=2, n_items=3)
    split = Protocol("time", cutoff=10).split(ds)
    m = evaluate(popularity_scorer(split.train), split, k=2)
    assert m["users"] == 1.0
    assert m["hit_rate@10"] == 1.0


def test_recent_popularity_ranks_by_the_last_days_and_breaks_ties_by_all_time() -> None:
    day = 86_400
    ds = shop(
        [
            (0, 0, 0), (1, 0, 0), (2, 0, 0),  # item 0: three buyers, long ago
            (0, 3, 1 * day), (1, 3, 1 * day),  # item 3: two buyers long ago...
            (2, 3, 9 * day),  # ...and one in the last week
            (0, 2, 9 * day), (1, 2, 9 * day),  # item 2: two buyers in the last week
            (3, 1, 9 * day),  # item 1: one, in the last week
            (0, 1, 20 * day),  # the hold-out
        ],
        n_users=4,
        n_items=4,
    )  # fmt: skip
    split = Protocol("time", cutoff=15 * day).split(ds)
    week = recent_popularity_scorer(ds, split, days=7)(np.array([0]))[0]
    # 2 (two buyers lately), then 3 and 1 (one each; 3 has more buyers in all), then 0 (none).
    assert np.argsort(-week, kind="stable").tolist() == [2, 3, 1, 0]
    month = recent_popularity_scorer(ds, split, days=30)(np.array([0]))[0]
    assert np.argsort(-month, kind="stable").tolist() == [0, 3, 2, 1]
