"""`discountctl clients ...`: the services allowed to call discountd when auth is on."""

from __future__ import annotations

import click

from admin.app import App
from admin.options import confirm, yes_option
from admin.output import emit, message, output_option
from core.store.clients import Clients

COLUMNS = ("name", "active", "created_at", "revoked_at")


@click.group()
def clients() -> None:
    """Calling services and their bearer tokens (discountd --auth required checks them)."""


@clients.command("create")
@click.argument("name")
@output_option
@click.pass_obj
def create(app: App, name: str, output: str) -> None:
    """Create a client and print its bearer token. The token is shown only this once; the
    store keeps its SHA-256. The service sends it as `authorization: Bearer TOKEN`.

    \b
    Example:
      discountctl clients create checkout --output json
    """
    with app.transaction() as session:
        client, token = Clients(session, app.actor).create(name)
        data = {**client.to_dict(), "token": token}
    message(f"created client {name!r}; store its token now, it is not shown again")
    emit(data, output)


@clients.command("list")
@output_option
@click.pass_obj
def list_(app: App, output: str) -> None:
    """List clients, revoked ones included (tokens are never shown again).

    \b
    Example:
      discountctl clients list
    """
    with app.transaction() as session:
        data = [c.to_dict() for c in Clients(session).list_all()]
    emit(data, output, COLUMNS)


@clients.command("revoke")
@click.argument("name")
@yes_option
@output_option
@click.pass_obj
def revoke(app: App, name: str, yes: bool, output: str) -> None:
    """Revoke a client's token. Running servers refuse it from their next rule refresh
    (--rules-poll-interval, and at once on PostgreSQL NOTIFY).

    \b
    Example:
      discountctl clients revoke checkout --yes
    """
    with app.transaction() as session:
        Clients(session).get(name)
    confirm(f"Revoke client {name!r}? Its calls will be refused.", yes)
    with app.transaction() as session:
        data = Clients(session, app.actor).revoke(name).to_dict()
    message(f"revoked client {name!r}")
    emit(data, output)
