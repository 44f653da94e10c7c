"""`discountctl events export`: what shoppers did, as discountd stored it through RecordEvents,
back out as the interactions `discount-train fit` reads. SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime
from pathlib import Path

from cli import ctl as attempt
from offer_server import OfferServer, ctl, eventually, ten_percent_off_everything

from core.store.db import Store
from core.store.events import EventIn, record
from discount.v1 import discount_pb2 as pb
from trainer.data import load_files

T0 = 1_764_000_000  # 2025-11-24T16:00:00Z


def event(event_id: str, kind: int, at: int, **fields: object) -> pb.Event:
    return pb.Event(event_id=event_id, type=kind, user_id="user-0", occurred_at=at, **fields)


def test_stored_events_come_back_as_fits_interactions(
    model_store: Path, db_url: str, tmp_path: Path
) -> None:
    ten_percent_off_everything(db_url)
    running = OfferServer(model_store, db_url)
    try:
        offer = running.stub.GetOffers(
            pb.GetOffersRequest(user_id="user-0", item_ids=["00002"])
        ).offers[0]
        eventually(lambda: running.server.offering.log.pending == 0, 10.0)
        sent = [
            event("i", pb.EVENT_TYPE_IMPRESSION, T0, item_id="00002"),
            event("c", pb.EVENT_TYPE_CLICK, T0 + 1, item_id="00002"),
            event("a", pb.EVENT_TYPE_ADD_TO_CART, T0 + 2, item_id="00002"),
            # Names only its offer: the item is the offer's.
            event("r", pb.EVENT_TYPE_REDEMPTION, T0 + 3, offer_id=offer.offer_id,
                  revenue_cents=2 * offer.final_price_cents, quantity=2),
            event("p", pb.EVENT_TYPE_PURCHASE, T0 + 4, item_id="00001", revenue_cents=1250),
            event("lost", pb.EVENT_TYPE_REDEMPTION, T0 + 5, offer_id="f" * 32),
        ]  # fmt: skip
        answer = running.stub.RecordEvents(pb.RecordEventsRequest(events=sent))
        assert all(r.status == pb.EVENT_STATUS_ACCEPTED for r in answer.results)
    finally:
        running.close()

    out = tmp_path / "interactions.csv"
    done = ctl(db_url, "events", "export", "--out", str(out), "-o", "json")
    assert json.loads(done.stdout) == {
        "out": str(out), "interactions": 4, "purchase": 2, "click": 1, "cart": 1,
        "left_out_without_item": 1,
    }  # fmt: skip
    assert done.stderr == (
        "left out 1 redemption(s) whose offer the store does not hold (no item_id given, and "
        "none to look up)\n"
    )
    rows = list(csv.DictReader(out.open()))
    unit = f"{offer.final_price_cents / 100:.2f}".rstrip("0").rstrip(".")
    assert [(r["item_id"], r["event"], r["quantity"], r["price"]) for r in rows] == [
        ("00002", "click", "1", ""),
        ("00002", "cart", "1", ""),
        ("00002", "purchase", "2", unit),
        ("00001", "purchase", "1", "12.5"),
    ]
    assert rows[0]["timestamp"] == "2025-11-24T16:00:01+00:00"
    assert {r["user_id"] for r in rows} == {"user-0"}

    # fit's reader takes the file whole, with a catalog beside it.
    items = tmp_path / "items.csv"
    items.write_text("item_id,price\n00001,12.50\n00002,10.00\n")
    loaded = load_files(out, items)
    assert (loaded.rows_read, loaded.dropped) == (4, {})
    assert loaded.dataset.user_ids == ["user-0"]

    window = ctl(db_url, "events", "export", "--out", "-", "--since", "2025-11-24T16:00:02Z",
                 "--until", "2025-11-24T16:00:04Z")  # fmt: skip
    assert [r["event"] for r in csv.DictReader(io.StringIO(window.stdout))] == ["cart", "purchase"]
    again = attempt(db_url, "events", "export", "--out", str(out))
    assert again.exit_code == 1
    assert again.stderr == f"Error: {out} exists; delete it or pick another --out\n"


def test_events_alike_in_one_second_are_one_row_with_their_quantities(
    store: Store, db_url: str, tmp_path: Path
) -> None:
    """A storefront that sends a purchase per unit sold (three units of one item, one second):
    three identical rows would be two 'exact duplicate rows' to fit, a third of the spend."""
    unit = {"type": "purchase", "user_id": "u", "item_id": "00001", "occurred_at": T0}
    sent = [EventIn(event_id=f"unit-{n}", revenue_cents=1250, **unit) for n in range(3)]
    sent += [
        EventIn(event_id="dearer", revenue_cents=1300, **unit),
        EventIn(event_id="c1", type="click", user_id="u", item_id="00001", occurred_at=T0),
        EventIn(event_id="c2", type="click", user_id="u", item_id="00001", occurred_at=T0),
        EventIn(event_id="later", revenue_cents=1250, **{**unit, "occurred_at": T0 + 1}),
    ]
    with store.transaction() as session:
        record(session, sent, datetime.now(UTC))

    out = tmp_path / "interactions.csv"
    done = ctl(db_url, "events", "export", "--out", str(out), "-o", "json")
    assert json.loads(done.stdout)["purchase"] == 5
    rows = list(csv.DictReader(out.open()))
    assert sorted((r["timestamp"], r["event"], r["quantity"], r["price"]) for r in rows) == [
        ("2025-11-24T16:00:00+00:00", "click", "2", ""),
        ("2025-11-24T16:00:00+00:00", "purchase", "1", "13"),
        ("2025-11-24T16:00:00+00:00", "purchase", "3", "12.5"),
        ("2025-11-24T16:00:01+00:00", "purchase", "1", "12.5"),
    ]
    items = tmp_path / "items.csv"
    items.write_text("item_id,price\n00001,12.50\n")
    loaded = load_files(out, items)
    assert loaded.dropped == {}
    assert loaded.dataset.interactions.quantity.sum() == 7
