"""`discountctl audit ...`"""

from __future__ import annotations

import click

from admin.app import App
from admin.output import emit, output_option
from core.store import audit as store_audit

MAX_LIMIT = 10_000
COLUMNS = ("id", "at", "actor", "action", "entity_type", "entity_name")


@click.group()
def audit() -> None:
    """The audit log: who changed what, when, with the record before and after."""


@audit.command("list")
@click.option("--entity-type", type=click.Choice(store_audit.ENTITY_TYPES), help="Only these.")
@click.option(
    "--name",
    help="Only entries about the segment, rule, experiment, model version or client named so "
    "(now or once: a renamed one's whole history).",
)
@click.option("--limit", type=int, default=50, show_default=True, help=f"1-{MAX_LIMIT} entries.")
@output_option
@click.pass_obj
def list_(app: App, entity_type: str | None, name: str | None, limit: int, output: str) -> None:
    """List audit entries, newest first (JSON output includes before/after).

    \b
    Example:
      discountctl audit list --entity-type rule --limit 10
    """
    if not 1 <= limit <= MAX_LIMIT:
        raise click.ClickException(f"--limit must be from 1 to {MAX_LIMIT}, got {limit}")
    with app.transaction() as session:
        data = [e.to_dict() for e in store_audit.entries(session, entity_type, name, limit)]
    emit(data, output, COLUMNS)
