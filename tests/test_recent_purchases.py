"""Purchases stored after the model's data ended are kept out of Recommend and GetOffers, as the
purchases the model was trained on are: at once when this server stored them, after a rule
snapshot refresh when another process did. SQLite, and PostgreSQL when it answers."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from offer_server import OfferServer, ctl, eventually
from sqlalchemy import update

from core.store.db import Store
from core.store.events import EventIn, record
from core.store.tables import Event
from discount.v1 import discount_pb2 as pb
from server.purchases import RecentPurchases

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def server(model_store: Path, db_url: str) -> Iterator[OfferServer]:
    ctl(db_url, "segments", "create", "regulars", "--where", "order_count >= 1")
    ctl(
        db_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=2", "--param", "d1=20", "--param", "d2=5", "--segment", "regulars",
    )  # fmt: skip
    # A slow poll: what a test sees within it, this server learned without reading the store.
    running = OfferServer(model_store, db_url, rules_poll_interval=30.0)
    yield running
    running.close()


def recommended(server: OfferServer, user: str, **fields: object) -> list[str]:
    request = pb.RecommendRequest(user_id=user, limit=8, **fields)  # type: ignore[arg-type]
    return [item.item_id for item in server.stub.Recommend(request).items]


def buy(server: OfferServer, event_id: str, user: str, item: str) -> None:
    event = pb.Event(event_id=event_id, type=pb.EVENT_TYPE_PURCHASE, user_id=user, item_id=item)
    result = server.stub.RecordEvents(pb.RecordEventsRequest(events=[event])).results[0]
    assert result.status != pb.EVENT_STATUS_REJECTED, result.reason


def stored_elsewhere(db_url: str, event_id: str, user: str, item: str) -> None:
    """A purchase another replica (or a backfill) stored: this server never saw it come in."""
    store = Store(db_url)
    try:
        with store.transaction() as session:
            record(session, [EventIn(event_id, "purchase", user, item)], datetime.now(UTC))
    finally:
        store.dispose()


def test_a_purchase_recorded_here_leaves_recommendations_at_once(server: OfferServer) -> None:
    top = recommended(server, "user-0")[0]
    buy(server, "p1", "user-0", top)
    assert top not in recommended(server, "user-0")
    assert top in recommended(server, "user-0", include_purchased=True)
    assert top in recommended(server, "user-1")  # only the buyer's own purchase
    # The other store-backed path to a ranking: GetOffers prices recommendations.
    offers = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=8)).offers
    assert offers and top not in [o.item_id for o in offers]
    # A named item is priced all the same: the caller asked for it.
    named = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", item_ids=[top])).offers
    assert [o.item_id for o in named] == [top]


def test_an_unknown_users_purchase_leaves_popularity_and_fold_in(server: OfferServer) -> None:
    popular = recommended(server, "newcomer")[0]
    buy(server, "p1", "newcomer", popular)
    assert popular not in recommended(server, "newcomer")
    folded = recommended(server, "newcomer", recent_item_ids=["00001"])
    assert folded and popular not in folded


def test_a_purchase_another_process_stored_is_read_with_the_rules(
    model_store: Path, db_url: str
) -> None:
    running = OfferServer(model_store, db_url, rules_poll_interval=0.2)
    try:
        top = recommended(running, "user-0")[0]
        stored_elsewhere(db_url, "p1", "user-0", top)
        eventually(lambda: top not in recommended(running, "user-0"), timeout=10)
    finally:
        running.close()


def test_purchases_stored_before_a_start_are_held_from_the_first_call(
    model_store: Path, db_url: str
) -> None:
    probe = OfferServer(model_store, db_url, rules_poll_interval=30.0)
    try:
        top = recommended(probe, "user-0")[0]
    finally:
        probe.close()
    stored_elsewhere(db_url, "p1", "user-0", top)
    # The read waits for no poll (30 s): the model's first load asks for one.
    running = OfferServer(model_store, db_url, rules_poll_interval=30.0)
    try:
        assert top not in recommended(running, "user-0")
    finally:
        running.close()


def test_only_purchases_after_the_models_data_are_held(store: Store) -> None:
    """The read starts where the serving model's data ends and again, from scratch, where a
    newer model's ends: purchases a model was trained on are not held twice."""
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    with store.transaction() as session:
        record(
            session,
            [EventIn(f"e{day}", "purchase", "u", f"item-{day}") for day in range(4)]
            + [EventIn("v", "view", "u", "viewed")],
            t0,
        )
        for day in range(4):  # item-N stored on day N
            session.execute(
                update(Event)
                .where(Event.event_id == f"e{day}")
                .values(received_at=t0 + timedelta(days=day))
            )
    data_end: list[datetime | None] = [None]
    purchases = RecentPurchases(lambda: data_end[0])

    def load() -> frozenset[str]:
        with store.transaction() as session:
            purchases.load_from(session)
        return purchases.of("u")

    assert load() == frozenset()  # no model serving yet
    data_end[0] = t0 + timedelta(hours=12)
    assert load() == {"item-1", "item-2", "item-3"}
    purchases.add("u", "item-9")  # stored by this process a moment ago
    assert load() == {"item-1", "item-2", "item-3", "item-9"}  # a re-read keeps it
    data_end[0] = t0 + timedelta(days=1, hours=12)  # a model trained on day 1's purchase
    assert load() == {"item-2", "item-3"}
    with store.transaction() as session:
        record(session, [EventIn("e4", "purchase", "u", "item-4")], datetime.now(UTC))
    assert load() == {"item-2", "item-3", "item-4"}
    assert purchases.of("someone else") == frozenset()
