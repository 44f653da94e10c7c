"""The Prometheus endpoint of a real server, scraped over HTTP and parsed with
prometheus_client's parser; structured access-log lines."""

from __future__ import annotations

import json
import logging
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.artifact import CURRENT, load_manifest, seal, set_current
from discount.v1 import discount_pb2 as pb
from server.logs import JsonFormatter
from tests.conftest import RunningServer


@pytest.fixture(scope="module")
def running(model_store: Path) -> Iterator[RunningServer]:
    server = RunningServer(model_store, metrics_port=0)
    server.wait_first_load()
    yield server
    server.close()


def scrape(server: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    port = server.server.metrics_port
    assert port is not None
    return scrape_port(port)


def scrape_port(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample /metrics on 127.0.0.1:port serves, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_and_histograms_move_after_calls(running: RunningServer) -> None:
    before = scrape(running)
    for _ in range(3):
        running.stub.Recommend(pb.RecommendRequest(user_id="user-0"))
    with pytest.raises(grpc.RpcError):
        running.stub.Recommend(pb.RecommendRequest(user_id=""))
    health_pb2_grpc.HealthStub(running.channel).Check(health_pb2.HealthCheckRequest())

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # A call is counted after its status is sent (an abort sends it at once): poll briefly.
    deadline = time.monotonic() + 10
    while True:
        after = scrape(running)
        if moved("discountd_request_seconds_count", method="Recommend") >= 4:
            break
        assert time.monotonic() < deadline, "the calls were never counted"
        time.sleep(0.02)

    assert moved("discountd_requests_total", method="Recommend", code="OK", client="-") == 3
    assert (
        moved("discountd_requests_total", method="Recommend", code="INVALID_ARGUMENT", client="-")
        == 1
    )
    assert moved("discountd_requests_total", method="Check", code="OK", client="-") == 1
    assert moved("discountd_request_seconds_count", method="Recommend") == 4
    assert moved("discountd_request_seconds_bucket", method="Recommend", le="+Inf") == 4
    # The three valid calls ran the model once each; the invalid one was refused before it.
    assert moved("discountd_inference_batch_size_count") == 3


def test_model_version_and_provider(running: RunningServer) -> None:
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    samples = scrape(running)
    labels = {"version": info.model_version, "provider": "CPUExecutionProvider"}
    assert value(samples, "discountd_model_info", **labels) == 1.0
    # Without a store there is no rule snapshot to age, nor purchases to read.
    names = {name for name, _ in samples}
    assert not names & {
        "discountd_rule_snapshot_age_seconds",
        "discountd_recent_purchases_age_seconds",
        "discountd_recent_purchase_users",
        "discountd_offer_log_pending",
    }


def test_a_refused_model_version_is_counted(
    model_store: Path, flipped_version: Path, tmp_path: Path
) -> None:
    """A version that fails to load leaves the old one serving and health SERVING: the
    counter is what an alert on a promote that never went live can watch."""
    store = tmp_path / "models"
    shutil.copytree(model_store, store)
    broken = store / "20991231-000000-broken"
    shutil.copytree(flipped_version, broken)
    data = bytearray((broken / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "model.onnx").write_bytes(bytes(data))
    server = RunningServer(store, metrics_port=0)
    try:
        server.wait_first_load()
        failures = "discountd_model_load_failures_total"
        assert value(scrape(server), failures, model="recommend") == 0
        serving = server.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
        set_current(store, broken.name)
        assert server.call(server.server.reload(force=False)) is False  # the poller
        assert server.call(server.server.reload(force=False)) is False  # its repeat
        assert value(scrape(server), failures, model="recommend") == 1
        assert server.call(server.server.reload(force=True)) is False  # SIGHUP
        samples = scrape(server)
        assert value(samples, failures, model="recommend") == 2
        labels = {"version": serving, "provider": "CPUExecutionProvider"}
        assert value(samples, "discountd_model_info", **labels) == 1.0
    finally:
        server.close()


def test_access_log_is_debug_when_ok_and_carries_fields(
    running: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="discountd.access")
    running.stub.Recommend(
        pb.RecommendRequest(user_id="user-0"), metadata=(("x-request-id", "q-1"),)
    )
    with pytest.raises(grpc.RpcError):
        running.stub.Recommend(pb.RecommendRequest(user_id=""), metadata=(("x-request-id", "q-2"),))

    # An aborted call's status reaches the client before the server's access log line is
    # written (abort sends it at once): wait for that call's line, then look at every line.
    def logged() -> list[str]:
        return [r.__dict__["request_id"] for r in caplog.records if r.name == "discountd.access"]

    deadline = time.monotonic() + 10
    while "q-2" not in logged():
        assert time.monotonic() < deadline, f"the refused call was never logged: {logged()}"
        time.sleep(0.02)
    assert logged() == ["q-2"], "OK calls log at debug only"
    records = [r for r in caplog.records if r.name == "discountd.access"]
    line = json.loads(JsonFormatter().format(records[0]))
    assert line["code"] == "INVALID_ARGUMENT"
    assert line["method"] == "/discount.v1.DiscountService/Recommend"
    assert line["request_id"] == "q-2" and line["client"] == "-"
    assert line["level"] == "INFO" and line["ms"] >= 0


def test_offer_and_event_metrics(model_store: Path, db_url: str) -> None:
    from offer_server import OfferServer, ctl
    from prometheus_client import generate_latest

    ctl(
        db_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=2", "--param", "d1=20", "--param", "d2=5", "--max-discount", "30",
    )  # fmt: skip
    server = OfferServer(model_store, db_url)
    try:
        offers = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=4)).offers
        click = {"type": pb.EVENT_TYPE_CLICK, "user_id": "user-0", "item_id": "00001"}
        server.stub.RecordEvents(
            pb.RecordEventsRequest(
                events=[
                    pb.Event(event_id="e-1", **click),  # type: ignore[arg-type]
                    pb.Event(event_id="e-1", **click),  # type: ignore[arg-type]
                    pb.Event(event_id="", **click),  # type: ignore[arg-type]
                ]
            )
        )
        bought = pb.Event(event_id="p-1", **{**click, "type": pb.EVENT_TYPE_PURCHASE})  # type: ignore[arg-type]
        server.stub.RecordEvents(pb.RecordEventsRequest(events=[bought]))
        text = generate_latest(server.server.metrics.registry).decode()
    finally:
        server.close()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert len(offers) == 4
    assert value(samples, "discountd_offers_issued_total") == 4
    offered = sum(o.base_price_cents - o.final_price_cents for o in offers)
    assert offered > 0 and value(samples, "discountd_discount_offered_cents_total") == offered
    for verdict, n in (("accepted", 2), ("duplicate", 1), ("rejected", 1)):
        assert value(samples, "discountd_events_total", verdict=verdict) == n, verdict
    # The snapshot was loaded moments ago; the bound is loose but catches an age measured from
    # the wrong origin (e.g. the epoch).
    assert 0 <= value(samples, "discountd_rule_snapshot_age_seconds") < 60
    assert ("discountd_rule_snapshot_age_seconds", ()) in samples
    assert 0 <= value(samples, "discountd_recent_purchases_age_seconds") < 60
    assert value(samples, "discountd_recent_purchase_users") == 1  # user-0, just now


def test_an_item_without_a_price_is_not_counted_as_an_issued_offer(
    model_store: Path, db_url: str, tmp_path: Path
) -> None:
    from offer_server import OfferServer

    store = tmp_path / "models"
    shutil.copytree(model_store, store)
    version = store / (store / CURRENT).read_text().strip()
    items = json.loads((version / "items.json").read_text())
    items["price"][1] = None
    (version / "items.json").write_text(json.dumps(items))
    seal(version, load_manifest(version, verify=False))
    server = OfferServer(store, db_url)
    try:
        reply = server.stub.GetOffers(
            pb.GetOffersRequest(user_id="user-0", item_ids=["00000", "00001"])
        )
        text = generate_latest(server.server.metrics.registry).decode()
    finally:
        server.close()
    assert [bool(o.offer_id) for o in reply.offers] == [True, False]
    assert "NO_PRICE" in reply.offers[1].reason_codes
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert value(samples, "discountd_offers_issued_total") == 1


def test_an_offer_log_that_cannot_write_shows_its_backlog(model_store: Path, db_url: str) -> None:
    """A store that answers reads but not the offer log's writes (a lock, a lost INSERT grant)
    leaves health and the snapshot fine: only these metrics show offers piling up."""
    from offer_server import OfferServer, ctl, eventually

    from core.store.db import Store

    ctl(db_url, "rules", "create", "tier", "--policy", "tiered_topk", "--param", "k1=2",
        "--param", "d1=20", "--param", "d2=5")  # fmt: skip
    server = OfferServer(model_store, db_url)
    store = Store(db_url)

    def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = generate_latest(server.server.metrics.registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    try:
        with store.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                conn.exec_driver_sql("LOCK TABLE offers IN EXCLUSIVE MODE")  # reads still pass
            request = pb.GetOffersRequest(user_id="user-0", limit=4)
            issued = [o for o in server.stub.GetOffers(request).offers if o.offer_id]
            time.sleep(1.0)  # two of the offer log's wake-ups: it tried, and could not write
            assert issued and value(samples(), "discountd_offer_log_pending") == len(issued)
            conn.rollback()
        eventually(lambda: value(samples(), "discountd_offer_log_pending") == 0, timeout=20)
        after = samples()
        for name in ("discountd_offer_log_refused_total", "discountd_offer_log_dropped_total"):
            assert (name, ()) in after and after[(name, ())] == 0, name
    finally:
        store.dispose()
        server.close()
