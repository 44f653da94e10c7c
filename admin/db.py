"""`discountctl db ...`: schema migrations."""

from __future__ import annotations

import click
from sqlalchemy import inspect

from admin.app import App
from admin.options import confirm, yes_option
from admin.output import echo, emit, message, output_option
from core.store import migrate, roles
from core.store.db import PG_SCHEMA, Store


@click.group()
def db() -> None:
    """The store's schema: upgrade, downgrade, current revision, history, server role."""


def _state(app: App) -> dict[str, object]:
    current = migrate.current_revision(app.store(check_schema=False))
    head = migrate.head_revision()
    return {
        "url": app.store(check_schema=False).masked_url,
        "current": current,
        "head": head,
        "at_head": current == head,
    }


def _where(state: dict[str, object]) -> str:
    if state["current"] is None:
        return f"store {state['url']} has no schema; `discountctl db upgrade` creates it"
    return f"store {state['url']} is at revision {state['current']}"


@db.command("upgrade")
@click.argument("revision", default="head")
@output_option
@click.pass_obj
def upgrade(app: App, revision: str, output: str) -> None:
    """Migrate the schema up to REVISION (default: head). Creates the schema on a new store.

    \b
    Example:
      discountctl --db-url postgresql+psycopg://discount@db/shop db upgrade
    """
    store = app.store(check_schema=False)
    before = _pg_tables(store)
    migrate.upgrade(store, revision)
    state = _state(app)
    message(_where(state))
    added = sorted(_pg_tables(store) - before)
    # discountd's role reads only the tables it was granted; a new store is SECURITY.md's
    # first steps, which grant them anyway.
    if added and before:
        message(
            f"new table{'s' if len(added) > 1 else ''} {', '.join(added)}: run `discountctl db "
            "grant-server-role ROLE` again for discountd's role, or a discountd connecting as it "
            "refuses to start (docs/SECURITY.md)"
        )
    emit(state, output)


def _pg_tables(store: Store) -> set[str]:
    """The store's tables on PostgreSQL, where roles are granted them; none on SQLite (whose
    file an upgrade may have yet to make)."""
    if store.engine.dialect.name != "postgresql":
        return set()
    return set(inspect(store.engine).get_table_names(schema=PG_SCHEMA))


@db.command("downgrade")
@click.argument("revision")
@yes_option
@output_option
@click.pass_obj
def downgrade(app: App, revision: str, yes: bool, output: str) -> None:
    """Migrate the schema down to REVISION ('base' drops every table and its data).

    \b
    Example:
      discountctl db downgrade base --yes
    """
    store = app.store(check_schema=False)
    confirm(f"Downgrade {store.masked_url} to {revision}? Dropped tables lose their data.", yes)
    migrate.downgrade(store, revision)
    state = _state(app)
    message(_where(state))
    emit(state, output)


@db.command("current")
@output_option
@click.pass_obj
def current(app: App, output: str) -> None:
    """Show the store's schema revision and whether it is at this build's head.

    \b
    Example:
      discountctl db current --output json
    """
    emit(_state(app), output)


@db.command("history")
@output_option
@click.pass_obj
def history(app: App, output: str) -> None:
    """List the schema revisions, newest first, marking the store's current one.

    \b
    Example:
      discountctl db history
    """
    current_rev = migrate.current_revision(app.store(check_schema=False))
    emit([r.to_dict() for r in migrate.history(current_rev)], output)


@db.command("grant-server-role")
@click.argument("role")
@click.option("--dry-run", is_flag=True, help="Print the GRANT statements; change nothing.")
@output_option
@click.pass_obj
def grant_server_role(app: App, role: str, dry_run: bool, output: str) -> None:
    """Give the existing PostgreSQL ROLE what discountd needs and no more: read rules,
    segments, experiments, model versions and clients; insert (never change) offers and events.
    Run it as the admin role after `db upgrade`; see docs/SECURITY.md.

    \b
    Example:
      discountctl db grant-server-role discount_server
    """
    store = app.store()
    if dry_run:
        statements = roles.server_grants(store.engine, role)
    else:
        statements = roles.grant_server_role(store.engine, role)
        message(f"granted the server's rights on {store.masked_url} to {role!r}")
    if output == "json":
        emit({"role": role, "applied": not dry_run, "statements": statements}, output)
    else:
        echo(";\n".join(statements) + ";")
