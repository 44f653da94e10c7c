"""Schema migrations (Alembic, in ``migrations/``) and the check that refuses an old schema."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError, OperationalError

import migrations
from core.store.db import GRANT_HINT, PG_SCHEMA, Store, denied
from core.store.errors import InvalidInput, SchemaOutOfDate, StoreUnavailable

UPGRADE_HINT = "run `discountctl db upgrade`"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["connection"] = connection
    return config


def script() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    heads = script().get_heads()
    if len(heads) != 1:
        raise AssertionError(f"migrations must have one head, found {heads}")
    return heads[0]


def current_revision(store: Store) -> str | None:
    if store.file_missing:
        return None
    try:
        with store.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                _require_usage(store, conn)
            return MigrationContext.configure(conn).get_current_revision()
    except DBAPIError as e:  # unreachable, or a role refused the version table
        raise store.unavailable(e) from None


def _require_usage(store: Store, conn: Connection) -> None:
    """A role that may not use the schema sees no table in it: its store would read as one
    with no schema yet, and `db upgrade` be named as the fix."""
    usable = conn.scalar(
        text("SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = :s"),
        {"s": PG_SCHEMA},
    )
    if usable is False:
        raise StoreUnavailable(
            f"cannot use store {store.masked_url}: permission denied for schema {PG_SCHEMA}; "
            + GRANT_HINT
        )


def require_head(store: Store) -> None:
    """Refuse a store whose schema is older (or newer) than this build's, naming the fix."""
    current = current_revision(store)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaOutOfDate(f"store {store.masked_url} has no schema yet; {UPGRADE_HINT}")
    known = {rev.revision for rev in script().walk_revisions()}
    if current not in known:
        raise SchemaOutOfDate(
            f"store {store.masked_url} is at revision {current}, newer than this build knows "
            f"(head {head}); upgrade discountd/discountctl"
        )
    raise SchemaOutOfDate(
        f"store {store.masked_url} is at revision {current}, this build needs {head}; "
        + UPGRADE_HINT
    )


def _run(store: Store, action: str, revision: str) -> None:
    known = {rev.revision for rev in script().walk_revisions()}
    if revision not in known | {"head", "heads", "base"}:
        # Alembic's own parser asserts on some malformed targets; refuse them here instead.
        raise InvalidInput(
            f"cannot {action} to {revision!r}: not a revision; use head, base or an id from "
            "`discountctl db history`"
        )
    if action == "downgrade" and store.file_missing:
        raise InvalidInput(f"store {store.masked_url} has no schema: nothing to downgrade")
    current = current_revision(store)
    if current is not None and current not in known:
        # Alembic's "Can't locate revision" named a revision `db history` does not list.
        fix = (
            "upgrade discountd/discountctl"
            if action == "upgrade"
            else "only the newer discountctl that upgraded it can downgrade it"
        )
        raise InvalidInput(
            f"cannot {action} to {revision!r}: store {store.masked_url} is at revision "
            f"{current}, newer than this build knows (head {head_revision()}); {fix}"
        )
    if action == "downgrade" and current is None:
        # Alembic would make the version table (and on PostgreSQL the schema) to find nothing.
        raise InvalidInput(f"store {store.masked_url} has no schema: nothing to downgrade")
    if current is not None and revision not in (current, "head", "heads"):
        older = {rev.revision for rev in script().iterate_revisions(current, "base")} | {"base"}
        # Alembic upgrades "to" an older revision by doing nothing, and says nothing either;
        # it refuses a downgrade "to" a newer one in its own words.
        if action == "upgrade" and revision in older:
            raise InvalidInput(
                f"cannot upgrade to {revision!r}: the store is already at {current}, which is "
                f"newer; to go back, `discountctl db downgrade {revision}`"
            )
        if action == "downgrade" and revision not in older:
            raise InvalidInput(
                f"cannot downgrade to {revision!r}: the store is at {current}, which is "
                f"older; to go forward, `discountctl db upgrade {revision}`"
            )
    if action == "upgrade":
        store.create_file()
    try:
        with store.engine.begin() as conn:
            config = alembic_config(conn)
            if action == "upgrade":
                command.upgrade(config, revision)
            else:
                command.downgrade(config, revision)
    except CommandError as e:
        raise InvalidInput(
            f"cannot {action} to {revision!r}: {e}; see `discountctl db history`"
        ) from None
    except DBAPIError as e:
        # Unreachable, or a role refused what the revision does; a revision that fails on its
        # own (an index already there) is named by the CLI as any other store error.
        if isinstance(e, OperationalError) or denied(e):
            raise store.unavailable(e) from None
        raise


def upgrade(store: Store, revision: str = "head") -> None:
    _run(store, "upgrade", revision)


def downgrade(store: Store, revision: str) -> None:
    _run(store, "downgrade", revision)


@dataclass(frozen=True)
class Revision:
    revision: str
    down_revision: str | None
    message: str
    is_head: bool
    is_current: bool

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def history(current: str | None) -> list[Revision]:
    """Every revision, newest first."""
    out = []
    for rev in script().walk_revisions():
        down = rev.down_revision
        out.append(
            Revision(
                revision=rev.revision,
                down_revision=down if isinstance(down, str) or down is None else ",".join(down),
                message=rev.doc or "",
                is_head=rev.is_head,
                is_current=rev.revision == current,
            )
        )
    return out
