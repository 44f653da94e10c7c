"""Prometheus metrics of one discountd process, served on --metrics-port.

Each server owns its registry (tests run several servers in one process). Values that already
live elsewhere (model version, provider, snapshot age) are read at scrape time, never copied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Seconds: from a health check's tens of microseconds to a slow 1M-item inference, and past
# the store's statement timeout (5 s, server.limits), so the calls that waited out a stalled
# store show as such, not as merely over 2.5 s.
LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# (model version, active provider) of the serving version, or None before the first load.
ModelState = Callable[[], tuple[str, str] | None]
# Model reloads that failed so far, by model: "recommend" (server.versions.ModelStore.failures)
# and "response" (--response-model-dir, server.app).
ModelFailures = Callable[[], dict[str, int]]
# Age in seconds of the rule snapshot, or None without a store.
SnapshotAge = Callable[[], float | None]
# (seconds since the last good read, users held) of the recent purchases (server.purchases);
# None without a store. The age is None until a read has succeeded.
PurchasesState = Callable[[], tuple[float | None, int] | None]
# (offers waiting for the store, GetOffers calls refused because that queue was full, offers the
# store refused as data) of the offer log (server.offer_log); None without a store.
OfferLogState = Callable[[], tuple[int, int, int] | None]


# eq=False keeps it hashable: the registry keys a dict by each collector it holds.
@dataclass(eq=False)
class LiveValues(Collector):
    """The readers of the values that live elsewhere, called at each scrape."""

    model: ModelState
    model_failures: ModelFailures
    snapshot_age: SnapshotAge
    purchases: PurchasesState
    offer_log: OfferLogState

    def collect(self) -> Iterable[Metric]:
        info = GaugeMetricFamily(
            "discountd_model_info",
            "The serving model version and ONNX Runtime provider (value 1).",
            labels=["version", "provider"],
        )
        state = self.model()
        if state is not None:
            info.add_metric(list(state), 1.0)
        yield info
        failures = CounterMetricFamily(
            "discountd_model_load_failures",
            "Model reloads that failed (a version refused, CURRENT unreadable, a response model "
            "that does not load), by model (recommend, response): the previous one keeps "
            "serving. Each SIGHUP's failure counts; the poller's repeats do not.",
            labels=["model"],
        )
        for model, count in self.model_failures().items():
            failures.add_metric([model], count)
        yield failures
        age = self.snapshot_age()
        if age is not None:
            yield GaugeMetricFamily(
                "discountd_rule_snapshot_age_seconds",
                "Seconds since the rule snapshot was last loaded from the store.",
                value=age,
            )
        offer_log = self.offer_log()
        if offer_log is not None:
            pending, refused, dropped = offer_log
            yield GaugeMetricFamily(
                "discountd_offer_log_pending",
                "Issued offers waiting to be written to the store (alert when it keeps growing).",
                value=pending,
            )
            yield CounterMetricFamily(
                "discountd_offer_log_refused",
                "GetOffers calls refused because the offer log's queue was full.",
                value=refused,
            )
            yield CounterMetricFamily(
                "discountd_offer_log_dropped",
                "Issued offers the store refused as data (logged each; a bug to report).",
                value=dropped,
            )
        purchases = self.purchases()
        if purchases is None:
            return
        read_age, users = purchases
        if read_age is not None:
            yield GaugeMetricFamily(
                "discountd_recent_purchases_age_seconds",
                "Seconds since the purchases stored since the model's data ended were last read.",
                value=read_age,
            )
        yield GaugeMetricFamily(
            "discountd_recent_purchase_users",
            "Users whose purchases since the model's data ended Recommend excludes.",
            value=users,
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "discountd_requests",
            "Calls answered, by method, status code and authenticated client ('-' without).",
            ["method", "code", "client"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "discountd_request_seconds",
            "Time from the call reaching the handler to its answer, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "discountd_inference_batch_size",
            "Recommend calls answered by one ONNX Runtime run (the micro-batch size).",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.offers = Counter(
            "discountd_offers_issued",
            "Signed offers returned by GetOffers.",
            registry=self.registry,
        )
        self.discount_cents = Counter(
            "discountd_discount_offered_cents",
            "Sum of base minus final price over issued offers, in cents.",
            registry=self.registry,
        )
        self.events = Counter(
            "discountd_events",
            "Events received by RecordEvents, by verdict (accepted, duplicate, rejected).",
            ["verdict"],
            registry=self.registry,
        )
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def watch(self, live: LiveValues) -> None:
        self.registry.register(live)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP in a daemon thread; returns the bound port (port 0 picks)."""
        self._server, self._thread = start_http_server(port, host, self.registry)
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
