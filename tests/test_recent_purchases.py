"""Purchases stored after the model's data ended are kept out of Recommend and GetOffers, as the
purchases the model was trained on are: at once when this server stored them, at its next poll
of the store when another process did. SQLite, and PostgreSQL when it answers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from offer_server import OfferServer, ctl, eventually
from sqlalchemy import func, select, update

from core.store.db import Store
from core.store.events import EventIn, record
from core.store.tables import Event, Offer
from discount.v1 import discount_pb2 as pb
from server.purchases import MAX_HELD, RecentPurchases

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
    top, second = recommended(server, "user-0")[:2]
    buy(server, "p1", "user-0", top)
    assert top not in recommended(server, "user-0")
    # Refused (another event under p1's id), so not stored, so not a purchase.
    reused = pb.Event(event_id="p1", type=pb.EVENT_TYPE_PURCHASE, user_id="user-0", item_id=second)
    refused = server.stub.RecordEvents(pb.RecordEventsRequest(events=[reused])).results[0]
    assert refused.status == pb.EVENT_STATUS_REJECTED
    assert second in recommended(server, "user-0")
    assert top in recommended(server, "user-0", include_purchased=True)
    assert top in recommended(server, "user-1")  # only the buyer's own purchase
    # The other store-backed path to a ranking: GetOffers prices recommendations.
    offers = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=8)).offers
    assert offers and top not in [o.item_id for o in offers]
    # A named item is priced all the same: the caller asked for it. Not ranked, though, as
    # the recommendations it left are what ranks a named item.
    named = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", item_ids=[top])).offers
    assert [o.item_id for o in named] == [top]
    assert named[0].rank == 0 and "NOT_RANKED" in named[0].reason_codes
    assert named[0].discount_percent == 5  # tiered_topk's rest, not the top tier's 20


def issued(server: OfferServer, user: str, db_url: str) -> list[pb.Offer]:
    """Offers GetOffers issued to user, once the offer log has stored them."""
    offers = [
        o
        for o in server.stub.GetOffers(pb.GetOffersRequest(user_id=user, limit=8)).offers
        if o.offer_id
    ]
    ids = [o.offer_id for o in offers]
    store = Store(db_url)
    try:

        def stored() -> bool:
            with store.transaction() as session:
                query = select(func.count()).where(Offer.offer_id.in_(ids))
                return session.scalar(query) == len(ids)

        eventually(stored, timeout=10)
    finally:
        store.dispose()
    return offers


def redeem(server: OfferServer, event_id: str, user: str, offer: pb.Offer, item: str) -> None:
    event = pb.Event(
        event_id=event_id,
        type=pb.EVENT_TYPE_REDEMPTION,
        user_id=user,
        item_id=item,
        offer_id=offer.offer_id,
        revenue_cents=offer.final_price_cents,
    )
    result = server.stub.RecordEvents(pb.RecordEventsRequest(events=[event])).results[0]
    assert result.status != pb.EVENT_STATUS_REJECTED, result.reason


def test_an_item_bought_at_an_offers_price_leaves_recommendations_at_once(
    server: OfferServer, db_url: str
) -> None:
    """A redemption is a sale as a purchase is: with its item_id, or naming only its offer."""
    named, unnamed = issued(server, "user-0", db_url)[:2]
    redeem(server, "r1", "user-0", named, named.item_id)
    redeem(server, "r2", "user-0", unnamed, "")
    again = recommended(server, "user-0")
    assert named.item_id not in again and unnamed.item_id not in again
    assert named.item_id in recommended(server, "user-1")


def test_a_redemption_another_process_stored_is_polled(model_store: Path, db_url: str) -> None:
    ctl(db_url, "rules", "create", "all", "--policy", "tiered_topk", "--param", "k1=1",
        "--param", "d1=10", "--param", "d2=5")  # fmt: skip
    running = OfferServer(model_store, db_url, rules_poll_interval=0.2)
    try:
        offer = issued(running, "user-0", db_url)[0]
        store = Store(db_url)
        try:
            with store.transaction() as session:
                sale = EventIn("r1", "redemption", "user-0", offer_id=offer.offer_id)
                record(session, [sale], datetime.now(UTC))
        finally:
            store.dispose()
        eventually(lambda: offer.item_id not in recommended(running, "user-0"), timeout=10)
    finally:
        running.close()


def test_an_unknown_users_purchase_leaves_popularity_and_fold_in(server: OfferServer) -> None:
    popular = recommended(server, "newcomer")[0]
    buy(server, "p1", "newcomer", popular)
    assert popular not in recommended(server, "newcomer")
    folded = recommended(server, "newcomer", recent_item_ids=["00001"])
    assert folded and popular not in folded


def test_a_purchase_another_process_stored_is_polled(model_store: Path, db_url: str) -> None:
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


def stored_on(store: Store, received: dict[str, datetime], user: str = "u") -> None:
    """Purchases of item-<id> by user, stored at the given times (received_at as set)."""
    with store.transaction() as session:
        record(session, [EventIn(f"e-{i}", "purchase", user, f"item-{i}") for i in received], T0)
        for i, at in received.items():
            session.execute(update(Event).where(Event.event_id == f"e-{i}").values(received_at=at))


class Reads:
    """A RecentPurchases read by hand, as discountd's poll would, for a data end set by hand."""

    def __init__(self, store: Store | None, limit: int = MAX_HELD) -> None:
        self.data_end: datetime | None = None
        self.purchases = RecentPurchases(store, lambda: self.data_end, 60.0, limit)

    def read(self, user: str = "u") -> frozenset[str]:
        asyncio.run(self._read())
        return self.purchases.of(user)

    async def _read(self) -> None:
        await self.purchases.read()


T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_only_purchases_after_the_models_data_are_held(store: Store) -> None:
    """The read starts where the serving model's data ends and again, from scratch, where a
    newer model's ends: purchases a model was trained on are not held twice."""
    stored_on(store, {str(day): T0 + timedelta(days=day) for day in range(4)})  # item-N on day N
    with store.transaction() as session:
        record(session, [EventIn("v", "view", "u", "viewed")], T0)
    held = Reads(store)
    assert held.read() == frozenset()  # no model serving yet
    held.data_end = T0 + timedelta(hours=12)
    assert held.read() == {"item-1", "item-2", "item-3"}
    held.purchases.add("u", "item-9")  # stored by this process a moment ago
    assert held.read() == {"item-1", "item-2", "item-3", "item-9"}  # a re-read keeps it
    held.data_end = T0 + timedelta(days=1, hours=12)  # a model trained on day 1's purchase
    assert held.read() == {"item-2", "item-3"}
    stored_on(store, {"4": datetime.now(UTC)})
    assert held.read() == {"item-2", "item-3", "item-4"}
    assert held.purchases.of("someone else") == frozenset()


def test_a_purchase_committed_after_a_later_one_was_read_is_still_held(store: Store) -> None:
    """received_at is stamped before the commit: a slow transaction's purchase can appear
    after the read that saw a newer one, and the next read reaches back for it."""
    now = datetime.now(UTC)
    stored_on(store, {"new": now})
    held = Reads(store)
    held.data_end = now - timedelta(days=1)
    assert held.read() == {"item-new"}
    stored_on(store, {"slow": now - timedelta(seconds=30)})
    assert held.read() == {"item-new", "item-slow"}


def test_a_model_switch_reads_the_newest_purchases_up_to_the_limit(store: Store) -> None:
    stored_on(store, {str(n): T0 + timedelta(minutes=n) for n in range(5)})
    held = Reads(store, limit=3)
    held.data_end = T0 - timedelta(days=1)
    assert held.read() == {"item-2", "item-3", "item-4"}


def test_the_limit_counts_only_sales_whose_item_is_known(store: Store) -> None:
    """A redemption of an offer the store does not hold names no item: it must not take one of
    the newest-N places of a model switch's read."""
    stored_on(store, {str(n): T0 + timedelta(minutes=n) for n in range(3)})
    with store.transaction() as session:
        record(session, [EventIn("r", "redemption", "u", offer_id="unknown")], T0)
        session.execute(
            update(Event).where(Event.event_id == "r").values(received_at=T0 + timedelta(hours=1))
        )
    held = Reads(store, limit=2)
    held.data_end = T0 - timedelta(days=1)
    assert held.read() == {"item-1", "item-2"}


def test_a_data_end_ahead_of_the_stores_clock_misses_no_purchase(store: Store) -> None:
    # Local times east of UTC read as UTC: the data seems to end after now.
    held = Reads(store)
    held.data_end = datetime.now(UTC) + timedelta(hours=2)
    assert held.read() == frozenset()
    stored_on(store, {"x": datetime.now(UTC)})
    assert held.read() == {"item-x"}


def test_a_failed_read_keeps_what_is_held(tmp_path: Path) -> None:
    (tmp_path / "empty.db").touch()  # a database without an events table: every read fails
    unmigrated = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        held = Reads(unmigrated)
        held.data_end = T0
        held.purchases.add("u", "item-1")
        assert held.read() == {"item-1"}
        assert "events" in held.purchases.error
    finally:
        unmigrated.dispose()


def test_a_purchase_added_while_a_read_runs_is_kept(store: Store) -> None:
    held = Reads(store)
    held.data_end = T0

    async def add_during_the_read() -> None:
        reading = held.purchases.read()
        await asyncio.sleep(0)  # the read has started; its rows are applied after this add
        held.purchases.add("u", "item-9")
        await reading

    asyncio.run(add_during_the_read())
    assert held.purchases.of("u") == {"item-9"}
