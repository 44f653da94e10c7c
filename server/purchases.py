"""What users bought after the serving model's data ended, so Recommend can exclude it as it
excludes the purchases the model was trained on.

A purchase is held as soon as this process stores it through RecordEvents. Purchases stored
by anyone else (another worker or replica, a backfill) are polled from the store, in reads of
their own: a slow or failing read never holds up the rule snapshot. Each read asks only for
purchases stored since the newest one the last read saw, less OVERLAP. When a model whose
data ends elsewhere starts serving, the newest MAX_HELD purchases since its data end are read
again from scratch, which also drops the ones the new model was trained on. So memory holds
the purchases made since the model's data end, at most MAX_HELD of them at the switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from core.store.db import Store
from core.store.errors import StoreError
from core.store.events import purchases_received_after
from server.limits import settled
from server.model import ModelVersion

log = logging.getLogger(__name__)
# How far back each read reaches past the newest purchase the last one saw. received_at is
# stamped before the transaction commits, so a purchase can become visible after a later-stamped
# one has been read: by the statement timeout on PostgreSQL (5 s, server.limits), the busy
# timeout on SQLite. Different hosts' clocks must also agree to within this.
OVERLAP = timedelta(seconds=60)
# The most purchases a model switch reads (the newest; docs/BENCHMARKS.md "Recent purchases":
# 300,000 took 35 MB and 1.5 s). A model trained on an old export would otherwise load the
# store's whole purchase history into every worker.
MAX_HELD = 500_000
EMPTY: frozenset[str] = frozenset()
ByUser = dict[str, frozenset[str]]


def data_end(model: ModelVersion | None) -> datetime | None:
    """When the model's training data ends: its last event (manifest data.reference_time), else
    when it was exported; None while no model serves."""
    if model is None:
        return None
    manifest = model.manifest
    for stamp in (manifest.data.get("reference_time"), manifest.created_at):
        try:
            moment = datetime.fromisoformat(str(stamp))
        except ValueError:
            continue
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    return None


def _group(rows: list[tuple[str, str, datetime]]) -> ByUser:
    read: dict[str, set[str]] = defaultdict(set)
    for user, item, _ in rows:
        read[user].add(sys.intern(item))
    return {user: frozenset(items) for user, items in read.items()}


class RecentPurchases:
    """Item ids per user id. Changed on the event loop only (reads run in a thread and hand
    their rows back), so a purchase added while a read runs is never overwritten by it."""

    def __init__(
        self,
        store: Store,
        since: Callable[[], datetime | None],
        interval: float,
        limit: int = MAX_HELD,
    ) -> None:
        self._store = store
        self._since = since  # the serving model's data_end
        self._interval = interval
        self._limit = limit
        self._items: ByUser = {}
        self._held_since: datetime | None = None  # the data end of the purchases held
        self._newest: datetime | None = None  # the newest received_at read so far
        self._added: list[tuple[str, str]] | None = None  # adds while a full read runs
        self._reading: asyncio.Task[None] | None = None
        self._asked_since: datetime | None = None  # the data end when _reading was asked for
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._read_at: float | None = None  # time.monotonic() of the last good read
        self.error = ""

    @property
    def state(self) -> tuple[float | None, int]:
        """Seconds since the last good read (None before one), and the users held."""
        age = time.monotonic() - self._read_at if self._read_at is not None else None
        return age, len(self._items)

    def of(self, user_id: str) -> frozenset[str]:
        return self._items.get(user_id, EMPTY)

    def add(self, user_id: str, item_id: str) -> None:
        """A purchase this process has just stored: excluded from the next call on."""
        held = self.of(user_id)
        if item_id not in held:
            self._items[user_id] = held | {sys.intern(item_id)}
        if self._added is not None:
            self._added.append((user_id, item_id))

    def read(self) -> asyncio.Task[None]:
        """A read of what the store holds since the last one: the one running when it was
        asked for with the same model (a store that hangs then holds one thread, not one per
        poll), else a new one once that is done."""
        running, since = self._reading, self._since()
        if running is None or running.done():
            running = asyncio.create_task(self._read())
        elif since != self._asked_since:
            running = asyncio.create_task(self._read(behind=running))
        self._reading, self._asked_since = running, since
        return running

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, wait: float = 0.0) -> bool:
        """Stop reading; False when a read still waits on the store after `wait` seconds."""
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return await settled(self._reading, wait)

    async def _run(self) -> None:
        while True:
            try:
                await self.read()
            except Exception:  # a bug must not end the polls for the life of the process
                log.exception("reading recent purchases failed")
            await asyncio.sleep(self._interval)

    async def _read(self, behind: asyncio.Task[None] | None = None) -> None:
        if behind is not None:
            await asyncio.wait({behind})
        since = self._since()
        if since is None or self._stopped:
            return
        anew = since != self._held_since
        if anew:
            # Not after now: a data end ahead of the store's clock (local times read as UTC)
            # would skip what is stored until then.
            after, limit = min(since, datetime.now(UTC)), self._limit
            newest = after
            self._added = []
        else:
            assert self._newest is not None
            newest = self._newest
            after, limit = newest - OVERLAP, None
        try:
            rows, held = await asyncio.to_thread(self._fetch, after, limit)
        except (StoreError, SQLAlchemyError, OSError) as e:
            self._failed(self._store.why(e))
            return
        finally:
            added, self._added = self._added, None
        if anew:
            for user, item in added or ():
                held[user] = held.get(user, EMPTY) | {item}
            self._items = held
            capped = len(rows) == limit
            log.log(
                logging.WARNING if capped else logging.INFO,
                "recent purchases: %s%d purchases by %d users since %s, the serving model's "
                "data end%s",
                "the newest " if capped else "",
                len(rows),
                len(held),
                since.isoformat(),
                " (the limit: older ones are not excluded until the next model)" if capped else "",
            )
        else:
            for user, items in held.items():
                mine = self.of(user)
                if not items <= mine:
                    self._items[user] = mine | items
        if self.error:
            log.info("recent purchases read again from %s", self._store.masked_url)
        self.error, self._read_at = "", time.monotonic()
        self._held_since = since
        self._newest = max([newest, *(received for _, _, received in rows)])

    def _fetch(
        self, after: datetime, limit: int | None
    ) -> tuple[list[tuple[str, str, datetime]], ByUser]:
        with self._store.transaction() as session:
            rows = purchases_received_after(session, after, limit)
        return rows, _group(rows)

    def _failed(self, message: str) -> None:
        if message != self.error:
            log.error("recent purchases: keeping what is held: %s", message)
        self.error = message
