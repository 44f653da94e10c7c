"""Admins at the same moment: two real discountctl processes against one PostgreSQL store,
racing for certain (tests/cli.py's race)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli import ctl, race
from pg import empty_database

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def empty_db_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """pg.py's stores, PostgreSQL's only: SQLite's one writer makes these races a wait."""
    with empty_database("postgres", tmp_path_factory.mktemp("store")) as url:
        yield url


def ok(db_url: str, *args: str) -> None:
    result = ctl(db_url, *args)
    assert result.exit_code == 0, result.output


def test_two_experiments_started_at_once_on_one_target_note_what_they_share(db_url: str) -> None:
    """Each start saw the other still a draft: both ran on the same target without a note, and
    the one started second got nobody, with nobody told."""
    ok(db_url, "segments", "create", "vip")
    for key in ("first", "second"):
        ok(db_url, "experiments", "create", key, "--target-segment", "vip",
           "--variant", "control:50", "--variant", "treatment:50")  # fmt: skip
    first, second = race(
        db_url, ("experiments", "start", "first"), ("experiments", "start", "second")
    )
    assert first.exit_code == 0 and second.exit_code == 0, (first, second)
    assert "note:" not in first.stderr
    assert (
        "note: 'first' started first and keeps every user of 'second': 'second' gets nobody "
        "until 'first' pauses or stops"
    ) in second.stderr


def test_a_rule_disabled_while_its_experiment_starts_is_refused_or_noted(db_url: str) -> None:
    """The start checked its variant's rule enabled, the disable looked for running experiments
    to note: each read before the other wrote, so a running variant lost its discounts
    (VARIANT_RULE_NOT_APPLICABLE) with neither admin told."""
    ok(db_url, "rules", "create", "tier", "--policy", "threshold", "--param", "t=0.5",
       "--param", "d=10")  # fmt: skip
    ok(db_url, "experiments", "create", "ab", "--variant", "control:50", "--variant", "t:50:tier")
    start, disable = race(db_url, ("experiments", "start", "ab"), ("rules", "disable", "tier"))
    assert start.exit_code == 0 and disable.exit_code == 0, (start, disable)
    assert (
        "note: variant 't' of running experiment 'ab' prices with rule 'tier', which is now "
        "disabled"
    ) in disable.stderr
    # The other way round: the disable first, so the start finds the rule disabled.
    ok(db_url, "rules", "enable", "tier")
    ok(db_url, "experiments", "pause", "ab")
    disable, start = race(db_url, ("rules", "disable", "tier"), ("experiments", "start", "ab"))
    assert disable.exit_code == 0, disable
    assert start.exit_code == 1
    assert "variant 't' uses rule 'tier', which is disabled; enable it first" in start.stderr


def test_two_imports_into_one_segment_at_once_both_land(db_url: str, tmp_path: Path) -> None:
    """Each read the members before the other wrote: one failed on an id both files hold
    ("duplicate key value violates unique constraint"), or on the segment's new version."""
    ok(db_url, "segments", "create", "vip")
    (tmp_path / "a.txt").write_text("".join(f"{i}\n" for i in range(1, 101)))
    (tmp_path / "b.txt").write_text("".join(f"{i}\n" for i in range(51, 151)))
    (tmp_path / "c.txt").write_text("".join(f"{i}\n" for i in range(201, 211)))
    a, b = race(
        db_url,
        ("segments", "import-members", "vip", str(tmp_path / "a.txt"), "-o", "json"),
        ("segments", "import-members", "vip", str(tmp_path / "b.txt"), "-o", "json"),
    )
    assert (a.exit_code, b.exit_code) == (0, 0), (a.stderr, b.stderr)
    assert (json.loads(a.stdout)["added"], json.loads(b.stdout)["added"]) == (100, 50)
    assert "segment 'vip': 50 new member(s), 150 in all" in b.stderr
    # A replacement racing an addition: the one that goes second sees the first's members.
    add, replace = race(
        db_url,
        ("segments", "import-members", "vip", str(tmp_path / "c.txt")),
        ("segments", "import-members", "vip", "--replace", str(tmp_path / "c.txt")),
    )
    assert (add.exit_code, replace.exit_code) == (0, 0), (add.stderr, replace.stderr)
    assert "segment 'vip': 0 new member(s), 150 removed, 10 in all" in replace.stderr
    shown = json.loads(ctl(db_url, "segments", "show", "vip", "-o", "json").stdout)
    assert (shown["member_count"], shown["version"]) == (10, 5)
    audit = json.loads(ctl(db_url, "audit", "list", "-o", "json").stdout)
    assert [(e["action"], e["after"]["member_count"]) for e in audit[:4]] == [
        ("import_members", 10),
        ("import_members", 160),
        ("import_members", 150),
        ("import_members", 100),
    ]


def test_a_client_revoked_twice_at_once_is_revoked_once(db_url: str) -> None:
    """Both revokes read the client active: the second moved revoked_at to its own time (the
    token was refused from the first's) and wrote a second audit entry saying it was active."""
    ok(db_url, "clients", "create", "checkout")
    first, second = race(
        db_url,
        ("--actor", "alice", "clients", "revoke", "checkout", "--yes", "-o", "json"),
        ("--actor", "bob", "clients", "revoke", "checkout", "--yes", "-o", "json"),
    )
    assert first.exit_code == 0, first.stderr
    assert second.exit_code == 1
    assert "Error: client 'checkout' was already revoked at " in second.stderr
    shown = json.loads(ctl(db_url, "clients", "list", "-o", "json").stdout)
    assert shown[0]["revoked_at"] == json.loads(first.stdout)["revoked_at"]
    audit = json.loads(ctl(db_url, "audit", "list", "-o", "json").stdout)
    assert [(e["actor"], e["action"]) for e in audit] == [("alice", "revoke"), ("tester", "create")]


THRESHOLD = ("--policy", "threshold", "--param", "t=0.5", "--param", "d=10")
VARIANTS = ("--variant", "control:50", "--variant", "t:50")


def test_a_segment_deleted_while_a_rule_names_it_fails_one_with_a_clear_reason(
    db_url: str,
) -> None:
    """Each read before the other wrote: the one that lost failed on the foreign key, as the
    driver's 'violates foreign key constraint "fk_rules_segment_id_segments"'."""
    ok(db_url, "segments", "create", "lapsed")
    delete, create = race(
        db_url,
        ("segments", "delete", "lapsed", "--yes"),
        ("rules", "create", "win-back", "--segment", "lapsed", *THRESHOLD),
    )
    assert delete.exit_code == 0, delete.stderr
    assert create.exit_code == 1
    assert create.stderr == "Error: no segment named 'lapsed'; see `discountctl segments list`\n"
    ok(db_url, "segments", "create", "lapsed")
    create, delete = race(
        db_url,
        ("rules", "create", "win-back", "--segment", "lapsed", *THRESHOLD),
        ("segments", "delete", "lapsed", "--yes"),
    )
    assert create.exit_code == 0, create.stderr
    assert delete.exit_code == 1
    assert "Error: segment 'lapsed' is used by rule 'win-back'; change or delete" in delete.stderr
    ok(db_url, "segments", "create", "churned")
    create, delete = race(
        db_url,
        ("experiments", "create", "ab", "--target-segment", "churned", *VARIANTS),
        ("segments", "delete", "churned", "--yes"),
    )
    assert create.exit_code == 0, create.stderr
    assert "Error: segment 'churned' is used by draft experiment 'ab'" in delete.stderr


def test_a_rule_deleted_while_an_experiment_names_it_fails_one_with_a_clear_reason(
    db_url: str,
) -> None:
    """As for segments: the loser failed on the foreign key, in the driver's words."""
    with_rule = ("--variant", "control:50", "--variant", "treated:50:win-back")
    ok(db_url, "rules", "create", "win-back", *THRESHOLD)
    delete, create = race(
        db_url,
        ("rules", "delete", "win-back", "--yes"),
        ("experiments", "create", "ab", *with_rule),
    )
    assert delete.exit_code == 0, delete.stderr
    assert create.exit_code == 1
    assert create.stderr == "Error: no rule named 'win-back'; see `discountctl rules list`\n"
    ok(db_url, "rules", "create", "win-back", *THRESHOLD)
    create, delete = race(
        db_url,
        ("experiments", "create", "ab", *with_rule),
        ("rules", "delete", "win-back", "--yes"),
    )
    assert create.exit_code == 0, create.stderr
    assert delete.exit_code == 1
    assert "Error: rule 'win-back' is a variant of experiment(s) 'ab'" in delete.stderr


def test_two_updates_of_one_drafts_variants_at_once_follow_each_other(db_url: str) -> None:
    """Both read the draft before either wrote: the second's --if-version passed on what it had
    read, and it then failed on the variant rows the first had just replaced (a generic
    conflict or a unique constraint, after an SQLAlchemy warning on stderr), where the stale
    version must be named, as it is without --if-version too (docs/ADMIN.md: the loser of a
    race gets a conflict)."""
    for name in ("a", "b"):
        ok(db_url, "rules", "create", name, *THRESHOLD)
    ok(db_url, "experiments", "create", "ab", *VARIANTS)
    program = ("--variant", "control:50", "--variant", "t:50:a", "--variant", "t:50:b")
    one = ("--variant", "control:50", "--variant", "t:50:b")
    first, second = race(
        db_url,
        ("--actor", "alice", "experiments", "update", "ab", "--if-version", "1", *program),
        ("--actor", "bob", "experiments", "update", "ab", "--if-version", "1", *one),
    )
    assert first.exit_code == 0, first.stderr
    assert second.exit_code == 1
    assert second.stderr == (
        "Error: experiment 'ab' is at version 2, not 1: someone changed it since you read it; "
        "show it again and retry\n"
    )
    shown = json.loads(ctl(db_url, "experiments", "show", "ab", "-o", "json").stdout)
    assert shown["variants"][1] == {"name": "t", "weight": 50, "rules": ["a", "b"]}
    # Without --if-version, as a rule's update: the loser is refused, and nothing it wrote stays.
    first, second = race(
        db_url,
        ("--actor", "alice", "experiments", "update", "ab", *VARIANTS),
        ("--actor", "bob", "experiments", "update", "ab", *one),
    )
    assert first.exit_code == 0, first.stderr
    assert second.exit_code == 1
    assert second.stderr == (
        "Error: experiment 'ab' is at version 3, not 2: someone changed it since you read it; "
        "show it again and retry\n"
    )
    shown = json.loads(ctl(db_url, "experiments", "show", "ab", "-o", "json").stdout)
    assert (shown["version"], [v["rules"] for v in shown["variants"]]) == (3, [[], []])
    audit = json.loads(ctl(db_url, "audit", "list", "--name", "ab", "-o", "json").stdout)
    assert [e["actor"] for e in audit] == ["alice", "alice", "tester"]
