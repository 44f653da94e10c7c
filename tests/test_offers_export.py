"""From the store to a response model: a `randomized` rule served by a real discountd, shoppers
replayed through it, `discountctl offers export` of its log and `discount-train response` on
the export. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from cli import ctl
from click.testing import CliRunner
from conftest import make_tiny_shop, write_tiny_artifact
from offer_server import OfferServer, eventually, ten_percent_off_everything
from secure_server import ServerThread
from secure_server import settings as server_settings
from sqlalchemy import select

from core import response_artifact
from core.artifact import current_version_dir
from core.features import NUMERIC_FEATURES
from core.store.db import Store
from core.store.events import EventIn, record
from core.store.offers import insert_offers
from core.store.tables import Event, Offer
from discount.v1 import discount_pb2 as pb
from trainer.cli import main as train
from trainer.replay import ReplayConfig, replay

pytestmark = pytest.mark.timeout(180)
GRID = [5.0, 10.0, 15.0, 20.0, 25.0]
MAX_DISCOUNT = 22.0  # 25% is over it: drawn among 0, 5, 10, 15 and 20 only


def _run(url: str, *args: str) -> str:
    result = ctl(url, *args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_a_randomized_rules_log_trains_a_response_model(
    tmp_path: Path, model_store: Path, db_url: str
) -> None:
    version = current_version_dir(model_store)
    _run(db_url, "rules", "create", "learn", "--policy", "randomized", "--params",
         json.dumps({"grid": GRID}), "--max-discount", str(MAX_DISCOUNT))  # fmt: skip
    # A rule to estimate from the experiment before it serves anyone.
    _run(db_url, "rules", "create", "tiered", "--policy", "tiered_topk", "--param", "k1=2",
         "--param", "d1=20", "--param", "d2=5", "--disabled")  # fmt: skip
    _run(db_url, "models", "register", str(version))
    _run(db_url, "models", "promote", version.name)
    token = json.loads(_run(db_url, "clients", "create", "replayer", "-o", "json"))["token"]
    server = ServerThread(server_settings(model_store, db_url, auth="required"))
    try:
        config = ReplayConfig(
            target=server.target, shoppers=400, seed=1, token=token, concurrency=4
        )
        asyncio.run(replay(config, [f"user-{u}" for u in range(40)]))
    finally:
        server.close()  # a graceful stop writes the offer log

    out = tmp_path / "log"
    summary = json.loads(_run(db_url, "offers", "export", "--rule", "learn", "--out", str(out),
                              "-o", "json"))  # fmt: skip
    ids = {"offer_id": str, "user_id": str, "item_id": str}
    offers = pd.read_csv(out / "offers.csv", dtype=ids)
    sales = pd.read_csv(out / "events.csv", dtype={"offer_id": str})
    store = Store(db_url)
    with store.transaction() as s:
        stored = {o.offer_id: o for o in s.scalars(select(Offer))}
        sold = s.scalars(select(Event).where(Event.type.in_(("purchase", "redemption"))))
        named = Counter(e.type for e in sold if e.offer_id in stored)
    store.dispose()
    assert summary["offers"] == len(offers) == len(stored) > 0
    assert summary["sales"] == len(sales) == sum(named.values()) > 0
    assert Counter(sales["type"]) == named
    # Every discount drawn among those the guardrail allows, each about as often as the others.
    shown = Counter((offers["discount"] * 100).round(2))
    assert set(shown) == {0, 5, 10, 15, 20}
    assert min(shown.values()) > len(offers) / 5 / 2
    assert (offers["propensity"] == 1 / 5).all()
    for row in offers.itertuples():
        offer = stored[row.offer_id]
        assert (row.user_id, row.item_id) == (offer.user_id, offer.item_id)
        assert row.discount == pytest.approx(offer.discount_pct / 100)
        assert row.price == pytest.approx(offer.base_price)
        # The tiny shop's users have 3 orders (conftest); a new visitor has the new-user features.
        assert row.order_count == (0.0 if row.user_id.startswith("visitor-") else 3.0)
    assert list(offers.columns[-len(NUMERIC_FEATURES) :]) == list(NUMERIC_FEATURES)

    model = tmp_path / "response"
    result = CliRunner().invoke(
        train,
        ["response", "--offers", str(out / "offers.csv"), "--events", str(out / "events.csv"),
         "--out", str(model), "--hidden", "8", "--epochs", "1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert response_artifact.load(model).grid == [0.0, 0.05, 0.1, 0.15, 0.2]

    rules = tmp_path / "rules.json"
    rules.write_text(_run(db_url, "rules", "list", "-o", "json"))
    estimated = CliRunner().invoke(
        train,
        ["estimate-policy", "--offers", str(out / "offers.csv"), "--events",
         str(out / "events.csv"), "--rules", str(rules), "--response-model", str(model)],
    )  # fmt: skip
    assert estimated.exit_code == 0, estimated.output
    assert [line.split()[0] for line in estimated.stdout.splitlines()[1:3]] == [
        "no_discount",
        "tiered",
    ]


def test_a_randomized_variant_is_exported_apart_from_its_control(
    tmp_path: Path, model_store: Path, db_url: str
) -> None:
    """The randomized rule as an experiment's variant next to the rule it may replace: the
    experiment's offers are both variants', and the control's fixed discounts are said to be
    among them, since `response` would train on them too; --rule keeps the draws alone."""
    _run(db_url, "rules", "create", "fixed", "--policy", "threshold", "--param", "t=-100",
         "--param", "d=10")  # fmt: skip
    _run(db_url, "rules", "create", "learn", "--policy", "randomized", "--params",
         json.dumps({"grid": [5, 10, 15, 20]}))  # fmt: skip
    _run(db_url, "experiments", "create", "ab", "--variant", "control:50:fixed",
         "--variant", "learn:50:learn")  # fmt: skip
    _run(db_url, "experiments", "start", "ab")
    running = OfferServer(model_store, db_url)
    try:
        for u in range(30):
            running.stub.GetOffers(pb.GetOffersRequest(user_id=f"user-{u}", limit=3))
        eventually(lambda: running.server.offering.log.pending == 0, 10.0)
    finally:
        running.close()
    store = Store(db_url)
    with store.transaction() as s:
        by_variant: dict[str, list[Offer]] = {"control": [], "learn": []}
        for offer in s.scalars(select(Offer).order_by(Offer.issued_at, Offer.offer_id)):
            by_variant[str(offer.variant)].append(offer)
        sold = [by_variant[v][0] for v in ("control", "learn")]
        record(
            s,
            [EventIn(f"e-{o.variant}", "redemption", o.user_id, "", o.offer_id, 900, 1)
             for o in sold],
            datetime.now(UTC),
        )  # fmt: skip
    store.dispose()
    assert all(by_variant.values()), "30 users and no one in one of the variants"

    both = ctl(db_url, "offers", "export", "--experiment", "ab", "--out", str(tmp_path / "ab"),
               "-o", "json")  # fmt: skip
    assert both.exit_code == 0, both.output
    summary = json.loads(both.stdout)
    fixed, drawn = len(by_variant["control"]), len(by_variant["learn"])
    assert (summary["offers"], summary["randomized"], summary["sales"]) == (fixed + drawn, drawn, 2)
    assert (
        f"{fixed:,} of these {fixed + drawn:,} offers had a discount not drawn at random"
        in both.stderr
    )
    assert "--rule" in both.stderr

    out = tmp_path / "learn"
    alone = ctl(db_url, "offers", "export", "--experiment", "ab", "--rule", "learn", "--out",
                str(out), "-o", "json")  # fmt: skip
    assert alone.exit_code == 0, alone.output
    assert json.loads(alone.stdout)["randomized"] == drawn
    assert alone.stderr == ""
    offers = pd.read_csv(out / "offers.csv", dtype={"offer_id": str})
    assert sorted(offers["offer_id"]) == sorted(o.offer_id for o in by_variant["learn"])
    assert (offers["propensity"] == 1 / 5).all()
    assert list(pd.read_csv(out / "events.csv")["event_id"]) == ["e-learn"]


def _offer(n: int, **later: object) -> dict[str, object]:
    at = datetime(2026, 11, 30, 9, 0, n, tzinfo=UTC)
    return {
        "offer_id": f"o{n}", "user_id": f"u{n}", "item_id": "i", "rule_id": None,
        "segment": None, "experiment_key": None, "variant": None, "base_price": 10.0,
        "discount_pct": 10.0 * (n % 2), "final_price": 10.0 - n % 2, "model_version": "v1",
        "reason_codes": [], "issued_at": at, "expires_at": at + timedelta(minutes=15), **later,
    }  # fmt: skip


def test_offers_without_what_a_model_needs_are_left_out_and_counted(
    tmp_path: Path, store: Store, db_url: str
) -> None:
    features = {name: 1.0 for name in NUMERIC_FEATURES}
    learnable = {"cf_score": 0.5, "rank": 1, "cost": 4.0, "user_features": features}
    # Logged by a build that knew one feature fewer: a blank cell would make `response` refuse
    # the whole file.
    fewer = {**learnable, "user_features": {**features, "avg_basket": None}}
    fewer_still = {**learnable, "user_features": {"order_count": 1.0}}
    with store.transaction() as s:
        insert_offers(
            s,
            [
                _offer(0),  # logged before migration 0006
                _offer(1, **learnable, propensity=0.5),
                _offer(2, **learnable, propensity=0.5),
                _offer(3, **{**learnable, "cf_score": None}, propensity=0.5),  # no score
                _offer(4, **fewer, propensity=0.5),
                _offer(5, **fewer_still, propensity=0.5),
            ],
        )
        record(
            s,
            [
                EventIn("e1", "redemption", "u1", "", "o1", 900, 1),
                EventIn("e0", "purchase", "u0", "i", "o0", 1000, 1),
                EventIn("e2", "click", "u2", "i", "o2"),
                EventIn("e4", "purchase", "u4", "i", "o4", 900, 1),
            ],
            datetime.now(UTC),
        )
    result = ctl(db_url, "offers", "export", "--out", str(tmp_path / "log"), "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["left_out_without_features"] == 4
    assert "left out 4 offer(s) without a score, cost, propensity or user feature" in (
        result.stderr
    )
    offers = pd.read_csv(tmp_path / "log/offers.csv")
    assert list(offers["offer_id"]) == ["o1", "o2"]
    assert list(offers["discount"]) == [0.1, 0.0]
    sales = pd.read_csv(tmp_path / "log/events.csv")
    assert list(sales["event_id"]) == ["e1"]  # the click is no sale; o0 and o4 were left out

    again = ctl(db_url, "offers", "export", "--out", str(tmp_path / "log"))
    assert again.exit_code == 1
    assert again.stderr.splitlines() == [
        f"Error: {tmp_path / 'log/offers.csv'}, {tmp_path / 'log/events.csv'} already there; "
        "delete them or pick another --out"
    ]


T0 = 1_764_496_800  # 2025-11-30T10:00:00Z


def test_both_stores_give_the_same_files_to_the_cent(
    tmp_path: Path, store: Store, db_url: str
) -> None:
    """SQLite gave a revenue of 9.00 back as 9, PostgreSQL as 9.0: money is written to the cent,
    as the price is, whichever store it comes from."""
    features = {name: float(n) for n, name in enumerate(NUMERIC_FEATURES)}
    learnable = {"cf_score": 0.25, "cost": 4.1, "user_features": features, "propensity": 0.2}
    with store.transaction() as s:
        insert_offers(
            s,
            [
                _offer(1, **learnable, rank=2, discount_pct=12.5),
                _offer(2, **learnable, rank=None, discount_pct=33.33, base_price=1234.5),
            ],
        )
        record(
            s,
            [
                EventIn("e1", "redemption", "u1", "", "o1", 900, 1, T0),
                EventIn("e2", "purchase", "u2", "i", "o2", 164_645, 2, T0 + 1),
            ],
            datetime.now(UTC),
        )
    out = tmp_path / "log"
    result = ctl(db_url, "offers", "export", "--out", str(out))
    assert result.exit_code == 0, result.output
    features_text = "0.0,1.0,2.0,3.0,4.0"
    assert (out / "offers.csv").read_text().splitlines()[1:] == [
        f"o1,u1,i,2,0.25,10.00,4.1,0.125,0.2,{features_text}",
        f"o2,u2,i,,0.25,1234.50,4.1,0.3333,0.2,{features_text}",
    ]
    assert (out / "events.csv").read_text().splitlines()[1:] == [
        "e1,redemption,u1,,o1,9.00,1,2025-11-30T10:00:00+00:00",
        "e2,purchase,u2,i,o2,1646.45,2,2025-11-30T10:00:01+00:00",
    ]


def test_since_and_until_select_offers_by_issue_and_bring_their_later_sales(
    tmp_path: Path, store: Store, db_url: str
) -> None:
    features = {name: 1.0 for name in NUMERIC_FEATURES}
    learnable = {"cf_score": 0.5, "rank": 1, "cost": 4.0, "user_features": features}
    with store.transaction() as s:
        # Issued at 09:00:01, :02 and :03.
        insert_offers(s, [_offer(n, **learnable, propensity=0.5) for n in (1, 2, 3)])
        an_hour_later = int(datetime(2026, 11, 30, 10, 0, 2, tzinfo=UTC).timestamp())
        record(s, [EventIn("late", "purchase", "u2", "i", "o2", 900, 1, an_hour_later)],
               datetime.now(UTC))  # fmt: skip
    out = tmp_path / "log"
    result = ctl(db_url, "offers", "export", "--out", str(out), "--since",
                 "2026-11-30T09:00:02Z", "--until", "2026-11-30T10:00:03+01:00")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(out / "offers.csv")["offer_id"]) == ["o2"]
    # Made after --until: a sale comes with its offer, whenever it was made.
    assert list(pd.read_csv(out / "events.csv")["event_id"]) == ["late"]


def test_a_rule_that_priced_none_of_the_offers_exports_none_and_says_so(
    tmp_path: Path, store: Store, db_url: str
) -> None:
    _run(db_url, "rules", "create", "learn", "--policy", "randomized", "--param", "grid=[5]")
    features = {name: 1.0 for name in NUMERIC_FEATURES}
    with store.transaction() as s:  # priced by no rule
        insert_offers(s, [_offer(1, cf_score=0.5, rank=1, cost=4.0, user_features=features,
                                 propensity=0.5)])  # fmt: skip
    out = tmp_path / "log"
    result = ctl(db_url, "offers", "export", "--rule", "learn", "--out", str(out), "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "out": str(out), "offers": 0, "randomized": 0, "sales": 0, "cost_assumed": 0,
        "left_out_without_features": 0,
    }  # fmt: skip
    assert result.stderr == "no offer matched: nothing for a response model to learn from\n"
    assert (out / "offers.csv").read_text().count("\n") == 1  # the header alone


def test_a_log_of_fixed_discounts_says_response_would_refuse_it(
    tmp_path: Path, store: Store, db_url: str
) -> None:
    with store.transaction() as s:
        features = {name: 1.0 for name in NUMERIC_FEATURES}
        learnable = {"cf_score": 0.5, "rank": 1, "cost": 4.0, "user_features": features}
        insert_offers(s, [_offer(1, **learnable, propensity=1.0)])
    result = ctl(db_url, "offers", "export", "--out", str(tmp_path / "log"))
    assert result.exit_code == 0, result.output
    assert "none of these offers had its discount drawn at random" in result.stderr


def test_offers_priced_against_an_assumed_cost_are_counted_and_said(
    tmp_path: Path, store: Store, db_url: str
) -> None:
    """An assumed cost is written as the cost, as discountd priced it; the export says how many
    rest on it, since every margin learned or estimated from them is only as right as it."""
    features = {name: 1.0 for name in NUMERIC_FEATURES}
    learnable = {"cf_score": 0.5, "rank": 1, "cost": 4.0, "user_features": features}
    with store.transaction() as s:
        insert_offers(
            s,
            [
                _offer(1, **learnable, propensity=0.5, reason_codes=["COST_ASSUMED"]),
                _offer(2, **learnable, propensity=0.5, reason_codes=["POLICY_RANDOMIZED"]),
                _offer(
                    3, **learnable, propensity=0.5, reason_codes=["NO_DISCOUNT", "COST_ASSUMED"]
                ),
            ],
        )
    out = tmp_path / "log"
    result = ctl(db_url, "offers", "export", "--out", str(out), "-o", "json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["cost_assumed"] == 2
    assert "2 of these 3 offers carry a cost assumed" in result.stderr
    assert list(pd.read_csv(out / "offers.csv")["cost"]) == [4.0, 4.0, 4.0]

    clean = ctl(db_url, "offers", "export", "--out", str(tmp_path / "clean"), "--since",
                "2026-11-30T09:00:02Z", "--until", "2026-11-30T09:00:03Z")  # fmt: skip
    assert clean.exit_code == 0, clean.output
    assert "assumed" not in clean.stderr


def test_a_control_arms_assumed_costs_are_counted_too(tmp_path: Path, db_url: str) -> None:
    """Every cost of a shop without costs is assumed (Online Retail's): an experiment's control
    offers carry it in the cost column as the treated ones do, though no rule priced them and
    so none says COST_ASSUMED; the count had left them out (1,480 of 3,010 where all were)."""
    shop = make_tiny_shop()
    catalog = shop.dataset.catalog
    assumed = np.ones(len(catalog.item_ids), dtype=bool)
    dataset = replace(shop.dataset, catalog=replace(catalog, cost_assumed=assumed))
    models = tmp_path / "models"
    version = write_tiny_artifact(models, replace(shop, dataset=dataset))
    ten_percent_off_everything(db_url)
    _run(db_url, "models", "register", str(version))
    _run(db_url, "models", "promote", version.name)
    _run(db_url, "experiments", "create", "ab", "--variant", "control:50",
         "--variant", "treated:50:all")  # fmt: skip
    _run(db_url, "experiments", "start", "ab")
    running = OfferServer(models, db_url)
    try:
        variants = {
            running.stub.GetOffers(pb.GetOffersRequest(user_id=f"user-{u}", limit=3)).variant
            for u in range(30)
        }
        eventually(lambda: running.server.offering.log.pending == 0, 10.0)
    finally:
        running.close()
    assert variants == {"control", "treated"}
    result = ctl(db_url, "offers", "export", "--experiment", "ab", "--out",
                 str(tmp_path / "ab"), "-o", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["offers"] == 90 and summary["cost_assumed"] == 90
    assert "90 of these 90 offers carry a cost assumed" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rule", "nope"], "no rule named 'nope'"),
        (["--experiment", "nope"], "no experiment with key 'nope'"),
        (["--since", "2026-12-01", "--until", "2026-11-01"], "is not before --until"),
        (["--since", "yesterday"], "--since"),
    ],
)
def test_bad_filters_are_one_line_and_write_nothing(
    tmp_path: Path, db_url: str, args: list[str], message: str
) -> None:
    result = ctl(db_url, "offers", "export", "--out", str(tmp_path / "log"), *args)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "log").exists()


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ("afile", "is a file, not a folder"),
        ("afile/log", "cannot write"),
    ],
)
def test_an_out_that_cannot_be_a_folder_is_one_line(
    tmp_path: Path, db_url: str, where: str, message: str
) -> None:
    """Click's "Invalid value for '--out'" was three lines of usage and exit 2, for a path that
    parses: refused like every other input after parsing (admin/options.py), exit 1."""
    (tmp_path / "afile").write_text("mine")
    result = ctl(db_url, "offers", "export", "--out", str(tmp_path / where))
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and message in result.output, result.output
    assert (tmp_path / "afile").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_asking_again_shows_the_same_draw_on_any_replica(model_store: Path, db_url: str) -> None:
    """A shopper who reloads must never draw again, not even once the offer has expired: they
    could keep the largest of several draws, and the log would credit the sale to it."""
    _run(db_url, "rules", "create", "learn", "--policy", "randomized", "--params",
         json.dumps({"grid": [5, 10, 15, 20, 25]}))  # fmt: skip
    _run(db_url, "models", "register", str(current_version_dir(model_store)))
    _run(db_url, "models", "promote", current_version_dir(model_store).name)
    shown = []
    for _ in range(2):
        # Offers that expire in a second: the second replica asks after the first's expired.
        replica = OfferServer(model_store, db_url, offer_ttl=1)
        try:
            shown.append(
                [
                    [
                        offer.discount_percent
                        for _ in range(2)
                        for offer in replica.stub.GetOffers(
                            pb.GetOffersRequest(user_id=f"user-{u}", limit=4)
                        ).offers
                    ]
                    for u in range(30)
                ]
            )
        finally:
            replica.close()
        time.sleep(1.1)
    first, second = shown
    assert first == second
    for discounts in first:
        assert discounts[:4] == discounts[4:]
    assert {d for discounts in first for d in discounts} == {0, 5, 10, 15, 20, 25}
