"""Recommend: validate a query, pick the path (known user, fold-in, popularity), run the graph.

Ids stay strings here; integer indices exist only between this module and the graph.
"""

from __future__ import annotations

import enum
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.store.validate import CONTROL_CHARACTERS
from server.errors import FieldViolation, InvalidRequest
from server.limits import MAX_ID_CHARS
from server.model import ModelVersion

DEFAULT_LIMIT = 10
MAX_LIMIT = 1000
MAX_IDS = 1000


class ColdStart(enum.Enum):
    NONE = "none"  # a user the model was trained on
    FOLD_IN = "fold_in"  # unknown user, vector folded in from recent items
    POPULARITY = "popularity"  # unknown user without recent items the model learned from


@dataclass(frozen=True)
class RecommendQuery:
    user_id: str
    limit: int = 0  # 0: DEFAULT_LIMIT
    exclude_item_ids: Sequence[str] = ()
    recent_item_ids: Sequence[str] = ()
    categories: Sequence[str] = ()
    include_purchased: bool = False
    # Items the store holds the user's purchases of since the model's data ended
    # (server.purchases): excluded, with those the model was trained on, unless include_purchased.
    bought: Collection[str] = ()


@dataclass(frozen=True)
class ScoredItem:
    item_id: str
    score: float
    category: str


@dataclass(frozen=True)
class Recommendation:
    items: list[ScoredItem]
    model_version: str
    cold_start: ColdStart


def user_and_limit_problems(user_id: str, limit: int) -> list[FieldViolation]:
    """The user_id and limit checks Recommend and GetOffers share."""
    problems: list[FieldViolation] = []
    if not user_id.strip():
        problems.append(FieldViolation("user_id", "required: the shop's id of the user"))
    elif len(user_id) > MAX_ID_CHARS:
        problems.append(FieldViolation("user_id", f"at most {MAX_ID_CHARS} characters"))
    elif CONTROL_CHARACTERS.search(user_id):
        # As the store's ids (core.store.validate): PostgreSQL text cannot even hold NUL, and
        # the offer log's insert would fail for good, every offer queued behind it waiting.
        problems.append(FieldViolation("user_id", "must not contain control characters"))
    if not 0 <= limit <= MAX_LIMIT:
        problems.append(
            FieldViolation(
                "limit",
                f"must be 1 to {MAX_LIMIT} (0 for the default {DEFAULT_LIMIT}), got {limit}",
            )
        )
    return problems


def validate(query: RecommendQuery, model: ModelVersion | None) -> None:
    """Raise InvalidRequest listing every problem; categories are checked once a model is known."""
    problems = user_and_limit_problems(query.user_id, query.limit)
    for name in ("exclude_item_ids", "recent_item_ids", "categories"):
        count = len(getattr(query, name))
        if count > MAX_IDS:
            problems.append(FieldViolation(name, f"at most {MAX_IDS} entries, got {count}"))
    if model is not None and len(query.categories) <= MAX_IDS:
        unknown = sorted({c for c in query.categories if c not in model.category_index})
        if unknown:
            known = ", ".join(repr(c) for c in model.categories[:10])
            more = ", ..." if len(model.categories) > 10 else ""
            problems.append(
                FieldViolation(
                    "categories",
                    f"unknown {', '.join(repr(c) for c in unknown)}; the catalog has {known}{more}",
                )
            )
    if problems:
        raise InvalidRequest(problems)


@dataclass(frozen=True)
class Plan:
    """One user's row of a model run: what recommend() feeds the graph, before padding."""

    user: int  # -1: folded in from history
    history: list[int]
    excluded: list[int]  # sorted
    allowed: np.ndarray[tuple[int], np.dtype[np.float32]]
    limit: int
    path: ColdStart


def plan(model: ModelVersion, query: RecommendQuery) -> Plan | Recommendation:
    """Validate and resolve ids; a popularity answer needs no model run and comes back whole."""
    validate(query, model)
    limit = query.limit or DEFAULT_LIMIT
    excluded = {model.item_index[i] for i in query.exclude_item_ids if i in model.item_index}
    if not query.include_purchased:
        excluded.update(model.item_index[i] for i in query.bought if i in model.item_index)
    allowed = np.ones(len(model.categories), dtype=np.float32)
    if query.categories:
        allowed[:] = 0.0
        allowed[[model.category_index[c] for c in query.categories]] = 1.0
    user = model.user_index.get(query.user_id)
    if user is not None:
        history: list[int] = []
        path = ColdStart.NONE
        if not query.include_purchased:
            excluded.update(model.purchased(user).tolist())
    else:
        # Known recent items only, first occurrence kept; unknown ids cannot inform the model.
        history = list(
            dict.fromkeys(
                model.item_index[i] for i in query.recent_item_ids if i in model.item_index
            )
        )
        # For a user the model never saw, recent items play the part of purchases.
        if not query.include_purchased:
            excluded.update(history)
        # Items nobody bought in training are most often new arrivals, whose factors are zero:
        # a user folded in from only those would be ranked by noise. (An item only viewed in
        # training has factors, but the artifact records purchases only: popularity for it.)
        if not model.bought_in_training[history].any():
            return _popular(model, limit, excluded, allowed)
        user, path = -1, ColdStart.FOLD_IN
    return Plan(user, history, sorted(excluded), allowed, limit, path)


def run_plans(
    model: ModelVersion, plans: Sequence[Plan]
) -> tuple[np.ndarray[tuple[int, int], np.dtype[np.int64]], npt.NDArray[np.float32]]:
    """One graph run for all plans: rows padded with -1, k the largest limit among them."""
    return model.run(
        np.array([p.user for p in plans], dtype=np.int64),
        _stacked([p.history for p in plans]),
        _stacked([p.excluded for p in plans]),
        np.stack([p.allowed for p in plans]),
        max(p.limit for p in plans),
    )


def finish(
    model: ModelVersion,
    plan: Plan,
    items: np.ndarray[tuple[int], np.dtype[np.int64]],
    scores: npt.NDArray[np.float32],
) -> Recommendation:
    """The answer from the plan's row of a run (cut to its own limit)."""
    row_items, row_scores = items[: plan.limit], scores[: plan.limit]
    kept = np.isfinite(row_scores)  # -inf marks excluded and filtered items
    ids, categories = model.item_ids, model.item_categories
    found = [
        ScoredItem(ids[i], s, categories[i])
        for i, s in zip(row_items[kept].tolist(), row_scores[kept].tolist(), strict=True)
    ]
    return Recommendation(found, model.version, plan.path)


def recommend(model: ModelVersion, query: RecommendQuery) -> Recommendation:
    planned = plan(model, query)
    if isinstance(planned, Recommendation):
        return planned
    items, scores = run_plans(model, [planned])
    return finish(model, planned, items[0], scores[0])


def ranks_in(model: ModelVersion, query: RecommendQuery, items: Collection[int]) -> dict[int, int]:
    """The 1-based rank in recommend(model, query)'s answer of each of items (indices) that it
    holds: as recommend() ranks, without building its answer's items (a thousand of them
    cost GetOffers a millisecond per call). No items (every named one unknown to the model):
    no run."""
    if not items:
        return {}
    planned = plan(model, query)
    if isinstance(planned, Recommendation):
        order = np.array([model.item_index[s.item_id] for s in planned.items], dtype=np.int64)
    else:
        found, scores = run_plans(model, [planned])
        row = found[0][: planned.limit]
        order = row[np.isfinite(scores[0][: planned.limit])]
    wanted = np.fromiter(items, dtype=np.int64)
    at = np.flatnonzero(np.isin(order, wanted))
    return dict(zip(order[at].tolist(), (at + 1).tolist(), strict=True))


def _popular(
    model: ModelVersion,
    limit: int,
    excluded: set[int],
    allowed: np.ndarray[tuple[int], np.dtype[np.float32]],
) -> Recommendation:
    """Most popular items passing the same filters; score falls linearly with popularity rank."""
    n = len(model.popularity)
    found: list[ScoredItem] = []
    # Item by item, not the whole ranking as a list: the walk usually stops after `limit`.
    for rank, item in enumerate(map(int, model.popularity)):
        category = model.item_categories[item]
        if item in excluded or allowed[model.category_index[category]] == 0.0:
            continue
        found.append(ScoredItem(model.item_ids[item], 1.0 - rank / n, category))
        if len(found) == limit:
            break
    return Recommendation(found, model.version, ColdStart.POPULARITY)


def _stacked(rows: list[list[int]]) -> np.ndarray[tuple[int, int], np.dtype[np.int64]]:
    """Rows padded with -1 to one width; at least one column, so no dimension is zero."""
    width = max(1, *(len(r) for r in rows))
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for n, row in enumerate(rows):
        out[n, : len(row)] = row
    return out
