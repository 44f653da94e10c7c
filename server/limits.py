"""Hard limits that keep one caller, or a slow store, from growing the server without bound.

Each limit answers the caller with a status it can act on instead of queueing more work:
oversized messages and too many concurrent calls get RESOURCE_EXHAUSTED from gRPC itself, a
full offer log gets RESOURCE_EXHAUSTED from GetOffers. docs/RELIABILITY.md lists them all.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import event

from core.store.db import Store
from core.store.tables import ID_LENGTH
from server.errors import Overloaded

T = TypeVar("T")

# The largest request is RecordEvents with 1000 events or GetOffers with 1000 item ids, well
# under 1 MiB; 4 MiB leaves room for long ids while refusing a caller who sends megabytes.
MAX_RECEIVE_MESSAGE_BYTES = 4 * 1024 * 1024
# Calls being served at once, per process, health checks not counted. Past this the server
# answers RESOURCE_EXHAUSTED at once (counted by server.service `rpc`), so a burst
# cannot queue unboundedly behind the model or the store's connection pool.
MAX_CONCURRENT_RPCS = 1000
# gRPC's own cap, which counts every call, sits this many above: room for health probes, and
# for the calls over the cap while they are being refused.
PROBE_SLOTS = 64
# Health Watch streams open at once (server.health); more are refused RESOURCE_EXHAUSTED.
# gRPC's cap sits this many higher again, so open streams take no slot of a call or a probe.
# A client channel with gRPC's client-side health checking holds one per server address.
MAX_HEALTH_WATCHES = 256
# The longest service name a health Watch may name; a longer one is refused NOT_FOUND at once.
# Anyone may Watch, and a stream holds its request while it is open: 4 MiB names held ~16 MB
# of memory each. The names the server answers for are a few dozen characters.
MAX_HEALTH_SERVICE_CHARS = 256
# What calls get to finish on a connection past its --max-connection-age (grpc_options).
MAX_CONNECTION_AGE_GRACE_S = 30.0
# Offers issued but not yet written to the store (a store outage keeps them queued). When the
# queue is full GetOffers refuses: handing out a token whose offer might never be logged
# would break "every offer id handed out is in the offers table".
OFFER_LOG_MAX_PENDING = 200_000
# Server-side waits on the store: a lock or a stalled query fails the call rather than holding
# a worker thread and a pooled connection for as long as the lock lasts.
STORE_STATEMENT_TIMEOUT_MS = 5_000
STORE_LOCK_TIMEOUT_MS = 2_000


# User ids are stored with every offer, in a column of this width: a longer one would make the
# offer log's insert fail on PostgreSQL, and every offer queued behind it wait forever.
MAX_ID_CHARS = ID_LENGTH
# Error messages echo what the caller sent, and gRPC sends a status in the trailing metadata,
# where a caller's default limit is 8 KiB: past it the call fails at random with "Stream
# removed" instead of the error. So the message and each violation's field and description
# are cut to these many bytes as sent, the details list at most MAX_VIOLATIONS (no request has
# more problems today), and the request id echoed with them is cut to MAX_REQUEST_ID_CHARS.
# At most ~5.5 KB in all: the message percent-encoded (800), the details in base64 (4/3 of the
# message again and 6 × 2 × 200 bytes of violations: 4.4 KB), the request id and a few headers.
MAX_ERROR_BYTES = 800
MAX_VIOLATION_BYTES = 200
MAX_VIOLATIONS = 6
MAX_REQUEST_ID_CHARS = 128


def _sent_bytes(char: str) -> int:
    # A status message goes percent-encoded: each UTF-8 byte of a character outside printable
    # ASCII, and "%", as three ("é" is "%C3%A9"). Counting so also bounds the UTF-8 bytes of the
    # same text in the details.
    return 1 if " " <= char <= "~" and char != "%" else 3 * len(char.encode(errors="replace"))


def shorten(text: str, limit: int) -> str:
    """The text, or its start and "...", in at most limit bytes as gRPC sends it."""
    if len(text) <= limit and text.isascii() and text.isprintable() and "%" not in text:
        return text
    used, room = 0, 0  # room: how many characters fit with "..." after them
    for end, char in enumerate(text):
        used += _sent_bytes(char)
        if used <= limit - 3:
            room = end + 1
        elif used > limit:
            return text[:room] + "..."
    return text


def grpc_options(
    share_port: bool, max_connection_age: float, grace: float
) -> list[tuple[str, int]]:
    """share_port: let other processes bind the same port (SO_REUSEPORT, which gRPC sets on
    Linux unless told not to); only --workers wants it. Left on for one process, a second
    discountd started by mistake on the same port would bind too, and take half its calls.

    max_connection_age (seconds; 0: for ever): after it gRPC sends the client a GOAWAY, and
    its channel reconnects for the next call. The kernel spreads connections over --workers
    (and a balancer over replicas) only when they are made, so a long-lived client channel
    would stay on one process for good. And a connection closes `grace` seconds later with
    whatever it still holds, so a call whose request never arrives keeps its slot of gRPC's
    call cap for at most the age (which gRPC stretches by up to 10%, so connections made
    together do not all go at once) and the grace, instead of until its client goes."""
    options = [
        ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
        ("grpc.so_reuseport", int(share_port)),
    ]
    if max_connection_age > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(grace * 1000)),
        ]
    return options


# RecordEvents batches waiting for, or holding, a store-write thread. More are refused with
# RESOURCE_EXHAUSTED: while the store is slow, callers back off instead of piling up.
MAX_WAITING_EVENT_BATCHES = 64
# Threads of their own, so a stalled store cannot take the threads Recommend and GetOffers use.
STORE_WRITE_THREADS = 4


async def settled(work: asyncio.Future[Any] | None, wait: float) -> bool:
    """Whether work running in a thread is over, waiting up to `wait` seconds. A thread that
    waits on a store that hangs cannot be stopped, and joining it (asyncio.run does at exit,
    then the interpreter) would hold the process until TCP gives up on the store."""
    if work is None or work.done():
        return True
    done, _ = await asyncio.wait({work}, timeout=wait)
    return bool(done)


def limit_store(store: Store) -> None:
    """Server-side timeouts on every PostgreSQL connection the server's store opens."""
    if store.engine.dialect.name != "postgresql":
        return  # SQLite waits on its busy timeout (core.store.db), a few seconds

    @event.listens_for(store.engine, "connect")
    def _timeouts(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET statement_timeout = {STORE_STATEMENT_TIMEOUT_MS}")
            cursor.execute(f"SET lock_timeout = {STORE_LOCK_TIMEOUT_MS}")
        # Committed, so the pool's rollback on check-in does not undo the settings.
        dbapi_connection.commit()


class BoundedWrites:
    """Store writes on their own threads, with at most max_waiting submitted and unfinished.

    Counted until the thread finishes, not until the caller stops waiting: a call whose client
    gave up still holds a thread and a connection until the store answers or times out.
    """

    def __init__(
        self, threads: int = STORE_WRITE_THREADS, max_waiting: int = MAX_WAITING_EVENT_BATCHES
    ) -> None:
        self.max_waiting = max_waiting
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="store-write")
        self._lock = threading.Lock()
        self._unfinished = 0

    @property
    def unfinished(self) -> int:
        return self._unfinished

    async def run(self, write: Callable[[], T]) -> T:
        with self._lock:
            if self._unfinished >= self.max_waiting:
                raise Overloaded(
                    f"{self._unfinished} event batches already wait for the store; "
                    "retry later with the same event ids"
                )
            self._unfinished += 1
        future = self._executor.submit(write)
        future.add_done_callback(self._finished)
        return await asyncio.wrap_future(future)

    def _finished(self, _future: Future[Any]) -> None:
        with self._lock:
            self._unfinished -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=True)
