"""What GetOffers, VerifyOffer and RecordEvents share: the store, the rule snapshot, the offer
log, the signing keys and the offer lifetime. Built by create_server when a store is set.

This module holds the per-server state; the per-request work is server.offers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from core.offer_token import OfferKeys
from core.offers import Respond
from core.store import events
from core.store.db import Store, first_line
from core.store.errors import Conflict, DataRefused, StoreError
from server.errors import NotReady, StoreDown, StoreRefused
from server.limits import BoundedWrites, limit_store
from server.offer_log import OfferLog
from server.purchases import RecentPurchases
from server.response import NoResponseModel
from server.snapshot import SnapshotKeeper

log = logging.getLogger(__name__)
# What a stop allows past its budget for the offer log's last write.
STOP_SLACK_S = 3.0
# What a stop waits for a read of the store in progress (rules, recent purchases); a store
# that answers takes milliseconds.
READ_WAIT_S = 1.0


@dataclass
class Offering:
    store: Store
    keeper: SnapshotKeeper
    log: OfferLog
    keys: OfferKeys
    ttl: timedelta
    # What users bought since the serving model's data ended (server.purchases).
    purchases: RecentPurchases
    writes: BoundedWrites = field(default_factory=BoundedWrites)
    # The response model `optimal` rules price with (server.response); create_server sets it.
    respond: Respond = field(default_factory=NoResponseModel)
    abandoned: bool = False  # stop() gave up on a store that does not answer
    # Where a stop puts the offers it could not write, for the next start (server.offer_log).
    spill_dir: Path | None = None

    @classmethod
    def open(
        cls,
        url: str,
        keys: OfferKeys | None,
        ttl: float,
        poll: float,
        data_end: Callable[[], datetime | None],
        spill_dir: Path | None = None,
    ) -> Offering:
        """Connect, refuse a schema that is not at head, load the first snapshot, and write
        the offers an earlier stop spilled to spill_dir. data_end: when the serving model's
        data ends (server.purchases.data_end), which purchases count as recent from."""
        if keys is None:
            raise NotReady("no offer signing key; set DISCOUNT_OFFER_KEY")
        store = Store(url)
        limit_store(store)
        keeper = SnapshotKeeper(store, poll)
        offer_log = OfferLog(store)
        try:
            keeper.open()
            if spill_dir is not None:
                offer_log.replay(spill_dir)
        except BaseException:
            store.dispose()
            raise
        purchases = RecentPurchases(store, data_end, poll)
        return cls(
            store, keeper, offer_log, keys, timedelta(seconds=ttl), purchases, spill_dir=spill_dir
        )

    def start(self, on_change: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self.keeper.start(on_change)
        self.log.start()
        self.purchases.start()

    async def stop(self, budget: float = 0.0) -> int:
        """Close the store's users; the number of issued offers the offer log could neither
        write within budget seconds (and STOP_SLACK_S for a last write) nor spill.

        A store that hangs (a frozen host: no answer, no error) would hold this for as long as
        TCP takes to give up, which can be forever. So the stop gives up at its deadline and
        sets ``abandoned``: threads still wait on the store, and the process must exit without
        joining them."""
        try:
            await asyncio.wait_for(self._stop(budget), budget + STOP_SLACK_S)
        except TimeoutError:
            self.abandoned = True
            log.error("the store did not answer within %.0fs of shutdown", budget + STOP_SLACK_S)
        if self.log.pending and self.spill_dir is not None:
            try:
                self.log.spill(self.spill_dir)
            except OSError as e:
                log.error("offer log: cannot spill to %s: %s", self.spill_dir, e)
        if self.log.pending:
            log.error("offer log: %d offers could not be written before shutdown", self.log.pending)
        return self.log.pending

    async def _stop(self, budget: float) -> None:
        await asyncio.to_thread(self.writes.close)
        await self.log.close(budget)
        stopped = self.keeper.stop(READ_WAIT_S), self.purchases.stop(READ_WAIT_S)
        if not all(await asyncio.gather(*stopped)):
            # Their threads wait on a store that hangs: the process must exit without them.
            self.abandoned = True
            log.error("a read of the store was still waiting for an answer at shutdown")
        self.store.dispose()

    def record_events(
        self, batch: list[events.EventIn]
    ) -> tuple[list[events.Outcome], list[tuple[str, str]]]:
        """Commit the accepted events before returning (runs in a worker thread): their
        outcomes, and the (user, item) of each sale the store now holds (events.sold)."""
        try:
            with self.store.transaction() as session:
                outcomes = events.record(session, batch, datetime.now(UTC))
                return outcomes, events.sold(session, batch, outcomes)
        except (DataRefused, Conflict) as e:
            raise StoreRefused(
                f"the store refused this batch ({first_line(e)}); no event of it was stored, and "
                "resending it will not help: report it as a discountd bug"
            ) from None
        except (StoreError, SQLAlchemyError, OSError) as e:
            message = self.store.why(e)
            raise StoreDown(
                f"{message}; no event of this batch was stored, retry it with the same event ids"
            ) from None
