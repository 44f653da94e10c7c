"""PostgreSQL becomes unreachable under a running server, then comes back.

The machine's PostgreSQL is shared with other tests, so the outage is of a dedicated database:
it stops accepting connections and its sessions are terminated; then it accepts them again.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from offer_server import OfferServer, ctl, eventually, ten_percent_off_everything
from pg import hanging_proxy, pg_database
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from core.store import migrate
from core.store.db import Store, mask_url
from core.store.tables import Offer
from discount.v1 import discount_pb2 as pb
from server import snapshot

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def set_reachable(url: str, reachable: bool) -> None:
    name = make_url(url).database
    admin = create_engine(make_url(url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(
                text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(reachable).lower()}')
            )
            if not reachable:
                conn.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                    ),
                    {"n": name},
                )
    finally:
        admin.dispose()


def offer_ids(url: str) -> set[str]:
    store = Store(url)
    try:
        with store.transaction() as session:
            return set(session.scalars(select(Offer.offer_id)))
    finally:
        store.dispose()


def stale_info(running: OfferServer) -> pb.GetModelInfoResponse | None:
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    return None if info.snapshot_fresh else info


def rules_health(running: OfferServer) -> int:
    stub = health_pb2_grpc.HealthStub(running.channel)
    request = health_pb2.HealthCheckRequest(service="discountd.rule_snapshot")
    return int(stub.Check(request).status)


def click(event_id: str) -> pb.Event:
    return pb.Event(event_id=event_id, type=pb.EVENT_TYPE_CLICK, user_id="user-0", item_id="00001")


def test_store_outage_serves_from_snapshot_refuses_events_and_recovers(
    model_store: Path,
) -> None:
    with pg_database() as url:
        ten_percent_off_everything(url)
        running = OfferServer(model_store, url, rules_poll_interval=0.2)
        try:
            request = pb.GetOffersRequest(user_id="user-0", limit=2)
            assert running.stub.GetOffers(request).offers[0].final_price_cents == 900
            set_reachable(url, False)
            try:
                info = eventually(lambda: stale_info(running), 10.0)
                # Which one the refresher meets first depends on timing: the kill of its open
                # connection, or the refusal of its next one.
                assert any(
                    why in info.store_error
                    for why in ("not currently accepting connections", "terminating connection")
                )
                assert mask_url(url) in info.store_error
                assert rules_health(running) == NOT_SERVING
                # The last good rules still price offers; the offer log keeps them for later.
                offers = running.stub.GetOffers(request).offers
                assert [o.final_price_cents for o in offers] == [900, 900]
                assert running.server.offering.log.pending >= 2
                with pytest.raises(grpc.RpcError) as e:
                    running.stub.RecordEvents(pb.RecordEventsRequest(events=[click("e1")]))
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "retry it with the same event ids" in (e.value.details() or "")
            finally:
                set_reachable(url, True)
            eventually(
                lambda: running.stub.GetModelInfo(pb.GetModelInfoRequest()).snapshot_fresh, 10.0
            )
            response = running.stub.RecordEvents(pb.RecordEventsRequest(events=[click("e1")]))
            assert response.results[0].status == pb.EVENT_STATUS_ACCEPTED
            info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
            assert info.store_error == "" and info.snapshot_age_seconds < 10
            assert rules_health(running) == SERVING
            # Offers issued during the outage reach the store without a restart.
            eventually(lambda: running.server.offering.log.pending == 0, 10.0)
            assert offer_ids(url) >= {o.offer_id for o in offers}
        finally:
            running.close()


def test_a_lost_listen_connection_refreshes_at_once_and_shows_the_outage(
    model_store: Path,
) -> None:
    """With NOTIFY doing the work the poll can be minutes apart; a store gone meanwhile looked
    fresh until the next poll."""
    with pg_database() as url:
        ten_percent_off_everything(url)
        running = OfferServer(model_store, url, rules_poll_interval=300)
        try:
            set_reachable(url, False)
            try:
                assert eventually(lambda: stale_info(running), 10.0) is not None
            finally:
                set_reachable(url, True)
            eventually(
                lambda: running.stub.GetModelInfo(pb.GetModelInfoRequest()).snapshot_fresh, 10.0
            )
        finally:
            running.close()


@pytest.mark.parametrize("replaced", [False, True])
def test_an_sqlite_file_moved_away_is_an_outage_not_a_new_store(
    model_store: Path, tmp_path: Path, replaced: bool
) -> None:
    """SQLite made a new empty file where the store had been, and pooled connections went on
    writing offers into the moved (or deleted) one: health said all was well while the offers
    were lost. Moving it back ends the outage; an empty file put in its place is not the store
    either (no tables: still an outage, and the offers wait)."""
    db = tmp_path / "discount.db"
    url = ten_percent_off_everything(f"sqlite:///{db}")
    running = OfferServer(model_store, url, rules_poll_interval=0.2)
    try:
        request = pb.GetOffersRequest(user_id="user-0", limit=2)
        assert running.stub.GetOffers(request).offers[0].final_price_cents == 900
        moved = tmp_path / "moved.db"
        db.rename(moved)
        if replaced:
            db.touch()
        info = eventually(lambda: stale_info(running), 10.0)
        assert rules_health(running) == NOT_SERVING
        assert db.exists() == replaced  # not made again by the server
        offers = running.stub.GetOffers(request).offers
        assert [o.final_price_cents for o in offers] == [900, 900]
        eventually(lambda: running.server.offering.log.pending >= 2, 10.0)
        why = "no such table" if replaced else "the file does not exist (moved or deleted?)"
        assert why in info.store_error
        moved.replace(db)
        eventually(lambda: running.server.offering.log.pending == 0, 10.0)
        assert offer_ids(url) >= {o.offer_id for o in offers}
        eventually(lambda: rules_health(running) == SERVING, 10.0)
    finally:
        running.close()


def test_a_store_that_hangs_instead_of_refusing_makes_the_snapshot_stale(
    model_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A frozen host or a network that drops packets answers nothing, and the server's statement
    # timeout cannot fire: the refresh waited for minutes while the snapshot, ever older, was
    # reported fresh in GetModelInfo and in health. The server reaches the store through a proxy
    # that stops passing bytes (no error, no close), as such a host does.
    with pg_database() as url, hanging_proxy(url) as proxy:
        store = Store(url)
        migrate.upgrade(store)
        store.dispose()
        # 0.5 s, not 15 s, from the start: a refresh begun before the change would keep 15 s.
        monkeypatch.setattr(snapshot, "STALL_S", 0.5)
        running = OfferServer(model_store, proxy.url, rules_poll_interval=0.2)
        try:
            proxy.hang()
            info = eventually(lambda: stale_info(running), 10.0)
            assert "no answer in 0.5s" in info.store_error
            assert mask_url(proxy.url) in info.store_error
            assert rules_health(running) == NOT_SERVING
            proxy.resume()
            eventually(
                lambda: running.stub.GetModelInfo(pb.GetModelInfoRequest()).snapshot_fresh, 10.0
            )
            assert rules_health(running) == SERVING
        finally:
            proxy.resume()
            running.close()


def test_a_refresh_that_fails_on_the_data_makes_the_snapshot_stale(
    model_store: Path, tmp_path: Path
) -> None:
    """A refresh that fails on what the store holds rather than on reaching it (here a budget
    SQLite keeps as text) kept the last rules while health said they were fresh."""
    url = ten_percent_off_everything(f"sqlite:///{tmp_path / 'discount.db'}")
    ctl(url, "rules", "update", "all", "--budget", "100")
    running = OfferServer(model_store, url, rules_poll_interval=0.2)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("UPDATE rules SET budget = 'abc'"))
        info = eventually(lambda: stale_info(running), 10.0)
        assert rules_health(running) == NOT_SERVING
        assert "cannot be read" in info.store_error and "InvalidOperation" in info.store_error
        request = pb.GetOffersRequest(user_id="user-0", limit=1)
        assert running.stub.GetOffers(request).offers[0].final_price_cents == 900
        with engine.begin() as conn:
            conn.execute(text("UPDATE rules SET budget = 100"))
        eventually(lambda: rules_health(running) == SERVING, 10.0)
    finally:
        running.close()
        engine.dispose()


def test_rules_that_cannot_be_read_log_their_traceback_once_not_at_every_refresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The refresher retries every --rules-poll-interval (5 s): a traceback each time would be
    17,280 a day for one bad value, burying the logs; the snapshot stays stale all along."""
    url = ten_percent_off_everything(f"sqlite:///{tmp_path / 'discount.db'}")
    ctl(url, "rules", "update", "all", "--budget", "100")
    store = Store(url)
    keeper = snapshot.SnapshotKeeper(store, 0)
    try:
        keeper.open()
        with store.engine.begin() as conn:
            conn.execute(text("UPDATE rules SET budget = 'abc'"))

        async def refresh_thrice() -> list[bool]:
            return [await keeper.refresh() for _ in range(3)]

        with caplog.at_level(logging.ERROR, logger=snapshot.__name__):
            assert asyncio.run(refresh_thrice()) == [False, False, False]
    finally:
        store.dispose()
    assert not keeper.fresh and "cannot be read: InvalidOperation" in keeper.error
    assert sum(r.exc_info is not None for r in caplog.records) == 1
    assert sum("rule snapshot stale" in r.getMessage() for r in caplog.records) == 1
