"""What GetOffers, VerifyOffer and RecordEvents share: the store, the rule snapshot, the offer
log, the signing keys and the offer lifetime. Built by create_server when a store is set.

This module holds the per-server state; the per-request work is server.offers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from core.offer_token import OfferKeys
from core.offers import Respond
from core.store import events
from core.store.db import Store, first_line
from core.store.errors import Conflict, DataRefused, StoreError
from server.errors import NotReady, StoreDown, StoreRefused
from server.limits import BoundedWrites, limit_store
from server.offer_log import OfferLog
from server.response import NoResponseModel
from server.snapshot import SnapshotKeeper


@dataclass
class Offering:
    store: Store
    keeper: SnapshotKeeper
    log: OfferLog
    keys: OfferKeys
    ttl: timedelta
    writes: BoundedWrites = field(default_factory=BoundedWrites)
    # The response model `optimal` rules price with (server.response); create_server sets it.
    respond: Respond = field(default_factory=NoResponseModel)

    @classmethod
    def open(cls, url: str, keys: OfferKeys | None, ttl: float, poll: float) -> Offering:
        """Connect, refuse a schema that is not at head, load the first snapshot."""
        if keys is None:
            raise NotReady("no offer signing key; set DISCOUNT_OFFER_KEY")
        store = Store(url)
        limit_store(store)
        keeper = SnapshotKeeper(store, poll)
        try:
            keeper.open()
        except BaseException:
            store.dispose()
            raise
        return cls(store, keeper, OfferLog(store), keys, timedelta(seconds=ttl))

    def start(self, on_change: Callable[[bool], Awaitable[None]] | None = None) -> None:
        self.keeper.start(on_change)
        self.log.start()

    async def stop(self, budget: float = 0.0) -> int:
        """Close the store's users; the number of issued offers the offer log could not write
        within budget seconds."""
        await asyncio.to_thread(self.writes.close)
        lost = await self.log.close(budget)
        await self.keeper.stop()
        self.store.dispose()
        return lost

    def record_events(self, batch: list[events.EventIn]) -> list[events.Outcome]:
        """Commit the accepted events before returning (runs in a worker thread)."""
        try:
            with self.store.transaction() as session:
                return events.record(session, batch, datetime.now(UTC))
        except (DataRefused, Conflict) as e:
            raise StoreRefused(
                f"the store refused this batch ({first_line(e)}); no event of it was stored, and "
                "resending it will not help: report it as a discountd bug"
            ) from None
        except (StoreError, SQLAlchemyError, OSError) as e:
            message = str(e) if isinstance(e, StoreError) else str(self.store.unavailable(e))
            raise StoreDown(
                f"{message}; no event of this batch was stored, retry it with the same event ids"
            ) from None
