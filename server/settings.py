"""Server settings: read once from flags with DISCOUNT_* environment fallbacks, then passed
explicitly. Every bad value is reported at once, so one restart fixes them all."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from core.offer_token import OfferKeyError, OfferKeys, load_offer_keys
from core.store.db import DEFAULT_URL, mask_url, parse_url
from core.store.errors import StoreUnavailable
from server.auth import AUTH_MODES
from server.limits import MAX_CONCURRENT_RPCS, MAX_CONNECTION_AGE_GRACE_S, MAX_HEALTH_WATCHES
from server.logs import LEVELS
from server.tls import TlsError, TlsFiles, load

DEVICES = ("auto", "cpu", "cuda")

# Flag name -> (environment fallback, default).
SOURCES: dict[str, tuple[str, str | None]] = {
    "model_dir": ("DISCOUNT_MODEL_DIR", None),
    "response_model_dir": ("DISCOUNT_RESPONSE_MODEL_DIR", None),
    "device": ("DISCOUNT_DEVICE", "auto"),
    "host": ("DISCOUNT_GRPC_HOST", "0.0.0.0"),
    "port": ("DISCOUNT_GRPC_PORT", "50051"),
    "poll_interval": ("DISCOUNT_POLL_INTERVAL", "2"),
    "grace": ("DISCOUNT_SHUTDOWN_GRACE", "10"),
    "drain_delay": ("DISCOUNT_DRAIN_DELAY", "0"),
    "db_url": ("DISCOUNT_DB_URL", DEFAULT_URL),
    "rules_poll_interval": ("DISCOUNT_RULES_POLL_INTERVAL", "5"),
    "offer_ttl": ("DISCOUNT_OFFER_TTL", "900"),
    "offer_spill_dir": ("DISCOUNT_OFFER_SPILL_DIR", None),
    # Deny by default: a forgotten flag must not open a money-issuing API to anyone who can
    # reach the port. The demo turns it off explicitly.
    "auth": ("DISCOUNT_AUTH", "required"),
    "reflection": ("DISCOUNT_REFLECTION", "on"),
    "tls_cert": ("DISCOUNT_TLS_CERT", None),
    "tls_key": ("DISCOUNT_TLS_KEY", None),
    "tls_client_ca": ("DISCOUNT_TLS_CLIENT_CA", None),
    "metrics_port": ("DISCOUNT_METRICS_PORT", None),
    "log_level": ("DISCOUNT_LOG_LEVEL", "info"),
    "batch_max_size": ("DISCOUNT_BATCH_MAX_SIZE", "64"),
    "batch_max_wait_us": ("DISCOUNT_BATCH_MAX_WAIT_US", "0"),
    "workers": ("DISCOUNT_WORKERS", "1"),
    "ort_threads": ("DISCOUNT_ORT_THREADS", "0"),
    "max_connection_age": ("DISCOUNT_MAX_CONNECTION_AGE", "300"),
}
SWITCHES = ("on", "off")
# gRPC keeps the age in int32 milliseconds: 24.8 days at most; a week is plenty.
MAX_CONNECTION_AGE_S = 7 * 86_400
# A public key for `make demo` and local trials only: anyone can forge offers signed with it.
DEMO_OFFER_KEY = b"discountd-insecure-demo-key--anyone-can-forge-offers-signed-with-it"


class SettingsError(Exception):
    """One or more settings are invalid; the message lists each with how to fix it."""


@dataclass(frozen=True)
class Settings:
    model_dir: Path
    device: str = "auto"
    host: str = "0.0.0.0"
    port: int = 50051
    # Seconds between checks of the store's CURRENT pointer; 0 turns polling off (SIGHUP only).
    poll_interval: float = 2.0
    # Seconds in-flight calls get to finish after SIGTERM.
    grace: float = 10.0
    # The store with rules and experiments, and where offers and events go; None serves
    # Recommend only (GetOffers and RecordEvents answer UNAVAILABLE).
    db_url: str | None = None
    # Seconds between rule snapshot reloads (PostgreSQL also reloads on NOTIFY at once).
    rules_poll_interval: float = 5.0
    # How long an offer's price holds, in seconds.
    offer_ttl: float = 900.0
    offer_keys: OfferKeys | None = None
    # Where a shutdown puts the issued offers it could not write to the store, and where a
    # start looks for them (server.offer_log); None: such offers are lost, and logged.
    offer_spill_dir: Path | None = None
    # Code that builds Settings itself (tests, embedding) opts in to auth and TLS; the
    # command line (resolve) requires both unless told otherwise.
    auth: str = "off"
    reflection: bool = True
    # None: plaintext, which the command line allows only with --insecure.
    tls: TlsFiles | None = None
    # Prometheus /metrics over HTTP on host:metrics_port; None: no metrics endpoint, 0 picks.
    metrics_port: int | None = None
    log_level: str = "info"
    # Recommend calls gathered into one model run (server.batching); 1 turns batching off.
    batch_max_size: int = 64
    # Microseconds a batch waits for more calls once the previous run is done (0: none).
    batch_max_wait_us: int = 0
    # Processes serving the same port (SO_REUSEPORT; server.workers).
    workers: int = 1
    # ONNX Runtime intra-op threads per model run; 0: server.versions.ort_threads_for picks
    # them for each version, by its catalog size.
    ort_threads: int = 0
    # Calls served at once per process, health checks not counted; more answer
    # RESOURCE_EXHAUSTED (server.limits).
    max_concurrent_rpcs: int = MAX_CONCURRENT_RPCS
    # Health Watch streams open at once; more are refused RESOURCE_EXHAUSTED (server.health).
    max_health_watches: int = MAX_HEALTH_WATCHES
    # Seconds a client connection lives before the server asks its client to reconnect (gRPC's
    # GOAWAY, jittered by ±10%; server.limits.grpc_options); 0: for ever.
    max_connection_age: float = 300.0
    # Seconds the calls on such a connection get to finish before it is closed under them.
    max_connection_age_grace: float = MAX_CONNECTION_AGE_GRACE_S
    # The folder `discount-train response` wrote; None: `optimal` rules grant no discount.
    response_model_dir: Path | None = None
    # Seconds between health turning NOT_SERVING at SIGTERM and the port closing, for load
    # balancers that poll health to stop routing here while calls are still answered.
    drain_delay: float = 0.0


def resolve(
    flags: Mapping[str, str | None],
    env: Mapping[str, str] = os.environ,
    insecure_demo_key: bool = False,
    insecure: bool = False,
) -> Settings:
    """Settings from flags, falling back to the environment, then to defaults. The offer key
    comes from the environment only (a flag would show it in `ps`)."""
    raw: dict[str, str | None] = {}
    for name, (variable, default) in SOURCES.items():
        value = flags.get(name)
        raw[name] = value if value is not None else env.get(variable, default)
    problems: list[str] = []

    def flag(name: str) -> str:
        return f"--{name.replace('_', '-')} / {SOURCES[name][0]}"

    model_dir = raw["model_dir"]
    if not model_dir:
        problems.append(f"{flag('model_dir')} is required: the folder `discount-train fit` wrote")
    elif not Path(model_dir).is_dir():
        problems.append(f"{flag('model_dir')}: {model_dir} is not a directory")
    response_dir = raw["response_model_dir"]
    if response_dir and not Path(response_dir).is_dir():
        problems.append(
            f"{flag('response_model_dir')}: {response_dir} is not a directory "
            "(a folder `discount-train response --out DIR` wrote)"
        )
    device = (raw["device"] or "").lower()
    if device not in DEVICES:
        problems.append(f"{flag('device')}: {raw['device']!r} is not one of {', '.join(DEVICES)}")
    port = _number(raw["port"], int)
    if port is None or not 0 <= port <= 65535:
        problems.append(f"{flag('port')}: {raw['port']!r} is not a port number (0-65535)")
    poll = _number(raw["poll_interval"], float)
    if poll is None or poll < 0:
        problems.append(f"{flag('poll_interval')}: {raw['poll_interval']!r} is not seconds >= 0")
    grace = _number(raw["grace"], float)
    if grace is None or grace < 0:
        problems.append(f"{flag('grace')}: {raw['grace']!r} is not seconds >= 0")
    drain_delay = _number(raw["drain_delay"], float)
    if drain_delay is None or drain_delay < 0:
        problems.append(f"{flag('drain_delay')}: {raw['drain_delay']!r} is not seconds >= 0")
    host = raw["host"] or ""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1], as in a URL: the bare address is what sockets take
    if not host:
        problems.append(f"{flag('host')} must not be empty")
    db_url = raw["db_url"] or ""
    if not _utf8(db_url):  # a byte that is not UTF-8, from argv or the environment
        problems.append(f"{flag('db_url')}: {mask_url(db_url)!a} is not valid UTF-8 text")
    else:
        try:
            parse_url(db_url)
        except StoreUnavailable as e:
            problems.append(f"{flag('db_url')}: {e}")
    rules_poll = _number(raw["rules_poll_interval"], float)
    if rules_poll is None or rules_poll <= 0:
        problems.append(
            f"{flag('rules_poll_interval')}: {raw['rules_poll_interval']!r} is not seconds > 0"
        )
    ttl = _number(raw["offer_ttl"], float)
    if ttl is None or not 1 <= ttl <= 7 * 86_400:
        problems.append(f"{flag('offer_ttl')}: {raw['offer_ttl']!r} is not 1 to 604800 seconds")
    spill_dir = Path(raw["offer_spill_dir"]) if raw["offer_spill_dir"] else None
    if spill_dir is not None:
        try:
            spill_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not os.access(spill_dir, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as e:
            problems.append(
                f"{flag('offer_spill_dir')}: {spill_dir} cannot take spilled offers "
                f"({e.strerror or e})"
            )
    keys: OfferKeys | None = None
    if insecure_demo_key:
        keys = OfferKeys(DEMO_OFFER_KEY)
    else:
        try:
            keys = load_offer_keys(env)
        except OfferKeyError as e:
            problems.append(f"{e} (or pass --insecure-demo-key for a local demo)")
        if keys is not None and DEMO_OFFER_KEY in keys.accepted:
            # Public: tokens it signs (a 1-cent price, a year's expiry) would verify.
            problems.append(
                "the offer keys hold the public demo key, with which anyone can sign offers; "
                "remove it (--insecure-demo-key is the one way to use it, for a local demo)"
            )
    auth = (raw["auth"] or "").lower()
    if auth not in AUTH_MODES:
        problems.append(f"{flag('auth')}: {raw['auth']!r} is not one of {', '.join(AUTH_MODES)}")
    reflection = (raw["reflection"] or "").lower()
    if reflection not in SWITCHES:
        problems.append(f"{flag('reflection')}: {raw['reflection']!r} is not on or off")
    tls = _tls(raw, insecure, flag, problems)
    metrics_port = _number(raw["metrics_port"], int) if raw["metrics_port"] else None
    if raw["metrics_port"] and (metrics_port is None or not 0 <= metrics_port <= 65535):
        problems.append(
            f"{flag('metrics_port')}: {raw['metrics_port']!r} is not a port number (0-65535)"
        )
    log_level = (raw["log_level"] or "").lower()
    if log_level not in LEVELS:
        problems.append(
            f"{flag('log_level')}: {raw['log_level']!r} is not one of {', '.join(LEVELS)}"
        )
    batch_size = _number(raw["batch_max_size"], int)
    if batch_size is None or not 1 <= batch_size <= 1024:
        problems.append(f"{flag('batch_max_size')}: {raw['batch_max_size']!r} is not 1 to 1024")
    batch_wait = _number(raw["batch_max_wait_us"], int)
    if batch_wait is None or not 0 <= batch_wait <= 1_000_000:
        problems.append(
            f"{flag('batch_max_wait_us')}: {raw['batch_max_wait_us']!r} is not 0 to 1000000"
        )
    workers = _number(raw["workers"], int)
    if workers is None or not 1 <= workers <= 64:
        problems.append(f"{flag('workers')}: {raw['workers']!r} is not 1 to 64")
    elif metrics_port and metrics_port <= 65535 < metrics_port + workers - 1:
        # Worker i serves its metrics on metrics_port + i (server.workers).
        problems.append(
            f"{flag('metrics_port')}: {metrics_port} + {workers} workers passes port 65535; "
            "pick a lower port"
        )
    ort_threads = _number(raw["ort_threads"], int)
    if ort_threads is None or not 0 <= ort_threads <= 256:
        problems.append(
            f"{flag('ort_threads')}: {raw['ort_threads']!r} is not 0 (automatic) to 256"
        )
    connection_age = _number(raw["max_connection_age"], float)
    if connection_age is None or not (
        connection_age == 0 or 1 <= connection_age <= MAX_CONNECTION_AGE_S
    ):
        problems.append(
            f"{flag('max_connection_age')}: {raw['max_connection_age']!r} is not 0 (for ever) "
            f"or 1 to {MAX_CONNECTION_AGE_S:g} seconds"
        )
    if problems:
        raise SettingsError("invalid settings: " + "; ".join(problems))
    assert model_dir is not None and port is not None and poll is not None and grace is not None
    assert rules_poll is not None and ttl is not None and drain_delay is not None
    assert batch_size is not None and batch_wait is not None and workers is not None
    assert ort_threads is not None and connection_age is not None
    return Settings(
        Path(model_dir),
        device,
        host,
        port,
        poll,
        grace,
        raw["db_url"],
        rules_poll,
        ttl,
        keys,
        auth=auth,
        reflection=reflection == "on",
        tls=tls,
        metrics_port=metrics_port,
        log_level=log_level,
        batch_max_size=batch_size,
        batch_max_wait_us=batch_wait,
        workers=workers,
        ort_threads=ort_threads,
        response_model_dir=Path(response_dir) if response_dir else None,
        offer_spill_dir=spill_dir,
        max_connection_age=connection_age,
        drain_delay=drain_delay,
    )


def address(host: str, port: int) -> str:
    """host:port as gRPC and people read it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _tls(
    raw: Mapping[str, str | None],
    insecure: bool,
    flag: Callable[[str], str],
    problems: list[str],
) -> TlsFiles | None:
    cert, key, ca = raw["tls_cert"], raw["tls_key"], raw["tls_client_ca"]
    if insecure:
        if cert or key or ca:
            problems.append(
                "--insecure serves plaintext; leave out the --tls-* settings (and DISCOUNT_TLS_* "
                "variables), or drop --insecure to serve TLS with them"
            )
        return None
    if not cert or not key:
        problems.append(
            f"TLS is required: give {flag('tls_cert')} and {flag('tls_key')} (PEM files), "
            "or --insecure for plaintext on a trusted network"
        )
        return None
    files = TlsFiles(Path(cert), Path(key), Path(ca) if ca else None)
    try:
        load(files)
    except TlsError as e:
        problems.append(str(e))
        return None
    return files


def insecure_demo_key_in_use(settings: Settings) -> bool:
    return settings.offer_keys is not None and settings.offer_keys.current == DEMO_OFFER_KEY


Number = TypeVar("Number", int, float)


def _number(text: str | None, kind: type[Number]) -> Number | None:
    # int() and float() read "1_0000" as 10000: a typo more likely than a way to write a port.
    if text is not None and "_" in text:
        return None
    try:
        value = kind(text) if text is not None else None
    except ValueError:
        return None
    # float() takes "nan" and "inf": a nan grace or poll interval passes every range check and
    # then stops polling for good, or drains for "nans".
    return value if value is None or math.isfinite(value) else None
