"""GetOffers, VerifyOffer and RecordEvents through a real server with a real store (SQLite, and
PostgreSQL when it answers), governed by discountctl as an admin would."""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import make_tiny_shop, write_tiny_artifact
from offer_server import OfferServer, ctl, eventually, ten_percent_off_everything
from pg import pg_database
from secure_server import KEY
from server_thread import bad_requests
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from core import offer_token
from core.store.db import Store
from core.store.tables import Event, Offer
from discount.v1 import discount_pb2 as pb
from server.logs import JsonFormatter

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def seeded(db_url: str) -> str:
    """Regulars (order_count >= 1, every trained user of the tiny shop) get a tiered rule."""
    ctl(db_url, "segments", "create", "regulars", "--where", "order_count >= 1")
    ctl(
        db_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=2", "--param", "d1=20", "--param", "d2=5",
        "--segment", "regulars", "--max-discount", "30", "--min-margin", "10",
    )  # fmt: skip
    return db_url


@pytest.fixture
def server(model_store: Path, seeded: str) -> Iterator[OfferServer]:
    # On PostgreSQL a poll too slow to matter: what a test sees change within seconds, only
    # LISTEN/NOTIFY can have brought.
    poll = 0.2 if seeded.startswith("sqlite") else 300.0
    running = OfferServer(model_store, seeded, rules_poll_interval=poll)
    yield running
    running.close()


def prices(response: pb.GetOffersResponse) -> list[tuple[int, int]]:
    return [(o.rank, o.final_price_cents) for o in response.offers]


def test_rule_prices_recommendations_with_reasons(server: OfferServer) -> None:
    response = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=4))
    assert response.segment == "regulars" and response.experiment_key == ""
    # Price 10.00, cost 6.00: top two at 20% off, the rest at 5%.
    assert prices(response) == [(1, 800), (2, 800), (3, 950), (4, 950)]
    top = response.offers[0]
    assert top.base_price_cents == 1000 and top.discount_percent == 20.0
    assert {"SEGMENT_MATCHED", "RANKED", "RULE_HIGHEST_PRIORITY", "POLICY_TIERED_TOP"} <= set(
        top.reason_codes
    )
    assert "POLICY_TIERED_REST" in response.offers[2].reason_codes
    assert top.rule_id and top.offer_id and top.offer_token
    assert datetime.fromisoformat(top.expires_at) > datetime.now(UTC)


def test_named_items_keep_their_rank_in_the_users_recommendations(server: OfferServer) -> None:
    # user-0 likes garden items (00000-00014): those rank above the kitchen item.
    ranks = recommended_ranks(server, "user-0")
    response = server.stub.GetOffers(
        pb.GetOffersRequest(user_id="user-0", item_ids=["00029", "00003", "00004"])
    )
    assert [o.item_id for o in response.offers] == ["00029", "00003", "00004"]
    assert [o.rank for o in response.offers] == [
        ranks.get(i, 0) for i in ("00029", "00003", "00004")
    ]
    assert response.offers[0].rank > 2 and response.offers[0].final_price_cents == 950


def test_an_item_named_twice_keeps_one_rank_and_price(server: OfferServer) -> None:
    # Two lines of one item in a cart: both get the item's rank, and the item ranked second
    # keeps its place in the tier (k1=2).
    recommended = server.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=2)).items
    first, second = (item.item_id for item in recommended)
    response = server.stub.GetOffers(
        pb.GetOffersRequest(user_id="user-0", item_ids=[first, first, second])
    )
    assert [o.item_id for o in response.offers] == [first, first, second]
    assert prices(response) == [(1, 800), (1, 800), (2, 800)]


def recommended_ranks(server: OfferServer, user: str) -> dict[str, int]:
    """Each item's 1-based rank in the user's recommendations, as Recommend lists them."""
    items = server.stub.Recommend(pb.RecommendRequest(user_id=user, limit=1000)).items
    return {item.item_id: item.rank for item in items}


def test_a_product_page_priced_one_item_at_a_time_pays_the_top_tier_only_on_the_top_items(
    server: OfferServer,
) -> None:
    """A storefront pricing one item per call (a product page), or a cart of at most k1 items,
    gave every item rank 1 among the named items, so tiered_topk paid its top tier (20%) on
    everything: an item pays it only where the user's recommendations rank it in the top k1=2,
    and one they do not hold (user-0 bought it) is not ranked: the rest's 5%."""
    ranks = recommended_ranks(server, "user-0")
    third = next(item for item, rank in ranks.items() if rank == 3)
    last = max(ranks, key=ranks.__getitem__)
    bought = sorted({f"{i:05d}" for i in range(30)} - ranks.keys())
    assert len(bought) == 3  # the tiny shop's purchases of user-0
    for item in (third, last, bought[0]):
        [offer] = server.stub.GetOffers(
            pb.GetOffersRequest(user_id="user-0", item_ids=[item])
        ).offers
        assert (offer.rank, offer.final_price_cents) == (ranks.get(item, 0), 950)
        assert "POLICY_TIERED_REST" in offer.reason_codes
    cart = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", item_ids=[last, third]))
    assert prices(cart) == [(ranks[last], 950), (3, 950)]
    [unranked] = server.stub.GetOffers(
        pb.GetOffersRequest(user_id="user-0", item_ids=[bought[0]])
    ).offers
    assert "NOT_RANKED" in unranked.reason_codes and "RANKED" not in unranked.reason_codes


@pytest.mark.parametrize("user", ["user-0", "user-7", "user-25", "a-visitor"])
def test_an_items_rank_is_the_same_recommended_or_named(server: OfferServer, user: str) -> None:
    """Known users (the model ranks) and an unknown one (popularity ranks): every recommended
    item has its Recommend rank when GetOffers recommends it, when named alone, and when named
    with all the others in another order, one of them twice."""
    ranks = recommended_ranks(server, user)
    assert len(ranks) >= 27
    offered = server.stub.GetOffers(pb.GetOffersRequest(user_id=user, limit=1000)).offers
    assert {o.item_id: o.rank for o in offered} == ranks
    for item in ranks:
        [alone] = server.stub.GetOffers(pb.GetOffersRequest(user_id=user, item_ids=[item])).offers
        assert alone.rank == ranks[item]
    named = [*sorted(ranks, reverse=True), next(iter(ranks))]
    together = server.stub.GetOffers(pb.GetOffersRequest(user_id=user, item_ids=named)).offers
    assert [o.rank for o in together] == [ranks[i] for i in named]


def top_offer(server: OfferServer, cents: int) -> pb.Offer | None:
    """user-0's best-ranked offer once its price is ``cents``, else None."""
    offer = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=1)).offers[0]
    return offer if offer.final_price_cents == cents else None


def test_guardrails_hold(server: OfferServer, seeded: str) -> None:
    ctl(seeded, "rules", "update", "tier", "--param", "d1=60", "--min-margin", "0")
    top = eventually(lambda: top_offer(server, 700), timeout=5)
    assert "GUARDRAIL_MAX_DISCOUNT" in top.reason_codes  # 60% asked, 30% allowed
    ctl(seeded, "rules", "update", "tier", "--min-margin", "30")
    top = eventually(lambda: top_offer(server, 780), timeout=5)
    assert "GUARDRAIL_MARGIN_FLOOR" in top.reason_codes  # cost 6.00 * 1.30


def test_extreme_minimum_margins_keep_the_floor(server: OfferServer, seeded: str) -> None:
    """discountctl takes any margin >= 0. 6.00 × (1 + 1e-300/100) is above 6.00, so rounded up
    to cents the floor is 6.01 (it was 6.00: the factor rounded to 1 in 80 digits); a margin
    of 1e80% puts the floor above any price (it was INTERNAL: too many digits to round)."""
    ctl(seeded, "rules", "update", "tier", "--param", "d1=50", "--max-discount", "60",
        "--min-margin", "1e-300")  # fmt: skip
    top = eventually(lambda: top_offer(server, 601), timeout=5)
    assert top.discount_percent == pytest.approx(39.9)
    assert "GUARDRAIL_MARGIN_FLOOR" in top.reason_codes
    ctl(seeded, "rules", "update", "tier", "--min-margin", "1e80")
    top = eventually(lambda: top_offer(server, 1000), timeout=5)
    assert top.discount_percent == 0 and "LOSS_LEADER_NO_DISCOUNT" in top.reason_codes


def test_new_users_fail_closed_unless_context_says_otherwise(server: OfferServer) -> None:
    response = server.stub.GetOffers(pb.GetOffersRequest(user_id="stranger", limit=2))
    assert response.segment == ""
    assert all(o.final_price_cents == 1000 and o.discount_percent == 0 for o in response.offers)
    assert {"NO_SEGMENT", "NO_RULE"} <= set(response.offers[0].reason_codes)
    regular = server.stub.GetOffers(
        pb.GetOffersRequest(user_id="stranger", limit=2, context={"order_count": "4"})
    )
    assert regular.segment == "regulars" and regular.offers[0].final_price_cents == 800


def test_rules_update_reaches_the_running_server_before_its_next_poll(
    server: OfferServer, seeded: str
) -> None:
    request = pb.GetOffersRequest(user_id="user-0", limit=1)
    assert server.stub.GetOffers(request).offers[0].final_price_cents == 800
    ctl(seeded, "rules", "update", "tier", "--param", "d1=10")
    eventually(lambda: server.stub.GetOffers(request).offers[0].final_price_cents == 900, 10.0)
    ctl(seeded, "rules", "disable", "tier")
    eventually(lambda: server.stub.GetOffers(request).offers[0].final_price_cents == 1000, 10.0)


@pytest.mark.postgres
def test_a_store_password_with_a_space_does_not_stop_listening(model_store: Path) -> None:
    with pg_database() as plain:
        ten_percent_off_everything(plain)
        # The test server trusts local connections, so any password gets in.
        url = make_url(plain).set(password="my secret").render_as_string(hide_password=False)
        running = OfferServer(model_store, url, rules_poll_interval=300.0)
        try:
            request = pb.GetOffersRequest(user_id="user-0", limit=1)
            assert running.stub.GetOffers(request).offers[0].final_price_cents == 900
            ctl(plain, "rules", "update", "all", "--param", "d=20")
            eventually(
                lambda: running.stub.GetOffers(request).offers[0].final_price_cents == 800, 10.0
            )
        finally:
            running.close()


def test_experiment_variants_follow_assignment(server: OfferServer, seeded: str) -> None:
    ctl(
        seeded, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50:tier", "--target-segment", "regulars", "--salt", "s1",
    )  # fmt: skip
    ctl(seeded, "experiments", "start", "ab")
    eventually(
        lambda: server.stub.GetOffers(pb.GetOffersRequest(user_id="user-1", limit=1)).variant,
        5.0,
    )
    seen = set()
    for n in range(12):
        user = f"user-{n}"
        response = server.stub.GetOffers(pb.GetOffersRequest(user_id=user, limit=3))
        expected = json.loads(
            ctl(seeded, "experiments", "assign", "ab", user, "--output", "json").stdout
        )["variant"]
        assert (response.experiment_key, response.variant) == ("ab", expected)
        seen.add(expected)
        if expected == "control":
            assert all(o.final_price_cents == 1000 for o in response.offers)
            assert "VARIANT_NO_DISCOUNT" in response.offers[0].reason_codes
        else:
            assert prices(response)[:2] == [(1, 800), (2, 800)]
            assert "EXPERIMENT_VARIANT" in response.offers[0].reason_codes
    assert seen == {"control", "treatment"}
    # Users outside the target segment are not in the experiment: no rule covers them either.
    outside = server.stub.GetOffers(pb.GetOffersRequest(user_id="stranger", limit=1))
    assert outside.experiment_key == "" and outside.variant == ""


def test_a_variant_of_two_rules_prices_each_user_with_the_one_of_their_segment(
    server: OfferServer, seeded: str
) -> None:
    """A discount program against its control: 20 % for new customers, 5 % for returning
    ones, two rules in one variant; the control gets no discount."""
    ctl(seeded, "rules", "disable", "tier")  # the regulars' ordinary rule: not what is measured
    ctl(seeded, "segments", "create", "new", "--where", "days_since_first_order < 30")
    ctl(seeded, "segments", "create", "returning", "--where", "days_since_first_order >= 30")
    for name, segment, percent in (("new: 20%", "new", 20), ("returning: 5%", "returning", 5)):
        ctl(seeded, "rules", "create", name, "--policy", "threshold", "--param", "t=-100",
            "--param", f"d={percent}", "--segment", segment)  # fmt: skip
    ctl(
        seeded, "experiments", "create", "program", "--variant", "control:50",
        "--variant", "program:50:new: 20%", "--variant", "program:50:returning: 5%",
    )  # fmt: skip
    ctl(seeded, "experiments", "start", "program")
    arms: dict[str, str] = {}
    for n in range(40):
        user = f"user-{n}"
        assigned = ctl(seeded, "experiments", "assign", "program", user, "--output", "json")
        arms.setdefault(json.loads(assigned.stdout)["variant"], user)
    new = {"days_since_first_order": "3"}
    returning = {"days_since_first_order": "400"}

    def offer(variant: str, context: dict[str, str]) -> pb.Offer:
        request = pb.GetOffersRequest(user_id=arms[variant], limit=1, context=context)
        response = server.stub.GetOffers(request)
        assert (response.experiment_key, response.variant) == ("program", variant)
        return response.offers[0]

    eventually(lambda: server.stub.GetOffers(
        pb.GetOffersRequest(user_id=arms["program"], limit=1)).variant, 5.0)  # fmt: skip
    first, other = offer("program", new), offer("program", returning)
    assert (first.discount_percent, first.final_price_cents) == (20, 800)
    assert (other.discount_percent, other.final_price_cents) == (5, 950)
    assert first.rule_id != other.rule_id
    assert "EXPERIMENT_VARIANT" in other.reason_codes
    for context in (new, returning):
        control = offer("control", context)
        assert (control.discount_percent, control.final_price_cents) == (0, 1000)
        assert "VARIANT_NO_DISCOUNT" in control.reason_codes
    # Both rules are held: outside the experiment nobody gets them as ordinary rules.
    ctl(seeded, "experiments", "pause", "program")
    paused = eventually(
        lambda: (r := server.stub.GetOffers(pb.GetOffersRequest(
            user_id=arms["program"], limit=1, context=new))).variant == "" and r,
        5.0,
    )  # fmt: skip
    assert paused.offers[0].final_price_cents == 1000
    assert "RULE_HELD_BY_EXPERIMENT" in paused.offers[0].reason_codes


def test_verify_offer_valid_tampered_expired(server: OfferServer) -> None:
    offer = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=1)).offers[0]
    verdict = server.stub.VerifyOffer(pb.VerifyOfferRequest(offer_token=offer.offer_token))
    assert verdict.validity == pb.OFFER_VALIDITY_VALID
    assert (verdict.offer_id, verdict.user_id, verdict.item_id, verdict.final_price_cents) == (
        offer.offer_id, "user-0", offer.item_id, offer.final_price_cents,
    )  # fmt: skip
    payload, mac = offer.offer_token.split(".")
    forged = offer_token.sign(
        offer.offer_id, "user-0", offer.item_id, Decimal("0.01"),
        datetime.now(UTC) + timedelta(hours=1), b"x" * 40,
    )  # fmt: skip
    cheaper = forged.split(".")[0] + "." + mac
    for token in (cheaper, forged, payload + "." + mac[::-1], "garbage"):
        tampered = server.stub.VerifyOffer(pb.VerifyOfferRequest(offer_token=token))
        assert tampered.validity == pb.OFFER_VALIDITY_TAMPERED and tampered.offer_id == ""
    old = offer_token.sign(
        "o1", "user-0", "00001", Decimal("8.00"), datetime.now(UTC) - timedelta(seconds=1), KEY
    )
    expired = server.stub.VerifyOffer(pb.VerifyOfferRequest(offer_token=old))
    assert expired.validity == pb.OFFER_VALIDITY_EXPIRED and expired.offer_id == "o1"
    with pytest.raises(grpc.RpcError) as e:
        server.stub.VerifyOffer(pb.VerifyOfferRequest(offer_token=""))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_item_newer_than_the_model_gets_no_offer_and_the_rest_of_the_basket_is_priced(
    server: OfferServer,
) -> None:
    """A shop adds products between model versions: one in a basket answered NOT_FOUND for
    the whole basket, so no item of it got an offer until the next model."""
    for user in ("user-0", "a-visitor"):  # scored by the model, and by popularity
        reply = server.stub.GetOffers(
            pb.GetOffersRequest(user_id=user, item_ids=["00001", "new-item", "00002"])
        )
        known, new, other = reply.offers
        assert new.item_id == "new-item" and "UNKNOWN_ITEM" in new.reason_codes
        assert (new.base_price_cents, new.final_price_cents, new.rank) == (0, 0, 0)
        assert (new.offer_id, new.offer_token, new.expires_at, new.rule_id) == ("", "", "", "")
        ranks = recommended_ranks(server, user)
        for offer in (known, other):
            assert offer.offer_token and offer.base_price_cents > 0
            assert offer.rank == ranks.get(offer.item_id, 0)
            assert "UNKNOWN_ITEM" not in offer.reason_codes


def test_a_named_item_outside_the_recommendations_keeps_its_score(
    model_store: Path, db_url: str
) -> None:
    """Not ranked is not unscored: a named item the recommendations leave out (user-0 bought
    it) is still priced by a score-based policy, here 10% off every scored item."""
    running = OfferServer(model_store, ten_percent_off_everything(db_url))
    try:
        ranks = recommended_ranks(running, "user-0")
        bought = min({f"{i:05d}" for i in range(30)} - ranks.keys())
        [offer] = running.stub.GetOffers(
            pb.GetOffersRequest(user_id="user-0", item_ids=[bought])
        ).offers
    finally:
        running.close()
    assert (offer.rank, offer.discount_percent) == (0, 10)
    assert "NOT_RANKED" in offer.reason_codes and "POLICY_THRESHOLD_MET" in offer.reason_codes


def test_bad_requests_name_the_field(server: OfferServer) -> None:
    for request, field in (
        (pb.GetOffersRequest(user_id=""), "user_id"),
        (pb.GetOffersRequest(user_id="u", limit=1001), "limit"),
        (pb.GetOffersRequest(user_id="u", context={"order_count": "many"}), "context[order_count]"),
        (pb.GetOffersRequest(user_id="u", item_ids=["x"] * 1001), "item_ids"),
        (pb.GetOffersRequest(user_id="u", item_ids=["00001", " "]), "item_ids"),
        (pb.GetOffersRequest(user_id="u", item_ids=["x" * 129]), "item_ids"),
        (pb.GetOffersRequest(user_id="u", item_ids=["a\x00b"]), "item_ids"),
    ):
        with pytest.raises(grpc.RpcError) as e:
            server.stub.GetOffers(request)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # Named where a caller's code looks: the BadRequest detail, one violation per problem.
        (bad,) = bad_requests(e.value)
        assert [v.field for v in bad.field_violations] == [field]
        assert bad.field_violations[0].description


def event(event_id: str, **fields: object) -> pb.Event:
    base: dict[str, object] = {"type": pb.EVENT_TYPE_CLICK, "user_id": "user-0", "item_id": "00001"}
    return pb.Event(event_id=event_id, **{**base, **fields})  # type: ignore[arg-type]


def test_record_events_per_event_verdicts(server: OfferServer, seeded: str) -> None:
    future = int((datetime.now(UTC) + timedelta(days=2)).timestamp())
    cases = [
        (event("ok-1"), pb.EVENT_STATUS_ACCEPTED, ""),
        (event("ok-2", type=pb.EVENT_TYPE_PURCHASE, revenue_cents=1999, quantity=2),
         pb.EVENT_STATUS_ACCEPTED, ""),
        (event("ok-3", type=pb.EVENT_TYPE_REDEMPTION, offer_id="o-1", revenue_cents=800),
         pb.EVENT_STATUS_ACCEPTED, ""),
        (event("ok-1"), pb.EVENT_STATUS_DUPLICATE, ""),
        (event(""), pb.EVENT_STATUS_REJECTED, "MISSING_EVENT_ID"),
        (event("t", type=pb.EVENT_TYPE_UNSPECIFIED), pb.EVENT_STATUS_REJECTED, "UNKNOWN_TYPE"),
        (event("t2", type=77), pb.EVENT_STATUS_REJECTED, "UNKNOWN_TYPE"),
        (event("u", user_id=""), pb.EVENT_STATUS_REJECTED, "MISSING_USER_ID"),
        (event("ub", user_id=" "), pb.EVENT_STATUS_REJECTED, "MISSING_USER_ID"),
        (event(" "), pb.EVENT_STATUS_REJECTED, "MISSING_EVENT_ID"),
        (event("ib", item_id="  "), pb.EVENT_STATUS_REJECTED, "MISSING_ITEM_ID"),
        (event("i", item_id=""), pb.EVENT_STATUS_REJECTED, "MISSING_ITEM_ID"),
        (event("r", type=pb.EVENT_TYPE_REDEMPTION), pb.EVENT_STATUS_REJECTED, "MISSING_OFFER_ID"),
        (event("m", type=pb.EVENT_TYPE_PURCHASE, revenue_cents=-1),
         pb.EVENT_STATUS_REJECTED, "NEGATIVE_REVENUE"),
        (event("q", quantity=-2), pb.EVENT_STATUS_REJECTED, "NEGATIVE_QUANTITY"),
        (event("f", occurred_at=future), pb.EVENT_STATUS_REJECTED, "FUTURE_TIME"),
        # A storefront's clock in milliseconds is told so, not to check its clock.
        (event("ms", occurred_at=int(time.time() * 1000)), pb.EVENT_STATUS_REJECTED,
         "FUTURE_TIME: occurred_at is Unix seconds; "),
        (event("l", user_id="u" * 200), pb.EVENT_STATUS_REJECTED, "ID_TOO_LONG"),
        (event("nul\x00"), pb.EVENT_STATUS_REJECTED, "CONTROL_CHARACTER_IN_ID"),
        (event("nu", user_id="user\t0"), pb.EVENT_STATUS_REJECTED, "CONTROL_CHARACTER_IN_ID"),
        (event("no", type=pb.EVENT_TYPE_REDEMPTION, offer_id="o\x00"),
         pb.EVENT_STATUS_REJECTED, "CONTROL_CHARACTER_IN_ID"),
    ]  # fmt: skip
    response = server.stub.RecordEvents(pb.RecordEventsRequest(events=[c[0] for c in cases]))
    assert len(response.results) == len(cases)
    for (sent, status, code), result in zip(cases, response.results, strict=True):
        assert result.event_id == sent.event_id
        assert result.status == status, (sent.event_id, result.reason)
        assert result.reason.startswith(code) if code else result.reason == ""
    # Acknowledged means committed: another connection sees them right away.
    store = Store(seeded)
    try:
        with store.transaction() as s:
            assert s.scalar(select(func.count()).select_from(Event)) == 3
            purchase = s.get(Event, "ok-2")
            assert purchase is not None and purchase.revenue == 19.99 and purchase.quantity == 2
    finally:
        store.dispose()
    again = server.stub.RecordEvents(pb.RecordEventsRequest(events=[event("ok-1"), event("n")]))
    assert [r.status for r in again.results] == [
        pb.EVENT_STATUS_DUPLICATE,
        pb.EVENT_STATUS_ACCEPTED,
    ]
    with pytest.raises(grpc.RpcError) as e:
        server.stub.RecordEvents(
            pb.RecordEventsRequest(events=[event(f"b{n}") for n in range(1001)])
        )
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_spent_budget_stops_the_rule(model_store: Path, seeded: str) -> None:
    """An answer grants what the budget left can pay, in order; redemptions that spend the
    budget stop the rule for every later answer (fail closed), each withdrawn discount saying
    BUDGET_EXHAUSTED."""
    ctl(seeded, "rules", "update", "tier", "--budget", "3.50")
    request = pb.GetOffersRequest(user_id="user-0", limit=4)
    # Redemptions reach the snapshot at its polls (they send no NOTIFY): poll often.
    server = OfferServer(model_store, seeded, rules_poll_interval=0.2)
    try:
        first = server.stub.GetOffers(request)
        # 2.00 off, then 2.00 more does not fit in the 1.50 left, then 0.50 twice does.
        assert prices(first) == [(1, 800), (2, 1000), (3, 950), (4, 950)]
        assert first.offers[1].reason_codes[-1] == "BUDGET_EXHAUSTED"
        assert first.offers[1].discount_percent == 0 and first.offers[1].rule_id
        top = first.offers[0]
        redeemed = event("spend", type=pb.EVENT_TYPE_REDEMPTION, offer_id=top.offer_id,
                         item_id=top.item_id, revenue_cents=1600, quantity=2)  # fmt: skip
        [result] = server.stub.RecordEvents(pb.RecordEventsRequest(events=[redeemed])).results
        assert result.status == pb.EVENT_STATUS_ACCEPTED

        def spent() -> pb.GetOffersResponse | None:
            # 4.00 redeemed of 3.50, once the offer log and a reload have it.
            response = server.stub.GetOffers(request)
            return response if response.offers[0].discount_percent == 0 else None

        after = eventually(spent, timeout=10)
    finally:
        server.close()
    assert all(o.final_price_cents == 1000 and o.discount_percent == 0 for o in after.offers)
    assert all(o.reason_codes[-1] == "BUDGET_EXHAUSTED" for o in after.offers)


def test_issued_offers_are_logged_and_flushed_on_shutdown(model_store: Path, seeded: str) -> None:
    running = OfferServer(model_store, seeded)
    answers = []
    for n in range(3):
        response = running.stub.GetOffers(pb.GetOffersRequest(user_id=f"user-{n}", limit=5))
        answers.append([o.offer_id for o in response.offers])
        time.sleep(0.002)  # the next answer's ids carry a later millisecond
    issued = [offer_id for answer in answers for offer_id in answer]
    # Unique, 32 hex digits, and in issue order from one answer to the next (the table's
    # primary key then grows at its end).
    assert len(set(issued)) == len(issued) and all(re.fullmatch("[0-9a-f]{32}", i) for i in issued)
    assert all(max(a) < min(b) for a, b in itertools.pairwise(answers))
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.snapshot_fresh and info.store_error == ""
    running.close()
    store = Store(seeded)
    try:
        with store.transaction() as s:
            rows = {o.offer_id: o for o in s.scalars(select(Offer))}
    finally:
        store.dispose()
    assert set(rows) == set(issued)
    row = rows[issued[0]]
    assert row.user_id == "user-0" and row.segment == "regulars" and row.final_price == 8.0
    assert "POLICY_TIERED_TOP" in row.reason_codes


def test_an_optimal_rule_without_a_response_model_fails_closed(
    server: OfferServer, seeded: str, caplog: pytest.LogCaptureFixture
) -> None:
    """No response model loaded: the `optimal` rule applies but grants nothing, not INTERNAL;
    the warning that says so carries the request id of the call it was logged in."""
    from core.store.tables import Rule

    store = Store(seeded)
    try:
        with store.transaction() as s:
            s.add(
                Rule(
                    name="future", policy="optimal", params={"grid": [5, 10]}, priority=99,
                    max_discount_pct=30.0, min_margin_pct=0.0, version=1,
                )
            )  # fmt: skip
    finally:
        store.dispose()
    ctl(seeded, "rules", "disable", "tier")
    request = pb.GetOffersRequest(user_id="user-0", limit=2)
    rid = (("x-request-id", "opt-1"),)
    eventually(
        lambda: server.stub.GetOffers(request, metadata=rid).offers[0].final_price_cents == 1000,
        5.0,
    )
    response = server.stub.GetOffers(request)
    assert all(
        "NO_RESPONSE_MODEL" in o.reason_codes and o.discount_percent == 0 and o.rule_id != ""
        for o in response.offers
    )
    (warning,) = [r for r in caplog.records if "no response model is loaded" in r.getMessage()]
    assert json.loads(JsonFormatter().format(warning))["request_id"] == "opt-1"


@pytest.fixture(scope="module")
def assumed_and_unloggable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store of the tiny shop where 00000's cost is assumed and 00001 costs more than
    the offer log holds; read-only, made once for both backends (the export takes seconds)."""
    shop = make_tiny_shop()
    catalog = shop.dataset.catalog
    assumed, prices = catalog.cost_assumed.copy(), catalog.prices.copy()
    assumed[0], prices[1] = True, 1e10
    dataset = replace(shop.dataset, catalog=replace(catalog, cost_assumed=assumed, prices=prices))
    store = tmp_path_factory.mktemp("assumed") / "models"
    write_tiny_artifact(store, replace(shop, dataset=dataset))
    return store


def test_an_assumed_cost_is_reported_and_a_price_the_log_cannot_hold_gets_no_offer(
    assumed_and_unloggable: Path, db_url: str
) -> None:
    """DESIGN: a cost the trainer assumed from its default margin is used and reported, so the
    checkout knows the margin floor rests on it; a price over the offer log's NUMERIC(12, 2)
    would get a token for an offer never stored."""
    ten_percent_off_everything(db_url)
    args = ["--user", "user-0", "--item", "00000", "--item", "00001", "--item", "00002"]
    result = ctl(db_url, "rules", "simulate", *args, "--model-dir", str(assumed_and_unloggable),
                 "--output", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    items = {i["item_id"]: i for i in json.loads(result.stdout)["items"]}
    assert "COST_ASSUMED" in items["00000"]["reason_codes"]
    assert Decimal(items["00000"]["discount_pct"]) == 10
    assert "NO_PRICE" in items["00001"]["reason_codes"]
    assert "COST_ASSUMED" not in items["00002"]["reason_codes"]
    assert Decimal(items["00002"]["discount_pct"]) == 10


@pytest.fixture(scope="module")
def costless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store of the tiny shop where 00000 has no cost; read-only, made once for both
    backends."""
    shop = make_tiny_shop()
    costs = shop.dataset.catalog.costs.copy()
    costs[0] = np.nan
    catalog = replace(shop.dataset.catalog, costs=costs)
    store = tmp_path_factory.mktemp("costless") / "models"
    write_tiny_artifact(store, replace(shop, dataset=replace(shop.dataset, catalog=catalog)))
    return store


def test_an_item_without_a_cost_says_which_rule_it_escaped_and_why(
    costless: Path, db_url: str
) -> None:
    """A rule covers the item but, with no cost, cannot check its margin floor: no discount,
    reasons RULE_HIGHEST_PRIORITY then NO_COST, and not NO_RULE ("no rule applies"), which
    contradicted them."""
    running = OfferServer(costless, ten_percent_off_everything(db_url))
    try:
        offers = running.stub.GetOffers(
            pb.GetOffersRequest(user_id="user-0", item_ids=["00000", "00001"])
        ).offers
    finally:
        running.close()
    assert (offers[0].discount_percent, offers[0].final_price_cents, offers[0].rule_id) == (
        0, 1000, "",
    )  # fmt: skip
    codes = list(offers[0].reason_codes)
    assert codes[-2:] == ["RULE_HIGHEST_PRIORITY", "NO_COST"] and "NO_RULE" not in codes
    assert offers[1].discount_percent == 10 and "NO_COST" not in offers[1].reason_codes


@pytest.fixture(scope="module")
def overpriced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model store of the tiny shop as an older `fit` wrote it, which took any finite price and
    cost: 00001 priced 2e10, 00002 priced 1e30 (past what Decimal quantizes to cents in 28
    digits), 00003 costing 1e30; read-only, made once for both backends."""
    shop = make_tiny_shop()
    catalog = shop.dataset.catalog
    prices, costs = catalog.prices.copy(), catalog.costs.copy()
    prices[1], prices[2], costs[3] = 2e10, 1e30, 1e30
    dataset = replace(shop.dataset, catalog=replace(catalog, prices=prices, costs=costs))
    store = tmp_path_factory.mktemp("overpriced") / "models"
    write_tiny_artifact(store, replace(shop, dataset=dataset))
    return store


def test_an_older_artifact_pricing_past_the_offer_log_loses_no_other_offer(
    overpriced: Path, db_url: str
) -> None:
    """Prices and costs no offer can hold are no price (NO_PRICE: no token, no log row) and no
    cost (NO_COST): the call succeeds, Recommend too, and the basket's other offers reach the
    offer log, whose NUMERIC(12, 2) could not store the price past it."""
    running = OfferServer(overpriced, ten_percent_off_everything(db_url))
    try:
        named = ["00000", "00001", "00002", "00003", "00004"]
        offers = running.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", item_ids=named))
        recommended = running.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=30))
    finally:
        running.close()
    by_item = {o.item_id: o for o in offers.offers}
    for item in ("00001", "00002"):
        offer = by_item[item]
        assert "NO_PRICE" in offer.reason_codes and (offer.offer_id, offer.offer_token) == ("", "")
        assert (offer.base_price_cents, offer.final_price_cents) == (0, 0)
    assert "NO_COST" in by_item["00003"].reason_codes
    assert (by_item["00003"].discount_percent, by_item["00003"].final_price_cents) == (0, 1000)
    for item in ("00000", "00004"):
        assert (by_item[item].discount_percent, by_item[item].final_price_cents) == (10, 900)
    assert len(recommended.items) == 30 - 3  # all but the three user-0 bought
    store = Store(db_url)
    try:
        with store.transaction() as s:
            logged = {o.item_id: o.offer_id for o in s.scalars(select(Offer))}
    finally:
        store.dispose()
    assert logged == {i: by_item[i].offer_id for i in ("00000", "00003", "00004")}


def test_the_largest_price_is_the_largest_the_offer_log_holds() -> None:
    from decimal import Decimal

    from core.shop import MAX_AMOUNT
    from core.store.tables import Offer

    column = Offer.__table__.columns["base_price"].type
    largest = Decimal(10) ** (column.precision - column.scale) - Decimal(10) ** -column.scale
    assert Decimal(str(MAX_AMOUNT)) == largest
