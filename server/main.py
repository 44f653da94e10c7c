"""`discountd`: serve recommendations over gRPC from a model store.

Signals: SIGHUP reloads the version CURRENT names if it is not the one serving (retrying one
refused before) and the TLS certificate files; SIGTERM and SIGINT drain: health NOT_SERVING,
calls still answered for --drain-delay seconds, then in-flight calls get --grace seconds, then
the offer log as long again to write what it holds; exit 0, or 1 when issued offers are left
unwritten.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

import click

from core.artifact import ArtifactError
from core.store.errors import StoreError
from server.app import CannotListen, create_server
from server.auth import AUTH_MODES
from server.limits import MAX_CONNECTION_AGE_GRACE_S
from server.logs import LEVELS
from server.logs import configure as configure_logs
from server.settings import (
    DEVICES,
    SOURCES,
    SWITCHES,
    Settings,
    SettingsError,
    address,
    insecure_demo_key_in_use,
    resolve,
)
from server.versions import LARGE_CATALOG
from server.workers import RELAYED, supervise, unowned_port

log = logging.getLogger("discountd")


def _choices(values: tuple[str, ...]) -> str:
    return f"[{'|'.join(values)}]"


def _env(name: str) -> str:
    variable, default = SOURCES[name]
    return f"[env {variable}]" if default is None else f"[env {variable}; default {default}]"


@click.command(
    epilog="\b\nExamples:\n"
    "  discountd --model-dir var/models --tls-cert tls.crt --tls-key tls.key\n"
    "  discountd --model-dir var/models --insecure --auth off --insecure-demo-key  # local trial",
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.option(
    "--model-dir",
    metavar="DIR",
    help=f"Model store (version folders + CURRENT) or one version folder. {_env('model_dir')}",
)
@click.option(
    "--response-model-dir",
    metavar="DIR",
    help="Response model for `optimal` rules: a folder `discount-train response` wrote, "
    "loaded again when a new one is written there (next --poll-interval check or SIGHUP); "
    f"without it they grant no discount. {_env('response_model_dir')}",
)
@click.option(
    "--device",
    metavar=_choices(DEVICES),
    help=f"Where ONNX Runtime runs: auto (CUDA, else CPU), cpu or cuda. {_env('device')}",
)
@click.option(
    "--host",
    metavar="ADDRESS",
    help=f"Address to listen on (IPv6 bare or in brackets). {_env('host')}",
)
@click.option("--port", metavar="PORT", help=f"gRPC port; 0 picks a free one. {_env('port')}")
@click.option(
    "--poll-interval",
    metavar="SECONDS",
    help="Seconds between checks of CURRENT (and of --response-model-dir); 0: SIGHUP only. "
    f"{_env('poll_interval')}",
)
@click.option(
    "--grace",
    metavar="SECONDS",
    help="Seconds in-flight calls get on shutdown, and the offer log after them to write what "
    f"it holds. {_env('grace')}",
)
@click.option(
    "--drain-delay",
    metavar="SECONDS",
    help="Seconds between SIGTERM turning health NOT_SERVING and the port closing: calls are "
    "still answered meanwhile, so that balancers polling health stop routing here first. "
    f"{_env('drain_delay')}",
)
@click.option(
    "--db-url",
    metavar="URL",
    help=f"Store with rules and experiments; offers and events go there. {_env('db_url')}",
)
@click.option(
    "--rules-poll-interval",
    metavar="SECONDS",
    help="Seconds between rule reloads (PostgreSQL also on NOTIFY), and between reads of the "
    f"purchases other processes stored. {_env('rules_poll_interval')}",
)
@click.option(
    "--offer-ttl", metavar="SECONDS", help=f"Seconds an offer's price holds. {_env('offer_ttl')}"
)
@click.option(
    "--offer-spill-dir",
    metavar="DIR",
    help="Folder (on a disk that outlives the process) where a shutdown puts the issued offers "
    "the store would not take within --grace; the next start writes them to the store. Unset: "
    f"they are lost (logged; exit code 1). {_env('offer_spill_dir')}",
)
@click.option(
    "--insecure-demo-key",
    is_flag=True,
    help="Sign offers with a public demo key instead of DISCOUNT_OFFER_KEY (demos only: "
    "anyone can forge such offers).",
)
@click.option(
    "--auth",
    metavar=_choices(AUTH_MODES),
    help="required: every RPC but health needs a client token (discountctl clients create); "
    f"off: anyone who reaches the port may call. {_env('auth')}",
)
@click.option(
    "--reflection",
    metavar=_choices(SWITCHES),
    help=f"Server reflection, on or off. {_env('reflection')}",
)
@click.option(
    "--tls-cert",
    metavar="FILE",
    help=f"PEM certificate (chain) for the gRPC port; re-read on SIGHUP. {_env('tls_cert')}",
)
@click.option("--tls-key", metavar="FILE", help=f"PEM private key of --tls-cert. {_env('tls_key')}")
@click.option(
    "--tls-client-ca",
    metavar="FILE",
    help="PEM CA(s): require client certificates signed by them "
    f"(mutual TLS). {_env('tls_client_ca')}",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Serve plaintext gRPC without TLS (demos, or behind a TLS-terminating proxy on a "
    "trusted network).",
)
@click.option(
    "--metrics-port",
    metavar="PORT",
    help="Serve Prometheus metrics at http://HOST:PORT/metrics; 0 picks a free port; unset: "
    f"no metrics. {_env('metrics_port')}",
)
@click.option(
    "--log-level",
    metavar=_choices(LEVELS),
    help="The whole log's level. debug: one JSON log line per call, and ONNX Runtime's own "
    "lines; info: failed calls only, and start-up lines (the ports 0 picked); warning: "
    "UNAVAILABLE and server errors; error: server errors (INTERNAL, UNKNOWN, DATA_LOSS). "
    f"{_env('log_level')}",
)
@click.option(
    "--batch-max-size",
    metavar="N",
    help="Most Recommend calls gathered into one model run; 1: no batching. "
    f"{_env('batch_max_size')}",
)
@click.option(
    "--batch-max-wait-us",
    metavar="MICROSECONDS",
    help="Microseconds a batch waits for more calls before it runs; 0: it runs as soon as the "
    f"previous model run is done. {_env('batch_max_wait_us')}",
)
@click.option(
    "--workers",
    metavar="N",
    help="Processes serving the port together (SO_REUSEPORT), each with its share of the "
    f"cores for ONNX Runtime. {_env('workers')}",
)
@click.option(
    "--ort-threads",
    metavar="N",
    help="ONNX Runtime threads per model run; 0: chosen for each model version, each worker's "
    "share of the cores less one (kept for its event loop), or the whole share for catalogs of "
    f"{LARGE_CATALOG:,} items or more, where the model is the limit. {_env('ort_threads')}",
)
@click.option(
    "--max-connection-age",
    metavar="SECONDS",
    help="Seconds a client connection lives before the server asks its client to reconnect "
    "(GOAWAY), so --workers and replicas get new connections to share; calls in flight get "
    f"{MAX_CONNECTION_AGE_GRACE_S:g} s more to finish; 0: for ever. {_env('max_connection_age')}",
)
def main(insecure_demo_key: bool, insecure: bool, **flags: str | None) -> None:
    """Serve recommendations and personalized offers over gRPC (with health and reflection).

    Offers are signed with DISCOUNT_OFFER_KEY (at least 32 bytes; older keys that still verify
    in DISCOUNT_OFFER_PREVIOUS_KEYS, comma-separated).
    """
    try:
        settings = resolve(flags, insecure_demo_key=insecure_demo_key, insecure=insecure)
    except SettingsError as e:
        raise click.UsageError(str(e)) from None
    configure_logs(settings.log_level)
    if settings.workers > 1:
        sys.exit(supervise(settings, serve))
    sys.exit(asyncio.run(serve(settings)))


def _cannot_listen(settings: Settings, error: CannotListen) -> int:
    where = address(settings.host, settings.port)
    # A worker's siblings hold the port with SO_REUSEPORT: a probe would blame them.
    reason = error if settings.workers > 1 else _bind_error(settings) or error
    log.error("cannot listen on %s: %s", where, reason)
    return 1


def _bind_error(settings: Settings) -> OSError | None:
    """Why the kernel refuses the address (in use, unknown host), which gRPC's error leaves out."""
    try:
        unowned_port(settings.host, settings.port)
    except OSError as e:
        return e
    return None


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; the exit code: 0 after a clean drain, 1 when it cannot serve."""
    try:
        server, port = create_server(settings)
    except CannotListen as e:
        return _cannot_listen(settings, e)
    except StoreError as e:
        log.error("%s", e)  # it names the store and what is wrong with it
        return 1
    except ArtifactError as e:
        log.error("cannot load the response model: %s", e)
        return 1
    if insecure_demo_key_in_use(settings):
        log.warning("offers are signed with the public demo key: never use this in production")
    if server.tls is None:
        log.warning(
            "serving plaintext gRPC (--insecure): calls and tokens cross the network unencrypted"
        )
    if server.clients is None:
        log.warning("client auth is off (--auth off): anyone who reaches the port may call")
    elif server.clients.count == 0:
        log.warning(
            "client auth is required and no active client exists (none created yet, or every one "
            "revoked): every call is refused until an admin runs `discountctl clients create NAME`"
        )
    # Handlers first: a signal during the model load must not kill the process mid-way.
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        if server.tls is not None:
            server.tls.reload()
        task = loop.create_task(server.reload(force=True))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    # A --workers worker holds them from its fork until now (server.workers); a no-op otherwise.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, RELAYED)
    try:
        await server.start(stopping)
    except CannotListen as e:  # a --workers worker binds once loaded (DiscountServer.start)
        await server.stop(0)
        return _cannot_listen(settings, e)
    except OSError as e:  # the metrics port: in use, or an address it cannot bind
        where = address(settings.host, settings.metrics_port or 0)
        log.error("cannot serve metrics on %s: %s", where, e)
        await server.stop(0)
        return 1
    await server.first_load.wait()
    if server.store.current is None:
        log.error("cannot serve: %s", server.store.last_error)
        await server.stop(0)
        return 1
    if server.listening:  # a worker told to stop while it loaded never listens
        log.info("listening on %s", address(settings.host, port))
    if server.metrics_port is not None:
        log.info("metrics on http://%s/metrics", address(settings.host, server.metrics_port))
    await stopping.wait()
    log.info(
        "shutting down: health NOT_SERVING for %gs, then draining for up to %gs",
        settings.drain_delay,
        settings.grace,
    )
    lost = await server.stop(settings.grace, settings.drain_delay)
    if server.store_abandoned:
        # Joining the threads that wait on it (asyncio.run does, then the interpreter) would
        # hold the process until TCP gives up on the store, long past --grace.
        log.error("stopped without waiting for the store")
        logging.shutdown()
        os._exit(1)
    log.info("stopped")
    # Offers whose tokens are out but that are not in the store: a failed stop, not a clean one.
    return 1 if lost else 0
