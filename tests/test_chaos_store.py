"""Faults in the store under a real server: an outage during mixed load, a lock held on the
events table, and the limits that keep calls from piling up while the store is slow.

PostgreSQL is shared with other tests, so every fault is of this module's own database:
it stops accepting connections (test_offers_outage.set_reachable), or a table is locked.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from offer_server import eventually, ten_percent_off_everything
from pg import pg_database
from secure_server import KEY
from sqlalchemy import create_engine, select, text
from test_offers_outage import set_reachable

from core.offer_token import OfferKeys
from core.store import events
from core.store.db import Store
from core.store.tables import Event, Offer
from discount.v1 import discount_pb2 as pb
from server import limits
from server.limits import MAX_ID_CHARS
from server.offer_log import BATCH
from tests.conftest import RunningServer

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]
ACKED = (pb.EVENT_STATUS_ACCEPTED, pb.EVENT_STATUS_DUPLICATE)


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with pg_database() as url:
        ten_percent_off_everything(url)
        yield url


@pytest.fixture
def start(model_store: Path, url: str) -> Iterator[type[RunningServer]]:
    started: list[RunningServer] = []

    class Started(RunningServer):
        def __init__(self, **settings: object) -> None:
            super().__init__(
                model_store,
                db_url=url,
                offer_keys=OfferKeys(KEY),
                rules_poll_interval=0.2,
                batch_max_size=1,
                **settings,
            )
            started.append(self)
            self.wait_first_load()

    yield Started  # type: ignore[misc]
    for running in started:
        running.close()


def stored(url: str) -> tuple[Counter[str], set[str]]:
    """Rows per event id, and every offer id in the offers table."""
    store = Store(url)
    try:
        with store.transaction() as session:
            rows = Counter(session.scalars(select(Event.event_id)))
            return rows, set(session.scalars(select(Offer.offer_id)))
    finally:
        store.dispose()


def clicks(prefix: str, n: int) -> pb.RecordEventsRequest:
    return pb.RecordEventsRequest(
        events=[
            pb.Event(
                event_id=f"{prefix}-{k}",
                type=pb.EVENT_TYPE_CLICK,
                user_id="user-1",
                item_id=f"{k % 30:05d}",
            )
            for k in range(n)
        ]
    )


class Locked:
    """ACCESS EXCLUSIVE on discount.events, held by another session until release()."""

    def __init__(self, url: str) -> None:
        self.engine = create_engine(url)
        self.conn = self.engine.connect()
        self.conn.execute(text("LOCK TABLE discount.events IN ACCESS EXCLUSIVE MODE"))

    def release(self) -> None:
        self.conn.rollback()
        self.conn.close()
        self.engine.dispose()


def test_oversized_request_is_refused_and_the_server_keeps_serving(
    start: type[RunningServer],
) -> None:
    running = start()
    with pytest.raises(grpc.RpcError) as e:
        running.stub.GetOffers(pb.GetOffersRequest(user_id="u" * (5 * 1024 * 1024)))
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert running.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=2)).items


def test_full_offer_log_refuses_offers_instead_of_dropping_them(
    start: type[RunningServer], url: str
) -> None:
    running = start()
    log = running.server.offering.log
    request = pb.GetOffersRequest(user_id="user-0", limit=2)
    issued = {o.offer_id for o in running.stub.GetOffers(request).offers}
    log.max_pending = log.pending  # full: nothing more fits
    with pytest.raises(grpc.RpcError) as e:
        running.stub.GetOffers(request)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry later" in (e.value.details() or "")
    log.max_pending = 10
    issued |= {o.offer_id for o in running.stub.GetOffers(request).offers}
    eventually(lambda: log.pending == 0, 10.0)
    assert issued <= stored(url)[1]


def test_a_user_id_too_long_to_log_is_refused_and_the_log_keeps_flowing(
    start: type[RunningServer], url: str
) -> None:
    # Before the limit, a 129-character user id was handed offers whose rows PostgreSQL then
    # refused, and every offer queued behind them waited for a write that never succeeded.
    running = start()
    longest = "u" * MAX_ID_CHARS
    issued = {
        o.offer_id
        for o in running.stub.GetOffers(pb.GetOffersRequest(user_id=longest, limit=2)).offers
    }
    with pytest.raises(grpc.RpcError) as e:
        running.stub.GetOffers(pb.GetOffersRequest(user_id=longest + "u", limit=2))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_ID_CHARS} characters" in (e.value.details() or "")
    eventually(lambda: running.server.offering.log.pending == 0, 10.0)
    assert issued <= stored(url)[1]


def test_an_event_the_store_cannot_hold_is_rejected_alone(
    start: type[RunningServer], url: str
) -> None:
    # An offer_id of 65-128 characters (the column holds 64) or a revenue past the column's
    # Numeric(14, 2) passed the checks; PostgreSQL then refused the whole batch, which came back
    # UNAVAILABLE ("retry it") on every retry.
    running = start()
    events = [
        pb.Event(event_id="holdable", type=pb.EVENT_TYPE_CLICK, user_id="u", item_id="00001"),
        pb.Event(
            event_id="long-offer", type=pb.EVENT_TYPE_REDEMPTION, user_id="u", offer_id="o" * 65
        ),
        pb.Event(
            event_id="rich", type=pb.EVENT_TYPE_PURCHASE, user_id="u", item_id="00001",
            revenue_cents=10**14,
        ),
    ]  # fmt: skip
    reply = running.stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=10)
    assert [(r.status, r.reason.split(":")[0]) for r in reply.results] == [
        (pb.EVENT_STATUS_ACCEPTED, ""),
        (pb.EVENT_STATUS_REJECTED, "ID_TOO_LONG"),
        (pb.EVENT_STATUS_REJECTED, "REVENUE_TOO_LARGE"),
    ]
    rows = stored(url)[0]
    assert rows["holdable"] == 1 and "long-offer" not in rows and "rich" not in rows


def test_a_batch_the_store_refuses_is_internal_not_a_retry_forever(
    start: type[RunningServer], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A check missing (here: the offer_id width, loosened on purpose) lets PostgreSQL refuse
    the batch's data: a bug of ours that no resend can cure, so INTERNAL, not UNAVAILABLE."""
    monkeypatch.setitem(events.MAX_CHARS, "offer_id", 128)
    running = start()
    event = pb.Event(event_id="e", type=pb.EVENT_TYPE_REDEMPTION, user_id="u", offer_id="o" * 65)
    with pytest.raises(grpc.RpcError) as refused:
        running.stub.RecordEvents(pb.RecordEventsRequest(events=[event]), timeout=10)
    assert refused.value.code() == grpc.StatusCode.INTERNAL
    assert "resending it will not help" in (refused.value.details() or "")
    assert "e" not in stored(url)[0]


def test_an_event_id_resent_with_other_content_is_rejected_not_a_silent_duplicate(
    start: type[RunningServer], url: str
) -> None:
    running = start()

    def purchase(
        event_id: str, item_id: str = "00001", cents: int = 1999, at: int = 1_700_000_000
    ) -> pb.Event:
        return pb.Event(
            event_id=event_id, type=pb.EVENT_TYPE_PURCHASE, user_id="u", item_id=item_id,
            revenue_cents=cents, occurred_at=at,
        )  # fmt: skip

    def verdicts(*events: pb.Event) -> list[tuple[int, str]]:
        reply = running.stub.RecordEvents(pb.RecordEventsRequest(events=events), timeout=10)
        return [(r.status, r.reason.split(":")[0]) for r in reply.results]

    first = verdicts(purchase("reuse-1"), purchase("reuse-2"), purchase("reuse-2", "00002"))
    assert first == [
        (pb.EVENT_STATUS_ACCEPTED, ""),
        (pb.EVENT_STATUS_ACCEPTED, ""),
        # The same id twice in one call, with another item: the second one is not stored.
        (pb.EVENT_STATUS_REJECTED, "EVENT_ID_REUSED"),
    ]
    again = verdicts(
        purchase("reuse-1", at=1_700_000_060),  # a true resend, stamped when it was sent
        purchase("reuse-2", cents=2999),  # another purchase under a used id
        purchase("reuse-2", cents=2999),  # and its repeat: never stored either
    )
    assert again == [
        (pb.EVENT_STATUS_DUPLICATE, ""),
        (pb.EVENT_STATUS_REJECTED, "EVENT_ID_REUSED"),
        (pb.EVENT_STATUS_REJECTED, "EVENT_ID_REUSED"),
    ]
    store = Store(url)
    try:
        with store.transaction() as session:
            kept = session.get(Event, "reuse-2")
            assert kept is not None and (kept.item_id, kept.revenue) == ("00001", 19.99)
    finally:
        store.dispose()


def test_replicas_storing_the_same_events_in_opposite_orders_do_not_deadlock(
    start: type[RunningServer], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two replicas, one store: a client's retry of a batch can reach the other replica while
    # the first still writes it, and batches that share ids need not list them in one order.
    # Rows were inserted in request order, so each insert held rows the other waited for, and
    # PostgreSQL killed one: UNAVAILABLE ("deadlock detected") from a store that was up.
    # Another session's uncommitted row in the middle of the batch stops both inserts there,
    # each holding its half, until it rolls back. The store timeouts are raised so that a busy
    # machine starting the second insert late does not end the first.
    monkeypatch.setattr(limits, "STORE_LOCK_TIMEOUT_MS", 30_000)
    monkeypatch.setattr(limits, "STORE_STATEMENT_TIMEOUT_MS", 30_000)
    replicas = [start(), start()]
    batch = clicks("both", 1000)
    reversed_batch = pb.RecordEventsRequest(events=list(reversed(batch.events)))
    engine = create_engine(url)
    middle = engine.connect()
    middle.execute(
        text(
            "INSERT INTO discount.events (event_id, type, user_id, item_id, occurred_at, "
            "received_at) VALUES ('both-500', 'click', 'user-1', '00020', now(), now())"
        )
    )
    try:
        with ThreadPoolExecutor(2) as pool:
            calls = [
                pool.submit(replica.stub.RecordEvents, request, timeout=30)
                for replica, request in zip(replicas, (batch, reversed_batch), strict=True)
            ]
            # Autocommit: within a transaction pg_stat_activity shows its first reading only.
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as watch:
                waiting = text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
                # Both inserts wait (on the middle row, or on each other).
                eventually(lambda: watch.execute(waiting).scalar() == 2, 10.0, step=0.01)
            middle.rollback()
            replies = [call.result() for call in calls]
    finally:
        middle.close()
        engine.dispose()
    statuses = Counter(r.status for reply in replies for r in reply.results)
    assert statuses == {pb.EVENT_STATUS_ACCEPTED: 1000, pb.EVENT_STATUS_DUPLICATE: 1000}
    rows = stored(url)[0]
    assert [rows[f"both-{k}"] for k in range(1000)] == [1] * 1000


def test_offer_log_retries_an_unreachable_store_at_its_interval_not_once_per_call(
    start: type[RunningServer], url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Once a full batch waited, every GetOffers woke the log, which tried a new connection to
    # the store per call all through an outage (600 in 3 s where the interval allows 6).
    running = start()
    log = running.server.offering.log
    writes: Counter[str] = Counter()
    write = log._write

    def counted(batch: list[dict[str, object]]) -> None:
        writes["tried"] += 1
        try:
            write(batch)
        except Exception:
            writes["failed"] += 1
            raise

    monkeypatch.setattr(log, "_write", counted)
    request = pb.GetOffersRequest(user_id="user-0", limit=5)
    issued: set[str] = set()
    set_reachable(url, False)
    try:
        log.interval = 3600.0  # from now on only a full batch wakes the log
        while log.pending < BATCH:
            issued |= {o.offer_id for o in running.stub.GetOffers(request).offers}
        eventually(lambda: writes["failed"] >= 1, 10.0)
        tried = writes["tried"]
        for _ in range(50):
            issued |= {o.offer_id for o in running.stub.GetOffers(request).offers}
        # At most one write woken while the failed one ran; then none until the interval.
        assert writes["tried"] - tried <= 1, writes
    finally:
        set_reachable(url, True)
    assert running.call(log.flush())
    assert issued <= stored(url)[1]


def test_an_offer_row_the_store_refuses_is_dropped_alone_not_retried_forever(
    start: type[RunningServer], url: str
) -> None:
    """A row the table cannot hold (a check upstream missing: here an item id past its column)
    failed its whole batch, taken for an outage and retried for good, holding back every
    offer behind it. Written row by row, only that row is lost, and it is logged."""
    running = start()
    log = running.server.offering.log
    now = datetime.now(UTC)
    row = {
        "offer_id": "poison", "user_id": "u", "item_id": "i" * 200, "rule_id": None,
        "segment": None, "experiment_key": None, "variant": None, "base_price": 10.0,
        "discount_pct": 0.0, "final_price": 10.0, "model_version": "v", "reason_codes": [],
        "issued_at": now, "expires_at": now,
    }  # fmt: skip
    log.append([row])
    issued = {
        o.offer_id
        for o in running.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=3)).offers
    }
    assert running.call(log.flush())
    assert log.dropped == 1 and log.pending == 0
    offers = stored(url)[1]
    assert issued <= offers and "poison" not in offers


def test_locked_events_table_fails_fast_bounded_and_recovers(
    start: type[RunningServer], url: str
) -> None:
    running = start(max_concurrent_rpcs=8)
    writes = running.server.offering.writes
    writes.max_waiting = 3
    lock = Locked(url)
    try:
        # A client deadline shorter than the server's lock timeout: the client gives up first.
        with pytest.raises(grpc.RpcError) as e:
            running.stub.RecordEvents(clicks("deadline", 1), timeout=0.5)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with ThreadPoolExecutor(6) as pool:
            calls = [
                pool.submit(running.stub.RecordEvents, clicks(f"locked-{n}", 1)) for n in range(6)
            ]
            # The store-write queue holds 3 (the abandoned call may still hold one); the rest
            # are refused at once. Meanwhile the other RPCs answer.
            assert running.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=2)).items
            assert running.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=2)).offers
            codes = Counter()
            for call in calls:
                try:
                    call.result()
                    codes["OK"] += 1
                except grpc.RpcError as error:
                    codes[error.code().name] += 1
        print(f"\nRecordEvents against a locked events table: {dict(codes)}")
        assert codes["RESOURCE_EXHAUSTED"] >= 3
        assert set(codes) <= {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
        # The server's lock timeout freed every store-write thread while the lock is still held.
        eventually(lambda: writes.unfinished == 0, 10.0)
    finally:
        lock.release()
    reply = running.stub.RecordEvents(clicks("after", 2), timeout=10)
    assert [r.status for r in reply.results] == [pb.EVENT_STATUS_ACCEPTED] * 2
    rows = stored(url)[0]
    assert not [i for i in rows if i.startswith(("deadline", "locked-"))]


def test_concurrent_call_cap_answers_resource_exhausted(
    start: type[RunningServer], url: str
) -> None:
    running = start(max_concurrent_rpcs=3)
    lock = Locked(url)
    try:
        with ThreadPoolExecutor(3) as pool:
            held = [
                pool.submit(running.stub.RecordEvents, clicks(f"held-{n}", 1)) for n in range(3)
            ]
            eventually(lambda: running.server.offering.writes.unfinished == 3, 10.0)
            with pytest.raises(grpc.RpcError) as e:
                running.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert e.value.details() == "3 calls in flight already; retry with backoff"
            # A busy server is not a dead one: its load balancer's probe still gets an answer.
            probe = health_pb2_grpc.HealthStub(running.channel)
            for _ in range(3):
                reply = probe.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            for call in held:
                with pytest.raises(grpc.RpcError) as held_error:
                    call.result()
                assert held_error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        lock.release()
    assert running.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version


def test_outage_during_mixed_load_loses_and_doubles_no_event(
    start: type[RunningServer], url: str
) -> None:
    running = start()
    stop = threading.Event()
    lock = threading.Lock()
    acked: Counter[str] = Counter()
    accepted: Counter[str] = Counter()  # ACCEPTED means "stored now": once per event id at most
    unacked: dict[str, pb.Event] = {}
    sent: list[pb.Event] = []
    codes: Counter[str] = Counter()

    def note(name: str) -> None:
        with lock:
            codes[name] += 1

    def reader(n: int) -> None:
        while not stop.is_set():
            try:
                if n % 2:
                    running.stub.Recommend(pb.RecommendRequest(user_id=f"user-{n}", limit=3))
                    note("Recommend OK")
                else:
                    running.stub.GetOffers(pb.GetOffersRequest(user_id=f"user-{n}", limit=2))
                    note("GetOffers OK")
            except grpc.RpcError as e:
                note(f"read {e.code().name}")

    def writer(n: int) -> None:
        batch = 0
        while not stop.is_set():
            batch += 1
            request = clicks(f"w{n}-{batch}", 5)
            with lock:
                sent.extend(request.events)
            try:
                reply = running.stub.RecordEvents(request, timeout=10)
            except grpc.RpcError as e:
                note(f"RecordEvents {e.code().name}")
                with lock:
                    unacked.update((e.event_id, e) for e in request.events)
                continue
            note("RecordEvents OK")
            with lock:
                acked.update(r.event_id for r in reply.results if r.status in ACKED)
                accepted.update(
                    r.event_id for r in reply.results if r.status == pb.EVENT_STATUS_ACCEPTED
                )
            time.sleep(0.01)

    workers = [threading.Thread(target=reader, args=(n,)) for n in range(2)]
    workers += [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for worker in workers:
        worker.start()
    try:
        eventually(lambda: codes["RecordEvents OK"] >= 10, 20.0)
        set_reachable(url, False)
        try:
            eventually(lambda: codes["RecordEvents UNAVAILABLE"] >= 3, 20.0)
            down = Counter(codes)
            eventually(lambda: codes["GetOffers OK"] > down["GetOffers OK"] + 2, 20.0)
            eventually(lambda: codes["Recommend OK"] > down["Recommend OK"] + 2, 20.0)
        finally:
            set_reachable(url, True)
        back = Counter(codes)
        eventually(lambda: codes["RecordEvents OK"] > back["RecordEvents OK"] + 10, 20.0)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=30)
    # What a client does after UNAVAILABLE: resend the same events; none may count twice.
    retried = list(unacked.values())
    for start_at in range(0, len(retried), 500):
        request = pb.RecordEventsRequest(events=retried[start_at : start_at + 500])
        reply = running.stub.RecordEvents(request, timeout=10)
        acked.update(r.event_id for r in reply.results if r.status in ACKED)
        accepted.update(r.event_id for r in reply.results if r.status == pb.EVENT_STATUS_ACCEPTED)
    # A client that lost a reply resends events the store already holds: each one is answered
    # DUPLICATE, never stored or counted again.
    for start_at in range(0, len(sent), 500):
        request = pb.RecordEventsRequest(events=sent[start_at : start_at + 500])
        reply = running.stub.RecordEvents(request, timeout=10)
        assert {r.status for r in reply.results} == {pb.EVENT_STATUS_DUPLICATE}
    eventually(lambda: running.server.offering.log.pending == 0, 10.0)
    rows = stored(url)[0]
    mine = Counter({i: c for i, c in rows.items() if i.startswith("w")})
    print(
        f"\nmixed load through an outage: calls {dict(codes)}; events acknowledged "
        f"{len(acked)}, resent after UNAVAILABLE {len(unacked)}, rows stored {sum(mine.values())}"
        f" for {len(mine)} ids"
    )
    assert not {k for k in codes if k.startswith("read")}, codes
    assert set(acked) == set(mine)
    assert len(mine) == len({e.event_id for e in sent}) and set(mine.values()) == {1}
    # What a client counts does not double either: ACCEPTED at most once per event id.
    assert max(accepted.values()) == 1, accepted.most_common(3)
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.snapshot_fresh and not info.store_error
