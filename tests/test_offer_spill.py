"""Spilled offers: what a stop could not write goes to a file and back into the store, exactly.

The process-level path (SIGTERM during an outage, then a new start) is in test_chaos_sigterm;
these check the file itself against a real SQLite store."""

from __future__ import annotations

import fcntl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pg import pg_database
from sqlalchemy import select

from core.store import migrate
from core.store.db import Store
from core.store.tables import Offer
from server.offer_log import OfferLog


@pytest.fixture
def store(tmp_path: Path) -> Any:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    migrate.upgrade(store)
    yield store
    store.dispose()


def _row(offer_id: str, item_id: str = "item-1") -> dict[str, Any]:
    issued = datetime(2026, 11, 29, 12, 0, 0, 123456, tzinfo=UTC)
    return {
        "offer_id": offer_id, "user_id": "user-é", "item_id": item_id, "rule_id": None,
        "segment": "vip", "experiment_key": "exp", "variant": "B", "base_price": 19.99,
        "discount_pct": 12.5, "final_price": 17.49, "model_version": "v1",
        "reason_codes": ["rule:all", "uplift:+0.031"], "issued_at": issued,
        "expires_at": issued + timedelta(minutes=15),
        # What a response model learns from (migration 0006), the user's features at the ends
        # of what a float holds: JSON and back, every digit kept.
        "cf_score": -0.1, "rank": 3, "cost": 8.125, "propensity": 1 / 3,
        "user_features": {"order_count": 1.7976931348623157e308, "lifetime_value": 5e-324,
                          "avg_basket": 19.99},
    }  # fmt: skip


def _stored(store: Store) -> dict[str, dict[str, Any]]:
    with store.transaction() as session:
        return {
            o.offer_id: {c.name: getattr(o, c.name) for c in Offer.__table__.columns}
            for o in session.scalars(select(Offer))
        }


def test_spilled_offers_come_back_as_they_were_issued(store: Store, tmp_path: Path) -> None:
    rows = [_row(f"offer-{n}") for n in range(3)]
    direct = OfferLog(store)
    direct.append([_row("reference")])
    direct._write(list(direct._pending))  # the same row, written the usual way
    spilling = OfferLog(store)
    spilling.append(rows)
    path = spilling.spill(tmp_path / "spill")
    assert path is not None and spilling.pending == 0
    assert path.stat().st_mode & 0o777 == 0o600  # users and prices: the server's user alone
    assert OfferLog(store).replay(tmp_path / "spill") == 3
    assert not path.exists()
    stored = _stored(store)
    reference = {k: v for k, v in stored["reference"].items() if k != "offer_id"}
    assert reference == {k: v for k, v in _row("reference").items() if k != "offer_id"}
    for row in rows:
        assert {k: v for k, v in stored[row["offer_id"]].items() if k != "offer_id"} == reference
    assert OfferLog(store).spill(tmp_path / "spill") is None  # nothing queued, no file


def test_a_file_that_is_not_a_spill_file_is_left_alone_and_the_rest_written(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spill = tmp_path / "spill"
    log = OfferLog(store)
    log.append([_row("good")])
    good = log.spill(spill)
    broken = spill / "offers-0-broken.jsonl"
    broken.write_text('{"offer_id": "half a line\n')
    assert OfferLog(store).replay(spill) == 1
    assert good is not None and not good.exists()
    assert broken.exists() and "is not a spill file, left as it is" in caplog.text
    assert set(_stored(store)) == {"good"}


def test_a_file_another_worker_is_replaying_is_left_to_it(store: Store, tmp_path: Path) -> None:
    log = OfferLog(store)
    log.append([_row("taken")])
    path = log.spill(tmp_path / "spill")
    assert path is not None
    with path.open() as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert OfferLog(store).replay(tmp_path / "spill") == 0
    assert path.exists() and _stored(store) == {}


@pytest.mark.postgres
def test_a_spilled_row_the_store_refuses_is_dropped_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An item id past its column: PostgreSQL refuses it (SQLite would not)."""
    with pg_database() as url:
        store = Store(url)
        try:
            migrate.upgrade(store)
            log = OfferLog(store)
            log.append([_row("fine"), _row("poison", item_id="i" * 200), _row("also-fine")])
            log.spill(tmp_path / "spill")
            replaying = OfferLog(store)
            replaying.replay(tmp_path / "spill")
            assert set(_stored(store)) == {"fine", "also-fine"} and replaying.dropped == 1
        finally:
            store.dispose()
    assert "offer poison dropped, the store refuses it" in caplog.text
    assert list((tmp_path / "spill").iterdir()) == []
