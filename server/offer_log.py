"""The offer log: issued offers go to the store in batches, off the request path.

GetOffers only appends to an in-memory queue; a background task writes batches in a worker
thread. A batch that fails stays queued and is retried, so a store outage delays the log
instead of losing it; a batch the store refuses as data is written row by row, and only the
rows it refuses are dropped (logged), so one bad row never holds back the others. The queue
holds at most max_pending offers: past that, append refuses (GetOffers answers
RESOURCE_EXHAUSTED) rather than grow memory or drop an offer whose token was handed out.
``close`` flushes what is queued, for a graceful shutdown.

An outage that outlasts the shutdown would still lose the offers left in the queue, though
their tokens are out. With a spill directory they go to a file there instead (``spill``), and
the next server to start on that directory writes them to the store before it serves
(``replay``): JSON lines, one offer each, written whole or not at all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import fcntl
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from core.store.db import Store
from core.store.errors import Conflict, DataRefused, StoreError
from core.store.offers import insert_offers
from server.errors import Overloaded
from server.limits import OFFER_LOG_MAX_PENDING

log = logging.getLogger(__name__)
BATCH = 500
SPILL_PATTERN = "offers-*.jsonl"
_TIMES = ("issued_at", "expires_at")  # the rows' datetimes, written in ISO 8601


class OfferLog:
    def __init__(
        self, store: Store, interval: float = 0.5, max_pending: int = OFFER_LOG_MAX_PENDING
    ) -> None:
        self.store = store
        self.interval = interval
        self.max_pending = max_pending
        self.refused = 0
        self.dropped = 0  # offers the store refused as data: a bug upstream, logged each
        self._error = ""
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Queue the rows, or raise Overloaded (nothing queued) when they do not fit."""
        if len(self._pending) + len(rows) > self.max_pending:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.error(
                    "offer log full (%d offers wait for the store): GetOffers refused %d times",
                    self.pending,
                    self.refused,
                )
            raise Overloaded(
                f"{self.pending} issued offers wait to be logged (the store is slow or down); "
                "retry later"
            )
        self._pending.extend(rows)
        # A full batch goes at once, but while the store refuses, retries keep to the interval:
        # woken by every GetOffers, the log tried a new connection per call during an outage.
        if len(self._pending) >= BATCH and not self._error:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def flush(self) -> bool:
        """Write everything queued; False (rows kept) when the store refuses."""
        while self._pending:
            batch = [self._pending[i] for i in range(min(BATCH, len(self._pending)))]
            try:
                await asyncio.to_thread(self._store, batch)
            except (StoreError, SQLAlchemyError, OSError) as e:
                message = self.store.why(e)
                if message != self._error:  # once per outage, not once per retry
                    log.warning(
                        "offer log: %d offers wait for the store: %s", self.pending, message
                    )
                self._error = message
                return False
            for _ in batch:
                self._pending.popleft()
        if self._error:
            log.info("offer log: the store takes offers again")
            self._error = ""
        return True

    def _store(self, batch: list[dict[str, Any]]) -> None:
        """Write a batch; an outage propagates, and the caller keeps the batch."""
        try:
            self._write(batch)
        except (DataRefused, Conflict):
            # Not an outage: a row the store cannot take. Retried as it is, it would hold
            # back every offer behind it for good; row by row, only the bad ones are lost.
            self._write_each(batch)

    def _write(self, batch: list[dict[str, Any]]) -> None:
        with self.store.transaction() as session:
            insert_offers(session, batch)

    def _write_each(self, batch: list[dict[str, Any]]) -> None:
        """Write rows one at a time, dropping (and logging) those the store refuses; an outage
        meanwhile propagates, and the batch is retried whole."""
        for row in batch:
            try:
                self._write([row])
            except (DataRefused, Conflict) as e:
                self.dropped += 1
                log.error(
                    "offer log: offer %s dropped, the store refuses it: %s", row["offer_id"], e
                )

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            await self.flush()

    async def close(self, budget: float = 0.0) -> None:
        """Stop writing in the background and flush what is queued, retrying at the interval
        for up to budget seconds while the store refuses (a shutdown during a short outage
        must not lose offers whose tokens are out); what is left stays ``pending``."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        while not await self.flush() and loop.time() + self.interval <= deadline:
            await asyncio.sleep(self.interval)

    def spill(self, directory: Path) -> Path | None:
        """Move the queued offers to a new file in directory; its path (None when nothing was
        queued). OSError when it cannot be written: the offers stay queued."""
        if not self._pending:
            return None
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = directory / SPILL_PATTERN.replace("*", f"{stamp}-{os.getpid()}")
        partial = path.with_name(path.name + ".partial")  # not matched by SPILL_PATTERN
        # Offers name users and prices: readable by the server's user alone, like the store.
        descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as out:
            for row in self._pending:
                times = {k: row[k].isoformat() for k in _TIMES}
                out.write(json.dumps({**row, **times}, separators=(",", ":")) + "\n")
            out.flush()
            os.fsync(out.fileno())
        partial.rename(path)
        _sync_directory(directory)
        log.warning("offer log: %d offers spilled to %s", self.pending, path)
        self._pending.clear()
        return path

    def replay(self, directory: Path) -> int:
        """Write to the store the offers spilled to directory, deleting each file once its
        offers are stored; how many offers the files held. A file another process is replaying
        is left to it; one the store cannot take now (an outage) is kept for the next start."""
        return sum(self._replay(path) for path in sorted(directory.glob(SPILL_PATTERN)))

    def _replay(self, path: Path) -> int:
        """One spill file's offers written and the file deleted; 0 when it is left in place."""
        try:
            file = path.open("r", encoding="utf-8")
        except FileNotFoundError:
            return 0  # replayed and deleted by another worker meanwhile
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # another worker is replaying it
            try:
                rows = [_decode(line) for line in file if line.strip()]
            except (ValueError, KeyError, TypeError) as e:
                log.error("offer log: %s is not a spill file, left as it is: %s", path, e)
                return 0
            try:
                for start in range(0, len(rows), BATCH):
                    self._store(rows[start : start + BATCH])
            except (StoreError, SQLAlchemyError, OSError) as e:
                log.error("offer log: %s kept for the next start: %s", path, e)
                return 0
            # Another worker may have replayed it too: the store skips offers it holds.
            path.unlink(missing_ok=True)
        log.info("offer log: %d spilled offers from %s written", len(rows), path)
        return len(rows)


def _decode(line: str) -> dict[str, Any]:
    row: dict[str, Any] = json.loads(line)
    for key in _TIMES:
        row[key] = datetime.fromisoformat(row[key])
    return row


def _sync_directory(directory: Path) -> None:
    """Make a rename in directory survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
