"""The least-privilege server role on real PostgreSQL: after `discountctl db grant-server-role`,
a discountd connected as that role serves offers, records events and logs offers, and the role
cannot change rules, events or the audit log."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
import pytest
from cli import ctl
from pg import pg_database
from secure_server import ServerThread, settings
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from core.store import migrate
from core.store.db import Store
from core.store.roles import ADMIN_ONLY, SERVER_INSERTS, SERVER_READS
from core.store.tables import Base, Event, Offer
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(120)]


def test_every_table_is_classified_for_the_server_role() -> None:
    tables = set(Base.metadata.tables)
    assert set(SERVER_READS) | set(ADMIN_ONLY) == tables | {"alembic_version"}
    assert set(SERVER_INSERTS) <= set(SERVER_READS) and not set(ADMIN_ONLY) & set(SERVER_READS)


@pytest.fixture
def admin_url() -> Iterator[str]:
    with pg_database() as url:
        store = Store(url)
        migrate.upgrade(store)
        store.dispose()
        yield url


@pytest.fixture
def server_role(admin_url: str) -> Iterator[str]:
    role = f"discount_server_{secrets.token_hex(4)}"
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE ROLE "{role}" LOGIN'))
    yield role
    # Roles are cluster-wide: revoke its grants in this database, then drop it.
    with engine.connect() as conn:
        conn.execute(text(f'DROP OWNED BY "{role}"'))
        conn.execute(text(f'DROP ROLE "{role}"'))
    engine.dispose()


def as_role(url: str, role: str) -> str:
    return make_url(url).set(username=role, password=None).render_as_string(hide_password=False)


def test_a_server_running_as_the_granted_role_serves_and_records_but_cannot_edit_rules(
    admin_url: str, server_role: str, model_store: Path
) -> None:
    missing = ctl(admin_url, "db", "grant-server-role", "no_such_role_here")
    assert missing.exit_code == 1 and "CREATE ROLE" in missing.output
    granted = ctl(admin_url, "db", "grant-server-role", server_role)
    assert granted.exit_code == 0, granted.output
    assert f'GRANT INSERT ON "discount"."offers", "discount"."events" TO "{server_role}"' in (
        granted.stdout
    )
    ctl(admin_url, "segments", "create", "regulars", "--where", "order_count >= 1")
    ctl(
        admin_url, "rules", "create", "tier", "--policy", "tiered_topk",
        "--param", "k1=2", "--param", "d1=20", "--param", "d2=5",
        "--segment", "regulars", "--max-discount", "30", "--min-margin", "10",
    )  # fmt: skip
    created = ctl(admin_url, "clients", "create", "checkout", "-o", "json")
    metadata = (("authorization", f"Bearer {json.loads(created.stdout)['token']}"),)
    server_url = as_role(admin_url, server_role)
    running = ServerThread(settings(model_store, server_url, auth="required"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.DiscountServiceStub(channel)
            request = pb.GetOffersRequest(user_id="user-0", limit=3)
            offers = stub.GetOffers(request, metadata=metadata).offers
            assert [o.discount_percent for o in offers] == [20.0, 20.0, 5.0]
            events = [
                pb.Event(
                    event_id=f"e{n}",
                    type=pb.EVENT_TYPE_REDEMPTION,
                    user_id="user-0",
                    item_id=o.item_id,
                    offer_id=o.offer_id,
                    revenue_cents=o.final_price_cents,
                )
                for n, o in enumerate(offers)
            ]
            recorded = stub.RecordEvents(pb.RecordEventsRequest(events=events), metadata=metadata)
            assert [r.status for r in recorded.results] == [pb.EVENT_STATUS_ACCEPTED] * 3
    finally:
        running.close()  # flushes the offer log, as the server role
    admin = Store(admin_url)
    with admin.transaction() as session:
        assert session.scalar(select(func.count()).select_from(Offer)) == 3
        assert session.scalar(select(func.count()).select_from(Event)) == 3
    admin.dispose()

    conninfo = make_url(server_url).set(drivername="postgresql").render_as_string(False)
    for statement in (
        "UPDATE discount.rules SET max_discount_pct = 90",
        "DELETE FROM discount.rules",
        "INSERT INTO discount.clients (name, token_sha256, created_at) VALUES ('x', 'y', now())",
        "UPDATE discount.clients SET revoked_at = NULL",
        "DELETE FROM discount.events",
        "UPDATE discount.offers SET final_price = 0",
        "DELETE FROM discount.offers",
        "UPDATE discount.events SET revenue = 0",
        "DELETE FROM discount.clients",
        "SELECT * FROM discount.audit_log",
        "DROP TABLE discount.rules",
        "CREATE TABLE discount.mine (x int)",
    ):
        with psycopg.connect(conninfo) as conn, pytest.raises(psycopg.Error) as e:
            conn.execute(statement)
        assert isinstance(e.value, psycopg.errors.InsufficientPrivilege), (statement, e.value)


DISCOUNTD = Path(sys.executable).with_name("discountd")


def _discountd_refusal(url: str, tmp_path: Path, *extra: str) -> str:
    """discountd's start against url, which must refuse the store: its stderr."""
    # Any folder will do: the store is checked, and refused, before a model is looked for.
    local = ("--insecure-demo-key", "--insecure", "--port", "0", "--device", "cpu")
    result = subprocess.run(
        [str(DISCOUNTD), "--model-dir", str(tmp_path), "--db-url", url, *local, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_a_role_without_grants_is_told_so_not_that_the_schema_is_missing(
    admin_url: str, server_role: str, tmp_path: Path
) -> None:
    """A role without USAGE on the schema sees none of its tables: the store read as having no
    schema yet, and `db upgrade` (which that role cannot run) was named as the fix."""
    url = as_role(admin_url, server_role)
    for result in (ctl(url, "db", "current"), ctl(url, "segments", "list")):
        assert result.exit_code == 1
        assert "permission denied for schema discount" in result.stderr
        assert "db grant-server-role" in result.stderr and "no schema" not in result.stderr
    stderr = _discountd_refusal(url, tmp_path, "--auth", "off")
    assert "permission denied for schema discount" in stderr and "grant-server-role" in stderr


def test_a_server_role_missing_a_table_grant_is_refused_in_one_line(
    admin_url: str, server_role: str, tmp_path: Path
) -> None:
    """The role granted before a `db upgrade` that added a table (as 0002 added clients) and
    not granted again: discountd's start printed a traceback."""
    assert ctl(admin_url, "db", "grant-server-role", server_role).exit_code == 0
    engine = create_engine(admin_url)
    with engine.begin() as conn:
        conn.execute(text(f'REVOKE SELECT ON discount.clients FROM "{server_role}"'))
    engine.dispose()
    stderr = _discountd_refusal(as_role(admin_url, server_role), tmp_path, "--auth", "required")
    assert "permission denied for table clients" in stderr
    assert "again after each `db upgrade`" in stderr
