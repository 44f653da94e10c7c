"""SIGTERM to a real `discountd` process under GetOffers and RecordEvents load on PostgreSQL:
every offer handed out is in the offers table and every acknowledged event in the events
table once the process has exited (the offer log is flushed on the way out)."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from offer_server import eventually, ten_percent_off_everything
from pg import hanging_proxy, pg_database
from sqlalchemy import select
from test_offers_outage import offer_ids, set_reachable
from test_server_process import Discountd

from core.store.db import Store
from core.store.tables import Event, Offer
from discount.v1 import discount_pb2 as pb
from server.offering import STOP_SLACK_S

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.timeout(120)]
ACKED = (pb.EVENT_STATUS_ACCEPTED, pb.EVENT_STATUS_DUPLICATE)


def test_sigterm_under_load_flushes_offers_and_keeps_every_acked_event(
    model_store: Path, tmp_path: Path
) -> None:
    with pg_database() as url:
        ten_percent_off_everything(url)
        server = Discountd(model_store, tmp_path, url, "--grace", "5", "--poll-interval", "0")
        handed_out: set[str] = set()
        acked: set[str] = set()
        codes: Counter[str] = Counter()
        lock = threading.Lock()
        stop = threading.Event()

        def offers(n: int) -> None:
            while not stop.is_set():
                try:
                    reply = server.stub.GetOffers(
                        pb.GetOffersRequest(user_id=f"user-{n}", limit=3), timeout=10
                    )
                except grpc.RpcError as e:
                    with lock:
                        codes[f"GetOffers {e.code().name}"] += 1
                    return
                with lock:
                    handed_out.update(o.offer_id for o in reply.offers)
                    codes["GetOffers OK"] += 1

        def events(n: int) -> None:
            batch = 0
            while not stop.is_set():
                batch += 1
                request = pb.RecordEventsRequest(
                    events=[
                        pb.Event(event_id=f"t{n}-{batch}-{k}", type=pb.EVENT_TYPE_CLICK,
                                 user_id="user-1", item_id="00002")
                        for k in range(5)
                    ]
                )  # fmt: skip
                try:
                    reply = server.stub.RecordEvents(request, timeout=10)
                except grpc.RpcError as e:
                    with lock:
                        codes[f"RecordEvents {e.code().name}"] += 1
                    return
                with lock:
                    acked.update(r.event_id for r in reply.results if r.status in ACKED)
                    codes["RecordEvents OK"] += 1

        workers = [threading.Thread(target=offers, args=(n,)) for n in range(3)]
        workers += [threading.Thread(target=events, args=(n,)) for n in range(2)]
        try:
            for worker in workers:
                worker.start()
            # Bounded: a worker that failed early would otherwise leave this waiting forever.
            eventually(lambda: codes["GetOffers OK"] >= 30 and codes["RecordEvents OK"] >= 10, 60.0)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
            server.close()
        log = server.drain_log()
        assert not [line for line in log if "Traceback" in line or "could not be written" in line]
        store = Store(url)
        try:
            with store.transaction() as session:
                logged = set(session.scalars(select(Offer.offer_id)))
                stored = set(session.scalars(select(Event.event_id)))
        finally:
            store.dispose()
        print(
            f"\nSIGTERM under load: calls {dict(codes)}; offers handed out {len(handed_out)}, "
            f"in the table {len(logged & handed_out)}; events acked {len(acked)}, "
            f"stored {len(stored & acked)}"
        )
        assert handed_out and handed_out <= logged
        assert acked and acked <= stored
        # Calls after the port closed are refused; calls gRPC had queued are cancelled.
        refused = {k.split()[1] for k in codes if not k.endswith(" OK")}
        assert refused <= {"UNAVAILABLE", "CANCELLED"}


def _offering_server(
    url: str, model_store: Path, tmp_path: Path, grace: str, *extra: str
) -> Discountd:
    ten_percent_off_everything(url)
    return Discountd(model_store, tmp_path, url, "--grace", grace, "--poll-interval", "0", *extra)


def _offers_during_an_outage(server: Discountd, url: str) -> set[str]:
    request = pb.GetOffersRequest(user_id="user-0", limit=3)
    server.stub.GetOffers(request)
    set_reachable(url, False)
    return {o.offer_id for _ in range(5) for o in server.stub.GetOffers(request).offers}


def test_sigterm_during_an_outage_writes_the_offers_when_the_store_is_back_within_grace(
    model_store: Path, tmp_path: Path
) -> None:
    """The offer log keeps retrying for --grace after the last call: a deploy during a short
    store outage loses no offer whose token is out."""
    with pg_database() as url:
        server = _offering_server(url, model_store, tmp_path, grace="30")
        try:
            handed_out = _offers_during_an_outage(server, url)
            server.process.send_signal(signal.SIGTERM)
            server.wait_for("shutting down")
            time.sleep(2)  # the first write after the last call has failed by now
            set_reachable(url, True)
            assert server.process.wait(timeout=60) == 0
        finally:
            set_reachable(url, True)
            server.close()
        # The outage held the offers back (else this proves nothing), and they were written.
        assert [line for line in server.drain_log() if "offers wait for the store" in line]
        assert handed_out and handed_out <= offer_ids(url)


def test_offers_still_unwritten_at_the_end_of_grace_make_the_exit_code_1(
    model_store: Path, tmp_path: Path
) -> None:
    with pg_database() as url:
        server = _offering_server(url, model_store, tmp_path, grace="1")
        try:
            _offers_during_an_outage(server, url)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 1
        finally:
            set_reachable(url, True)
            server.close()
        assert [line for line in server.drain_log() if "could not be written" in line]


def _sigterm_leaves_the_hung_store(server: Discountd) -> None:
    """Threads still wait on the store: the process leaves them and exits 1 within its bound,
    2 x --grace (1 s here) and STOP_SLACK_S."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=2 * 1 + STOP_SLACK_S + 10) == 1


def test_sigterm_while_the_store_hangs_stops_within_grace_and_exits_1(
    model_store: Path, tmp_path: Path
) -> None:
    """A store that answers nothing (no error either) cannot hold the stop past its bound:
    2 x --grace and STOP_SLACK_S. Threads still waiting on the store are left behind."""
    with pg_database() as url, hanging_proxy(url) as proxy:
        server = _offering_server(proxy.url, model_store, tmp_path, grace="1")
        try:
            request = pb.GetOffersRequest(user_id="user-0", limit=3)
            server.stub.GetOffers(request)
            proxy.hang()
            for _ in range(5):
                server.stub.GetOffers(request)
            _sigterm_leaves_the_hung_store(server)
        finally:
            proxy.resume()
            server.close()
        log = server.drain_log()
        assert [line for line in log if "could not be written before shutdown" in line]
        assert [line for line in log if "stopped without waiting for the store" in line]


def test_sigterm_while_only_reads_of_the_store_hang_exits_1_without_them(
    model_store: Path, tmp_path: Path
) -> None:
    """No offer or event waits: only the polls of rules and recent purchases hang on the
    store. Their threads cannot be stopped, and joining them would hold the exit for good."""
    with pg_database() as url, hanging_proxy(url) as proxy:
        server = _offering_server(
            proxy.url, model_store, tmp_path, "1", "--rules-poll-interval", "0.2"
        )
        try:
            proxy.hang()
            time.sleep(1)  # the polls have asked the store by now
            _sigterm_leaves_the_hung_store(server)
        finally:
            proxy.resume()
            server.close()
        # Left by the reads' own check, or by the stop's deadline when the reads took too long.
        assert [
            line for line in server.drain_log() if "stopped without waiting for the store" in line
        ]


def _spilled_ids(spill: Path) -> set[str]:
    return {
        json.loads(line)["offer_id"]
        for path in spill.glob("offers-*.jsonl")
        for line in path.read_text().splitlines()
    }


def _written_at_the_next_start(
    url: str, model_store: Path, tmp_path: Path, spill: Path, offers: set[str]
) -> None:
    again = Discountd(model_store, tmp_path, url, "--offer-spill-dir", str(spill))
    try:
        assert offers <= offer_ids(url)  # written before the server listened
    finally:
        again.process.send_signal(signal.SIGTERM)
        assert again.process.wait(timeout=60) == 0
        again.close()
    assert [line for line in again.drain_log() if "spilled offers from" in line]
    assert list(spill.iterdir()) == []


def test_offers_the_store_refuses_past_grace_are_spilled_and_written_at_the_next_start(
    model_store: Path, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    with pg_database() as url:
        server = _offering_server(url, model_store, tmp_path, "1", "--offer-spill-dir", str(spill))
        try:
            handed_out = _offers_during_an_outage(server, url)
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(timeout=60) == 0  # nothing lost
        finally:
            set_reachable(url, True)
            server.close()
        assert [line for line in server.drain_log() if "offers spilled to" in line]
        assert handed_out and handed_out <= _spilled_ids(spill)
        assert not handed_out & offer_ids(url)
        _written_at_the_next_start(url, model_store, tmp_path, spill, handed_out)


def test_offers_held_by_a_hanging_store_are_spilled_and_written_at_the_next_start(
    model_store: Path, tmp_path: Path
) -> None:
    spill = tmp_path / "spill"
    with pg_database() as url, hanging_proxy(url) as proxy:
        server = _offering_server(
            proxy.url, model_store, tmp_path, "1", "--offer-spill-dir", str(spill)
        )
        try:
            request = pb.GetOffersRequest(user_id="user-0", limit=3)
            server.stub.GetOffers(request)
            eventually(lambda: bool(offer_ids(url)), 10.0)  # the first answer's offers are in
            proxy.hang()
            handed_out = {
                o.offer_id for _ in range(5) for o in server.stub.GetOffers(request).offers
            }
            _sigterm_leaves_the_hung_store(server)
        finally:
            proxy.resume()
            server.close()
        assert [line for line in server.drain_log() if "offers spilled to" in line]
        assert handed_out and handed_out <= _spilled_ids(spill)
        _written_at_the_next_start(url, model_store, tmp_path, spill, handed_out)
