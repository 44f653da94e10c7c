"""Wiring: the gRPC server with DiscountService, health, reflection and interceptors.

``create_server`` builds everything and binds the port; ``DiscountServer.start`` begins serving
and loading the model; health stays NOT_SERVING until a version is loaded and warm. A --workers
worker binds only once its model is loaded (``DiscountServer.start``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from core.store.errors import StoreUnavailable
from discount.v1 import discount_pb2
from server.auth import AuthInterceptor, ClientRegistry
from server.batching import Batcher
from server.decoding import add_discount_service
from server.health import CappedHealth
from server.interceptors import AccessLogInterceptor, Interceptor, RequestIdInterceptor
from server.limits import PROBE_SLOTS, grpc_options
from server.metrics import LiveValues, Metrics
from server.offering import Offering
from server.purchases import data_end
from server.response import ResponseModel, Stamp, stamp
from server.service import DiscountService
from server.settings import Settings, address
from server.tls import TlsCredentials
from server.versions import ModelStore

log = logging.getLogger(__name__)

SERVICE_NAME = discount_pb2.DESCRIPTOR.services_by_name["DiscountService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Health entry for the rule snapshot: NOT_SERVING while the store is unreachable.
RULES_HEALTH = "discountd.rule_snapshot"
# How long health waits, at the first model load, for the store's purchases since the model's
# data ended (server.purchases) before it says SERVING without them.
PURCHASES_WAIT_S = 2.0


class CannotListen(Exception):
    """gRPC could not bind the address (its RuntimeError gives no reason)."""


class DiscountServer:
    """The running server: gRPC, health, and the model store it keeps current."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: aio.Server,
        store: ModelStore,
        offering: Offering | None,
        clients: ClientRegistry | None,
        tls: TlsCredentials | None,
        metrics: Metrics,
        response_stamp: Stamp,
    ) -> None:
        self.settings = settings
        self.grpc = grpc_server
        self.store = store
        self.offering = offering
        self.clients = clients
        self.tls = tls
        self.metrics = metrics
        # Bound by start() when settings.metrics_port is set.
        self.metrics_port: int | None = None
        # The response model folder's stamp when the serving one was loaded from it.
        self.response_stamp = response_stamp
        self._response_lock = asyncio.Lock()
        self._response_refused = False  # the folder at response_stamp failed to load
        self.response_failures = 0  # response models that failed to load (metrics)
        self.health = CappedHealth(settings.max_health_watches)
        self.first_load = asyncio.Event()
        self.listening = False
        self._watcher: asyncio.Task[None] | None = None

    def bind(self) -> int:
        """Listen on settings.host:settings.port; the port (0 picks one)."""
        where = address(self.settings.host, self.settings.port)
        try:
            if self.tls is None:
                return int(self.grpc.add_insecure_port(where))
            return int(self.grpc.add_secure_port(where, self.tls.server_credentials()))
        except RuntimeError as e:
            raise CannotListen(str(e)) from None

    async def start(self, stopping: asyncio.Event | None = None) -> None:
        """Serve, and load the model. A --workers worker loads first and binds then (not at
        all without a loadable version, or when told to stop meanwhile): its port is the other
        workers' too, and the kernel hands a share of new connections to each listener, so one
        still loading would answer its share UNAVAILABLE while the others could serve them.
        One process binds at once (create_server): it answers NOT_SERVING while it loads, and
        nothing else could serve."""
        for service in ("", SERVICE_NAME):
            await self.health.set(service, NOT_SERVING)
        if self.settings.workers == 1:
            await self.grpc.start()
            self.listening = True
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.host, self.settings.metrics_port)
        if self.offering is not None:
            # A health entry of its own: balancers keep routing while rules are stale, and
            # operators can still see it (grpc_health_probe -service discountd.rule_snapshot).
            await self.health.set(RULES_HEALTH, SERVING)
            self.offering.start(self._rules_freshness)
        if self.settings.workers > 1:
            await self._load_first()
            if self.store.current is None or (stopping is not None and stopping.is_set()):
                return  # serve() says why and stops
            self.bind()
            await self.grpc.start()
            self.listening = True
        self._watcher = asyncio.create_task(self._watch())

    async def _rules_freshness(self, fresh: bool) -> None:
        await self.health.set(RULES_HEALTH, SERVING if fresh else NOT_SERVING)

    async def reload(self, force: bool = True) -> bool:
        """Load the version CURRENT names; SIGHUP forces a retry of a refused one. Also load
        a response model swapped into --response-model-dir since the last look."""
        await self._reload_response(force)
        switched = await self.store.reload(force=force)
        if switched and self.offering is not None:
            # Which purchases are recent depends on the model. A switch is already serving;
            # after a start, health says SERVING once they are read, or the store was slow
            # and the read goes on.
            await asyncio.wait({self.offering.purchases.read()}, timeout=PURCHASES_WAIT_S)
        if self.store.current is not None:
            for service in ("", SERVICE_NAME):
                await self.health.set(service, SERVING)
        return switched

    async def _reload_response(self, force: bool) -> None:
        """A response model that fails to load leaves the serving one in place, and says why
        once per folder it finds there (force, from SIGHUP: try a refused folder again)."""
        path = self.settings.response_model_dir
        if path is None or self.offering is None:
            return
        async with self._response_lock:  # one load at a time, so none lands out of order
            found = stamp(path)
            if found == self.response_stamp and not (force and self._response_refused):
                return
            self.response_stamp, self._response_refused = found, True
            serving = getattr(self.offering.respond, "version", None)
            try:
                model = await asyncio.to_thread(ResponseModel.load, path)
            # Any error: one that escaped would end the model poller, and with it the drain.
            except Exception as e:
                log.error("response model in %s not loaded, %s keeps serving: %s", path, serving, e)
                self.response_failures += 1
                return
            self.offering.respond, self._response_refused = model, False
            log.info(
                "response model %s loaded for `optimal` rules (was %s)", model.version, serving
            )

    async def stop(self, grace: float | None, drain_delay: float = 0.0) -> int:
        """NOT_SERVING first, answering calls for drain_delay more seconds so that balancers
        polling health drain us, then let in-flight calls finish; then the offer log gets as
        long again to write what it holds. The number of issued offers it could not write (0
        without a store)."""
        await self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self.grpc.stop(grace)
        self.metrics.stop()
        # After the last call: every offer issued is in the log's queue, flushed here.
        if self.offering is not None:
            return await self.offering.stop(grace or 0.0)
        return 0

    @property
    def store_abandoned(self) -> bool:
        """stop() gave up on a store that does not answer: threads still wait on it."""
        return self.offering is not None and self.offering.abandoned

    async def _load_first(self) -> None:
        await self.reload(force=False)
        self.first_load.set()

    async def _watch(self) -> None:
        if not self.first_load.is_set():
            await self._load_first()
        interval = self.settings.poll_interval
        while interval > 0:
            await asyncio.sleep(interval)
            await self.reload(force=False)


def create_server(settings: Settings) -> tuple[DiscountServer, int]:
    """Build the server and bind settings.host:settings.port (0 picks a free port); a --workers
    worker binds in DiscountServer.start instead.

    With a store (settings.db_url) it is checked first: StoreError when unreachable or not at
    the schema head, so a misconfigured server never starts half-working; ArtifactError
    when settings.response_model_dir is not a response model it can run.
    """
    respond, response_stamp = None, None
    if settings.response_model_dir is not None:
        response_stamp = stamp(settings.response_model_dir)  # before: a swap meanwhile reloads
        respond = ResponseModel.load(settings.response_model_dir)
        log.info("response model %s loaded for `optimal` rules", respond.version)
    store = ModelStore(
        settings.model_dir,
        settings.device,
        settings.ort_threads,
        settings.workers,
        facts=settings.db_url is not None,
    )
    offering = None
    if settings.db_url is not None:
        offering = Offering.open(
            settings.db_url,
            settings.offer_keys,
            settings.offer_ttl,
            settings.rules_poll_interval,
            lambda: data_end(store.current),
            settings.offer_spill_dir,
        )
        if respond is not None:
            offering.respond = respond
    metrics = Metrics()
    interceptors: list[Interceptor] = [RequestIdInterceptor(), AccessLogInterceptor(metrics)]
    clients = None
    if settings.auth == "required":
        if offering is None:
            raise StoreUnavailable("--auth required needs the store that holds the clients")
        clients = ClientRegistry()
        with offering.store.transaction() as session:
            clients.load_from(session)
        offering.keeper.on_load = clients.load_from
        interceptors.append(AuthInterceptor(clients))
    tls = TlsCredentials(settings.tls) if settings.tls is not None else None
    grpc_server = aio.server(
        interceptors=interceptors,
        options=grpc_options(
            settings.workers > 1, settings.max_connection_age, settings.max_connection_age_grace
        ),
        maximum_concurrent_rpcs=(
            settings.max_concurrent_rpcs + PROBE_SLOTS + settings.max_health_watches
        ),
    )
    server = DiscountServer(
        settings, grpc_server, store, offering, clients, tls, metrics, response_stamp
    )
    batcher = None
    if settings.batch_max_size > 1:
        batcher = Batcher(settings.batch_max_size, settings.batch_max_wait_us, metrics)
    metrics.watch(
        LiveValues(
            model=lambda: (
                (store.current.version, store.current.provider) if store.current else None
            ),
            model_failures=lambda: {
                "recommend": store.failures,
                "response": server.response_failures,
            },
            snapshot_age=lambda: offering.keeper.age_seconds if offering is not None else None,
            purchases=lambda: offering.purchases.state if offering is not None else None,
            offer_log=lambda: (
                (offering.log.pending, offering.log.refused, offering.log.dropped)
                if offering is not None
                else None
            ),
        )
    )
    add_discount_service(
        DiscountService(
            store, settings.device, offering, metrics, batcher, settings.max_concurrent_rpcs
        ),
        grpc_server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(server.health, grpc_server)
    if settings.reflection:
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), grpc_server
        )
    # A worker's port: the parent's (server.workers), bound by start() once loaded.
    port = server.bind() if settings.workers == 1 else settings.port
    return server, port
