"""What users bought after the serving model's data ended, so Recommend can exclude it as it
excludes the purchases the model was trained on.

A purchase is held as soon as this process stores it through RecordEvents. Purchases stored
by anyone else (another worker or replica, a backfill) are read along with the rule snapshot
(server.snapshot), so they arrive as fast as rule changes do and go stale with them. Each read
asks only for purchases stored since the previous one, less OVERLAP. When a model whose data
ends later starts serving, everything is read again from that point, which also drops the
purchases the new model was trained on. So memory grows with the purchases made since the last
training, not with the shop's history.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import Session

from core.store.events import purchases_received_after
from server.model import ModelVersion

log = logging.getLogger(__name__)
# How far back each read reaches past the newest purchase the last one saw. received_at is
# stamped before the transaction commits, so a purchase can become visible after a later-stamped
# one has been read. The store's statement timeout (5 s) bounds that delay; different hosts'
# clocks must also agree to within this.
OVERLAP = timedelta(seconds=60)
NONE: frozenset[str] = frozenset()


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


class RecentPurchases:
    """Item ids per user id. The event loop reads and adds; a snapshot thread loads. Each user's
    set is replaced, never changed in place, so a reader never sees one half-updated."""

    def __init__(self, since: Callable[[], datetime | None]) -> None:
        self._since = since  # the serving model's data_end
        self._loaded_since: datetime | None = None
        self._newest: datetime | None = None  # the newest received_at read so far
        self._items: dict[str, frozenset[str]] = {}

    def of(self, user_id: str) -> frozenset[str]:
        return self._items.get(user_id, NONE)

    def add(self, user_id: str, item_id: str) -> None:
        """A purchase this process has just stored: excluded from the next call on."""
        held = self.of(user_id)
        if item_id not in held:
            self._items[user_id] = held | {sys.intern(item_id)}

    def load_from(self, session: Session) -> None:
        since = self._since()
        if since is None:  # no model yet: nothing to measure "after its data" from
            return
        if since != self._loaded_since or self._newest is None:
            anew, after, newest = True, since, since
        else:
            anew, after, newest = False, max(since, self._newest - OVERLAP), self._newest
        read: dict[str, set[str]] = defaultdict(set)
        for user, item, received in purchases_received_after(session, after):
            read[user].add(sys.intern(item))
            newest = max(newest, received)
        if anew:
            self._items = {user: frozenset(items) for user, items in read.items()}
            log.info(
                "recent purchases: %d users bought since %s, the serving model's data end",
                len(read),
                since.isoformat(),
            )
        else:
            for user, items in read.items():
                held = self.of(user)
                if not items <= held:
                    self._items[user] = held | items
        self._loaded_since, self._newest = since, newest
