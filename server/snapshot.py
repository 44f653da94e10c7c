"""The live rule snapshot: loaded from the store at start, refreshed on change, kept when the
store is unreachable.

Refreshes come from two sources: PostgreSQL LISTEN on core.store.db.NOTIFY_CHANNEL (the CLI
notifies inside its own transaction, so a notice means the change is committed) and polling
every ``interval`` seconds, the only mechanism on SQLite and the safety net for a lost notice.
A failed refresh keeps the last good snapshot, marks it stale with the (password-masked)
error, and the next poll retries. So does one the store leaves unanswered for STALL_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import psycopg
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.offers import Snapshot
from core.store.db import NOTIFY_CHANNEL, Store, first_line
from core.store.errors import StoreError
from core.store.migrate import require_head
from core.store.snapshot import Held, load_snapshot
from server.errors import NotReady
from server.limits import settled

log = logging.getLogger(__name__)
LISTEN_RECONNECT_S = 1.0
# A store that hangs rather than refuses (a frozen host, a network that drops packets: its
# statement timeout cannot fire) holds a refresh for as long as TCP waits, minutes. Past this
# the snapshot is reported stale meanwhile; a store that answers takes well under it.
STALL_S = 15.0


class SnapshotKeeper:
    def __init__(self, store: Store, interval: float) -> None:
        self.store = store
        self.interval = interval
        self.snapshot: Snapshot | None = None
        self._held = Held()  # changed only by _load, one at a time (_loading)
        self.fresh = False
        self.error = ""
        self._loaded_at = 0.0  # time.monotonic() of the last good load
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loading: asyncio.Future[None] | None = None  # the latest load's thread
        self._stop_listening = threading.Event()
        self._listener: threading.Thread | None = None
        # The listener waits on its connection and on this pair's far end, which stop()
        # writes to: a stop is not held until the connection next has something to say.
        self._stop_signal: tuple[socket.socket, socket.socket] | None = None
        self._on_change: Callable[[bool], Awaitable[None]] | None = None
        # Also read, in the snapshot's own transaction, by whoever needs store data kept as
        # current as the rules (server.auth's client list): one refresh path, one staleness.
        self.on_load: Callable[[Session], None] | None = None

    def open(self) -> None:
        """Refuse a store that is unreachable or not at the schema head; load the first
        snapshot. Raises StoreError with a message that names the fix."""
        self.store.ping()
        require_head(self.store)
        try:
            self._load()
        except (StoreError, SQLAlchemyError, OSError):
            raise
        except Exception as e:
            raise StoreError(self._unreadable(e)) from e

    @property
    def age_seconds(self) -> float:
        return time.monotonic() - self._loaded_at if self.snapshot is not None else 0.0

    def require(self) -> Snapshot:
        if self.snapshot is None:
            raise NotReady(
                f"no rule snapshot loaded from {self.store.masked_url} yet: {self.error}"
            )
        return self.snapshot

    def _load(self) -> None:
        with self.store.transaction() as session:
            snapshot = load_snapshot(session, datetime.now(UTC), self._held)
            if self.on_load is not None:
                self.on_load(session)
        self.snapshot, self._loaded_at = snapshot, time.monotonic()
        if not self.fresh and self.error:
            log.info("rule snapshot fresh again from %s", self.store.masked_url)
        self.fresh, self.error = True, ""

    async def refresh(self) -> bool:
        """Reload from the store; on failure keep the last snapshot and report why."""
        was_fresh = self.fresh
        load = self._loading = asyncio.ensure_future(asyncio.to_thread(self._load))
        done, _ = await asyncio.wait({load}, timeout=STALL_S)
        if not done:
            # Stale while the store is silent; this load is waited for, not joined by more
            # (each would hold a thread and a pooled connection).
            self._stale(f"cannot use store {self.store.masked_url}: no answer in {STALL_S:g}s")
            await self._changed(was_fresh)
            was_fresh = self.fresh
        try:
            await load
            ok = True
        except (StoreError, SQLAlchemyError, OSError) as e:
            self._stale(self.store.why(e))
            ok = False
        except Exception as e:  # what the store holds, not reaching it: stale all the same
            message = self._unreadable(e)
            if message != self.error:  # each poll repeats it: the traceback once, as _stale
                log.exception("rule snapshot refresh failed")
            self._stale(message)
            ok = False
        await self._changed(was_fresh)
        return ok

    def _unreadable(self, e: Exception) -> str:
        # Not just "rules": a load also reads segments, experiments, budgets' redemptions and
        # the client list (on_load), any of which may be what failed.
        return (
            f"the rule snapshot in {self.store.masked_url} cannot be read: {type(e).__name__}: {e}"
        )

    def _stale(self, message: str) -> None:
        if message != self.error:
            log.error(
                "rule snapshot stale (age %.0fs), serving the last good one: %s",
                self.age_seconds,
                message,
            )
        self.fresh, self.error = False, message

    async def _changed(self, was_fresh: bool) -> None:
        if self._on_change is not None and self.fresh != was_fresh:
            await self._on_change(self.fresh)

    def start(self, on_change: Callable[[bool], Awaitable[None]] | None = None) -> None:
        """Refresh in the background; on_change(fresh) hears when freshness flips."""
        self._on_change = on_change
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())
        if self.store.engine.dialect.name == "postgresql":
            loop = asyncio.get_running_loop()
            self._stop_signal = socket.socketpair()
            self._listener = threading.Thread(
                target=self._listen,
                args=(loop, self._wake, self._stop_signal[0]),
                name="snapshot-listen",
                daemon=True,
            )
            self._listener.start()

    async def stop(self, wait: float = 0.0) -> bool:
        """Stop refreshing; False when a load still waits on the store after `wait` seconds."""
        self._stop_listening.set()
        if self._stop_signal is not None:
            self._stop_signal[1].send(b"x")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._listener is not None:
            await asyncio.to_thread(self._listener.join, 5)
            if self._stop_signal is not None and not self._listener.is_alive():
                for end in self._stop_signal:
                    end.close()
        return await settled(self._loading, wait)

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval or None)
            self._wake.clear()
            try:
                await self.refresh()
            except Exception:  # a bug must not stop refreshes for the life of the process
                log.exception("rule snapshot refresh failed")

    def _listen(
        self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event, stopped: socket.socket
    ) -> None:
        """LISTEN in a thread of its own (psycopg blocks); each notice wakes the refresher.
        A broken connection is retried; polling covers the gap."""
        # Connected as the store's engine connects: a URL rendered back to text would not
        # quote a password with a space, which libpq then refuses.
        args, params = self.store.engine.dialect.create_connect_args(self.store.engine.url)
        params = {"connect_timeout": 5, **params}
        failed = ""
        while not self._stop_listening.is_set():
            try:
                with (
                    psycopg.connect(*args, autocommit=True, **params) as conn,
                    selectors.DefaultSelector() as waiting,
                ):
                    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    failed = ""
                    # Changes made while not listening are picked up by this refresh.
                    loop.call_soon_threadsafe(wake.set)
                    waiting.register(conn.fileno(), selectors.EVENT_READ)
                    waiting.register(stopped, selectors.EVENT_READ)
                    while not self._stop_listening.is_set():
                        if any(key.fileobj is stopped for key, _ in waiting.select()):
                            break
                        # What arrived, read without waiting: a closed connection raises here.
                        if list(conn.notifies(timeout=0)):
                            loop.call_soon_threadsafe(wake.set)
            except (psycopg.Error, OSError) as e:
                # Once per new reason: without LISTEN, changes wait for the next poll.
                reason = first_line(e)
                if params.get("password"):  # libpq quotes a conninfo it cannot parse
                    reason = reason.replace(str(params["password"]), "***")
                log.log(
                    logging.WARNING if reason != failed else logging.DEBUG,
                    "LISTEN %s failed, changes wait for the next poll: %s",
                    NOTIFY_CHANNEL,
                    reason,
                )
                if reason != failed:
                    # A refresh now: a store that is gone shows as stale at once, not after a
                    # poll interval that, with NOTIFY doing the work, may be minutes long.
                    loop.call_soon_threadsafe(wake.set)
                failed = reason
                self._stop_listening.wait(LISTEN_RECONNECT_S)
            except RuntimeError:  # the event loop closed under us: the server is gone
                return
