"""Opening the store: URL choice and masking, engines per backend, transactions.

The caller owns the transaction: repositories flush, ``transaction()`` commits or rolls back.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
)
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from core.store.errors import Conflict, DataRefused, StoreError, StoreUnavailable

DEFAULT_URL = "sqlite:///var/discount.db"
PG_SCHEMA = "discount"
# Channel that every admin change is announced on, inside the change's own transaction.
NOTIFY_CHANNEL = "discount_changes"
CONNECT_TIMEOUT_S = 5
# libpq's own timeouts, for a database host that dies or drops off the network without closing
# its connections: nothing tells the client, and the server-side statement_timeout cannot
# fire. Without these a query waits ~15 minutes of TCP retransmissions, and an idle pooled
# connection stays "open" for ever. A request unanswered at the TCP level fails after
# tcp_user_timeout; an idle connection is found dead after idle + interval x count.
DEAD_PEER_DETECTION = {
    "tcp_user_timeout": 30_000,  # ms
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 10,
    "keepalives_count": 3,
}


# PostgreSQL's insufficient_privilege: the role may not use the schema or a table in it.
DENIED_SQLSTATE = "42501"
GRANT_HINT = (
    "the role lacks a privilege: discountctl runs as the admin role that owns the schema "
    f"(CREATE SCHEMA {PG_SCHEMA} AUTHORIZATION ROLE), discountd as a role given its rights by "
    "`discountctl db grant-server-role ROLE`, again after each `db upgrade` (docs/SECURITY.md)"
)


def denied(error: BaseException) -> bool:
    """Whether PostgreSQL refused the role a privilege (not an outage, not bad data)."""
    inner = error.orig if isinstance(error, DBAPIError) else error
    return getattr(inner, "sqlstate", None) == DENIED_SQLSTATE


# Query parameters libpq (and so psycopg) takes a password from.
SECRET_QUERY_KEYS = ("password", "sslpassword")


def mask_url(url: str | URL) -> str:
    """The URL with its passwords replaced by ***, safe for messages and logs: the one before
    the @ and any given as a query parameter (?password=...)."""
    try:
        parsed = make_url(url)
        if "@" in (parsed.host or ""):  # a bare @ in the password: its tail reads as the host
            parsed = parsed.set(host="***")
        hidden = {k: "***" for k in parsed.query if k.lower() in SECRET_QUERY_KEYS}
        shown = parsed.update_query_dict(hidden).render_as_string(hide_password=True)
        return shown.replace("=%2A%2A%2A", "=***")  # the query's *** as the password's
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        return "<unparseable URL>"


def first_line(error: BaseException) -> str:
    """An error's first line (pandas' and pyarrow's run over several); a driver error's without
    SQLAlchemy's background link."""
    inner = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    lines = str(inner).strip().splitlines()
    return lines[0] if lines else type(inner).__name__


def parse_url(url: str) -> URL:
    """The store URL, parsed: StoreUnavailable (never echoing a password) when it is not one of
    an SQLite file or a PostgreSQL database this build can open."""
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        # Not echoed: an unparseable URL may still hold a password.
        raise StoreUnavailable(
            "the store URL (--db-url / DISCOUNT_DB_URL) is not a database URL; "
            "use e.g. sqlite:///var/discount.db or postgresql+psycopg://user@host/db"
        ) from None
    if "@" in (parsed.host or ""):
        # A password holding a bare @: the URL splits at its first @, so the password's tail
        # would become the host, and the driver's "cannot resolve host" would print it.
        raise StoreUnavailable(
            "the store URL (--db-url / DISCOUNT_DB_URL) has an @ in its password or user name; "
            "write it as %40"
        )
    backend = parsed.get_backend_name()
    if backend == "postgresql" and parsed.get_driver_name() != "psycopg":
        return parsed.set(drivername="postgresql+psycopg")
    if backend == "sqlite" and (parsed.database or "") in ("", ":memory:"):
        # Each connection would get a database of its own, gone when it closes: `db upgrade`
        # reported a schema at head that no later command, nor discountd, could find.
        raise StoreUnavailable(
            f"store URL {mask_url(parsed)} names no file, and an in-memory SQLite database "
            "does not outlive its connection; use sqlite:///PATH"
        )
    if backend not in ("sqlite", "postgresql"):
        raise StoreUnavailable(
            f"store URL {mask_url(parsed)}: backend {backend!r} is not supported; "
            "use sqlite:///PATH or postgresql+psycopg://..."
        )
    return parsed


def make_engine(url: str) -> Engine:
    """An engine for SQLite or PostgreSQL (psycopg); PostgreSQL works in schema ``discount``."""
    parsed = parse_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(parsed)
    return create_engine(
        parsed,
        pool_pre_ping=True,
        connect_args={
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c search_path={PG_SCHEMA}",
            **DEAD_PEER_DETECTION,
        },
    )


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _sqlite_engine(url: URL) -> Engine:
    engine = create_engine(url, connect_args={"timeout": CONNECT_TIMEOUT_S})
    path = url.database or ""
    on_disk = path not in ("", ":memory:") and not path.startswith("file:")

    @event.listens_for(engine, "do_connect")
    def _existing_only(_dialect: Any, _record: Any, cargs: list[Any], cparams: Any) -> None:
        # SQLite creates a missing file, and a server whose store file was deleted would write
        # its offers into a new empty one (or fail on its missing tables while reporting the
        # store healthy). Only `db upgrade` creates the file (Store.create_file).
        if on_disk:
            cargs[:] = [f"file:{quote(os.path.abspath(path))}?mode=rw"]
            cparams["uri"] = True

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        # WAL: a polling server keeps reading while discountctl writes.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()
        record.info["file_id"] = _file_id(path)

    @event.listens_for(engine, "checkout")
    def _same_file(_dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # A pooled connection holds the file it opened: after the file is deleted or replaced
        # (a restore, a mv) it would go on reading and writing one nobody else sees.
        if on_disk and _file_id(path) != record.info.get("file_id"):
            raise DisconnectionError(f"the store file {path} was removed or replaced")

    return engine


class Store:
    """An engine and its session factory; one per process."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.masked_url = mask_url(url)
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def file_missing(self) -> bool:
        """An SQLite store whose file does not exist: connecting would create it, and a mistyped
        path would leave an empty file behind. Only `db upgrade` makes it."""
        url = self.engine.url
        database = url.database or ""
        return (
            url.get_backend_name() == "sqlite"
            and database not in ("", ":memory:")
            and not Path(database).exists()
        )

    def create_file(self) -> None:
        """The SQLite file (and its folder) `db upgrade` is about to fill (the default store's
        ./var/ is not in a fresh checkout); no other command creates either: the engine opens
        only a file that exists."""
        if self.file_missing:
            path = Path(self.engine.url.database or "")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # Readable by its owner alone: on SQLite the file's mode is the access control
                # (docs/SECURITY.md). An empty file is a new database to SQLite.
                with suppress(FileExistsError):  # another `db upgrade` made it
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except OSError as e:  # a read-only folder, a path through a file, a full disk
                raise StoreUnavailable(
                    f"cannot use store {self.masked_url}: {first_line(e)}"
                ) from None

    def ping(self) -> None:
        """Connect once, so an unreachable store fails fast with one clear line."""
        if self.file_missing:
            return  # nothing to reach yet; the schema check says what to run
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (OperationalError, DBAPIError) as e:
            raise self.unavailable(e) from None

    def unavailable(self, error: BaseException) -> StoreUnavailable:
        if self.file_missing and "unable to open database file" in str(error):
            return StoreUnavailable(
                f"cannot use store {self.masked_url}: the file does not exist (moved or "
                "deleted?); `discountctl db upgrade` makes a new, empty one"
            )
        if denied(error):
            return StoreUnavailable(
                f"cannot use store {self.masked_url}: {first_line(error)}; {GRANT_HINT}"
            )
        return StoreUnavailable(f"cannot use store {self.masked_url}: {first_line(error)}")

    def why(self, error: BaseException) -> str:
        """One line on why a store operation failed: a StoreError says it itself; any other
        error (the driver's, the network's) is named with the store, password masked."""
        return str(error) if isinstance(error, StoreError) else str(self.unavailable(error))

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session whose work is committed on success and rolled back on any error."""
        session = self._sessions()
        try:
            with session.begin():
                yield session
        except StaleDataError:
            raise Conflict(
                "someone else changed this record since it was read; nothing was written. "
                "Show it again and retry."
            ) from None
        except IntegrityError as e:
            raise Conflict(f"the store refused the change: {first_line(e)}") from None
        except DataError as e:
            raise DataRefused(f"the store refused the data: {first_line(e)}") from None
        except OperationalError as e:
            raise self.unavailable(e) from None
        except ProgrammingError as e:
            # A role without its grants: discountd's start says so in one line, a refresh
            # reports the snapshot stale, like an outage that a GRANT ends.
            if not denied(e):
                raise
            raise self.unavailable(e) from None
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def notify_change(session: Session, payload: str) -> None:
    """Tell listening servers that admin data changed; delivered only if the transaction commits."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_notify(:channel, :payload)"),
            {
                "channel": NOTIFY_CHANNEL,
                "payload": payload,
            },
        )
