"""`discountctl experiments report` over logged offers and events whose answer is known, with
the statistics checked against scipy; `discountctl rules simulate` through the CLI."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from click.testing import Result
from conftest import make_tiny_shop, write_tiny_artifact
from offer_server import ctl
from scipy import stats as sps
from sqlalchemy import select

from admin.report import axis_unit, conversion_curves, report
from core.artifact import CURRENT
from core.store.db import Store
from core.store.events import EventIn, record
from core.store.offers import insert_offers
from core.store.tables import AuditEntry

START = datetime.now(UTC) - timedelta(days=40)


def offer(n: int, user: str, variant: str, discount: float) -> dict[str, object]:
    return {
        "offer_id": f"o{n}", "user_id": user, "item_id": "00001", "rule_id": None,
        "segment": None, "experiment_key": "ab", "variant": variant, "base_price": 10.0,
        "discount_pct": discount, "final_price": 10.0 * (1 - discount / 100),
        "model_version": "v", "reason_codes": [], "issued_at": START,
        "expires_at": START + timedelta(hours=1),
    }  # fmt: skip


def insert(db_url: str, offers: list[dict[str, object]]) -> None:
    """Store offers as discountd's offer log would have."""
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, offers)
    store.dispose()


@pytest.fixture
def logged(db_url: str) -> tuple[str, dict[str, list[float]]]:
    """200 control users (20 buy 10.00), 200 treatment users (40 redeem at 8.00, 10 of them
    again 3 days later). Every user saw an impression; a quarter clicked."""
    ctl(db_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=1", "--param", "d1=20", "--param", "d2=0")  # fmt: skip
    ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50:tier")  # fmt: skip
    ctl(db_url, "experiments", "start", "ab")
    rng = np.random.default_rng(0)
    offers, events = [], []
    revenue: dict[str, list[float]] = {"control": [], "treatment": []}
    t0 = int(START.timestamp()) + 60
    for n in range(400):
        variant = "control" if n < 200 else "treatment"
        user = f"u{n}"
        offers.append(offer(n, user, variant, 0.0 if variant == "control" else 20.0))
        events.append(EventIn(f"i{n}", "impression", user, "00001", occurred_at=t0))
        if rng.random() < 0.25:
            events.append(EventIn(f"c{n}", "click", user, "00001", occurred_at=t0 + 1))
        money = 0.0
        k = n % 200
        if variant == "control" and k < 20:
            events.append(EventIn(f"p{n}", "purchase", user, "00001", "", 1000, 1, t0 + 2))
            money = 10.0
        if variant == "treatment" and k < 40:
            events.append(EventIn(f"r{n}", "redemption", user, "", f"o{n}", 800, 1, t0 + 2))
            money = 8.0
            if k < 10:
                events.append(
                    EventIn(f"a{n}", "purchase", user, "00002", "", 1000, 1, t0 + 3 * 86_400)
                )
                money += 10.0
        revenue[variant].append(money)
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, offers)
        record(session, events[:1000], datetime.now(UTC))
        record(session, events[1000:], datetime.now(UTC))
    store.dispose()
    return db_url, revenue


def test_report_numbers_and_statistics(
    logged: tuple[str, dict[str, list[float]]], tmp_path: Path
) -> None:
    url, revenue = logged
    png = tmp_path / "ab.png"
    result = ctl(url, "experiments", "report", "ab", "--output", "json", "--plot", str(png))
    data = json.loads(result.stdout)
    control, treatment = data["variants"]
    assert (control["users_assigned"], treatment["users_assigned"]) == (200, 200)
    assert (control["users_exposed"], treatment["users_exposed"]) == (200, 200)
    assert control["conversion"]["value"] == pytest.approx(0.10)
    assert treatment["conversion"]["value"] == pytest.approx(0.20)
    assert treatment["repeat_rate_30d"]["value"] == pytest.approx(10 / 40)
    assert control["repeat_rate_30d"]["value"] == 0.0
    assert treatment["discount_cost"] == pytest.approx(40 * 2.0)
    assert treatment["discount_cost_per_user"]["value"] == pytest.approx(40 * 2.0 / 200)
    spent = [2.0] * 40 + [0.0] * 160
    lift = treatment["vs_control"]["discount_cost_per_user"]
    assert lift["p_value"] == pytest.approx(
        sps.ttest_ind(spent, [0.0] * 200, equal_var=False).pvalue, rel=1e-4
    )
    assert treatment["revenue_per_user"]["value"] == pytest.approx(np.mean(revenue["treatment"]))
    # Pooled two-proportion z-test, as scipy computes it from the normal distribution.
    pooled = 60 / 400
    z = (0.20 - 0.10) / math.sqrt(pooled * (1 - pooled) * (2 / 200))
    p_conv = treatment["vs_control"]["conversion"]["p_value"]
    assert p_conv == pytest.approx(2 * sps.norm.sf(z), rel=1e-5)
    welch = sps.ttest_ind(revenue["treatment"], revenue["control"], equal_var=False)
    p_rev = treatment["vs_control"]["revenue_per_user"]["p_value"]
    assert p_rev == pytest.approx(welch.pvalue, rel=1e-4)
    assert data["srm_p_value"] == pytest.approx(1.0)
    assert not any("mismatch" in w for w in data["warnings"])
    assert png.stat().st_size > 10_000
    table = ctl(url, "experiments", "report", "ab")
    assert "treatment" in table.stdout and "20.00%" in table.stdout
    # Margin is n/a (no model version), so two p-values: conversion and revenue.
    assert "of these 2, about 0.1 fall below 0.05 by chance alone" in table.stderr


def test_sample_ratio_mismatch_warns(db_url: str) -> None:
    ctl(db_url, "experiments", "create", "ab", "--variant", "a:50", "--variant", "b:50")
    offers = [offer(n, f"u{n}", "a" if n < 300 else "b", 0.0) for n in range(400)]
    insert(db_url, offers)
    result = ctl(db_url, "experiments", "report", "ab", "--output", "json")
    data = json.loads(result.stdout)
    assert data["srm_p_value"] < 0.001
    assert "sample ratio mismatch" in result.stderr


def test_simulate_shows_the_servers_answer_without_issuing(db_url: str, model_store: Path) -> None:
    ctl(db_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=1", "--param", "d1=20", "--param", "d2=5", "--min-margin", "10")  # fmt: skip
    model = ("--model-dir", str(model_store), "-o", "json")
    best = ctl(db_url, "rules", "simulate", "--user", "user-0", "--limit", "1", *model)
    [top] = json.loads(best.stdout)["items"]
    # Ranked as the user's recommendations rank them; user-0 bought 00003: not among them.
    items = ("--item", "00029", "--item", top["item_id"], "--item", "00003", "--item", "zzz")
    result = ctl(db_url, "rules", "simulate", "--user", "user-0", *items, *model)
    data = json.loads(result.stdout)
    assert data["segment"] is None and data["experiment"] is None
    first, second, bought, unknown = data["items"]
    assert unknown["item_id"] == "zzz" and "UNKNOWN_ITEM" in unknown["reason_codes"]
    assert (first["item_id"], first["final_price"]) == ("00029", "9.50") and first["rank"] > 1
    assert (second["rank"], second["final_price"], second["rule"]) == (1, "8.00", "tier")
    assert "POLICY_TIERED_TOP" in second["reason_codes"]
    assert (bought["rank"], bought["final_price"]) == (0, "9.50")
    assert "NOT_RANKED" in bought["reason_codes"]
    store = Store(db_url)
    with store.transaction() as session:
        from sqlalchemy import func, select

        from core.store.tables import Offer

        assert session.scalar(select(func.count()).select_from(Offer)) == 0
    store.dispose()


def test_simulate_says_a_randomized_rules_discounts_are_one_draw(
    db_url: str, model_store: Path
) -> None:
    """Two runs of the same question may price differently: the table says why."""
    ctl(db_url, "rules", "create", "learn", "--policy", "randomized", "--param", "grid=[5,10]")
    args = ("--user", "user-0", "--limit", "3", "--model-dir", str(model_store))
    note = (
        "rule 'learn' draws each discount at random among CHOICES=n percents: this shows one "
        "draw, and another run may show another (discountd keeps a shopper's draw for an "
        "offer's lifetime)\n"
    )
    table = ctl(db_url, "rules", "simulate", *args)
    assert table.stdout.count("POLICY_RANDOMIZED CHOICES=3") == 3
    assert table.stderr.endswith(note)
    assert ctl(db_url, "rules", "simulate", *args, "-o", "json").stderr == note


def test_simulate_leaves_out_what_the_user_bought_since_the_models_data(
    db_url: str, model_store: Path
) -> None:
    """As discountd does: an item bought (or redeemed) after the model's data ended is not
    recommended again, so simulate prices the same recommendations the server would."""

    def recommended() -> list[str]:
        args = ("--user", "user-0", "--limit", "3", "--model-dir", str(model_store), "-o", "json")
        return [i["item_id"] for i in json.loads(ctl(db_url, "rules", "simulate", *args).stdout)
                ["items"]]  # fmt: skip

    top, *rest = recommended()
    store = Store(db_url)
    with store.transaction() as session:
        record(session, [
            EventIn("p", "purchase", "user-0", top, "", 500, 1, int(time.time())),
            EventIn("q", "purchase", "user-1", rest[0], "", 500, 1, int(time.time())),
        ], datetime.now(UTC))  # fmt: skip
    store.dispose()
    after = recommended()
    assert top not in after and after[:2] == rest


def test_simulate_passes_context_values_as_typed(db_url: str, model_store: Path) -> None:
    """The API's context is strings: a category 1.50 must not reach the pipeline as 1.5."""
    ctl(db_url, "segments", "create", "code-150", "--where", "favourite_category == 1.50")
    args = ("--user", "new-user", "--context", "favourite_category=1.50")
    result = ctl(db_url, "rules", "simulate", *args, "--model-dir", str(model_store), "-o", "json")
    assert json.loads(result.stdout)["segment"] == "code-150"


def test_report_plot_that_cannot_be_written_is_one_line(db_url: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from admin.cli import cli

    ctl(db_url, "experiments", "create", "ab", "--variant", "a:50", "--variant", "b:50")
    for path, fragment in (
        (tmp_path / "report.txt", "Format 'txt' is not supported"),
        # /proc takes no new files, whoever runs the test (root included).
        (Path("/proc/report.png"), "cannot write it (No such file or directory)"),
    ):
        result = CliRunner().invoke(cli, ["--db-url", db_url, "experiments", "report", "ab",
                                          "--plot", str(path)])  # fmt: skip
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith(f"Error: --plot {path}: "), result.stderr
        assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("experiments", "report", "nope"), "no experiment with key 'nope'"),
        (("rules", "simulate", "--user", "u1"), "no active model version in the store"),
        (("rules", "simulate", "--user", "u1", "--context", "order_count=x", "--model-dir",
          "{model}"), "order_count must be a number"),
        (("rules", "simulate", "--user", "u1", "--model-dir", "/nonexistent"),
         "cannot load the model"),
        (("rules", "simulate", "--user", "u1", "--model-dir", "{model}", "--response-model-dir",
          "/nonexistent"), "cannot load the response model"),
    ],
)  # fmt: skip
def test_offer_commands_refuse_bad_input_in_one_line(
    db_url: str, model_store: Path, args: tuple[str, ...], fragment: str
) -> None:
    from click.testing import CliRunner

    from admin.cli import cli

    argv = ["--db-url", db_url, *(a.replace("{model}", str(model_store)) for a in args)]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1


def _report(url: str) -> dict[str, Any]:
    return cast(
        dict[str, Any], json.loads(ctl(url, "experiments", "report", "ab", "-o", "json").stdout)
    )


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (timedelta(0), timedelta(hours=1)),
        # Within one second: the report reads offers to the microsecond, events to the second.
        (timedelta(seconds=0.3), timedelta(seconds=0.7)),
        (timedelta(seconds=0.7), timedelta(seconds=0.9)),
    ],
)
@pytest.mark.parametrize("arm", ["control", "treatment"])
def test_a_user_offered_under_two_variants_counts_once_where_first_offered(
    db_url: str, first: timedelta, then: timedelta, arm: str
) -> None:
    ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50")  # fmt: skip
    offers = [offer(n, f"u{n}", "control" if n < 10 else "treatment", 0.0) for n in range(20)]
    # "x" was first offered under arm, later under the other one: whichever order the store
    # returns the rows in, x is one user of arm.
    other = "treatment" if arm == "control" else "control"
    offers += [
        {**offer(20, "x", other, 0.0), "issued_at": START + then},
        {**offer(21, "x", arm, 0.0), "issued_at": START + first},
    ]
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, offers)
        record(
            session,
            [EventIn("p", "purchase", "x", "00001", "", 500, 1, int(START.timestamp()) + 7200)],
            datetime.now(UTC),
        )
    store.dispose()
    shown = {v["variant"]: v for v in _report(db_url)["variants"]}
    assert (shown[arm]["users_assigned"], shown[other]["users_assigned"]) == (11, 10)
    assert (shown[arm]["conversion"]["value"], shown[other]["conversion"]["value"]) == (1 / 11, 0)


def test_conversion_curve_ends_at_the_reports_conversion(db_url: str) -> None:
    """A customer who also bought before the experiment converts in the curve as in the report."""
    from admin.report import conversion_curves

    ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50")  # fmt: skip
    t0 = int(START.timestamp())
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, [offer(n, f"u{n}", "control", 0.0) for n in range(4)])
        record(session, [
            EventIn("before", "purchase", "u0", "00001", "", 500, 1, t0 - 86_400),
            EventIn("after", "purchase", "u0", "00001", "", 500, 1, t0 + 3600),
            EventIn("only", "purchase", "u1", "00001", "", 500, 1, t0 + 7200),
        ], datetime.now(UTC))  # fmt: skip
    with store.transaction() as session:
        series = conversion_curves(session, "ab")["control"][1]
    store.dispose()
    assert _report(db_url)["variants"][0]["conversion"]["value"] == 2 / 4
    assert series[-1].value == 2 / 4


@pytest.mark.parametrize(
    ("again", "repeated"),
    [
        (timedelta(hours=2), False),  # the same day: the same order, split into lines
        (timedelta(days=29, hours=23), True),
        (timedelta(days=30), True),
        # A later calendar day within 30 days of the *day* but not of the purchase: out.
        (timedelta(days=30, hours=22), False),
    ],
)
def test_repeat_purchase_is_within_30_days_of_the_first(
    db_url: str, again: timedelta, repeated: bool
) -> None:
    ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50")  # fmt: skip
    # The first purchase a second after midnight UTC, the day after the offer.
    first = (int(START.timestamp()) // 86_400 + 1) * 86_400 + 1
    second = first + int(again.total_seconds())
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, [offer(0, "u0", "control", 0.0)])
        record(session, [
            EventIn("p1", "purchase", "u0", "00001", "", 500, 1, first),
            EventIn("p2", "purchase", "u0", "00001", "", 500, 1, second),
        ], datetime.now(UTC))  # fmt: skip
    store.dispose()
    assert _report(db_url)["variants"][0]["repeat_rate_30d"]["value"] == float(repeated)


def test_events_count_from_the_offers_second_and_discounts_only_for_the_holder(
    db_url: str,
) -> None:
    ctl(db_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=1", "--param", "d1=20", "--param", "d2=0")  # fmt: skip
    ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50:tier")  # fmt: skip
    # Offers carry microseconds, events whole seconds: an impression 0.3 s after an offer
    # issued at .7 is stored in the offer's own second.
    issued = START.replace(microsecond=700_000)
    second = int(issued.timestamp())
    offers = [
        {**offer(0, "u0", "control", 0.0), "issued_at": issued},
        {**offer(1, "u1", "treatment", 20.0), "issued_at": issued},
    ]
    events = [
        EventIn("i0", "impression", "u0", "00001", occurred_at=second),
        EventIn("i1", "impression", "u1", "00001", occurred_at=second),
        EventIn("r1", "redemption", "u1", "", "o1", 800, 1, second),
        # A control user checking out with the treatment user's token: control's revenue, and
        # no discount charged to treatment, whose user this is not.
        EventIn("r0", "redemption", "u0", "", "o1", 800, 1, second + 5),
    ]
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, offers)
        record(session, events, datetime.now(UTC))
    store.dispose()
    result = ctl(db_url, "experiments", "report", "ab", "--output", "json")
    control, treatment = json.loads(result.stdout)["variants"]
    assert (control["users_exposed"], treatment["users_exposed"]) == (1, 1)
    assert control["conversion"]["value"] == treatment["conversion"]["value"] == 1.0
    assert (control["discount_cost"], treatment["discount_cost"]) == (0.0, 2.0)
    assert "fewer than 10 buyers in control, treatment" in result.stderr


def test_a_redemption_under_another_experiment_costs_this_one_nothing(db_url: str) -> None:
    for key in ("ab", "other"):
        ctl(db_url, "experiments", "create", key, "--variant", "control:50",
            "--variant", "treatment:50")  # fmt: skip
    second = int(START.timestamp()) + 10
    offers = [
        offer(0, "u0", "treatment", 0.0),
        # The same user and variant name in another experiment, with a discount.
        {**offer(1, "u0", "treatment", 20.0), "experiment_key": "other"},
        offer(2, "u1", "control", 0.0),
        {**offer(3, "u2", "control", 0.0), "experiment_key": "other"},
        {**offer(4, "u3", "control", 0.0), "experiment_key": None, "variant": None},
    ]
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, offers)
        record(session, [EventIn("r1", "redemption", "u0", "", "o1", 800, 1, second)],
               datetime.now(UTC))  # fmt: skip
    store.dispose()
    result = ctl(db_url, "experiments", "report", "ab", "--output", "json")
    treatment = json.loads(result.stdout)["variants"][1]
    assert treatment["conversion"]["value"] == 1.0  # a purchase is a purchase
    assert treatment["discount_cost"] == 0.0
    assert "1 users of this experiment were also offered something under another" in (result.stderr)


def two_buyers(db_url: str, version: Path, items: tuple[str, str]) -> Result:
    """The report of experiment ab, on the promoted version, where u0 (variant a) and u1 (b)
    each bought one item after their offer."""
    ctl(db_url, "models", "register", str(version))
    ctl(db_url, "models", "promote", version.name)
    ctl(db_url, "experiments", "create", "ab", "--variant", "a:50", "--variant", "b:50")
    second = int(START.timestamp()) + 10
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, [offer(0, "u0", "a", 0.0), offer(1, "u1", "b", 0.0)])
        purchases = [
            EventIn(f"p{n}", "purchase", f"u{n}", item, "", 1000, 1, second)
            for n, item in enumerate(items)
        ]
        record(session, purchases, datetime.now(UTC))
    store.dispose()
    return ctl(db_url, "experiments", "report", "ab", "--output", "json")


def test_a_variant_without_margin_says_why(db_url: str, model_store: Path, tmp_path: Path) -> None:
    store_copy = tmp_path / "models"
    shutil.copytree(model_store, store_copy)
    version = store_copy / (store_copy / CURRENT).read_text().strip()
    # An item the active version's catalog does not have: its cost is unknown.
    result = two_buyers(db_url, version, ("00001", "new-item"))
    a, b = json.loads(result.stdout)["variants"]
    assert a["margin_per_user"] is not None and b["margin_per_user"] is None
    assert "margin is n/a for b: purchases of items without a cost" in result.stderr


@pytest.fixture(scope="module")
def assumed_cost_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of the tiny shop whose item 00001 has a cost assumed from the default margin,
    made once for both backends (the export takes seconds). Read-only: promote writes CURRENT,
    so a test copies it."""
    shop = make_tiny_shop()
    assumed = shop.dataset.catalog.cost_assumed.copy()
    assumed[1] = True
    catalog = replace(shop.dataset.catalog, cost_assumed=assumed)
    store = tmp_path_factory.mktemp("assumed-cost") / "models"
    write_tiny_artifact(store, replace(shop, dataset=replace(shop.dataset, catalog=catalog)))
    return store


def test_a_margin_on_assumed_costs_says_so(
    db_url: str, assumed_cost_store: Path, tmp_path: Path
) -> None:
    """DESIGN: a cost assumed from the default margin is assumed and reported."""
    store_copy = tmp_path / "models"
    shutil.copytree(assumed_cost_store, store_copy)
    version = store_copy / (store_copy / CURRENT).read_text().strip()
    result = two_buyers(db_url, version, ("00001", "00002"))
    a, b = json.loads(result.stdout)["variants"]
    assert a["margin_per_user"] is not None and b["margin_per_user"] is not None
    assert "the trainer assumed from its --default-margin for 1 of 2 purchases" in result.stderr
    # Purchases outside the figures are not counted in the warning either: a user of a variant
    # the experiment lacks, and a purchase while the experiment was paused.
    ctl(db_url, "experiments", "start", "ab")
    ctl(db_url, "experiments", "pause", "ab")
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, [offer(2, "z", "zz", 0.0)])
        record(session, [
            EventIn("pz", "purchase", "z", "00002", "", 1000, 1, int(START.timestamp()) + 10),
            EventIn("paused", "purchase", "u1", "00002", "", 1000, 1, int(time.time()) + 5),
        ], datetime.now(UTC))  # fmt: skip
    store.dispose()
    again = ctl(db_url, "experiments", "report", "ab", "--output", "json")
    assert "for 1 of 2 purchases" in again.stderr


def test_users_offered_under_a_variant_the_experiment_lacks_are_named(db_url: str) -> None:
    ctl(db_url, "experiments", "create", "ab", "--variant", "a:50", "--variant", "b:50")
    offers = [offer(0, "u0", "a", 0.0), offer(1, "u1", "b", 0.0)]
    offers += [{**offer(n, f"u{n}", "", 0.0), "variant": None} for n in range(2, 5)]
    insert(db_url, offers)
    result = ctl(db_url, "experiments", "report", "ab", "--output", "json")
    assert [v["users_assigned"] for v in json.loads(result.stdout)["variants"]] == [1, 1]
    store = Store(db_url)
    with store.transaction() as session:
        assert list(conversion_curves(session, "ab")) == ["a", "b"]
    store.dispose()
    assert "3 users were offered under variants this experiment does not have ((none): 3)" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("span", "unit"),
    [
        (timedelta(0), "seconds"),
        (timedelta(seconds=12), "seconds"),  # make demo's whole experiment
        (timedelta(minutes=3), "minutes"),
        (timedelta(hours=1, minutes=59), "minutes"),
        (timedelta(hours=2), "hours"),
        (timedelta(days=1), "hours"),
        (timedelta(days=14), "days"),
    ],
)
def test_the_plot_counts_time_in_the_largest_unit_the_experiment_has_lasted_twice(
    span: timedelta, unit: str
) -> None:
    assert axis_unit(span)[1] == unit


def test_purchases_while_paused_or_after_the_stop_are_not_counted(db_url: str) -> None:
    """Then other rules or experiments served the users: their purchases say nothing of this
    experiment's arms."""
    ctl(db_url, "experiments", "create", "w", "--variant", "control:50", "--variant", "b:50")
    for move in ("start", "pause", "start", "stop"):
        ctl(db_url, "experiments", move, "w", "--yes" if move == "stop" else "--output=json")
    now = datetime.now(UTC).replace(microsecond=0)
    moved = [now - timedelta(minutes=m) for m in (180, 120, 60, 30)]  # start, pause, start, stop
    store = Store(db_url)
    try:
        with store.transaction() as session:
            rows = session.scalars(
                select(AuditEntry)
                .where(AuditEntry.entity_type == "experiment")
                .order_by(AuditEntry.id)
            ).all()
            moves = [r for r in rows if r.action in ("start", "pause", "stop")]
            for row, at in zip(moves, moved, strict=True):
                row.at = at
            first = {**offer(1, "u1", "control", 0.0), "experiment_key": "w"}
            second = {**offer(2, "u2", "control", 0.0), "experiment_key": "w"}
            issued = now - timedelta(minutes=170)
            insert_offers(session, [{**o, "issued_at": issued} for o in (first, second)])
            bought = {150: 100, 90: 200, 45: 400, 10: 800}  # minutes ago: cents
            record(
                session,
                [
                    EventIn(
                        f"p{m}",
                        "purchase",
                        "u1",
                        "00001",
                        revenue_cents=cents,
                        occurred_at=int((now - timedelta(minutes=m)).timestamp()),
                    )
                    for m, cents in bought.items()
                ]
                + [  # its own offer's token, used while paused: the arm's treatment all the same
                    EventIn(
                        f"r{user}",
                        "redemption",
                        user,
                        offer_id=f"o{user[1:]}",
                        revenue_cents=50,
                        occurred_at=int((now - timedelta(minutes=100)).timestamp()),
                    )
                    for user in ("u1", "u2")
                ],
                now,
            )
        with store.transaction() as session:
            data = report(session, "w", now)
            curves = conversion_curves(session, "w")
    finally:
        store.dispose()
    control = next(v for v in data["variants"] if v["variant"] == "control")
    # u1: 1.00 while running, 0.50 its own offer's redemption while paused, 4.00 after resuming;
    # u2: only that redemption, which converts it (in the plot's curve as in the table).
    assert control["revenue_per_user"]["value"] == (5.5 + 0.5) / 2
    assert control["conversion"]["value"] == 1.0
    assert curves["control"][1][-1].value == 1.0
    assert data["idle"] == [
        [(moved[1] + timedelta(seconds=1)).isoformat(), moved[2].isoformat()],
        [(moved[3] + timedelta(seconds=1)).isoformat(), None],
    ]
    shown = ctl(db_url, "experiments", "report", "w")
    assert f"not counted: purchases from {data['idle'][0][0]} to" in shown.stderr
    assert "to now, while it was not running" in shown.stderr


def test_money_where_neither_arm_varies_claims_no_p_value(db_url: str) -> None:
    """Three users who each spent 0.10 against three who spent nothing: the sample cannot say
    how much spend varies, so no interval and no p-value (rounding in the mean of 0.10s must not
    pass for variance and make the difference certain)."""
    ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50")  # fmt: skip
    offers = [offer(n, f"u{n}", "control" if n < 3 else "treatment", 0.0) for n in range(6)]
    second = int(START.timestamp()) + 10
    store = Store(db_url)
    with store.transaction() as session:
        insert_offers(session, offers)
        record(session, [
            EventIn(f"p{n}", "purchase", f"u{n}", "00001", "", 10, 1, second) for n in (3, 4, 5)
        ], datetime.now(UTC))  # fmt: skip
    store.dispose()
    treatment = _report(db_url)["variants"][1]
    assert treatment["revenue_per_user"]["value"] == pytest.approx(0.10)
    revenue = treatment["vs_control"]["revenue_per_user"]
    assert revenue["difference"]["value"] == pytest.approx(0.10)
    assert revenue["p_value"] is None and revenue["difference"]["low"] is None


def test_a_purchase_under_the_arms_own_offer_counts_after_the_stop_as_a_redemption_does(
    db_url: str,
) -> None:
    """Offers outlive a stop (their tokens are valid for minutes): the treatment's shopper who
    redeems one then, and the control's who buys under its no-discount offer then, were both
    treated by their arm. Counting only the redemption would credit the discount arm alone."""
    ctl(db_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=1", "--param", "d1=20", "--param", "d2=0")  # fmt: skip
    ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
        "--variant", "treatment:50:tier")  # fmt: skip
    ctl(db_url, "experiments", "start", "ab")
    issued = datetime.now(UTC) - timedelta(seconds=30)
    offers = [
        {**offer(0, "u0", "control", 0.0), "issued_at": issued},
        {**offer(1, "u1", "treatment", 20.0), "issued_at": issued},
    ]
    insert(db_url, offers)
    ctl(db_url, "experiments", "stop", "ab", "--yes")
    after = int(time.time()) + 5
    store = Store(db_url)
    with store.transaction() as session:
        record(session, [
            EventIn("p0", "purchase", "u0", "00001", "o0", 1000, 1, after),
            EventIn("r1", "redemption", "u1", "00001", "o1", 800, 1, after),
            # Not under its own offer: after the stop, another rule may have served it.
            EventIn("p1", "purchase", "u1", "00002", "", 1000, 1, after),
        ], datetime.now(UTC))  # fmt: skip
    store.dispose()
    control, treatment = _report(db_url)["variants"]
    assert control["conversion"]["value"] == treatment["conversion"]["value"] == 1.0
    assert control["revenue_per_user"]["value"] == 10.0
    assert treatment["revenue_per_user"]["value"] == 8.0
    assert treatment["discount_cost"] == 2.0 and control["discount_cost"] == 0.0
    store = Store(db_url)
    with store.transaction() as session:
        curves = conversion_curves(session, "ab")
    store.dispose()
    assert curves["control"][1][-1].value == 1.0


def test_sample_ratio_check_with_few_expected_users_is_not_chi_square(db_url: str) -> None:
    """A 1% canary after 100 users expects 1 user in it; 5 is unusual (exactly, p = 0.0034) but
    no sign of broken assignment, where Pearson's chi-square, invalid with an expected count
    below 5, would say p = 0.00006 and cry mismatch."""
    ctl(db_url, "experiments", "create", "ab", "--variant", "a:99", "--variant", "canary:1")
    offers = [offer(n, f"u{n}", "a" if n < 95 else "canary", 0.0) for n in range(100)]
    insert(db_url, offers)
    result = ctl(db_url, "experiments", "report", "ab", "--output", "json")
    # By hand: the outcomes at least as far from the expected 1 as 5 are 5 or more.
    exact = float(sps.binom.sf(4, 100, 0.01))
    assert json.loads(result.stdout)["srm_p_value"] == pytest.approx(exact, rel=0.1)
    assert "sample ratio mismatch" not in result.stderr
