"""discountctl end to end on both backends: help, the admin walk-through, JSON shapes, invalid
input (message, exit 1, nothing written), confirmation, conflicts, unreachable stores."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import pytest
from cli import contents, ctl
from click.testing import CliRunner
from pg import BACKENDS, empty_database
from sqlalchemy import select, text

from admin.cli import cli
from core.policy import POLICIES
from core.store import migrate
from core.store.db import Store
from core.store.segments import Segments
from core.store.snapshot import load_snapshot
from core.store.tables import SegmentMember

SEGMENT_KEYS = {
    "id",
    "name",
    "description",
    "kind",
    "condition",
    "priority",
    "created_at",
    "updated_at",
    "version",
}
RULE_KEYS = {
    "id",
    "name",
    "description",
    "segment",
    "categories",
    "item_ids",
    "policy",
    "params",
    "max_discount_pct",
    "min_margin_pct",
    "budget",
    "valid_from",
    "valid_until",
    "priority",
    "enabled",
    "created_at",
    "updated_at",
    "version",
}
EXPERIMENT_KEYS = {
    "id",
    "key",
    "description",
    "salt",
    "status",
    "target_segment",
    "variants",
    "started_at",
    "ended_at",
    "created_at",
    "updated_at",
    "version",
}
ASSIGN_KEYS = {
    "experiment",
    "status",
    "user_id",
    "bucket",
    "variant",
    "rules",
    "target_segment",
    "in_target",
    "served",
    "served_by",
}
AUDIT_KEYS = {
    "id",
    "at",
    "actor",
    "action",
    "entity_type",
    "entity_id",
    "entity_name",
    "before",
    "after",
}


def _leaves(
    group: click.Group, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    out = []
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            assert command.help, f"group {' '.join((*path, name))} has no help"
            out += _leaves(command, (*path, name))
        else:
            out.append(((*path, name), command))
    return out


def test_every_command_has_help_an_example_and_output_option() -> None:
    leaves = _leaves(cli)
    assert len(leaves) >= 25
    for path, command in leaves:
        label = "discountctl " + " ".join(path)
        assert command.help and len(command.help.split()) >= 3, f"{label} lacks help"
        assert "Example:" in command.help, f"{label} lacks an Example: block"
        assert f" {path[0]} {path[1]}" in command.help.split("Example:")[1], (
            f"{label}: example runs another command"
        )
        options = {o for p in command.params for o in getattr(p, "opts", [])}
        assert "--output" in options, f"{label} lacks --output"


def test_policy_help_describes_every_policy() -> None:
    for path in (("rules", "create"), ("rules", "update")):
        command = _leaves(cli)[[p for p, _ in _leaves(cli)].index(path)][1]
        (policy,) = [p for p in command.params if p.name == "policy"]
        assert isinstance(policy, click.Option) and policy.help
        for name in POLICIES:
            assert f"{name}:" in policy.help, f"{' '.join(path)} --policy help lacks {name}"


def test_simulate_limit_help_says_what_it_takes_and_what_0_means() -> None:
    """--limit 0 is the default and prices 10, as GetOffers; without saying so the help
    left a user to find out from an error."""
    command = _leaves(cli)[[p for p, _ in _leaves(cli)].index(("rules", "simulate"))][1]
    (limit,) = [p for p in command.params if p.name == "limit"]
    assert isinstance(limit, click.Option) and limit.help
    assert "1 to 1000" in limit.help and "0, the default, prices 10" in limit.help


def ok(url: str, line: str, input: str | None = None) -> Any:
    """Run one command line as a user types it, with --output json; it must succeed."""
    result = ctl(url, *shlex.split(line), "--output", "json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_admin_walk_through(db_url: str) -> None:
    new = ok(
        db_url, "segments create new-customers --where 'days_since_first_order < 30' --priority 10"
    )
    assert set(new) == SEGMENT_KEYS
    assert new["condition"] == {"feature": "days_since_first_order", "op": "<", "value": 30.0}
    high = ok(
        db_url,
        "segments create high-value --where 'lifetime_value >= 500' "
        "--where 'order_count >= 3' --priority 20",
    )
    assert [c["feature"] for c in high["condition"]["all"]] == ["lifetime_value", "order_count"]
    lapsed = ok(
        db_url,
        "segments create lapsed --condition "
        '\'{"all": [{"feature": "days_since_last_order", "op": ">", "value": 90}]}\'',
    )
    assert lapsed["kind"] == "condition"
    rule = ok(
        db_url,
        "rules create new-tiered --segment new-customers --policy tiered_topk "
        "--param k1=3 --param d1=15 --param d2=5 --max-discount 20 --min-margin 10 "
        "--budget 5000 --valid-from 2026-12-01 --priority 5",
    )
    assert set(rule) == RULE_KEYS
    assert rule["params"] == {"k1": 3, "d1": 15.0, "d2": 5.0}
    assert (rule["budget"], rule["valid_from"]) == (5000.0, "2026-12-01T00:00:00+00:00")
    exp = ok(
        db_url,
        "experiments create new-tiered-ab --target-segment new-customers "
        "--variant control:50 --variant treatment:50:new-tiered --salt s1",
    )
    assert set(exp) == EXPERIMENT_KEYS and exp["status"] == "draft"
    assert exp["variants"] == [
        {"name": "control", "weight": 50, "rules": []},
        {"name": "treatment", "weight": 50, "rules": ["new-tiered"]},
    ]
    assert ok(db_url, "experiments start new-tiered-ab")["status"] == "running"

    assigned = ok(
        db_url, "experiments assign new-tiered-ab 17850 --feature days_since_first_order=12"
    )
    assert set(assigned) == ASSIGN_KEYS
    assert (assigned["in_target"], assigned["served"]) == (True, True)
    # Without features the condition target is not checked, but the variant is the same.
    again = ok(db_url, "experiments assign new-tiered-ab 17850")
    assert (again["variant"], again["bucket"], again["in_target"]) == (
        assigned["variant"],
        assigned["bucket"],
        None,
    )
    old = ok(db_url, "experiments assign new-tiered-ab 17850 --feature days_since_first_order=400")
    assert (old["in_target"], old["served"]) == (False, False)

    names = [s["name"] for s in ok(db_url, "segments list")]
    assert names == ["new-customers", "high-value", "lapsed"]
    log = ok(db_url, "audit list")
    assert set(log[0]) == AUDIT_KEYS
    assert [(e["action"], e["entity_type"]) for e in log[:2]] == [
        ("start", "experiment"),
        ("create", "experiment"),
    ]
    assert {e["actor"] for e in log} == {"tester"}
    assert (log[0]["before"]["status"], log[0]["after"]["status"]) == ("draft", "running")
    table = ctl(db_url, "rules", "list")
    assert table.exit_code == 0 and table.stderr == ""
    assert table.stdout.splitlines()[0].split()[:4] == ["NAME", "ENABLED", "HELD_BY", "PRIORITY"]
    # The running experiment's treatment: a rule it holds, no ordinary one.
    assert table.stdout.splitlines()[1].split()[:4] == [
        "new-tiered",
        "yes",
        '["new-tiered-ab"]',
        "5",
    ]
    assert ok(db_url, "rules show new-tiered")["held_by"] == ["new-tiered-ab"]


def test_sql_looking_and_unicode_names_round_trip_through_the_cli(db_url: str) -> None:
    names = ["Robert'); DROP TABLE rules;--", "1 OR 1=1", "%_\\*", "клиенты-новые", "新客户 🛒"]
    for name in names:
        ctl(db_url, "segments", "create", name, "--where", "order_count >= 1")
        created = ctl(db_url, "rules", "create", name, "--segment", name, *TIER, "-o", "json")
        assert json.loads(created.stdout)["segment"] == name
        shown = json.loads(ctl(db_url, "rules", "show", name, "-o", "json").stdout)
        assert (shown["name"], shown["segment"]) == (name, name)
    listed = ctl(db_url, "rules", "list").stdout
    assert all(name in listed for name in names)
    assert sorted(r["name"] for r in ok(db_url, "rules list")) == sorted(names)


def test_member_lists_import_from_csv_or_lines(db_url: str) -> None:
    ok(db_url, "segments create vip")
    got = ok(db_url, "segments import-members vip -", input="user_id,name\n007,Ann\n12,Bo\n")
    assert (got["member_count"], got["added"]) == (2, 2)
    got = ok(db_url, "segments import-members vip -", input="007\n0012\n\n")
    assert (got["member_count"], got["added"]) == (3, 1)
    got = ok(db_url, "segments import-members vip - --replace", input="9\n")
    assert (got["member_count"], got["added"]) == (1, 1)
    # Spreadsheets save CSV with a byte-order mark; the header is still the header.
    got = ok(
        db_url, "segments import-members vip - --replace", input="\ufeffuser_id,name\r\n5,A\r\n"
    )
    assert (got["member_count"], got["added"]) == (1, 1)
    assert ok(db_url, "experiments create vip-ab --variant a:50 --variant b:50 "
              "--target-segment vip")["target_segment"] == "vip"  # fmt: skip
    assert ok(db_url, "experiments assign vip-ab 5")["in_target"] is True


def _members(url: str, name: str) -> list[str]:
    store = Store(url)
    try:
        with store.transaction() as s:
            segment = Segments(s).get(name)
            query = select(SegmentMember.user_id).where(SegmentMember.segment_id == segment.id)
            return sorted(s.scalars(query))
    finally:
        store.dispose()


@pytest.mark.parametrize(
    ("text", "members"),
    [
        (" u3 \n\n u4\n", ["u3", "u4"]),
        ("User_ID\n17850\n", ["17850"]),
        ("user_id;name\nu1;Ann\n", ["u1"]),
        ("name\t USER_ID \nAnn\t u9 \n", ["u9"]),
        ('email,user_id\n"a,b@c.com",u2\n', ["u2"]),
        # pandas' QUOTE_ALL, psql's \copy ... FORCE QUOTE *: the header is quoted too.
        ('"user_id"\r\n"12345"\r\n"0042"\r\n', ["0042", "12345"]),
        # A CRM export whose notes run over two lines: one record, not a member "calls...".
        ('user_id,notes\r\n1001,"VIP\r\ncalls on Fridays"\r\n1002,plain\r\n', ["1001", "1002"]),
        ("\n\nuser_id\n\nu7\n", ["u7"]),
        ("u1\t\n\tu2\n", ["u1", "u2"]),
    ],
    ids=[
        "plain",
        "header in another case",
        "semicolons",
        "tabs",
        "quoted",
        "all quoted",
        "a field over two lines",
        "blank lines first",
        "plain ids with tabs around",
    ],
)
def test_import_members_reads_plain_ids_or_a_user_id_column(
    db_url: str, text: str, members: list[str]
) -> None:
    ok(db_url, "segments create vip")
    ok(db_url, "segments import-members vip -", input=text)
    assert _members(db_url, "vip") == members


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("customer_id,email\n17850,a@b.com\n", "(found 'customer_id,email')"),
        ("User ID;name\nu1;Ann\n", "(found 'User ID;name')"),
        ("user_id,email\n1,a\n\n,b@c.com\n", "<stdin>: line 4 has no user_id"),
        ("email;user_id\na@b.com\n", "<stdin>: line 2 has no user_id"),
        ('\nuser_id,notes\n1,"two\nlines"\n,x\n', "<stdin>: line 5 has no user_id"),
        ("u1\n" + "x" * 129 + "\n", "<stdin>: line 2: user id 'xxx"),
        ("user_id\nu1\nu\x012\n", "<stdin>: line 3: user id 'u\\x012'"),
        # A stray quote used to swallow every row after it, silently (or past 128 KiB, crash).
        ('user_id,notes\n1,"oops\n2,x\n3,y\n', "<stdin>: line 4 is not valid CSV"),
        ('user_id,notes\n1,"x"y\n2,z\n', "<stdin>: line 2 is not valid CSV"),
        ('"user_id\nu1\n', "<stdin>: line 2 is not valid CSV"),
        # Past the csv module's 128 KiB field limit: was a traceback while looking for a header,
        # and the error echoed the whole id.
        ("x" * 200_000 + "\n", "<stdin>: line 1: user id 'xxxxxxxxxxxxxxxxxxxx'... is 200000"),
        # Ids comma-separated on one line: the error echoed the whole line (hundreds of KB).
        (
            ",".join(f"u{i}" for i in range(50_000)) + "\n",
            "line 1 is a CSV header without a user_id column (found 'u0,u1,u2,",
        ),
    ],
)
def test_import_members_refuses_a_csv_without_user_ids(
    db_url: str, text: str, fragment: str
) -> None:
    ok(db_url, "segments create vip")
    before = contents(db_url)
    result = ctl(db_url, "segments", "import-members", "vip", "-", input=text)
    assert result.exit_code == 1 and fragment in result.stderr, result.output
    assert len(result.stderr.splitlines()) == 1 and len(result.stderr) < 1000
    assert contents(db_url) == before


def test_import_members_that_changes_nothing_says_so_and_replace_can_empty(db_url: str) -> None:
    ok(db_url, "segments create vip")
    ok(db_url, "segments import-members vip -", input="1\n2\n")
    before = contents(db_url)
    same = ctl(db_url, "segments", "import-members", "vip", "-", input="2\n")
    assert same.exit_code == 0 and "segment 'vip' unchanged: 2 member(s)" in same.stderr
    assert contents(db_url) == before
    emptied = ok(db_url, "segments import-members vip - --replace", input="")
    assert (emptied["member_count"], emptied["version"]) == (0, 3)


def _seed(url: str) -> str:
    for line in (
        "segments create new-customers --where 'days_since_first_order < 30'",
        "segments create vip",
        "rules create tier --segment new-customers --policy tiered_topk "
        "--param k1=3 --param d1=15 --param d2=5",
        "rules create measured --policy threshold --param t=0.5 --param d=10",
        "experiments create ab --variant control:50 --variant treatment:50:measured",
        "experiments create live --variant a:50 --variant b:50",
        "experiments start live",
    ):
        ok(url, line)
    return url


@pytest.fixture
def seeded(db_url: str) -> str:
    return _seed(db_url)


@pytest.fixture(scope="module", params=BACKENDS)
def seeded_once(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Seeded once per backend: the invalid-input cases write nothing (that is what they check)."""
    with empty_database(request.param, tmp_path_factory.mktemp("seeded")) as url:
        store = Store(url)
        migrate.upgrade(store)
        store.dispose()
        yield _seed(url)


TIER = ("--policy", "tiered_topk", "--param", "k1=3", "--param", "d1=15", "--param", "d2=5")
# A valid experiment so far: each case adds the one argument it refuses.
AB2 = ("experiments", "create", "ab2", "--variant", "a:50", "--variant", "b:50")
INVALID = [
    (("segments", "create", "new-customers", "--where", "order_count > 1"), "already exists"),
    (("segments", "create", "x", "--where", "age < 3"), "unknown feature 'age'"),
    (("segments", "create", "x", "--where", "order_count > lots"), "compares with a number"),
    (("segments", "create", "x", "--condition", "{not json"), "--condition: not valid JSON"),
    (("segments", "create", "x", "--condition", '{"all": []}'), "non-empty list"),
    (
        # Deep inside: the 5 would silently have become the condition.
        (
            "segments",
            "create",
            "x",
            "--condition",
            '{"any": [{"not": {"feature": "order_count", "op": ">", "value": 1, "value": 5}}]}',
        ),
        "--condition: key 'value' is given twice; give it once",
    ),
    (
        # An escaped lone surrogate: JSON, but no text the store (or a terminal) can encode.
        ("segments", "create", "x", "--condition", '{"all": [{"feature": "\\ud800"}]}'),
        "--condition: JSON the store cannot take",
    ),
    (("segments", "create", " x"), "leading or trailing spaces"),
    (("segments", "create", "a\x01b"), "not printable"),
    (("segments", "create", "a\u2028b"), "not printable ('\\u2028')"),
    (("segments", "create", "pp", "--priority", "2147483648"), "priority must be an integer"),
    (("segments", "show", "nope"), "no segment named 'nope'"),
    (
        ("segments", "update", "new-customers", "--if-version", "9", "--priority", "1"),
        "at version 1, not 9",
    ),
    (("segments", "update", "vip", "--where", "order_count > 1"), "is a member list"),
    (("segments", "update", "new-customers", "--name", "vip"), "'vip' already exists"),
    (("segments", "delete", "new-customers", "--yes"), "used by rule 'tier'"),
    (("segments", "delete", "vip"), "no terminal; pass --yes"),
    (("segments", "import-members", "vip", "/dev/null"), "no user ids to import"),
    (("segments", "import-members", "vip", "{latin1}"), "not UTF-8 text; save it as UTF-8"),
    (("segments", "import-members", "new-customers", "/dev/null"), "defined by a condition"),
    (
        ("segments", "import-members", "vip", "{csv}"),
        "line 1 is a CSV header without a user_id column (found 'customer_id,email')",
    ),
    (
        (
            "rules",
            "create",
            "t2",
            "--policy",
            "tiered_topk",
            "--param",
            "k1=0",
            "--param",
            "d1=5",
            "--param",
            "d2=1",
        ),
        "'k1' must be an integer >= 1",
    ),
    (("rules", "create", "t2", *TIER, "--max-discount", "100"), "max discount percent"),
    (("rules", "create", "t2", *TIER, "--segment", "nope"), "no segment named 'nope'"),
    (
        (
            "rules",
            "create",
            "t2",
            *TIER,
            "--valid-from",
            "2027-01-01",
            "--valid-until",
            "2026-01-01",
        ),
        "must be before valid until",
    ),
    (("rules", "create", "t2", *TIER, "--valid-from", "tomorrow"), "not an ISO 8601 time"),
    (
        ("rules", "create", "t2", *TIER, "--valid-from", "9999-12-31T23:00:00-05:00"),
        "falls outside the years 1-9999 in UTC",
    ),
    (
        ("rules", "create", "t2", *TIER, "--valid-until", "0001-01-01T00:00:00+05:00"),
        "falls outside the years 1-9999 in UTC",
    ),
    (("rules", "create", "t2", *TIER, "--budget", "1234.567"), "has more than 2 decimals"),
    (("rules", "create", "t2", *TIER, "--budget", "1e20"), "above the largest allowed"),
    (("rules", "create", "t2", *TIER, "--param", "k1=4"), "--param: 'k1' is given twice"),
    (
        ("rules", "create", "t2", "--policy", "threshold", "--params", '{"t":0,"d":5,"d":90}'),
        "--params: key 'd' is given twice; give it once",
    ),
    # null was taken as no --params: "unchanged", exit 0.
    (("rules", "update", "tier", "--params", "null"), "parameters must be an object, got None"),
    (
        (
            "rules",
            "update",
            "tier",
            "--params",
            '{"k1": 3, "d1": 15, "d2": 5, "k1": 30}',
        ),
        "--params: key 'k1' is given twice; give it once",
    ),
    (
        ("rules", "create", "t2", *TIER[:-2], "--param", "d2=" + "9" * 5000),
        "--param d2: JSON the store cannot take (",
    ),
    (
        (
            "rules",
            "create",
            "t2",
            "--policy",
            "optimal",
            "--param",
            "grid=" + "[" * 3000 + "]" * 3000,
        ),
        "--param grid: JSON the store cannot take (",
    ),
    (("rules", "create", "t2", *TIER, "--budget", "-1"), "budget must be >= 0"),
    (
        ("rules", "create", "t2", "--policy", "optimal", "--param", "grid=[10,5]"),
        "sorted ascending without repeats",
    ),
    # What a newcomer types first: the message shows the list syntax.
    (
        ("rules", "create", "t2", "--policy", "optimal", "--param", "grid=5,10"),
        "got '5,10'; write a list, e.g. grid=[5,10,15,20]",
    ),
    (
        ("rules", "create", "t2", "--policy", "threshold", "--param", "t=0.5"),
        "missing parameter(s) d",
    ),
    # A randomized rule that can draw only no discount logs no experiment at all.
    (
        ("rules", "create", "t2", "--policy", "randomized", "--param", "grid=[40,50]"),
        "randomized: no percent of grid [40.0, 50.0] is above 0 and within the max discount (30%)",
    ),
    (("rules", "create", "t2", "--policy", "randomized", "--param", "grid=[0]"), "no percent"),
    # Offers are priced at two-decimal percents, rounded down: these grids hold one choice fewer
    # than they show, and these percents price below what the rule shows.
    (
        ("rules", "create", "t2", "--policy", "randomized", "--param", "grid=[0.1,0.10000001]"),
        "randomized: grid percent 0.10000001 has more decimals than the two offers are priced at "
        "(it would price as 0.10%)",
    ),
    (
        ("rules", "create", "t2", "--policy", "optimal", "--params", '{"grid": [5, 10, 10.009]}'),
        "optimal: grid percent 10.009 has more decimals",
    ),
    (
        ("rules", "create", "t2", "--policy", "randomized", "--param", "grid=[0.004,5]"),
        "randomized: grid percent 0.004 has more decimals than the two offers are priced at "
        "(it would price as 0.00%)",
    ),
    (
        ("rules", "update", "tier", "--policy", "randomized", "--param", "grid=[5,5.001]"),
        "randomized: grid percent 5.001 has more decimals",
    ),
    (
        ("rules", "update", "tier", "--param", "d1=15.009"),
        "tiered_topk: parameter 'd1' 15.009 has more decimals than the two offers are priced at "
        "(it would price as 15.00%); give at most two",
    ),
    (
        (
            "rules",
            "create",
            "t2",
            "--policy",
            "linear",
            "--param",
            "a=1",
            "--param",
            "b=0",
            "--param",
            "min=0.005",
            "--param",
            "max=10",
        ),
        "linear: parameter 'min' 0.005 has more decimals",
    ),
    (
        (
            "rules",
            "update",
            "tier",
            "--policy",
            "randomized",
            "--param",
            "grid=[5,10]",
            "--max-discount",
            "4.99",
        ),
        "within the max discount (4.99%)",
    ),
    (
        ("rules", "create", "t2", "--policy", "linear", "--params", "[1]"),
        "parameters must be an object",
    ),
    (("rules", "create", "tier", *TIER), "rule 'tier' already exists"),
    (("rules", "show", "nope"), "no rule named 'nope'"),
    (
        (
            "rules",
            "create",
            "x",
            "--policy",
            "threshold",
            "--param",
            "t=0.5",
            "--param",
            "d=10",
            "--category",
            "To\x01ys",
        ),
        "category 'To\\x01ys' must be 1-",
    ),
    (("rules", "update", "tier", "--if-version", "5", "--priority", "1"), "at version 1, not 5"),
    (("rules", "update", "tier", "--param", "d2=50"), "must not exceed 'd1'"),
    (("rules", "update", "tier", "--priority", "2147483648"), "priority must be an integer"),
    (("rules", "enable", "nope"), "no rule named 'nope'"),
    (("rules", "disable", "tier", "--if-version", "2"), "at version 1, not 2"),
    (("rules", "delete", "tier"), "no terminal; pass --yes"),
    (("rules", "delete", "measured", "--yes"), "variant of experiment(s) 'ab'"),
    (("experiments", "create", "ab", "--variant", "a:50", "--variant", "b:50"), "already exists"),
    (
        ("experiments", "create", "ab2", "--variant", "a:50", "--variant", "b:40"),
        "sum to 100, got 90",
    ),
    (("experiments", "create", "ab2", "--variant", "a:100"), "at least two variants"),
    (
        ("experiments", "create", "ab2", "--variant", "control:0", "--variant", "t:100:measured"),
        "'control' have weight 0: nobody would be assigned",
    ),
    ((*AB2, "--variant", "x:0"), "'x' have weight 0"),
    (
        ("experiments", "create", "ab2\n", "--variant", "a:50", "--variant", "b:50"),
        "must be 1-64 letters",
    ),
    (
        (*AB2, "--salt", "a b"),
        "must be 1-64 printable characters without spaces",
    ),
    (
        ("experiments", "create", "ab2", "--variant", "a:x", "--variant", "b:50"),
        "is not an integer",
    ),
    (("experiments", "create", "ab2", "--variant", "a:50", "--variant", "a:50"), "unique"),
    # A variant of several rules repeats NAME:WEIGHT with another RULE; anything else is refused.
    (
        (*AB2, "--variant", "b:40:tier"),
        "--variant 'b:40:tier': variant 'b' was given weight 50 before",
    ),
    (
        (*AB2[:-1], "b:50:tier", "--variant", "b:50:tier"),
        "rule 'tier' is given twice for variant 'b'",
    ),
    (
        (*AB2[:-1], "b:50:tier", "--variant", "b:50"),
        "'b' is given twice; repeat a variant only to add a rule",
    ),
    (
        ("experiments", "create", "ab2", "--variant", "a:50:nope", "--variant", "b:50"),
        "no rule named 'nope'",
    ),
    (
        ("experiments", "create", "bad key!", "--variant", "a:50", "--variant", "b:50"),
        "must be 1-64 letters",
    ),
    ((*AB2, "--target-segment", "nope"), "no segment named 'nope'"),
    (("experiments", "show", "nope"), "no experiment with key 'nope'"),
    (
        ("experiments", "update", "live", "--variant", "a:10", "--variant", "b:90"),
        "can change only while it is a draft",
    ),
    (("experiments", "start", "live"), "it can start only from draft or paused"),
    (("experiments", "pause", "ab"), "it can pause only from running"),
    (("experiments", "stop", "live"), "no terminal; pass --yes"),
    (("experiments", "stop", "ab"), "never ran, so there is nothing to stop; delete"),
    (("experiments", "delete", "live", "--yes"), "is running; only a draft can be deleted"),
    (("experiments", "delete", "ab"), "no terminal; pass --yes"),
    (("experiments", "delete", "live"), "is running; only a draft can be deleted"),
    (("experiments", "assign", "nope", "u1"), "no experiment with key 'nope'"),
    (("experiments", "assign", "ab", "u1", "--feature", "age=3"), "unknown"),
    (("experiments", "assign", "ab", "u1", "--feature", "order_count=lots"), "must be a number"),
    (("experiments", "assign", "ab", "u1", "--feature", "order_count=nan"), "finite number"),
    (("models", "register", "/nonexistent/v1"), "no manifest.json; not a model version"),
    (("models", "promote", "nope"), "no model version 'nope'"),
    (("models", "rollback", "--yes"), "no active model version"),
    (("clients", "create", ""), "client name must not be empty"),
    (("clients", "create", " padded"), "leading or trailing spaces"),
    (("clients", "revoke", "nope", "--yes"), "no client 'nope'"),
    (("db", "upgrade", "nope"), "cannot upgrade to 'nope'"),
    (("db", "upgrade", "head+1"), "not a revision"),
    (("db", "upgrade", "base"), "the store is already at"),
    (("db", "upgrade", "0001"), "to go back, `discountctl db downgrade 0001`"),
    (("audit", "list", "--limit", "0"), "--limit must be from 1 to 10000, got 0"),
    (("db", "downgrade", "base"), "no terminal; pass --yes"),
    (("db", "downgrade", "nope", "--yes"), "cannot downgrade to 'nope'"),
]


@pytest.mark.parametrize(("args", "fragment"), INVALID, ids=[" ".join(a[:3]) for a, _ in INVALID])
def test_invalid_input_is_refused_and_nothing_is_written(
    seeded_once: str, args: tuple[str, ...], fragment: str, tmp_path: Path
) -> None:
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n12\n".encode("latin-1"))
    csv = tmp_path / "members.csv"
    csv.write_text("customer_id,email\n17850,a@b.com\n")
    before = contents(seeded_once)
    files = {"{latin1}": str(latin1), "{csv}": str(csv)}
    result = ctl(seeded_once, *(files.get(a, a) for a in args))
    assert result.exit_code == 1, result.output
    assert fragment in result.stderr
    assert result.stderr.startswith("Error: ") and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert contents(seeded_once) == before


# The store's commands (issue 3); commands other modules add are tested with their own code.
STORE_COMMANDS = (
    {("segments", v) for v in ("create", "list", "show", "update", "delete", "import-members")}
    | {("rules", v) for v in ("create", "list", "show", "update", "enable", "disable", "delete")}
    | {
        ("experiments", v)
        for v in ("create", "list", "show", "update", "start", "pause", "stop", "assign", "delete")
    }
    | {("models", v) for v in ("register", "list", "promote", "rollback")}
    | {("clients", v) for v in ("create", "list", "revoke")}
    | {("audit", "list")}
    | {("db", v) for v in ("upgrade", "downgrade", "current", "history")}
)
# Listing commands take no input that could be invalid beyond their options (usage errors).
NO_INPUT = {
    ("segments", "list"),
    ("rules", "list"),
    ("experiments", "list"),
    ("models", "list"),
    ("clients", "list"),
    ("db", "current"),
    ("db", "history"),
    ("audit", "list"),
}


def test_every_store_command_has_an_invalid_input_case() -> None:
    assert STORE_COMMANDS.issubset(p for p, _ in _leaves(cli))
    assert STORE_COMMANDS - NO_INPUT - {a[:2] for a, _ in INVALID} == set()


@pytest.mark.parametrize(
    "condition",
    [
        "[" * 20_000 + "]" * 20_000,
        '{"feature": "order_count", "op": "<", "value": 1' + "0" * 5000 + "}",
    ],
    ids=["nested too deep", "too many digits"],
)
def test_json_python_cannot_read_is_one_line(seeded_once: str, condition: str) -> None:
    result = ctl(seeded_once, "segments", "create", "x", "--condition", condition)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: --condition: JSON the store cannot take (")
    assert len(result.stderr.strip().splitlines()) == 1


def test_usage_errors_exit_2(seeded_once: str) -> None:
    """Only what does not parse; a number out of range is a refused input (INVALID, exit 1)."""
    for args in (
        ("rules", "create", "x"),
        ("audit", "list", "--limit", "ten"),
        ("segments", "list", "--output", "yaml"),
        ("nouns",),
        ("segments", "create", "x", "--priority", "high"),
        ("segments", "create", "x", "--where", "order_count > 1", "--condition", "{}"),
        ("rules", "update", "tier", "--segment", "vip", "--clear", "segment"),
    ):
        result = ctl(seeded_once, *args)
        assert result.exit_code == 2, (args, result.output)


def test_destructive_commands_work_with_yes(seeded: str) -> None:
    assert ok(seeded, "segments delete vip --yes")["name"] == "vip"
    ok(seeded, "experiments start ab")
    assert ok(seeded, "experiments stop ab --yes")["status"] == "stopped"
    result = ctl(seeded, "experiments", "start", "ab")
    assert result.exit_code == 1 and "a stopped experiment cannot restart" in result.stderr


def test_a_segment_an_experiment_targets_goes_with_the_draft_and_stays_after_a_run(
    seeded: str,
) -> None:
    ok(seeded, "experiments create vip-ab --target-segment vip --variant a:50 --variant b:50")
    refused = ctl(seeded, "segments", "delete", "vip", "--yes")
    assert "used by draft experiment 'vip-ab'; change or delete those first" in refused.stderr
    assert ok(seeded, "experiments delete vip-ab --yes")["key"] == "vip-ab"
    assert ok(seeded, "audit list --limit 1")[0]["action"] == "delete"
    assert ok(seeded, "segments delete vip --yes")["name"] == "vip"

    ok(seeded, "segments create vip2")
    ok(seeded, "experiments create ran --target-segment vip2 --variant a:50 --variant b:50")
    ok(seeded, "experiments start ran")
    ok(seeded, "experiments stop ran --yes")
    kept = ctl(seeded, "segments", "delete", "vip2", "--yes")
    assert kept.exit_code == 1
    assert (
        "used by stopped experiment 'ran'; an experiment that has run keeps its target as the "
        "record its report reads, so the segment stays"
    ) in kept.stderr


def test_times_are_given_back_in_utc(seeded: str) -> None:
    rule = ok(seeded, "rules update tier --valid-from 2026-12-01T09:00:00+01:00")
    assert rule["valid_from"] == "2026-12-01T08:00:00+00:00"
    assert ok(seeded, "audit list --limit 1")[0]["after"]["valid_from"] == rule["valid_from"]
    assert ok(seeded, "rules show tier")["valid_from"] == rule["valid_from"]


def test_actor_is_checked_before_anything_is_written(seeded_once: str) -> None:
    before = contents(seeded_once)
    for actor, fragment in (("", "must not be empty"), ("a" * 201, "the limit is 200")):
        result = CliRunner().invoke(cli, ["--db-url", seeded_once, "--actor", actor,
                                          "segments", "create", "x"])  # fmt: skip
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: --actor / DISCOUNT_ACTOR: actor name ")
        assert fragment in result.stderr
    assert contents(seeded_once) == before


def test_grant_server_role_dry_run_is_refused_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ok(url, "db upgrade")
    result = ctl(url, "db", "grant-server-role", "discount_server", "--dry-run")
    assert result.exit_code == 1 and result.stdout == ""
    assert "database roles exist only on PostgreSQL" in result.stderr


def test_a_variant_whose_rule_reaches_fewer_users_than_the_experiment_is_noted(
    seeded: str,
) -> None:
    """A variant never widens its rule's segment: its other users get no discount. Said when
    the experiment is created and started, and not when the target segment matches."""
    wide = ctl(seeded, "experiments", "create", "wide", "--variant", "control:50",
               "--variant", "treatment:50:tier")  # fmt: skip
    assert wide.exit_code == 0, wide.output
    note = "rule 'tier', which reaches only segment 'new-customers'"
    assert note in wide.stderr
    assert note in ctl(seeded, "experiments", "start", "wide").stderr
    narrow = ctl(seeded, "experiments", "create", "narrow", "--variant", "control:50",
                 "--variant", "treatment:50:tier", "--target-segment", "new-customers")  # fmt: skip
    assert narrow.exit_code == 0 and "reaches only" not in narrow.stderr


def test_running_experiments_keep_the_users_they_share_in_the_order_they_started(
    seeded: str,
) -> None:
    """'live' runs for everyone; 'ab', also for everyone and first by key, must not take its
    users from it mid-flight, and the admin hears what starting it does."""
    started = ctl(seeded, "experiments", "start", "ab")
    assert started.exit_code == 0, started.output
    assert (
        "note: 'live' started first and keeps every user of 'ab': 'ab' gets nobody until "
        "'live' pauses or stops"
    ) in started.stderr
    assert ok(seeded, "experiments assign live u1")["served"] is True
    assigned = ctl(seeded, "experiments", "assign", "ab", "u1", "-o", "json")
    assert json.loads(assigned.stdout)["served"] is False
    assert json.loads(assigned.stdout)["served_by"] == "live"
    assert "the server gives this user that one" in assigned.stderr

    def server_order() -> list[str]:
        store = Store(seeded)
        try:
            with store.transaction() as session:
                return [e.key for e in load_snapshot(session, datetime.now(UTC)).experiments]
        finally:
            store.dispose()

    assert server_order() == ["live", "ab"]
    ok(seeded, "experiments pause live")
    assert ok(seeded, "experiments assign ab u1")["served"] is True
    resumed = ctl(seeded, "experiments", "start", "live")
    assert "note: 'live' started first and keeps every user of 'ab'; they leave 'ab' now" in (
        resumed.stderr
    )
    assert server_order() == ["live", "ab"]


def test_assign_judges_a_condition_only_on_the_features_given(seeded: str) -> None:
    """A feature not given would be taken as a new user's: the answer would be a guess."""
    ok(seeded, "segments create big --where 'lifetime_value >= 500' --where 'order_count >= 3'")
    ok(seeded, "experiments create big-ab --target-segment big --variant a:50 --variant b:50")
    half = "experiments assign big-ab 17850 --feature lifetime_value=800"
    assert ok(seeded, half)["in_target"] is None
    assert ok(seeded, f"{half} --feature order_count=5")["in_target"] is True
    assert ok(seeded, f"{half} --feature order_count=1")["in_target"] is False


def test_changes_to_a_rule_a_running_experiment_measures_are_noted(seeded: str) -> None:
    """Allowed (a rule that gives money away must be stoppable), but the experiment keeps
    assigning users to the variant, so the admin hears what happens to it."""
    ok(seeded, "experiments create m --variant control:50 --variant t:50:measured")
    ok(seeded, "experiments start m")
    quiet = ctl(seeded, "rules", "update", "measured", "--description", "x")
    assert quiet.exit_code == 0 and "note:" not in quiet.stderr
    changed = ctl(seeded, "rules", "update", "measured", "--param", "d=20")
    assert changed.exit_code == 0
    assert (
        "note: variant 't' of running experiment 'm' prices with rule 'measured', whose "
        "params changed"
    ) in changed.stderr
    narrowed = ctl(seeded, "rules", "update", "measured", "--item", "000001", "--budget", "50")
    assert "whose item_ids, budget changed" in narrowed.stderr
    # A window that keeps the rule live reprices nothing; where it ends is still worth a note.
    longer = ctl(seeded, "rules", "update", "measured", "--valid-until", "2999-01-01")
    assert longer.exit_code == 0 and "results mix" not in longer.stderr
    assert "whose validity window is now any time to 2999-01-01T00:00:00+00:00" in longer.stderr
    expired = ctl(seeded, "rules", "update", "measured", "--valid-until", "2020-01-01")
    assert "which is now outside its validity window" in expired.stderr
    assert "VARIANT_RULE_NOT_APPLICABLE" in expired.stderr
    ok(seeded, "experiments pause m")
    restart = ctl(seeded, "experiments", "start", "m")
    assert restart.exit_code == 1
    assert (
        "variant 't' uses rule 'measured', whose validity ended at 2020-01-01T00:00:00+00:00; "
        "extend it first"
    ) in restart.stderr
    ok(seeded, "rules update measured --clear valid_until")
    ok(seeded, "experiments start m")
    ok(seeded, "rules update measured --valid-until 2999-01-01")
    unbounded = ctl(seeded, "rules", "update", "measured", "--clear", "valid_until")
    assert (
        "whose validity window is now gone: the variant's users get its discounts at any time"
    ) in unbounded.stderr
    disabled = ctl(seeded, "rules", "disable", "measured")
    assert disabled.exit_code == 0
    notes = [line for line in disabled.stderr.splitlines() if line.startswith("note:")]
    # The draft experiment 'ab' uses the rule too, but nobody is assigned to it yet.
    assert len(notes) == 1 and "running experiment 'm'" in notes[0]
    assert "VARIANT_RULE_NOT_APPLICABLE" in notes[0]
    assert "`discountctl experiments pause m`" in notes[0]
    assert ok(seeded, "rules show measured")["enabled"] is False


def test_changes_to_who_is_in_a_segment_a_running_experiment_uses_are_noted(seeded: str) -> None:
    """Allowed (the shop keeps its segments current), but the experiment's population or its
    rule's reach changes mid-flight, so the admin hears which experiments it touches."""
    ok(seeded, "segments import-members vip -", input="1\n2\n3\n")
    ok(seeded, "rules create vip-rule --segment vip --policy threshold --param t=0 --param d=5")
    ok(
        seeded,
        "experiments create vip-ab --target-segment vip --variant a:50 --variant b:50:vip-rule",
    )
    ok(seeded, "experiments create scoped --variant c:50 --variant t:50:tier")
    ok(seeded, "experiments start vip-ab")
    ok(seeded, "experiments start scoped")
    emptied = ctl(seeded, "segments", "import-members", "vip", "-", "--replace", input="")
    assert emptied.exit_code == 0
    notes = [line for line in emptied.stderr.splitlines() if line.startswith("note:")]
    assert "segment 'vip': 0 new member(s), 3 removed, 0 in all" in emptied.stderr
    assert notes == [
        "note: segment 'vip' is the target of running experiment 'vip-ab': who takes part "
        "changes from now on, so its results mix the old population and the new",
        "note: segment 'vip' scopes rule 'vip-rule', which prices variant 'b' of running "
        "experiment 'vip-ab': which of the variant's users get its discounts changes from now on",
    ]
    renamed = ctl(seeded, "segments", "update", "new-customers", "--description", "x")
    assert renamed.exit_code == 0 and "note:" not in renamed.stderr
    redefined = ctl(seeded, "segments", "update", "new-customers", "--where", "order_count > 1")
    assert (
        "note: segment 'new-customers' scopes rule 'tier', which prices variant 't' of running "
        "experiment 'scoped'"
    ) in redefined.stderr


def test_a_rule_created_or_moved_past_its_window_says_it_prices_nothing(seeded: str) -> None:
    old = ctl(seeded, "rules", "create", "old", "--policy", "threshold", "--param", "t=0.5",
              "--param", "d=10", "--valid-until", "2020-01-01")  # fmt: skip
    assert old.exit_code == 0
    ended = "note: rule 'old' ended at 2020-01-01T00:00:00+00:00 (--valid-until): it prices nothing"
    assert ended in old.stderr
    assert ended not in ctl(seeded, "rules", "update", "old", "--clear", "valid_until").stderr
    moved = ctl(seeded, "rules", "update", "old", "--valid-until", "2020-01-01")
    assert ended in moved.stderr
    described = ctl(seeded, "rules", "update", "old", "--description", "spring sale")
    assert described.exit_code == 0 and "note:" not in described.stderr  # the window is as it was


def test_a_new_policy_takes_new_parameters_not_the_old_ones(seeded: str) -> None:
    ok(seeded, "rules create swap --policy threshold --param t=0.5 --param d=10")
    bare = ctl(seeded, "rules", "update", "swap", "--policy", "tiered_topk")
    assert bare.exit_code == 1
    assert (
        "--policy tiered_topk needs its own parameters, passed with --param K=V (repeat) or "
        "--params JSON: the rule's (d, t) are threshold's"
    ) in bare.stderr
    swapped = ok(seeded, "rules update swap --policy tiered_topk --param k1=1 --param d1=10 "
                 "--param d2=0")  # fmt: skip
    assert (swapped["policy"], swapped["params"]) == ("tiered_topk", {"k1": 1, "d1": 10, "d2": 0})


def test_an_update_that_changes_nothing_says_so(seeded: str) -> None:
    before = contents(seeded)
    for args, said in (
        (("rules", "update", "tier", "--param", "d1=15"), "rule 'tier' unchanged (version 1)"),
        (("rules", "enable", "tier"), "rule 'tier' is already enabled"),
        (("segments", "update", "vip", "--priority", "100"), "segment 'vip' unchanged"),
        (("experiments", "update", "ab", "--description", ""), "experiment 'ab' unchanged"),
    ):
        result = ctl(seeded, *args)
        assert result.exit_code == 0 and said in result.stderr, (args, result.output)
    assert contents(seeded) == before


def test_concurrent_cli_updates_of_one_rule_one_wins(seeded: str) -> None:
    """Two admins both read version 1 and update with --if-version 1: the second is refused."""
    first = ctl(seeded, "rules", "update", "tier", "--priority", "7", "--if-version", "1")
    second = ctl(seeded, "rules", "update", "tier", "--priority", "3", "--if-version", "1")
    assert first.exit_code == 0 and second.exit_code == 1
    assert "someone changed it since you read it" in second.stderr
    shown = ok(seeded, "rules show tier")
    assert (shown["priority"], shown["version"]) == (7, 2)


def test_rule_update_clears_and_toggles(seeded: str) -> None:
    rule = ok(seeded, "rules update tier --clear segment --category Toys")
    assert (rule["segment"], rule["categories"]) == (None, ["Toys"])
    assert ok(seeded, "rules disable tier")["enabled"] is False
    assert ok(seeded, "rules enable tier")["enabled"] is True
    assert ok(seeded, "rules delete tier --yes")["name"] == "tier"


@pytest.mark.parametrize(
    ("stored", "refusal"),
    [
        # A rule that draws only no discount.
        ('{"grid": [40.0]}', "no percent of grid [40.0]"),
        # A grid percent of three decimals: 5 and 5.001 price as one.
        ('{"grid": [5.0, 5.001]}', "grid percent 5.001 has more decimals"),
    ],
)
def test_a_rule_stored_before_its_grid_was_checked_stays_manageable(
    seeded: str, stored: str, refusal: str
) -> None:
    """A build before the checks stored such a randomized rule: disabling or describing it
    changes nothing it draws among, so it is not refused for its grid; a change of what it
    chooses among is."""
    ok(seeded, "rules create learn --policy randomized --param grid=[5,10]")
    store = Store(seeded)
    with store.transaction() as session:
        session.execute(
            text("UPDATE rules SET params = :params WHERE name = 'learn'"), {"params": stored}
        )
    store.dispose()
    assert ok(seeded, "rules disable learn")["enabled"] is False
    assert ok(seeded, "rules update learn --description old")["description"] == "old"
    refused = ctl(seeded, "rules", "update", "learn", "--max-discount", "35")
    assert refused.exit_code == 1 and refusal in refused.stderr


def test_schema_not_at_head_names_the_fix(tmp_path: Path) -> None:
    empty_db_url = f"sqlite:///{tmp_path / 'new.db'}"
    result = ctl(empty_db_url, "rules", "list")
    assert result.exit_code == 1
    assert "has no schema yet; run `discountctl db upgrade`" in result.stderr
    current = ok(empty_db_url, "db current")
    assert current["current"] is None and current["at_head"] is False
    downgrade = ctl(empty_db_url, "db", "downgrade", "base", "--yes")
    assert downgrade.exit_code == 1 and "has no schema: nothing to downgrade" in downgrade.stderr
    # Asking created nothing: a mistyped path leaves no empty store behind.
    assert not (tmp_path / "new.db").exists()


def test_only_db_upgrade_makes_the_default_store_and_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DISCOUNT_DB_URL", raising=False)
    listed = CliRunner().invoke(cli, ["segments", "list"])
    assert listed.exit_code == 1 and "has no schema yet" in listed.stderr
    assert list(tmp_path.iterdir()) == []
    upgraded = CliRunner().invoke(cli, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert (tmp_path / "var" / "discount.db").is_file()
    # Any SQLite path: `db upgrade` is what the "no schema yet" refusal tells the user to run.
    nested = f"sqlite:///{tmp_path / 'new' / 'folder' / 'x.db'}"
    assert "has no schema yet" in ctl(nested, "rules", "list").stderr
    assert not (tmp_path / "new").exists()
    ok(nested, "db upgrade")
    assert (tmp_path / "new" / "folder" / "x.db").is_file()


def test_tables_show_amounts_exactly(seeded: str) -> None:
    ok(seeded, "rules update tier --budget 1234567.89 --max-discount 12.5")
    shown = ctl(seeded, "rules", "show", "tier").stdout
    assert re.search(r"^budget +1234567\.89$", shown, re.M), shown
    assert re.search(r"^max_discount_pct +12\.5$", shown, re.M), shown
    listed = ctl(seeded, "rules", "list").stdout
    assert "1234567.89" in listed and "e+" not in listed, listed


def test_table_columns_line_up_under_wide_and_accented_names(db_url: str) -> None:
    """len() counted a Chinese character (two terminal columns) and a combining accent (none)
    as one each, so every column after such a name stood off to its right or left."""
    for name in ("新客户", "cafe\u0301", "vip"):
        ok(db_url, f"segments create {name}")
    ok(db_url, "clients create 结账服务")
    listed = ctl(db_url, "segments", "list").stdout.splitlines()
    assert listed == [
        "NAME    KIND     PRIORITY  CONDITION  MEMBER_COUNT  VERSION",
        "cafe\u0301    members  100       -          0             1",
        "vip     members  100       -          0             1",
        "新客户  members  100       -          0             1",
    ]
    clients = ctl(db_url, "clients", "list").stdout.splitlines()
    assert clients[1].startswith("结账服务  yes     20"), clients


def test_audit_list_by_name_follows_a_renamed_record(db_url: str) -> None:
    """Entries keep the name of their time: `--name` matched that alone, so a renamed rule's
    history began at the rename under its new name, and ended there under its old one."""
    ok(db_url, "rules create tier --policy threshold --param t=0.5 --param d=10")
    ok(db_url, "rules update tier --name tier-2")
    ok(db_url, "rules disable tier-2")
    ok(db_url, "rules create other --policy threshold --param t=0.5 --param d=5")
    expected = [("disable", "tier-2"), ("update", "tier-2"), ("create", "tier")]
    for name in ("tier-2", "tier"):
        log = ok(db_url, f"audit list --name {name}")
        assert [(e["action"], e["entity_name"]) for e in log] == expected, name
    assert [e["action"] for e in ok(db_url, "audit list --name tier-2 --limit 1")] == ["disable"]
    assert ok(db_url, "audit list --name tier --entity-type segment") == []


def test_a_store_without_schema_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ok(url, "db upgrade")
    result = ctl(url, "db", "downgrade", "base", "--yes")
    assert result.exit_code == 0
    assert result.stderr.strip().endswith("has no schema; `discountctl db upgrade` creates it")


def test_db_commands(db_url: str) -> None:
    current = ok(db_url, "db current")
    assert current["at_head"] is True and current["current"] == current["head"]
    history = ok(db_url, "db history")
    assert history[0]["is_current"] and history[0]["is_head"]
    assert ok(db_url, "db upgrade")["at_head"] is True


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://admin:s3cret@127.0.0.1:1/shop",
        "sqlite:////nonexistent/dir/discount.db",
        "mysql://admin:s3cret@localhost/shop",
        "not a url",
    ],
)
def test_unreachable_store_is_one_line_with_the_password_masked(url: str) -> None:
    result = ctl(url, "segments", "list")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "s3cret" not in result.stderr
    assert ("***" in lines[0]) == ("s3cret" in url)


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///", "sqlite:///:memory:"])
def test_an_sqlite_url_without_a_file_is_refused(url: str) -> None:
    """`db upgrade` reported revision head of an in-memory database that was gone when it
    exited; every command after it said the store had no schema and named `db upgrade`."""
    for args in (("db", "upgrade"), ("db", "current"), ("segments", "list")):
        result = ctl(url, *args)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("Error: ") and len(result.stderr.splitlines()) == 1
        assert "names no file" in result.stderr and "sqlite:///PATH" in result.stderr


NOT_UTF8 = "new\udcff"  # how Python hands on the byte 0xff of an argument


@pytest.mark.parametrize(
    "args",
    [
        ("segments", "create", NOT_UTF8),
        ("segments", "create", "x", "--description", NOT_UTF8),
        ("experiments", "assign", "live", NOT_UTF8),
        (
            "experiments",
            "create",
            "x",
            "--variant",
            "a:50",
            "--variant",
            "b:50",
            "--salt",
            NOT_UTF8,
        ),
        ("audit", "list", "--name", NOT_UTF8),
        ("--actor", NOT_UTF8, "segments", "create", "x"),
    ],
    ids=["name", "description", "user id", "salt", "audit name", "actor"],
)
def test_arguments_that_are_not_utf8_are_one_line(seeded_once: str, args: tuple[str, ...]) -> None:
    before = contents(seeded_once)
    result = CliRunner().invoke(cli, ["--db-url", seeded_once, *args])
    assert result.exit_code == 1, result.output
    assert (
        result.stderr == "Error: argument 'new\\udcff' is not valid UTF-8 text; give it in UTF-8\n"
    )
    env = CliRunner(env={"DISCOUNT_ACTOR": NOT_UTF8}).invoke(
        cli, ["--db-url", seeded_once, "segments", "create", "x"]
    )
    assert env.exit_code == 1 and env.stderr.startswith("Error: --actor / DISCOUNT_ACTOR 'new")
    assert contents(seeded_once) == before


def test_a_store_url_that_is_not_utf8_is_refused_without_its_password() -> None:
    url = "postgresql+psycopg://admin:Tr\udce9sSecret@db.internal/shop"  # Latin-1 é, as argv
    flag = CliRunner().invoke(cli, ["--db-url", url, "clients", "list"])
    env = CliRunner(env={"DISCOUNT_DB_URL": url}).invoke(cli, ["clients", "list"])
    for result in (flag, env):
        assert result.exit_code == 1, result.output
        assert "is not valid UTF-8 text" in result.stderr
        assert "Secret" not in result.stderr and "admin:***@db.internal" in result.stderr


def test_a_stdout_that_cannot_take_the_output_is_one_line(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    ok(url, "db upgrade")
    script = Path(sys.executable).parent / "discountctl"
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [str(script), "--db-url", url, "audit", "list", "-o", "json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert result.returncode == 1
    assert result.stderr == "Error: cannot write the output: No space left on device\n"


def test_installed_command_prints_no_traceback() -> None:
    script = Path(sys.executable).parent / "discountctl"
    assert script.is_file(), "console script missing; run `pip install -e .`"
    result = subprocess.run(
        [
            str(script),
            "--db-url",
            "postgresql+psycopg://admin:s3cret@127.0.0.1:1/shop",
            "rules",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: cannot use store postgresql+psycopg://admin:***@")
    assert "Traceback" not in result.stderr


def test_experiment_notes_name_rules_not_valid_yet_and_rules_held_or_released(db_url: str) -> None:
    ctl(db_url, "rules", "create", "later", *TIER, "--valid-from", "2030-01-01T00:00:00Z")
    ctl(db_url, "experiments", "create", "f", "--variant", "control:50", "--variant", "t:50:later")
    started = ctl(db_url, "experiments", "start", "f")
    assert started.exit_code == 0
    assert (
        "note: variant 't' prices with rule 'later', valid only from 2030-01-01T00:00:00+00:00"
        in started.stderr
    )
    ctl(db_url, "rules", "create", "now", *TIER)
    another = ctl(db_url, "experiments", "create", "g", "--variant", "c:50",
                  "--variant", "t:50:later")  # fmt: skip
    assert another.exit_code == 0
    assert "note: rule 'later' now prices only through" not in another.stderr  # f holds it
    moved = ctl(db_url, "experiments", "update", "g", "--variant", "c:50", "--variant", "t:50:now")
    assert moved.exit_code == 0
    assert "note: rule 'now' now prices only through" in moved.stderr
    assert "rule 'later' prices as an ordinary rule again" not in moved.stderr  # f still holds it
    back = ctl(db_url, "experiments", "update", "g", "--variant", "c:50", "--variant", "t:50:later")
    assert "note: rule 'now' prices as an ordinary rule again" in back.stderr


# Rule names with the characters a list in one --variant value would need as separators.
NEW_20 = "new: 20%, first order"
ALL_5 = "all: 5%"


def test_a_variant_of_several_rules_is_written_by_repeating_it(db_url: str) -> None:
    """A discount program (20 % for new customers, 5 % for everyone else) against its control:
    each rule comes whole, colons and commas included, and show/list name them in the order
    they compete (priority, then name)."""
    ok(db_url, "segments create new-customers --where 'days_since_first_order < 30'")
    ok(db_url, "segments create vip")
    ok(db_url, f"rules create '{ALL_5}' --policy threshold --param t=0 --param d=5")
    ok(
        db_url,
        f"rules create '{NEW_20}' --segment new-customers --priority 5 --policy threshold "
        "--param t=0 --param d=20",
    )
    line = (
        f"experiments create program --variant control:50 --variant 'program:50:{ALL_5}' "
        f"--variant 'program:50:{NEW_20}'"
    )
    expected = [
        {"name": "control", "weight": 50, "rules": []},
        {"name": "program", "weight": 50, "rules": [NEW_20, ALL_5]},
    ]
    assert ok(db_url, line)["variants"] == expected
    assert ok(db_url, "experiments show program")["variants"] == expected
    assert ok(db_url, "experiments list")[0]["variants"] == expected
    table = ctl(db_url, "experiments", "show", "program")
    assert f"control:50, program:50({NEW_20}, {ALL_5})" in table.stdout
    held = {r["name"]: r["held_by"] for r in ok(db_url, "rules list")}
    assert held == {NEW_20: ["program"], ALL_5: ["program"]}
    refused = ctl(db_url, "rules", "delete", ALL_5, "--yes")
    assert refused.exit_code == 1 and "variant of experiment(s) 'program'" in refused.stderr
    assigned = [ok(db_url, f"experiments assign program u{n}")["rules"] for n in range(20)]
    assert [] in assigned and [NEW_20, ALL_5] in assigned
    # Rules of segments alone: the arm holds users none of them prices.
    ok(db_url, "rules create 'vip: 10%' --segment vip --policy threshold --param t=0 --param d=10")
    program = ("--variant", f"program:50:{NEW_20}", "--variant", "program:50:vip: 10%")
    narrower = ctl(db_url, "experiments", "update", "program", "--variant", "control:50", *program)
    assert narrower.exit_code == 0, narrower.output
    started = ctl(db_url, "experiments", "start", "program")
    assert (
        f"note: variant 'program' prices with rules '{NEW_20}', 'vip: 10%', which reach only "
        "segment(s) 'new-customers', 'vip'; the variant's other users get no discount"
    ) in started.stderr
    # Disabling one rule leaves the variant its other one, and the note says so.
    disabled = ctl(db_url, "rules", "disable", "vip: 10%")
    assert (
        "note: variant 'program' of running experiment 'program' prices with rule 'vip: 10%', "
        f"which is now disabled: what it priced for the variant's users gets the variant's other "
        f"rules ('{NEW_20}') where they apply, else no discount"
    ) in disabled.stderr
    # Among a variant's rules priority decides, so a change of it is noted too.
    reordered = ctl(db_url, "rules", "update", NEW_20, "--priority", "-1")
    assert f"prices with rule '{NEW_20}', whose priority changed" in reordered.stderr


def test_a_variant_rules_priority_or_name_is_noted_only_when_it_reorders_the_variant(
    db_url: str,
) -> None:
    """Priority and name decide which of a variant's rules prices an item only through the
    order they put the rules in: a rename or a new priority that leaves that order as it was
    prices every user as before, and a note saying otherwise sends an admin to pause a sound
    experiment."""
    ctl(db_url, "rules", "create", "high", *TIER, "--priority", "20")
    ctl(db_url, "rules", "create", "low", *TIER, "--priority", "10")
    ctl(db_url, "experiments", "create", "p", "--variant", "control:50", "--variant", "t:50:high",
        "--variant", "t:50:low")  # fmt: skip
    assert ctl(db_url, "experiments", "start", "p").exit_code == 0
    for change in (("--name", "low-2"), ("--priority", "15")):
        same_order = ctl(db_url, "rules", "update", "low" if "low-2" in change else "low-2",
                         *change)  # fmt: skip
        assert same_order.exit_code == 0, same_order.output
        assert "note:" not in same_order.stderr, same_order.stderr
    reordered = ctl(db_url, "rules", "update", "low-2", "--priority", "25")
    assert (
        "note: variant 't' of running experiment 'p' prices with rule 'low-2', whose priority "
        "changed"
    ) in reordered.stderr
    # Equal priorities go by name: a rename across the other rule's name reorders them too.
    ctl(db_url, "rules", "update", "low-2", "--priority", "20")
    renamed = ctl(db_url, "rules", "update", "low-2", "--name", "a-first")
    assert "prices with rule 'a-first', whose name changed" in renamed.stderr


def test_disabling_a_variants_last_live_rule_says_its_users_get_no_discount(db_url: str) -> None:
    """The note named the variant's other rule as taking over what the disabled one priced,
    though that rule was disabled already: the whole arm got no discount, the case where an
    admin most needs to pause, and the note said otherwise."""
    ctl(db_url, "rules", "create", "high", *TIER, "--priority", "20")
    ctl(db_url, "rules", "create", "low", *TIER, "--priority", "10")
    ctl(db_url, "experiments", "create", "p", "--variant", "control:50", "--variant", "t:50:high",
        "--variant", "t:50:low")  # fmt: skip
    assert ctl(db_url, "experiments", "start", "p").exit_code == 0
    first = ctl(db_url, "rules", "disable", "low")
    assert "gets the variant's other rules ('high') where they apply" in first.stderr
    last = ctl(db_url, "rules", "disable", "high")
    assert last.exit_code == 0, last.output
    assert (
        "note: variant 't' of running experiment 'p' prices with rule 'high', which is now "
        "disabled: the variant's users get no discount (VARIANT_RULE_NOT_APPLICABLE)"
    ) in last.stderr


def test_a_variant_whose_rules_are_all_not_valid_yet_is_noted_as_giving_no_discount(
    db_url: str,
) -> None:
    """Each rule's note named the other as pricing meanwhile, though neither had begun: the
    whole arm gets no discount until the first window opens."""
    for name in ("later", "later-2"):
        ctl(db_url, "rules", "create", name, *TIER, "--valid-from", "2030-01-01T00:00:00Z")
    ctl(db_url, "experiments", "create", "f", "--variant", "control:50", "--variant", "t:50:later",
        "--variant", "t:50:later-2")  # fmt: skip
    started = ctl(db_url, "experiments", "start", "f")
    assert started.exit_code == 0, started.output
    for name in ("later", "later-2"):
        assert (
            f"note: variant 't' prices with rule '{name}', valid only from "
            "2030-01-01T00:00:00+00:00: until then its users get no discount"
        ) in started.stderr
    assert "other rules" not in started.stderr


def test_a_variant_rule_not_valid_yet_names_the_variants_other_rules(db_url: str) -> None:
    ctl(db_url, "rules", "create", "later", *TIER, "--valid-from", "2030-01-01T00:00:00Z")
    ctl(db_url, "rules", "create", "now", *TIER)
    ctl(db_url, "experiments", "create", "f", "--variant", "control:50", "--variant", "t:50:later",
        "--variant", "t:50:now")  # fmt: skip
    started = ctl(db_url, "experiments", "start", "f")
    assert started.exit_code == 0, started.output
    assert (
        "note: variant 't' prices with rule 'later', valid only from 2030-01-01T00:00:00+00:00: "
        "until then what it would price gets the variant's other rules ('now') where they "
        "apply, else no discount"
    ) in started.stderr
