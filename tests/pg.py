"""Store fixtures: the same tests on SQLite (always) and real PostgreSQL (when it answers).

PostgreSQL comes from DISCOUNT_TEST_PG_URL; each test module gets its own database, created
and dropped here. When no PostgreSQL answers, its tests skip, unless DISCOUNT_REQUIRE_PG=1.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import create_engine, delete, text
from sqlalchemy.engine import make_url

from core.store import migrate
from core.store.db import Store, first_line, mask_url
from core.store.tables import Base

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BACKENDS = [pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)]


def pg_url() -> str:
    return os.environ.get("DISCOUNT_TEST_PG_URL", DEFAULT_PG_URL)


def _require_pg() -> str:
    url = pg_url()
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:  # any failure to answer means "no PostgreSQL here"
        why = f"PostgreSQL at {mask_url(url)} does not answer ({first_line(e)})"
        if os.environ.get("DISCOUNT_REQUIRE_PG") == "1":
            pytest.fail(f"{why}; DISCOUNT_REQUIRE_PG=1 requires it")
        pytest.skip(f"{why}; set DISCOUNT_TEST_PG_URL, or DISCOUNT_REQUIRE_PG=1 to fail instead")
    finally:
        engine.dispose()
    return url


def pg_url_if_answering() -> str:
    """DISCOUNT_TEST_PG_URL when PostgreSQL answers there, "" where its tests would skip (for
    a test that also runs without it); DISCOUNT_REQUIRE_PG=1 still fails when none answers."""
    try:
        return _require_pg()
    except pytest.skip.Exception:
        return ""


@contextmanager
def pg_database(options: str = "") -> Iterator[str]:
    """A new, empty database next to the one DISCOUNT_TEST_PG_URL names, made with CREATE
    DATABASE's options (e.g. a collation); dropped afterwards."""
    base = make_url(_require_pg())
    name = f"discount_test_{secrets.token_hex(4)}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}" {options}'))
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:  # also when the work in it failed: no database is left behind
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def empty_database(backend: str, tmp: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'store.db'}"
    else:
        with pg_database() as url:
            yield url


@pytest.fixture(scope="module", params=BACKENDS)
def empty_db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """An empty database per test module and backend."""
    with empty_database(request.param, tmp_path_factory.mktemp("store")) as url:
        yield url


@pytest.fixture(scope="module")
def migrated_db_url(empty_db_url: str) -> str:
    store = Store(empty_db_url)
    migrate.upgrade(store)
    store.dispose()
    return empty_db_url


@pytest.fixture
def db_url(migrated_db_url: str) -> Iterator[str]:
    """A migrated store, emptied after each test (commands commit, so no rollback trick)."""
    yield migrated_db_url
    store = Store(migrated_db_url)
    with store.transaction() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(delete(table))
    store.dispose()


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.dispose()


class HangingProxy:
    """A TCP proxy in front of PostgreSQL that can stop passing bytes, both ways, without
    closing anything: to its clients, a store host that hangs (a frozen machine, dropped
    packets), which no error reveals. Kernel-level ACKs still flow, so TCP never gives up."""

    def __init__(self, url: str) -> None:
        self.target = make_url(url)
        self._listener = socket.create_server(("127.0.0.1", 0))
        here = self.target.set(host="127.0.0.1", port=self._listener.getsockname()[1])
        self.url = here.render_as_string(hide_password=False)
        self._passing = threading.Event()
        self._passing.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def hang(self) -> None:
        self._passing.clear()

    def resume(self) -> None:
        self._passing.set()

    def close(self) -> None:
        self._closed = True
        self._passing.set()
        for s in [self._listener, *self._sockets]:
            with contextlib.suppress(OSError):
                s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
                upstream = socket.create_connection(
                    (self.target.host or "127.0.0.1", self.target.port or 5432)
                )
            except OSError:
                return  # closed
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                self._passing.wait()  # hanging: the bytes read are held, not passed on
                if self._closed:
                    return
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@contextmanager
def hanging_proxy(url: str) -> Iterator[HangingProxy]:
    proxy = HangingProxy(url)
    try:
        yield proxy
    finally:
        proxy.close()
