"""`discountctl`: the admin CLI over the store. Noun groups, verb commands.

Data goes to stdout (``--output table|json``), messages to stderr. Exit 0 on success, 1 for a
refused input or an unreachable store (one line, no traceback), 2 for a usage error.
"""

from __future__ import annotations

from typing import Any

import click
from sqlalchemy.exc import SQLAlchemyError

from admin.app import App, default_actor
from admin.audit import audit
from admin.clients import clients
from admin.db import db
from admin.events import events
from admin.experiments import experiments
from admin.models import models
from admin.offers_cli import report_command, simulate_command
from admin.offers_export import offers
from admin.rules import rules
from admin.segments import segments
from core.store import validate
from core.store.db import DEFAULT_URL, first_line, mask_url
from core.store.errors import InvalidInput, StoreError


class Cli(click.Group):
    """Refuses arguments that are not UTF-8, and turns the store's typed errors into one-line
    messages; both with exit status 1."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # Python hands on bytes that are not UTF-8 as lone surrogates, which fail wherever the
        # text is encoded again (the database, the terminal): refused here, once for every
        # argument, option and environment setting.
        for arg in args:
            _check_utf8("argument", arg)
        rest = super().parse_args(ctx, args)
        # The settings that may come from the environment instead.
        _check_utf8("--db-url / DISCOUNT_DB_URL", ctx.params.get("db_url") or "")
        _check_utf8("--actor / DISCOUNT_ACTOR", ctx.params.get("actor") or "")
        return rest

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except StoreError as e:
            raise click.ClickException(str(e)) from None
        except SQLAlchemyError as e:
            url = ctx.obj.db_url if isinstance(ctx.obj, App) else None
            raise click.ClickException(f"store {mask_url(url or '')}: {first_line(e)}") from None


def _check_utf8(label: str, value: str) -> None:
    try:
        value.encode()
    except UnicodeEncodeError:
        shown = mask_url(value) if "://" in value else value  # a store URL's password: never
        raise click.ClickException(
            f"{label} {shown!a} is not valid UTF-8 text; give it in UTF-8"
        ) from None


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--db-url",
    envvar="DISCOUNT_DB_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="The store: sqlite:///PATH or postgresql+psycopg://USER[:PASSWORD]@HOST/DB "
    "(env DISCOUNT_DB_URL).",
)
@click.option(
    "--actor",
    envvar="DISCOUNT_ACTOR",
    default=default_actor,
    help="Your name in the audit log (env DISCOUNT_ACTOR; default: the login name).",
)
@click.pass_context
def cli(ctx: click.Context, db_url: str, actor: str) -> None:
    """Govern discountd: segments, discount rules, experiments, model versions, API clients,
    audit log; export the offers and events it stored for the next models.

    \b
    Example:
      discountctl db upgrade
      discountctl segments create new-customers --where 'days_since_first_order < 30'
    """
    try:
        # The audit log's "who": never empty, and never more than its column holds.
        validate.name("actor", actor)
    except InvalidInput as e:
        raise click.ClickException(f"--actor / DISCOUNT_ACTOR: {e}") from None
    app = App(db_url, actor)
    ctx.obj = app
    ctx.call_on_close(app.close)


for group in (segments, rules, experiments, models, clients, audit, offers, events, db):
    cli.add_command(group)
experiments.add_command(report_command)
rules.add_command(simulate_command)


def main() -> None:
    cli(prog_name="discountctl")
