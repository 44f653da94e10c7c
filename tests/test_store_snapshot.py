"""core.store.snapshot.load_snapshot against a real store: segment members reloaded only when
their segment changed, budgets' spend summed from redemptions, incrementally from one load to
the next as from scratch, and the rules experiments hold. SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from cli import ctl as with_input
from offer_server import ctl
from pg import pg_database

from core.offers import ItemInput, Snapshot, decide
from core.store.db import Store
from core.store.events import EventIn, record
from core.store.offers import insert_offers
from core.store.snapshot import RESUM, Held, load_snapshot

NOW = datetime.now(UTC)


def load(url: str, held: Held | None = None, at: datetime | None = None) -> Snapshot:
    store = Store(url)
    try:
        with store.transaction() as session:
            return load_snapshot(session, at or datetime.now(UTC), held)
    finally:
        store.dispose()


def members(snapshot: Snapshot, name: str) -> frozenset[str]:
    return next(s.members for s in snapshot.segments if s.name == name)


def test_members_are_read_again_exactly_when_their_segment_changed(db_url: str) -> None:
    ctl(db_url, "segments", "create", "vip")
    ctl(db_url, "segments", "create", "lapsed", "--where", "days_since_last_order > 90")
    cache = Held()
    first = members(load(db_url, cache), "vip")
    assert first == frozenset()

    def imported(text: str, *flags: str) -> frozenset[str]:
        result = with_input(db_url, "segments", "import-members", "vip", "-", *flags, input=text)
        assert result.exit_code == 0, result.output
        return members(load(db_url, cache), "vip")

    assert imported("u1\nu2\n") == {"u1", "u2"}
    held = members(load(db_url, cache), "vip")
    assert members(load(db_url, cache), "vip") is held  # unchanged: not read again
    assert imported("u3\n") == {"u1", "u2", "u3"}
    assert imported("u9\n", "--replace") == {"u9"}
    ctl(db_url, "segments", "delete", "vip", "--yes")
    assert [s.name for s in load(db_url, cache).segments] == ["lapsed"]
    ctl(db_url, "segments", "create", "vip")  # the same name, a new segment
    assert imported("z\n") == {"z"}
    assert len(cache.members) == 2
    assert members(load(db_url), "vip") == {"z"}  # as a load without a cache reads it


def _offer(offer_id: str, rule_id: int, base: float, final: float) -> dict[str, object]:
    return {
        "offer_id": offer_id, "user_id": "u", "item_id": "i", "rule_id": rule_id,
        "segment": None, "experiment_key": None, "variant": None, "base_price": base,
        "discount_pct": round(100 * (1 - final / base), 2), "final_price": final,
        "model_version": "v", "reason_codes": [], "issued_at": NOW,
        "expires_at": NOW + timedelta(minutes=15),
    }  # fmt: skip


TIER = ("--policy", "tiered_topk", "--param", "k1=1", "--param", "d1=20", "--param", "d2=5")


def capped_and_open(url: str, budget: str) -> dict[str, int]:
    """Rule ids of 'capped' (with the budget) and 'open' (without one)."""
    ctl(url, "rules", "create", "capped", *TIER, "--budget", budget)
    ctl(url, "rules", "create", "open", *TIER)
    return {r.name: r.id for r in load(url).rules}


def test_a_budgeted_rules_spend_is_what_its_redemptions_gave(db_url: str) -> None:
    ids = capped_and_open(db_url, "100")
    store = Store(db_url)
    try:
        with store.transaction() as session:
            insert_offers(
                session,
                [
                    _offer("o1", ids["capped"], 10.0, 8.0),
                    _offer("o2", ids["capped"], 25.0, 20.0),
                    _offer("o3", ids["capped"], 40.0, 30.0),  # issued, never redeemed
                    _offer("o4", ids["open"], 10.0, 9.5),
                ],
            )
            sales = [
                EventIn("e1", "redemption", "u", offer_id="o1", quantity=3),
                EventIn("e2", "redemption", "u", offer_id="o2"),
                EventIn("e3", "purchase", "u", "i", offer_id="o3"),  # at the base price
                EventIn("e4", "redemption", "u", offer_id="o4"),
            ]
            record(session, sales, NOW)
    finally:
        store.dispose()
    rules = {r.name: r for r in load(db_url).rules}
    assert rules["capped"].spent == Decimal("11.00")  # 2.00 × 3 + 5.00
    assert rules["capped"].remaining() == Decimal("89.00")
    assert rules["open"].remaining() is None


def test_a_budgets_spend_carried_from_load_to_load_is_the_spend_from_scratch(db_url: str) -> None:
    ids = capped_and_open(db_url, "1000")
    store = Store(db_url)
    n = 0

    def redeem(rule: str, cents_off: int, received: datetime) -> None:
        nonlocal n
        n += 1
        with store.transaction() as session:
            insert_offers(session, [_offer(f"o{n}", ids[rule], 10.0, 10.0 - cents_off / 100)])
            record(session, [EventIn(f"e{n}", "redemption", "u", offer_id=f"o{n}")], received)

    held = Held()

    def spent(at: datetime) -> dict[str, Decimal]:
        carried = {r.name: r.spent for r in load(db_url, held, at).rules}
        assert carried == {r.name: r.spent for r in load(db_url, at=at).rules}
        return carried

    try:
        t = datetime.now(UTC)
        redeem("capped", 100, t - timedelta(hours=2))
        redeem("open", 50, t - timedelta(hours=2))
        assert spent(t) == {"capped": Decimal("1.00"), "open": Decimal(0)}
        redeem("capped", 20, t - timedelta(seconds=10))  # not settled yet at t
        assert spent(t)["capped"] == Decimal("1.20")
        later = t + timedelta(minutes=5)  # now it is, and not counted twice
        redeem("capped", 3, later - timedelta(seconds=1))
        assert spent(later)["capped"] == Decimal("1.23")
        assert held.settled_at == later - timedelta(seconds=60)
        ctl(db_url, "rules", "update", "open", "--budget", "10")  # its past spend counts
        assert spent(later) == {"capped": Decimal("1.23"), "open": Decimal("0.50")}
        # A redemption whose offer row is stored long after it (an offer log that waited for
        # the store): the carried sums miss it until the next sum from scratch, RESUM later.
        with store.transaction() as session:
            late = EventIn("late", "redemption", "u", offer_id="o-late")
            record(session, [late], later - timedelta(minutes=30))
        load(db_url, held, later)
        with store.transaction() as session:
            insert_offers(session, [_offer("o-late", ids["capped"], 10.0, 9.0)])
        soon = later + timedelta(minutes=1)
        assert {r.name: r.spent for r in load(db_url, held, soon).rules}["capped"] == Decimal(
            "1.23"
        )
        assert spent(later + RESUM)["capped"] == Decimal("2.23")
    finally:
        store.dispose()


def test_a_variants_rule_prices_only_through_its_experiment_until_that_stops(
    db_url: str,
) -> None:
    """Not before the start, not while paused, not in the control arm: a treatment given to
    everyone whenever the experiment is not running would reach the control arm too."""
    tier = ("--policy", "tiered_topk", "--param", "k1=1", "--param", "d1=20", "--param", "d2=20")
    ctl(db_url, "rules", "create", "treat", *tier)
    ctl(db_url, "rules", "create", "everyone", *tier, "--priority", "-5")

    def rule_for(user: str) -> str | None:
        snapshot = load(db_url)
        [item] = decide(snapshot, user, {}, [ItemInput("i", "", 10.0, 5.0, 1, 1.0)], NOW).items
        return item.rule.name if item.rule is not None else None

    assert rule_for("u1") == "treat"  # an ordinary rule, the highest priority
    created = ctl(db_url, "experiments", "create", "ab", "--variant", "control:50",
                  "--variant", "treatment:50:treat", "--salt", "s")  # fmt: skip
    assert "note: rule 'treat' now prices only through this experiment" in created.stderr
    variant = {
        u: json.loads(ctl(db_url, "experiments", "assign", "ab", u, "-o", "json").stdout)["variant"]
        for u in (f"u{n}" for n in range(10))
    }
    treated = next(u for u, v in variant.items() if v == "treatment")
    control = next(u for u, v in variant.items() if v == "control")
    assert rule_for(treated) == rule_for(control) == "everyone"  # a draft
    ctl(db_url, "experiments", "start", "ab")
    assert (rule_for(treated), rule_for(control)) == ("treat", None)
    ctl(db_url, "experiments", "pause", "ab")
    assert rule_for(treated) == rule_for(control) == "everyone"
    stopped = ctl(db_url, "experiments", "stop", "ab", "--yes")
    assert "note: rule 'treat' prices as an ordinary rule again" in stopped.stderr
    assert rule_for(treated) == rule_for(control) == "treat"


@pytest.mark.postgres
def test_equal_priorities_go_by_name_in_code_point_order_whatever_the_collation(
    tmp_path: Path,
) -> None:
    """SQLite's and a C-collated PostgreSQL's ORDER BY put "Zebra" before "apple"; an
    en-US-collated PostgreSQL the other way round. The winner must not depend on it."""
    with pg_database(
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
    ) as pg:
        for url in (pg, f"sqlite:///{tmp_path / 'store.db'}"):
            ctl(url, "db", "upgrade")
            for name in ("apple", "Zebra"):
                ctl(url, "segments", "create", name, "--priority", "1")
                ctl(url, "rules", "create", name, *TIER, "--priority", "1")
            snapshot = load(url)
            assert [s.name for s in snapshot.segments] == ["Zebra", "apple"], url
            assert [r.name for r in snapshot.rules] == ["Zebra", "apple"], url
