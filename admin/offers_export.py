"""`discountctl offers export`: the store's offers and their sales as the randomized-discount log
that `discount-train response` learns from (docs/DISCOUNTS.md, section 1)."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import click
from sqlalchemy.orm import Session

from admin.app import App
from admin.options import parse_time
from admin.output import emit, message, output_option
from core.artifact import ArtifactError
from core.features import NUMERIC_FEATURES
from core.files import replace_files
from core.offers import Why
from core.response_log import EVENT_COLUMNS, LOGS, OFFER_COLUMNS
from core.shop import load_shop_facts
from core.store.errors import NotFound
from core.store.experiments import Experiments
from core.store.model_versions import ModelVersions
from core.store.offers import (
    LogFilter,
    response_model_versions,
    response_offers,
    response_sales,
    unlearnable_offers,
)
from core.store.rules import Rules

PROGRESS_EVERY = 500_000


@click.group()
def offers() -> None:
    """The offers discountd issued."""


@offers.command("export")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder for offers.csv and events.csv (created if missing); refused if either is "
    "already there.",
)
@click.option("--rule", "rule_name", help="Only the offers this rule priced (by name).")
@click.option("--experiment", "experiment_key", help="Only the offers of this experiment (key).")
@click.option("--since", help="Only offers issued at or after this ISO 8601 time.")
@click.option("--until", help="Only offers issued before this ISO 8601 time.")
@output_option
@click.pass_obj
def export(
    app: App,
    out: Path,
    rule_name: str | None,
    experiment_key: str | None,
    since: str | None,
    until: str | None,
    output: str,
) -> None:
    """Write the offers and the purchases and redemptions naming them as the log `discount-train
    response` learns from: offers.csv (per offer the discount shown as a fraction, its
    propensity, the model's score and rank, price, cost and the user's features as they were
    when it was priced) and events.csv (the sales, in the RecordEvents shape). A response model
    learns what a discount does only from discounts drawn at random: run a `randomized` rule
    (alone, or as an experiment's variant) and export its offers with --rule. Offers logged
    before the store kept these columns (migration 0006) or by a build that knew fewer user
    features, and offers of items the model had no score for, are left out and counted, with
    their sales. Offers of items whose cost the trainer assumed (COST_ASSUMED where a rule
    priced them) are written with that cost, and counted. --since and --until select offers by
    when they were issued; their sales come with them whenever they were made.

    \b
    Example:
      discountctl rules create learn --policy randomized --param 'grid=[5,10,15,20]'
      ... discountd serves and the storefront records its sales for a while ...
      discountctl offers export --rule learn --out var/responses
      discount-train response --offers var/responses/offers.csv \\
        --events var/responses/events.csv --out var/response
    """
    start, end = parse_time(since, "--since"), parse_time(until, "--until")
    if start is not None and end is not None and start >= end:
        raise click.ClickException(f"--since {since} is not before --until {until}")
    if out.exists() and not out.is_dir():
        raise click.ClickException(f"--out {out} is a file, not a folder; pick a folder")
    paths = [out / name for name in LOGS]
    there = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if there:
        raise click.ClickException(
            f"{', '.join(there)} already there; delete {'them' if len(there) > 1 else 'it'} "
            "or pick another --out"
        )
    counts: Counter[str] = Counter()
    lacking: set[str] = set()  # offers left out for want of a user feature, and their sales
    with app.transaction() as session:
        if session.get_bind().dialect.name == "postgresql":
            # One snapshot for every read: offers logged between the read of offers and that of
            # sales would bring sales whose offer is not in offers.csv.
            session.connection(execution_options={"isolation_level": "REPEATABLE READ"})
        rule_id = Rules(session).get(rule_name).id if rule_name is not None else None
        if experiment_key is not None:
            Experiments(session).get(experiment_key)
        which = LogFilter(rule_id, experiment_key, start, end)
        assumed = {v: _assumed_costs(session, v) for v in response_model_versions(session, which)}
        try:
            replace_files(
                {
                    paths[0]: lambda tmp: _write(
                        tmp, _offer_rows(session, which, counts, lacking, assumed)
                    ),
                    paths[1]: lambda tmp: _write(tmp, _sale_rows(session, which, counts, lacking)),
                }
            )
        except OSError as e:
            raise click.ClickException(f"cannot write {out}: {e.strerror or e}") from None
        counts["left_out"] = unlearnable_offers(session, which) + len(lacking)
    summary: dict[str, Any] = {
        "out": str(out),
        "offers": counts["offers"],
        "randomized": counts["randomized"],
        "sales": counts["sales"],
        "cost_assumed": counts["cost_assumed"],
        "left_out_without_features": counts["left_out"],
    }
    emit(summary, output)
    if not counts["offers"]:
        message("no offer matched: nothing for a response model to learn from")
    elif not counts["randomized"]:
        message(
            "none of these offers had its discount drawn at random (propensity 1): "
            "`discount-train response` refuses such a log; export a `randomized` rule's offers"
        )
    elif counts["randomized"] < counts["offers"]:
        # An experiment's control, another rule, a spent budget: `response` trains on them as
        # though drawn, and only warns.
        fixed = counts["offers"] - counts["randomized"]
        message(
            f"{fixed:,} of these {counts['offers']:,} offers had a discount not drawn at random "
            "(propensity 1), which `discount-train response` learns from too"
            + ("" if rule_name else "; --rule NAME keeps a `randomized` rule's offers alone")
        )
    if counts["cost_assumed"]:
        message(
            f"{counts['cost_assumed']:,} of these {counts['offers']:,} offers carry a cost "
            "assumed from the trainer's --default-margin (reason code COST_ASSUMED where a rule "
            "priced them), written as their cost: a margin learned or estimated from them is "
            "only as right as that margin"
        )
    if counts["left_out"]:
        message(
            f"left out {counts['left_out']:,} offer(s) without a score, cost, propensity or "
            "user feature (logged before migration 0006 or by a build that knew fewer "
            "features, or of an item the model could not score)"
        )


Rows = Iterator[Sequence[object]]


def _write(path: Path, rows: Iterable[Sequence[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file, lineterminator="\n").writerows(rows)


def _assumed_costs(session: Session, version: str) -> frozenset[str]:
    """The items whose cost the trainer of this version assumed. An offer no rule priced (an
    experiment's control) says no COST_ASSUMED, yet the cost logged with it is that assumption.
    Empty for a version the registry lacks or can no longer read: COST_ASSUMED alone tells."""
    try:
        return load_shop_facts(Path(ModelVersions(session).get(version).path)).assumed_costs
    except (NotFound, ArtifactError):
        return frozenset()


def _offer_rows(
    session: Session,
    which: LogFilter,
    counts: Counter[str],
    lacking: set[str],
    assumed: dict[str, frozenset[str]],
) -> Rows:
    yield OFFER_COLUMNS
    for row in response_offers(session, which):
        features = [(row.user_features or {}).get(name) for name in NUMERIC_FEATURES]
        if None in features:
            # Logged by a build that knew fewer features: a blank cell makes `discount-train
            # response` refuse the whole file, and a made-up value teaches it a false shopper.
            lacking.add(row.offer_id)
            continue
        yield (
            row.offer_id,
            row.user_id,
            row.item_id,
            "" if row.rank is None else row.rank,
            repr(row.cf_score),
            f"{row.base_price:.2f}",
            repr(row.cost),
            repr(round(row.discount_pct / 100, 6)),
            repr(row.propensity),
            *features,
        )
        counts["offers"] += 1
        counts["randomized"] += row.propensity < 1
        counts["cost_assumed"] += Why.COST_ASSUMED in (row.reason_codes or ()) or (
            row.item_id in assumed.get(row.model_version, ())
        )
        if counts["offers"] % PROGRESS_EVERY == 0:
            click.echo(f"  {counts['offers']:,} offers read", err=True)


def _sale_rows(session: Session, which: LogFilter, counts: Counter[str], lacking: set[str]) -> Rows:
    yield EVENT_COLUMNS
    for row in response_sales(session, which):
        if row.offer_id in lacking:
            continue
        yield (
            row.event_id,
            row.type,
            row.user_id,
            row.item_id or "",
            row.offer_id,
            # To the cent, as the price: the stores give 9.00 back as 9 (SQLite) or 9.0.
            "" if row.revenue is None else f"{row.revenue:.2f}",
            row.quantity or "",
            row.occurred_at.isoformat(),
        )
        counts["sales"] += 1
