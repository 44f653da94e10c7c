"""What every command shares: the store (opened once, checked once) and the actor's name."""

from __future__ import annotations

import getpass
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from core.store.db import Store
from core.store.migrate import require_head


def default_actor() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        # Containers may run as a uid without a passwd entry.
        return "unknown"


class App:
    def __init__(self, db_url: str, actor: str) -> None:
        self.db_url = db_url
        self.actor = actor
        self._store: Store | None = None

    def store(self, check_schema: bool = True) -> Store:
        """The store, reachable and (unless for `db` commands) at the schema head."""
        if self._store is None:
            store = Store(self.db_url)
            store.ping()
            if check_schema:
                require_head(store)
            self._store = store
        return self._store

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        with self.store().transaction() as session:
            yield session

    def close(self) -> None:
        if self._store is not None:
            self._store.dispose()
