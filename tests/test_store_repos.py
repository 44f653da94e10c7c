"""Repositories on both backends: literal round-trips, optimistic locking, audit in the same
transaction, change notification, lifecycle rules."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from pg import pg_database
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from core.store import audit, migrate
from core.store.db import DEAD_PEER_DETECTION, NOTIFY_CHANNEL, Store
from core.store.errors import Conflict, InvalidInput, NotFound
from core.store.experiments import Experiments, VariantSpec
from core.store.offers import insert_offers
from core.store.rules import Rules
from core.store.segments import Segments
from core.store.tables import AuditEntry, Offer, Rule

NEW = {"feature": "days_since_first_order", "op": "<", "value": 30}
TIERED = {"k1": 3, "d1": 15, "d2": 5}

NAMES = [
    "Robert'); DROP TABLE segments;--",
    "1 OR 1=1",
    "%_\\",
    "nouveaux clients — été 2026",
    "新客户",
    "emoji 🛒",
    'quote " and backtick `',
]


def _audit_count(store: Store) -> int:
    with store.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(AuditEntry)) or 0)


@pytest.mark.parametrize("name", NAMES)
def test_sql_looking_and_unicode_names_round_trip(store: Store, name: str) -> None:
    with store.transaction() as s:
        Segments(s, "t").create(name, NEW)
        Rules(s, "t").create(name, "tiered_topk", TIERED, segment=name)
    with store.transaction() as s:
        assert Segments(s).get(name).name == name
        rule = Rules(s).get(name)
        assert (rule.name, rule.to_dict()["segment"]) == (name, name)
        assert [e.entity_name for e in audit.entries(s)] == [name, name]


def test_two_concurrent_updates_of_one_rule_one_wins(store: Store) -> None:
    with store.transaction() as s:
        Rules(s, "t").create("r", "tiered_topk", TIERED)
    other = Store(store.url)
    with pytest.raises(Conflict, match="someone else changed this record"):  # noqa: SIM117
        with store.transaction() as first:
            read = Rules(first, "alice").get("r")  # both read version 1 ...
            with other.transaction() as second:
                Rules(second, "bob").update("r", priority=7)  # ... bob commits first
            # alice's update works on what she read; its UPDATE ... WHERE version = 1 matches no row
            assert Rules(first, "alice").update("r", priority=3) is read
    other.dispose()
    with store.transaction() as s:
        rule = Rules(s).get("r")
        assert (rule.priority, rule.version) == (7, 2)
        assert [(e.actor, e.action) for e in audit.entries(s, "rule")] == [
            ("bob", "update"),
            ("t", "create"),
        ]


def test_two_racing_admins_updating_one_rule_one_wins(store: Store) -> None:
    """Both read before either writes (a barrier makes sure); exactly one update lands."""
    with store.transaction() as s:
        Rules(s, "t").create("r", "tiered_topk", TIERED)
    both_read = threading.Barrier(2, timeout=30)
    outcomes: dict[int, str] = {}

    def admin(priority: int) -> None:
        other = Store(store.url)
        try:
            with other.transaction() as s:
                read = Rules(s, f"admin{priority}").get("r")
                both_read.wait()
                assert Rules(s, f"admin{priority}").update("r", priority=priority) is read
            outcomes[priority] = "won"
        except Conflict:
            outcomes[priority] = "conflict"
        finally:
            other.dispose()

    threads = [threading.Thread(target=admin, args=(p,)) for p in (3, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes.values()) == ["conflict", "won"]
    winner = next(p for p, o in outcomes.items() if o == "won")
    with store.transaction() as s:
        rule = Rules(s).get("r")
        assert (rule.priority, rule.version) == (winner, 2)
        assert [e.actor for e in audit.entries(s, "rule")] == [f"admin{winner}", "t"]


def test_stale_expected_version_is_a_conflict(store: Store) -> None:
    with store.transaction() as s:
        Segments(s, "t").create("seg", NEW)
        Segments(s, "t").update("seg", expected_version=1, priority=5)
    with pytest.raises(Conflict, match="at version 2, not 1"), store.transaction() as s:
        Segments(s, "t").update("seg", expected_version=1, priority=9)
    with store.transaction() as s:
        assert Segments(s).get("seg").priority == 5


def test_failed_write_leaves_no_audit_row(store: Store) -> None:
    with pytest.raises(InvalidInput), store.transaction() as s:
        Segments(s, "t").create("ok", NEW)
        Rules(s, "t").create("r", "tiered_topk", {"k1": 0, "d1": 5, "d2": 1})
    assert _audit_count(store) == 0
    with store.transaction() as s:
        assert Segments(s).list_all() == []


@pytest.mark.parametrize(
    ("params", "fields", "fragment"),
    [
        ({"k1": 3, "d1": 5, "d2": 10}, {}, "'d2' (10) must not exceed 'd1'"),
        (TIERED, {"max_discount_pct": 100}, "max discount percent must be in [0, 100)"),
        (TIERED, {"min_margin_pct": -1}, "min margin percent must be >= 0"),
        (TIERED, {"budget": -5}, "budget must be >= 0"),
        # NUMERIC(14, 2): PostgreSQL would round to cents and overflow above 10^12.
        (TIERED, {"budget": 1234.567}, "budget 1234.567 has more than 2 decimals"),
        (TIERED, {"budget": 1e20}, "above the largest allowed, 999999999999.99"),
        (TIERED, {"priority": 2**31}, "priority must be an integer from -2147483648"),
        (TIERED, {"segment": "nope"}, "no segment named 'nope'"),
        (TIERED, {"categories": [""]}, "category list must hold non-empty strings"),
        (
            TIERED,
            {
                "valid_from": datetime(2027, 1, 1, tzinfo=UTC),
                "valid_until": datetime(2026, 1, 1, tzinfo=UTC),
            },
            "must be before valid until",
        ),
    ],
)
def test_rule_validation(
    store: Store, params: dict[str, int], fields: dict[str, object], fragment: str
) -> None:
    with pytest.raises((InvalidInput, NotFound)) as info, store.transaction() as s:
        Rules(s, "t").create("r", "tiered_topk", params, **fields)
    assert fragment in str(info.value)
    assert _audit_count(store) == 0


@pytest.mark.parametrize(
    ("key", "variant", "fragment"),
    [
        ("abc\n", "control", "experiment key 'abc\\n' must be 1-64"),
        ("abc", "control\n", "variant name 'control\\n' must be 1-64"),
    ],
)
def test_keys_ending_in_a_newline_are_refused(
    store: Store, key: str, variant: str, fragment: str
) -> None:
    with pytest.raises(InvalidInput) as info, store.transaction() as s:
        Experiments(s, "t").create(key, [VariantSpec(variant, 50), VariantSpec("t", 50)])
    assert fragment in str(info.value)
    assert _audit_count(store) == 0


@pytest.mark.parametrize("name", ["a\x85b", "a\u2028b", "a\u200bb", "a\u00a0b", "a\tb"])
def test_names_with_characters_that_are_not_printable_are_refused(store: Store, name: str) -> None:
    with pytest.raises(InvalidInput, match="not printable"), store.transaction() as s:
        Segments(s, "t").create(name, NEW)
    with pytest.raises(InvalidInput, match="not printable"), store.transaction() as s:
        Rules(s, "t").create(name, "tiered_topk", TIERED)
    assert _audit_count(store) == 0


@pytest.mark.parametrize("salt", ["", " ", "a b", "salt\n", "a\u2028b", "x" * 65])
def test_salts_that_cannot_be_typed_back_are_refused(store: Store, salt: str) -> None:
    arms = [VariantSpec("a", 50), VariantSpec("b", 50)]
    with pytest.raises(InvalidInput, match=r"salt .* must be 1-64 printable characters"):  # noqa: SIM117
        with store.transaction() as s:
            Experiments(s, "t").create("ab", arms, salt=salt)
    assert _audit_count(store) == 0


@pytest.mark.parametrize("weights", [(0, 100), (50, 50, 0)])
def test_a_variant_nobody_is_assigned_to_is_refused(store: Store, weights: tuple[int, ...]) -> None:
    arms = [VariantSpec(f"v{i}", w) for i, w in enumerate(weights)]
    with pytest.raises(InvalidInput, match="weight 0: nobody would be assigned"):  # noqa: SIM117
        with store.transaction() as s:
            Experiments(s, "t").create("ab", arms)
    assert _audit_count(store) == 0


def test_segment_priorities_must_fit_their_column(store: Store) -> None:
    for priority in (2**31, -(2**31) - 1):
        with pytest.raises(InvalidInput, match="priority must be an integer from"):  # noqa: SIM117
            with store.transaction() as s:
                Segments(s, "t").create("seg", NEW, priority=priority)
    with store.transaction() as s:
        Segments(s, "t").create("seg", NEW, priority=2**31 - 1)
    with pytest.raises(InvalidInput, match="priority must be an integer from"):  # noqa: SIM117
        with store.transaction() as s:
            Segments(s, "t").update("seg", priority=-(2**31) - 1)


def test_import_members_that_adds_nothing_is_not_a_new_version(store: Store) -> None:
    with store.transaction() as s:
        Segments(s, "t").create("vip", None)
        Segments(s, "t").import_members("vip", ["1", "2"])
    before = _audit_count(store)
    with store.transaction() as s:
        assert Segments(s, "t").import_members("vip", ["2", "1"])[1] == 0
        assert Segments(s, "t").import_members("vip", ["1", "2", "1"], replace=True)[1] == 0
    with store.transaction() as s:
        assert Segments(s).get("vip").version == 2
    assert _audit_count(store) == before


def test_replacing_members_with_none_empties_the_list(store: Store) -> None:
    with store.transaction() as s:
        Segments(s, "t").create("vip", None)
        Segments(s, "t").import_members("vip", ["1", "2"])
    with pytest.raises(InvalidInput, match="no user ids to import"), store.transaction() as s:
        Segments(s, "t").import_members("vip", [])
    with store.transaction() as s:
        segment, added = Segments(s, "t").import_members("vip", [], replace=True)
        assert (added, Segments(s).member_count(segment), segment.version) == (0, 0, 3)
        assert audit.entries(s, limit=1)[0].action == "import_members"


def test_optimal_rules_are_created_with_a_valid_grid_only(store: Store) -> None:
    with store.transaction() as s:
        assert Rules(s, "t").create("o", "optimal", {"grid": [0, 5, 10]}).params == {
            "grid": [0.0, 5.0, 10.0]
        }
    with pytest.raises(InvalidInput, match="'grid' must be"), store.transaction() as s:
        Rules(s, "t").create("o2", "optimal", {"grid": []})


def test_experiment_lifecycle(store: Store) -> None:
    with store.transaction() as s:
        Rules(s, "t").create("tier", "tiered_topk", TIERED)
        Experiments(s, "t").create(
            "ab", [VariantSpec("control", 50), VariantSpec("treatment", 50, ("tier",))]
        )
    with store.transaction() as s:
        e = Experiments(s, "t")
        assert e.transition("ab", "start").status == "running"
        with pytest.raises(InvalidInput, match="can change only while it is a draft"):
            e.update("ab", variants=[VariantSpec("a", 100), VariantSpec("b", 0)])
        assert e.transition("ab", "pause").status == "paused"
        assert e.transition("ab", "start").status == "running"
        stopped = e.transition("ab", "stop")
        assert stopped.ended_at is not None and stopped.started_at is not None
        with pytest.raises(InvalidInput, match="a stopped experiment cannot restart"):
            e.transition("ab", "start")
        with pytest.raises(InvalidInput, match="it has ended; there is nothing to pause"):
            e.transition("ab", "pause")
    with pytest.raises(Conflict, match="variant of experiment"), store.transaction() as s:
        Rules(s, "t").delete("tier")


def test_a_draft_an_earlier_build_stopped_can_still_be_deleted(store: Store) -> None:
    """Earlier builds let a draft be stopped; it never ran, so it holds no record to keep."""
    with store.transaction() as s:
        Experiments(s, "t").create("old", [VariantSpec("a", 50), VariantSpec("b", 50)])
        Experiments(s, "t").create("ran", [VariantSpec("a", 50), VariantSpec("b", 50)])
    with store.transaction() as s:
        e = Experiments(s, "t")
        e.get("old").status = "stopped"  # as such a build left it
        e.transition("ran", "start")
        e.transition("ran", "stop")
    with store.transaction() as s:
        assert Experiments(s, "t").delete("old")["status"] == "stopped"
        with pytest.raises(Conflict, match="only a draft can be deleted"):
            Experiments(s, "t").delete("ran")


def test_draft_variants_can_be_replaced(store: Store) -> None:
    with store.transaction() as s:
        Experiments(s, "t").create("ab", [VariantSpec("a", 50), VariantSpec("b", 50)])
    with store.transaction() as s:
        e = Experiments(s, "t").update("ab", variants=[VariantSpec("b", 20), VariantSpec("c", 80)])
        assert [(v.name, v.weight) for v in e.variants] == [("b", 20), ("c", 80)]


def test_a_variant_naming_a_rule_twice_is_refused_by_the_store(store: Store) -> None:
    """discountctl refuses it while parsing --variant; any other caller of the repository gets
    a refusal naming the variant and the rule, not the variant-rule table's unique constraint
    failing on flush."""
    with store.transaction() as s:
        Rules(s, "t").create("tier", "tiered_topk", TIERED)
    twice = [VariantSpec("control", 50), VariantSpec("t", 50, ("tier", "tier"))]
    refused = r"variant 't' names rule\(s\) 'tier' more than once"
    with pytest.raises(InvalidInput, match=refused), store.transaction() as s:
        Experiments(s, "t").create("ab", twice)
    with store.transaction() as s:
        Experiments(s, "t").create("ab", [VariantSpec("a", 50), VariantSpec("b", 50)])
    with pytest.raises(InvalidInput, match=refused), store.transaction() as s:
        Experiments(s, "t").update("ab", variants=twice)


def test_assign_checks_member_list_targets(store: Store) -> None:
    with store.transaction() as s:
        Segments(s, "t").create("vip", None)
        Segments(s, "t").import_members("vip", ["007", "42"])
        Experiments(s, "t").create(
            "ab", [VariantSpec("a", 50), VariantSpec("b", 50)], target_segment="vip"
        )
        Experiments(s, "t").transition("ab", "start")
    with store.transaction() as s:
        inside = Experiments(s).assign("ab", "007")
        outside = Experiments(s).assign("ab", "7")
    assert (inside["in_target"], inside["served"]) == (True, True)
    assert (outside["in_target"], outside["served"]) == (False, False)


def test_segment_in_use_cannot_be_deleted(store: Store) -> None:
    with store.transaction() as s:
        Segments(s, "t").create("seg", NEW)
        Rules(s, "t").create("r", "tiered_topk", TIERED, segment="seg")
    with pytest.raises(Conflict, match="used by rule 'r'"), store.transaction() as s:
        Segments(s, "t").delete("seg")


def test_rule_update_keeps_unnamed_fields(store: Store) -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    with store.transaction() as s:
        Segments(s, "t").create("seg", NEW)
        Rules(s, "t").create(
            "r",
            "tiered_topk",
            TIERED,
            segment="seg",
            categories=["Toys"],
            budget=250.5,
            valid_from=start,
            valid_until=start + timedelta(days=7),
        )
    with store.transaction() as s:
        Rules(s, "t").update("r", params={"k1": 2, "d1": 20, "d2": 0})
    with store.transaction() as s:
        rule: Rule = Rules(s).get("r")
        assert rule.to_dict() | {"created_at": None, "updated_at": None} == {
            "id": rule.id,
            "name": "r",
            "description": "",
            "segment": "seg",
            "categories": ["Toys"],
            "item_ids": [],
            "policy": "tiered_topk",
            "params": {"k1": 2, "d1": 20.0, "d2": 0.0},
            "max_discount_pct": 30.0,
            "min_margin_pct": 0.0,
            "budget": 250.5,
            "valid_from": start.isoformat(),
            "valid_until": (start + timedelta(days=7)).isoformat(),
            "priority": 0,
            "enabled": True,
            "created_at": None,
            "updated_at": None,
            "version": 2,
        }


def test_an_update_that_changes_nothing_is_not_a_new_version(store: Store) -> None:
    """Else it would fail others' --if-version for nothing, and fill the audit log."""
    with store.transaction() as s:
        Segments(s, "t").create("seg", NEW)
        Rules(s, "t").create("r", "tiered_topk", TIERED, segment="seg")
    before = _audit_count(store)
    with store.transaction() as s:
        Rules(s, "t").update("r")
        Rules(s, "t").update("r", params=dict(TIERED), priority=0, new_name="r")
        Rules(s, "t").set_enabled("r", True)
        Segments(s, "t").update("seg", condition=dict(NEW), priority=100, new_name="seg")
    with store.transaction() as s:
        assert (Rules(s).get("r").version, Segments(s).get("seg").version) == (1, 1)
    assert _audit_count(store) == before
    with store.transaction() as s:
        Rules(s, "t").update("r", priority=1)
        Segments(s, "t").update("seg", description="changed")
    with store.transaction() as s:
        assert (Rules(s).get("r").version, Segments(s).get("seg").version) == (2, 2)
    assert _audit_count(store) == before + 2
    arms = [VariantSpec("control", 50), VariantSpec("treatment", 50, ("r",))]
    with store.transaction() as s:
        Experiments(s, "t").create("ab", arms)
    before = _audit_count(store)
    with store.transaction() as s:
        Experiments(s, "t").update("ab", variants=arms, description="")
    with store.transaction() as s:
        assert Experiments(s).get("ab").version == 1
    assert _audit_count(store) == before


@pytest.mark.postgres
def test_changes_are_notified_on_commit_only() -> None:
    with pg_database() as url:
        store = Store(url)
        migrate.upgrade(store)
        _notified(store)
        store.dispose()


def _notified(store: Store) -> None:
    dsn = make_url(store.url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
        with pytest.raises(InvalidInput), store.transaction() as s:
            Segments(s, "t").create("rolled-back", NEW)
            raise InvalidInput("abort")
        with store.transaction() as s:
            seg = Segments(s, "t").create("seg", NEW)
        # stop_after=1: back as soon as the first arrives; the timeout only bounds a failure.
        got = [json.loads(n.payload) for n in listener.notifies(timeout=10, stop_after=1)]
    assert got == [{"entity": "segment", "id": str(seg.id), "action": "create"}]


def _offer_row(n: int) -> dict[str, object]:
    # Rows 0 and 2 share their times and reason codes, bound once per batch (insert_offers).
    issued = datetime(2026, 11, 29, 2, 0, n % 2, 123456, tzinfo=UTC)
    return {
        "offer_id": f"0{n}", "user_id": f"用户-{n}", "item_id": "item'; --", "rule_id": n or None,
        "segment": None, "experiment_key": "ab", "variant": "b", "base_price": 12.34,
        "discount_pct": 15.5, "final_price": 10.43, "model_version": "v1",
        "reason_codes": ["RANKED", 'quote "'][n % 2 :], "issued_at": issued,
        "expires_at": issued + timedelta(minutes=15), "cf_score": 0.25 * n, "rank": n + 1,
        "cost": 7.125, "propensity": 1 / (n + 1),
        "user_features": {"order_count": 3.0, "lifetime_value": 12.5 * (n % 2)},
    }  # fmt: skip


LATER_COLUMNS = ("cf_score", "rank", "cost", "propensity", "user_features")  # migration 0006


def test_offers_round_trip_and_a_retried_batch_adds_only_what_is_missing(store: Store) -> None:
    rows = [_offer_row(n) for n in range(3)]
    # Spilled by a discountd from before migration 0006, an offer lacks its later columns.
    old = {k: v for k, v in rows[1].items() if k not in LATER_COLUMNS}
    rows[1].update(dict.fromkeys(LATER_COLUMNS))
    with store.transaction() as s:
        insert_offers(s, [rows[0], old])
    # The offer log retries a whole batch when a commit's acknowledgement was lost.
    with store.transaction() as s:
        insert_offers(s, rows)
    with store.transaction() as s:
        stored = [
            {column.name: getattr(o, column.name) for column in Offer.__table__.columns}
            for o in s.scalars(select(Offer).order_by(Offer.offer_id))
        ]
    assert stored == rows


@pytest.mark.postgres
def test_postgres_connections_detect_a_dead_host_on_their_own() -> None:
    """A host that dies without closing its connections sends nothing the client could act on;
    only libpq's TCP timeouts end the wait (the server-side statement_timeout cannot fire)."""
    with pg_database() as url:
        store = Store(url)
        try:
            with store.engine.connect() as conn:
                info = conn.connection.dbapi_connection.info  # type: ignore[union-attr]
                used = info.get_parameters()
        finally:
            store.dispose()
    assert {k: int(used[k]) for k in DEAD_PEER_DETECTION} == DEAD_PEER_DETECTION
