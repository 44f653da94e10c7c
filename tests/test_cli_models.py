"""discountctl models: register verifies the manifest's sha256s; promote; rollback."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli import ctl, race, row_counts
from offer_server import eventually
from pg import pg_database
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.artifact import REQUIRED_FILES, Manifest, load_manifest, seal
from core.store.db import Store
from core.store.errors import Conflict
from core.store.model_versions import ModelVersions


def _version(root: Path, name: str) -> Path:
    """A sealed version folder; registration checks the manifest, not what the graph computes."""
    folder = root / name
    folder.mkdir()
    for file in REQUIRED_FILES:
        (folder / file).write_bytes(f"{file} of {name}".encode())
    (folder / "model.onnx").write_bytes(b"graph " + name.encode())
    (folder / "items.json").write_text('{"item_id": ["85123A"]}')
    (folder / "users.json").write_text('["17850"]')
    seal(
        folder,
        Manifest(
            version=name,
            created_at="2026-11-28T17:24:00Z",
            files={},
            n_users=1,
            n_items=1,
            n_categories=1,
            metrics={"recall@10": 0.25},
        ),
    )
    return folder


def _reseal_without(folder: Path, name: str) -> None:
    (folder / name).unlink()
    seal(folder, load_manifest(folder, verify=False))


def _rewrite(folder: Path, name: str, text: str) -> None:
    """A file changed and the version sealed again: the manifest vouches for the new text."""
    (folder / name).write_text(text)
    seal(folder, load_manifest(folder, verify=False))


def _list(folder: Path, name: str, same_as: str) -> None:
    """List name in the manifest with the sha256 of a file that is there."""
    raw = json.loads((folder / "manifest.json").read_text())
    raw["files"][name] = raw["files"][same_as]
    (folder / "manifest.json").write_text(json.dumps(raw))


def _listed_twice(folder: Path, name: str) -> None:
    """List name twice in the manifest, the sha256 that matches last: Python's json alone keeps
    the last, and a reader that keeps the first sees another file."""
    path = folder / "manifest.json"
    path.write_text(path.read_text().replace('"files": {', f'"files": {{"{name}": "{"0" * 64}",'))


def run(url: str, *args: str) -> Any:
    result = ctl(url, "models", *args, "--output", "json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_file_no_reader_opens_does_not_make_a_version_unusable(
    db_url: str, tmp_path: Path
) -> None:
    folder = _version(tmp_path, "v1")
    (folder / "README.txt").write_text("trained for the spring sale")
    (folder / ".items.json.swp").write_bytes(b"editor")
    assert run(db_url, "register", str(folder))["status"] == "staged"


def test_register_promote_rollback(db_url: str, tmp_path: Path) -> None:
    for name in ("v1", "v2", "v3"):
        got = run(db_url, "register", str(_version(tmp_path, name)))
        assert (got["version"], got["status"], got["metrics"]) == (
            name,
            "staged",
            {"recall@10": 0.25},
        )
        assert got["path"] == str((tmp_path / name).resolve()) and len(got["manifest_sha256"]) == 64
    for name in ("v1", "v2", "v3"):
        assert run(db_url, "promote", name)["status"] == "active"
        assert (tmp_path / "CURRENT").read_text().strip() == name
    statuses = {m["version"]: m["status"] for m in run(db_url, "list")}
    assert statuses == {"v1": "retired", "v2": "retired", "v3": "active"}

    assert run(db_url, "rollback", "--yes")["version"] == "v2"
    assert (tmp_path / "CURRENT").read_text().strip() == "v2"
    assert run(db_url, "rollback", "--yes")["version"] == "v1"
    assert (tmp_path / "CURRENT").read_text().strip() == "v1"
    listed = {m["version"]: m for m in run(db_url, "list")}
    assert [listed[v]["status"] for v in ("v1", "v2", "v3")] == ["active", "retired", "retired"]
    assert listed["v3"]["rolled_back_at"] and listed["v2"]["rolled_back_at"]
    before = row_counts(db_url)
    result = ctl(db_url, "models", "rollback", "--yes")
    assert result.exit_code == 1 and "nothing to roll back to" in result.stderr
    assert "no version but 'v1' has been active, except ones rolled back from" in result.stderr
    assert row_counts(db_url) == before
    assert (tmp_path / "CURRENT").read_text().strip() == "v1"

    # A version rolled back from may be promoted again on purpose.
    assert run(db_url, "promote", "v3")["status"] == "active"
    assert run(db_url, "rollback", "--yes")["version"] == "v1"
    actions = [
        e["action"]
        for e in json.loads(
            ctl(db_url, "audit", "list", "--entity-type", "model", "-o", "json").stdout
        )
    ]
    assert actions[:3] == ["rollback", "promote", "rollback"] and actions.count("register") == 3


def test_a_current_the_registry_did_not_set_is_pointed_out(db_url: str, tmp_path: Path) -> None:
    """`discount-train fit` points CURRENT at what it trains: discountd serves that, while the
    registry still names the version it last promoted."""
    run(db_url, "register", str(_version(tmp_path, "v1")))
    run(db_url, "promote", "v1")
    assert "warning" not in ctl(db_url, "models", "list").stderr
    _version(tmp_path, "v2")
    (tmp_path / "CURRENT").write_text("v2\n")  # as fit writes it
    warning = (
        f"warning: {tmp_path / 'CURRENT'} names 'v2', not the registry's active version 'v1', "
        "and discountd serves what it names"
    )
    assert warning in ctl(db_url, "models", "list").stderr
    simulated = ctl(db_url, "rules", "simulate", "--user", "u1")
    assert warning in simulated.stderr  # it prices with the registry's version, not the served
    refused = ctl(db_url, "models", "rollback", "--yes")
    assert warning in refused.stderr and "nothing to roll back to" in refused.stderr
    run(db_url, "register", str(tmp_path / "v2"))
    run(db_url, "promote", "v2")
    assert "warning" not in ctl(db_url, "models", "list").stderr


def test_a_model_store_left_behind_is_named(db_url: str, tmp_path: Path) -> None:
    """CURRENT can name only a folder beside it: promoting a version of another model store
    leaves the old store's servers where they were, and the admin hears it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    run(db_url, "register", str(_version(tmp_path / "a", "v1")))
    run(db_url, "register", str(_version(tmp_path / "b", "v2")))
    assert "note" not in ctl(db_url, "models", "promote", "v1").stderr
    promoted = ctl(db_url, "models", "promote", "v2")
    assert (
        f"note: {tmp_path / 'a' / 'CURRENT'} still names 'v1', which servers started with "
        f"--model-dir {tmp_path / 'a'} keep serving"
    ) in promoted.stderr
    back = ctl(db_url, "models", "rollback", "--yes")
    assert f"note: {tmp_path / 'b' / 'CURRENT'} still names 'v2'" in back.stderr
    assert (tmp_path / "a" / "CURRENT").read_text().strip() == "v1"


def test_rollback_asks_first(db_url: str, tmp_path: Path) -> None:
    run(db_url, "register", str(_version(tmp_path, "v1")))
    run(db_url, "promote", "v1")
    result = ctl(db_url, "models", "rollback")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: Roll back from model version 'v1'? Not asked: no terminal; pass --yes to confirm"
    ]


@pytest.mark.parametrize(
    ("tamper", "fragment"),
    [
        (
            lambda d: (d / "model.onnx").write_bytes(b"changed"),
            "model.onnx does not match its sha256",
        ),
        (lambda d: (d / "items.json").unlink(), "items.json listed in the manifest is missing"),
        (lambda d: (d / "manifest.json").write_text("{"), "unreadable manifest"),
        (
            lambda d: _listed_twice(d, "model.onnx"),
            "unreadable manifest: key 'model.onnx' is given twice; give it once",
        ),
        # Files a reader opens but the manifest does not vouch for.
        (lambda d: _reseal_without(d, "score.onnx"), "does not list score.onnx"),
        (
            lambda d: (d / "user_features.json").write_text("{}"),
            "user_features.json not listed in the manifest",
        ),
        (
            lambda d: _list(d, "../v1/model.onnx", "model.onnx"),
            "manifest lists '../v1/model.onnx', not a file of the folder",
        ),
        # Sealed, yet unreadable: discountd could not price from it, the report crashed on it.
        (
            lambda d: _rewrite(d, "items.json", '{"item_id": ["A", "B"], "cost": [6]}'),
            "items.json has 2 item ids but not as many cost (1)",
        ),
        (
            lambda d: _rewrite(d, "items.json", '{"item_id": ["A"], "price": {"A": 1}}'),
            "not as many price (not a list)",
        ),
        (
            lambda d: _rewrite(
                d, "user_features.json", '{"columns": ["order_count"], "rows": [[]]}'
            ),
            "malformed user_features.json",
        ),
    ],
)
def test_register_refuses_a_version_that_does_not_match_its_manifest(
    db_url: str, tmp_path: Path, tamper: Callable[[Path], object], fragment: str
) -> None:
    folder = _version(tmp_path, "v1")
    tamper(folder)
    result = ctl(db_url, "models", "register", str(folder))
    assert result.exit_code == 1 and fragment in result.stderr
    assert row_counts(db_url)["model_versions"] == 0


def test_registering_the_model_store_names_the_version_folder_to_give(
    db_url: str, tmp_path: Path
) -> None:
    """`fit --out var/models` prints the store; the version to register is a folder in it."""
    store = tmp_path / "models"
    store.mkdir()
    _version(store, "v1")
    (store / "CURRENT").write_text("v1\n")
    result = ctl(db_url, "models", "register", str(store))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: not a valid model version: {store} is a model store (it has CURRENT); "
        f"give a version folder in it, e.g. {store / 'v1'}"
    ]
    assert row_counts(db_url)["model_versions"] == 0


def test_promoting_a_version_never_registered_says_to_register_it(
    db_url: str, tmp_path: Path
) -> None:
    result = ctl(db_url, "models", "promote", "v1")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "Error: no model version 'v1' is registered; `discountctl models register DIR` "
        "registers the version folder DIR, `discountctl models list` shows those registered"
    ]


def test_register_twice_and_promote_after_tampering_are_refused(
    db_url: str, tmp_path: Path
) -> None:
    folder = _version(tmp_path, "v1")
    run(db_url, "register", str(folder))
    again = ctl(db_url, "models", "register", str(folder))
    assert again.exit_code == 1 and "already registered" in again.stderr
    (folder / "model.onnx").write_bytes(b"swapped after registration")
    result = ctl(db_url, "models", "promote", "v1")
    assert result.exit_code == 1 and "does not match its sha256" in result.stderr
    assert run(db_url, "list")[0]["status"] == "staged"


def test_rollback_refuses_a_version_whose_files_changed(db_url: str, tmp_path: Path) -> None:
    """Rollback re-verifies like promote: a server would refuse the files, so the registry and
    CURRENT must not move to them either."""
    for name in ("v1", "v2"):
        run(db_url, "register", str(_version(tmp_path, name)))
        run(db_url, "promote", name)
    (tmp_path / "v1" / "model.onnx").write_bytes(b"overwritten since")
    result = ctl(db_url, "models", "rollback", "--yes")
    assert result.exit_code == 1
    assert "cannot roll back to 'v1'" in result.stderr
    assert "model.onnx does not match its sha256" in result.stderr
    statuses = {m["version"]: m["status"] for m in run(db_url, "list")}
    assert statuses == {"v1": "retired", "v2": "active"}
    assert (tmp_path / "CURRENT").read_text().strip() == "v2"


def lock_waits(url: str) -> int:
    """Sessions of url's database waiting on a lock, as PostgreSQL sees them."""
    admin = create_engine(make_url(url).set(database="postgres"))
    try:
        with admin.connect() as conn:
            query = text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = :name AND wait_event_type = 'Lock'"
            )
            return int(conn.scalar(query, {"name": make_url(url).database}) or 0)
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_two_racing_promotions_leave_one_version_active(tmp_path: Path) -> None:
    """The second promote waits on the first's lock of the version both retire, then would go
    on and commit a second active version; the database's one-active index refuses it."""
    with pg_database() as url:
        assert ctl(url, "db", "upgrade").exit_code == 0
        for name in ("v1", "v2", "v3"):
            run(url, "register", str(_version(tmp_path, name)))
        run(url, "promote", "v1")
        first, second = Store(url), Store(url)
        outcome: list[BaseException | None] = []

        def promote_v3() -> None:
            try:
                with second.transaction() as s:
                    ModelVersions(s, "bob").promote("v3")
                outcome.append(None)
            except BaseException as e:
                outcome.append(e)

        with first.transaction() as s:
            ModelVersions(s, "alice").promote("v2")  # flushed, not committed
            racing = threading.Thread(target=promote_v3)
            racing.start()
            # Seen from the server, not guessed from a pause: bob's session waits on a lock
            # (that is, on alice's open transaction), and bob has no outcome yet.
            eventually(lambda: lock_waits(url) or not racing.is_alive(), 30.0)
            assert racing.is_alive() and lock_waits(url) == 1, (
                f"bob's promote should wait for alice's transaction: {outcome}"
            )
        racing.join(timeout=30)
        assert isinstance(outcome[0], Conflict), outcome
        assert "another model version was activated at the same time" in str(outcome[0])
        statuses = {m["version"]: m["status"] for m in run(url, "list")}
        assert statuses == {"v1": "retired", "v2": "active", "v3": "staged"}
        first.dispose()
        second.dispose()


@pytest.mark.postgres
def test_one_version_promoted_or_rolled_back_twice_at_once_changes_once(tmp_path: Path) -> None:
    """Two admins promote the same version, or both roll back, at the same moment: both
    succeeded, writing two audit entries for one change (the second's before saying the
    version was staged), the promote moving activated_at to the second's time."""
    with pg_database() as url:
        assert ctl(url, "db", "upgrade").exit_code == 0
        for name in ("v1", "v2"):
            run(url, "register", str(_version(tmp_path, name)))
        run(url, "promote", "v1")
        first, second = race(
            url,
            ("--actor", "alice", "models", "promote", "v2", "-o", "json"),
            ("--actor", "bob", "models", "promote", "v2", "-o", "json"),
        )
        assert first.exit_code == 0, first.stderr
        assert second.exit_code == 1
        assert second.stderr == "Error: model version 'v2' is already active\n"
        first, second = race(
            url,
            ("--actor", "alice", "models", "rollback", "--yes"),
            ("--actor", "bob", "models", "rollback", "--yes"),
        )
        assert first.exit_code == 0, first.stderr
        assert second.exit_code == 1
        assert (
            "Error: model version 'v1' became active since rollback from 'v2' was asked for; "
            "nothing was changed"
        ) in second.stderr
        audit = json.loads(ctl(url, "audit", "list", "-o", "json").stdout)
        assert [(e["actor"], e["action"], e["entity_name"]) for e in audit[:2]] == [
            ("alice", "rollback", "v1"),
            ("alice", "promote", "v2"),
        ]
        statuses = {m["version"]: m["status"] for m in run(url, "list")}
        assert statuses == {"v1": "active", "v2": "retired"}


def test_rollback_rolls_back_only_from_the_version_it_confirmed(
    db_url: str, tmp_path: Path
) -> None:
    """A colleague's promote while the prompt waits: the rollback confirmed for v2 must not
    retire v3 and bring back v2."""
    for name in ("v1", "v2", "v3"):
        run(db_url, "register", str(_version(tmp_path, name)))
    run(db_url, "promote", "v1")
    run(db_url, "promote", "v2")
    run(db_url, "promote", "v3")  # after `rollback` read v2 as active, before it wrote
    store = Store(db_url)
    try:
        with (
            pytest.raises(Conflict, match="'v3' became active since rollback from 'v2'"),
            store.transaction() as session,
        ):
            ModelVersions(session, "alice").rollback(expected="v2")
    finally:
        store.dispose()
    statuses = {v["version"]: v["status"] for v in run(db_url, "list")}
    assert statuses == {"v1": "retired", "v2": "retired", "v3": "active"}
    assert run(db_url, "rollback", "--yes")["version"] == "v2"  # asked again: from v3


def test_rollback_with_nothing_active_says_so(db_url: str, tmp_path: Path) -> None:
    result = ctl(db_url, "models", "rollback", "--yes")
    assert result.exit_code == 1
    assert result.stderr.strip() == "Error: no active model version to roll back from"


def test_promote_names_the_running_experiments_whose_targets_it_moves_users_across(
    db_url: str, tmp_path: Path
) -> None:
    """Condition targets are judged on the serving version's user features: a version whose
    features differ moves users in or out of an experiment mid-flight."""
    for name, orders in (("v1", 5), ("v2", 0), ("v3", 7)):
        folder = _version(tmp_path, name)
        _rewrite(
            folder, "user_features.json", f'{{"columns": ["order_count"], "rows": [[{orders}]]}}'
        )
        run(db_url, "register", str(folder))
    run(db_url, "promote", "v1")
    ctl(db_url, "segments", "create", "regulars", "--where", "order_count >= 1")
    ctl(db_url, "experiments", "create", "ab", "--variant", "a:50", "--variant", "b:50",
        "--target-segment", "regulars")  # fmt: skip
    ctl(db_url, "experiments", "start", "ab")
    moved = ctl(db_url, "models", "promote", "v2")
    assert "counting the known users this version moves in or out of 1 running" in moved.stderr
    assert (
        "note: running experiment 'ab' targets segment 'regulars', judged on the serving "
        "version's user features: 1 known user(s) move in or out of it" in moved.stderr
    )
    back = ctl(db_url, "models", "rollback", "--yes")
    assert "1 known user(s) move" in back.stderr
    same = ctl(db_url, "models", "promote", "v3")  # 5 orders or 7: a regular either way
    assert same.exit_code == 0 and "note: running experiment" not in same.stderr
