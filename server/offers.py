"""GetOffers: validate, rank the items with the model, run the shared pipeline (core.offers)
and issue each priced item as a signed offer. The store is never touched on this path: rules
come from the snapshot, and issued offers go to the offer log's queue.

Everything here is per request; the per-server state it reads (snapshot, offer log, keys) lives
in server.offering, and the catalog's prices and costs and the users' features come with the
model version (ModelVersion.facts). The pipeline is core.offers; core.store.offers stores the
offers."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np

from core import offer_token
from core.assignment import draw_index
from core.features import NUMERIC_FEATURES
from core.offers import (
    Decision,
    FeatureError,
    Features,
    ItemInput,
    Respond,
    RuleDraw,
    Snapshot,
    decide,
    resolve_features,
)
from core.policy import Draw
from core.records import record
from core.shop import ShopFacts
from core.store.validate import CONTROL_CHARACTERS
from server.errors import FieldViolation, InvalidRequest
from server.limits import MAX_ID_CHARS
from server.model import ModelVersion
from server.recommend import (
    MAX_IDS,
    MAX_LIMIT,
    RecommendQuery,
    ranks_in,
    recommend,
    user_and_limit_problems,
)

MAX_CONTEXT = 64


@dataclass(frozen=True)
class OffersQuery:
    user_id: str
    item_ids: Sequence[str] = ()
    limit: int = 0
    context: Mapping[str, str] = field(default_factory=dict)
    # As RecommendQuery.bought: kept out of the recommendations priced when item_ids is empty.
    bought: Collection[str] = ()


@record
class IssuedOffer:
    item_id: str
    base_price_cents: int
    discount_percent: float
    final_price_cents: int
    rule_id: str
    reason_codes: tuple[str, ...]
    offer_id: str
    offer_token: str
    expires_at: str  # ISO 8601, "" for an offer not issued
    rank: int


@dataclass(frozen=True)
class OffersResult:
    offers: list[IssuedOffer]
    segment: str
    experiment_key: str
    variant: str
    model_version: str
    # Rows for the offer log (core.store.tables.Offer's columns).
    log_rows: list[dict[str, Any]]


def validate(query: OffersQuery) -> None:
    problems = user_and_limit_problems(query.user_id, query.limit)
    if len(query.item_ids) > MAX_IDS:
        problems.append(
            FieldViolation("item_ids", f"at most {MAX_IDS} entries, got {len(query.item_ids)}")
        )
    if any(not i.strip() for i in query.item_ids):
        # As user_id: " " names no item (it was priced as an item the catalog lacked).
        problems.append(FieldViolation("item_ids", "must not contain empty or blank ids"))
    elif any(len(i) > MAX_ID_CHARS or CONTROL_CHARACTERS.search(i) for i in query.item_ids):
        # Ids no catalog holds: as RecordEvents' item_id, not an UNKNOWN_ITEM echoed back.
        problems.append(
            FieldViolation(
                "item_ids", f"ids must be at most {MAX_ID_CHARS} characters, without control ones"
            )
        )
    if len(query.context) > MAX_CONTEXT:
        problems.append(
            FieldViolation("context", f"at most {MAX_CONTEXT} keys, got {len(query.context)}")
        )
    try:
        resolve_features(None, query.context)
    except FeatureError as e:
        problems.append(FieldViolation(f"context[{e.name}]", str(e)))
    if problems:
        raise InvalidRequest(problems)


def _named_items(model: ModelVersion, facts: ShopFacts, query: OffersQuery) -> list[ItemInput]:
    # -1: an item the model's catalog lacks (one newer than the model). It gets no offer
    # (UNKNOWN_ITEM) and the rest of the basket is priced: failing the call would take offers
    # off every basket holding a new product until the next model.
    indices = [model.item_index.get(i, -1) for i in query.item_ids]
    user = model.user_index.get(query.user_id)
    scores: dict[int, float] = {}
    if user is not None:
        values: list[float] = model.score(
            np.array([user], dtype=np.int64),
            np.array([[-1]], dtype=np.int64),
            np.array([indices], dtype=np.int64),
        )[0].tolist()
        scores = {i: v for i, v in zip(indices, values, strict=True) if math.isfinite(v)}
    else:
        # No history to fold in: the popularity score Recommend gives unknown users.
        ranks, n = model.popularity_rank, len(model.popularity)
        scores = {i: 1.0 - int(ranks[i]) / n for i in set(indices) if i >= 0 and ranks[i] >= 0}
    # The item's rank in the user's own recommendations, not among the named items: ranked
    # among themselves, an item priced alone (a product page), or any cart of at most k1
    # items, would always be in tiered_topk's top tier. Outside them (past MAX_LIMIT, or
    # excluded as bought): 0, not ranked.
    mine = RecommendQuery(query.user_id, MAX_LIMIT, bought=query.bought)
    rank = ranks_in(model, mine, {i for i in indices if i >= 0})
    return [
        ItemInput(
            item_id,
            facts.categories.get(item_id, ""),
            facts.prices.get(item_id) if i >= 0 else None,
            facts.costs.get(item_id),
            rank.get(i, 0),
            scores.get(i),
            item_id in facts.assumed_costs,
            known=i >= 0,
        )
        for item_id, i in zip(query.item_ids, indices, strict=True)
    ]


def candidates(model: ModelVersion, facts: ShopFacts, query: OffersQuery) -> list[ItemInput]:
    """The items to price, with ranks and scores: the named items or the user's
    recommendations, each ranked where the recommendations rank it."""
    if query.item_ids:
        return _named_items(model, facts, query)
    recommended = recommend(model, RecommendQuery(query.user_id, query.limit, bought=query.bought))
    return [
        ItemInput(
            item.item_id,
            item.category,
            facts.prices.get(item.item_id),
            facts.costs.get(item.item_id),
            rank,
            item.score,
            item.item_id in facts.assumed_costs,
        )
        for rank, item in enumerate(recommended.items, start=1)
    ]


def simulate(
    model: ModelVersion,
    snapshot: Snapshot,
    query: OffersQuery,
    now: datetime,
    respond: Respond | None = None,
) -> Decision:
    """What the user would be offered, and why, without issuing anything. The model must be
    loaded with its facts (load_version(..., facts=True)); ``respond`` is the response model
    `optimal` rules need (server.response)."""
    features, items = _inputs(model, query)
    return decide(snapshot, query.user_id, features, items, now, respond)


def _inputs(model: ModelVersion, query: OffersQuery) -> tuple[Features, list[ItemInput]]:
    """The user's features and the items to price, for a valid query."""
    validate(query)
    facts = model.facts
    assert facts is not None, "a model version loaded without its shop facts cannot price"
    features = resolve_features(facts.user_features.get(query.user_id), query.context)
    return features, candidates(model, facts, query)


def _offer_ids(now: datetime, n: int) -> list[str]:
    """n offer ids, 32 hex digits each: the issue time in milliseconds (12 digits), then 80
    random bits. Ids in time order land at the end of the offers table's primary-key index
    instead of at random pages of it: on a SQLite store of 1.6M offers, an offer's insert cost
    45 us with uniformly random ids and 21 us with these (docs/BENCHMARKS.md); UUIDv7 orders
    its ids the same way for the same reason. One read of the kernel's random source per answer
    rather than one per offer."""
    stamp = f"{int(now.timestamp() * 1000):012x}"
    entropy = os.urandom(10 * n).hex()
    return [stamp + entropy[20 * k : 20 * (k + 1)] for k in range(n)]


def _lasting_draw(key: bytes, user_id: str) -> RuleDraw:
    """`randomized` rules' draws: the same for this user, item and rule for as long as the
    offer key (docs/OFFERS.md)."""

    def for_rule(rule_id: int) -> Draw:
        return functools.partial(draw_index, key, rule_id, user_id)

    return for_rule


def _cents(amount: Decimal) -> int:
    return int((amount * 100).to_integral_value())


def get_offers(
    model: ModelVersion,
    snapshot: Snapshot,
    query: OffersQuery,
    keys: offer_token.OfferKeys,
    ttl: timedelta,
    respond: Respond | None = None,
) -> OffersResult:
    now = datetime.now(UTC)
    features, items = _inputs(model, query)
    draw = _lasting_draw(keys.current, query.user_id)
    decision = decide(snapshot, query.user_id, features, items, now, respond, draw)
    # What a response model learns from, logged with every offer (core.store.tables.Offer).
    numeric = {name: float(features[name]) for name in NUMERIC_FEATURES}
    # Whole seconds, because the token keeps its expiry to the second.
    expires = (now + ttl).replace(microsecond=0)
    signed = [item for item in decision.items if item.priced_ok]
    offer_ids = _offer_ids(now, len(signed))
    tokens = offer_token.sign_all(
        query.user_id,
        expires,
        keys.current,
        [
            (offer_id, item.item_id, item.priced.final_price)
            for offer_id, item in zip(offer_ids, signed, strict=True)
        ],
    )
    issued = zip(offer_ids, tokens, strict=True)
    expires_text = expires.isoformat()  # once: every offer of an answer expires together
    offers, rows = [], []
    for item, given in zip(decision.items, items, strict=True):
        priced = item.priced
        rule_id = item.rule.id if item.rule else None
        reasons = tuple(map(str, item.reasons))
        offer_id, token = next(issued) if item.priced_ok else ("", "")
        if offer_id:
            rows.append(
                {
                    "offer_id": offer_id,
                    "user_id": query.user_id,
                    "item_id": item.item_id,
                    "rule_id": rule_id,
                    "segment": decision.segment,
                    "experiment_key": decision.experiment_key,
                    "variant": decision.variant,
                    "base_price": float(priced.base_price),
                    "discount_pct": float(priced.discount_pct),
                    "final_price": float(priced.final_price),
                    "model_version": model.version,
                    "reason_codes": list(reasons),
                    "issued_at": now,
                    "expires_at": expires,
                    "cf_score": given.score,
                    "rank": given.rank or None,
                    "cost": given.cost,
                    "propensity": priced.propensity,
                    "user_features": numeric,
                }
            )
        offers.append(
            IssuedOffer(
                item_id=item.item_id,
                base_price_cents=_cents(priced.base_price),
                discount_percent=float(priced.discount_pct),
                final_price_cents=_cents(priced.final_price),
                rule_id=str(rule_id) if rule_id is not None else "",
                reason_codes=reasons,
                offer_id=offer_id,
                offer_token=token,
                expires_at=expires_text if offer_id else "",
                rank=item.rank,
            )
        )
    return OffersResult(
        offers,
        decision.segment or "",
        decision.experiment_key or "",
        decision.variant or "",
        model.version,
        rows,
    )
