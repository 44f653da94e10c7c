"""`discountctl experiments report` and `discountctl rules simulate`: the offer side of the
admin tool, over the same code the server runs (core.offers via server.offers)."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from admin.app import App
from admin.models import warn_if_served_elsewhere
from admin.options import parse_pairs
from admin.output import emit, message, output_option
from admin.report import plot, report
from core.artifact import ArtifactError, current_version_dir
from core.offers import FeatureError
from core.store.errors import InvalidInput
from core.store.events import purchases_received_after
from core.store.model_versions import ModelVersions
from core.store.snapshot import load_snapshot


def _pct(e: dict[str, Any] | None) -> str:
    if e is None or e["value"] is None:
        return "n/a"
    if e["low"] is None:
        return f"{e['value'] * 100:.2f}%"
    return f"{e['value'] * 100:.2f}% [{e['low'] * 100:.2f}, {e['high'] * 100:.2f}]"


def _money(e: dict[str, Any] | None) -> str:
    if e is None or e["value"] is None:
        return "n/a"
    if e["low"] is None:
        return f"{e['value']:.2f}"
    return f"{e['value']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"


def _p(row: dict[str, Any], name: str) -> str:
    test = row.get("vs_control", {}).get(name)
    if test is None or test["p_value"] is None:
        return "-"
    return f"{test['p_value']:.3g}"


@click.command("report")
@click.argument("key")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw cumulative conversion per variant, with 95% bands, into this PNG.",
)
@output_option
@click.pass_obj
def report_command(app: App, key: str, plot_path: Path | None, output: str) -> None:
    """Report an experiment: per variant users assigned and exposed, CTR, conversion, revenue,
    discount cost and margin per user, 30-day repeat rate, 95% intervals, p-values against the
    control (the first variant; the table shows those of conversion, revenue and margin, the
    JSON every metric's), and a sample-ratio-mismatch check. Purchases made while the
    experiment was paused, or after it stopped, are not counted (purchases and redemptions under
    its own offers, and converters' repeats, still are).

    \b
    Example:
      discountctl experiments report spring-test --plot var/spring-test.png
    """
    with app.transaction() as session:
        data = report(session, key, datetime.now(UTC))
        if plot_path is not None:
            if plot_path.parent and not plot_path.parent.is_dir():
                raise InvalidInput(f"--plot {plot_path}: folder {plot_path.parent} does not exist")
            plot(session, key, plot_path)
    if output == "json":
        emit(data, output)
    else:
        rows = [
            {
                "variant": r["variant"],
                "assigned": r["users_assigned"],
                "exposed": r["users_exposed"],
                "ctr": _pct(r["ctr"]),
                "conversion": _pct(r["conversion"]),
                "p_conv": _p(r, "conversion"),
                "revenue/user": _money(r["revenue_per_user"]),
                "p_rev": _p(r, "revenue_per_user"),
                "discount/user": _money(r["discount_cost_per_user"]),
                "margin/user": _money(r["margin_per_user"]),
                "p_margin": _p(r, "margin_per_user"),
                "repeat_30d": _pct(r["repeat_rate_30d"]),
            }
            for r in data["variants"]
        ]
        emit(rows, output)
        srm = data["srm_p_value"]
        message(
            f"experiment {key} ({data['status']}); control: {data['control']}; "
            f"SRM p = {'n/a' if srm is None or math.isnan(srm) else f'{srm:.3g}'}"
        )
        for begin, end in data["idle"]:
            message(
                f"not counted: purchases from {begin} to {end or 'now'}, while it was not "
                "running (other than those under its own offers)"
            )
        compared = sum(
            row[column] != "-" for row in rows for column in ("p_conv", "p_rev", "p_margin")
        )
        if compared > 1:
            message(
                f"p-values are per comparison and uncorrected: of these {compared}, about "
                f"{compared * 0.05:.2g} fall below 0.05 by chance alone when nothing differs; "
                "judge the one metric chosen before the experiment started"
            )
    for warning in data["warnings"]:
        message(f"warning: {warning}")
    if plot_path is not None:
        message(f"wrote {plot_path}")


def _model_dir(app: App, explicit: str | None) -> Path:
    if explicit:
        return current_version_dir(Path(explicit))
    with app.transaction() as session:
        active = ModelVersions(session).active()
    if active is None:
        raise InvalidInput(
            "no active model version in the store; pass --model-dir or "
            "`discountctl models promote VERSION`"
        )
    warn_if_served_elsewhere(active.path)
    return Path(active.path)


@click.command("simulate")
@click.option("--user", "user_id", required=True, help="The shop's id of the user.")
@click.option("--item", "item_ids", multiple=True, help="An item to price (repeat); default: "
              "the user's recommendations.")  # fmt: skip
@click.option("--limit", type=int, default=0, help="Recommendations to price without --item, "
              "1 to 1000; 0, the default, prices 10 (as GetOffers).")  # fmt: skip
@click.option(
    "--context",
    "context_pairs",
    multiple=True,
    metavar="NAME=VALUE",
    help="A request context value, e.g. a feature override: --context lifetime_value=800.",
)
@click.option(
    "--model-dir",
    envvar="DISCOUNT_MODEL_DIR",
    help="Model store or version (env DISCOUNT_MODEL_DIR; default: the active model version).",
)
@click.option(
    "--response-model-dir",
    envvar="DISCOUNT_RESPONSE_MODEL_DIR",
    help="Response model for `optimal` rules, as discountd's flag (env "
    "DISCOUNT_RESPONSE_MODEL_DIR; without it they grant no discount).",
)
@output_option
@click.pass_obj
def simulate_command(
    app: App,
    user_id: str,
    item_ids: tuple[str, ...],
    limit: int,
    context_pairs: tuple[str, ...],
    model_dir: str | None,
    response_model_dir: str | None,
    output: str,
) -> None:
    """Show what a user would be offered now, and why, without issuing an offer. Runs the
    server's pipeline on the store's current rules and experiments. A `randomized` rule draws
    each discount anew here (discountd holds a draw for an offer's lifetime, keyed by its offer
    key, which this command does not have): what it shows is one draw (stderr says so).

    \b
    Example:
      discountctl rules simulate --user 12347 --item 85123A --item 22423
    """
    # The server's modules: onnxruntime and numpy only, loaded when this command runs.
    from server.errors import InvalidRequest
    from server.model import load_version
    from server.offers import OffersQuery, simulate
    from server.purchases import data_end
    from server.response import ResponseModel

    # Strings, as the API's context map carries them: a category like 1.50 stays 1.50.
    context = parse_pairs(context_pairs, "--context")
    try:
        version = _model_dir(app, model_dir)
        model = load_version(version, "cpu", facts=True)
    except ArtifactError as e:
        raise InvalidInput(f"cannot load the model: {e}") from None
    try:
        respond = ResponseModel.load(Path(response_model_dir)) if response_model_dir else None
    except ArtifactError as e:
        raise InvalidInput(f"cannot load the response model: {e}") from None
    now = datetime.now(UTC)
    since = data_end(model)
    with app.transaction() as session:
        snapshot = load_snapshot(session, now)
        # As discountd: what the user bought since the model's data ended is not recommended.
        bought = (
            {item for _, item, _ in purchases_received_after(session, since, user_id=user_id)}
            if since is not None
            else set()
        )
    query = OffersQuery(user_id, list(item_ids), limit, context, bought)
    try:
        decision = simulate(model, snapshot, query, now, respond)
    except (InvalidRequest, FeatureError) as e:
        raise InvalidInput(str(e)) from None
    items: list[dict[str, Any]] = [
        {
            "item_id": d.item_id,
            "rank": d.rank,
            "base_price": str(d.priced.base_price),
            "discount_pct": str(d.priced.discount_pct),
            "final_price": str(d.priced.final_price),
            "rule": d.rule.name if d.rule else None,
            "reason_codes": [str(r) for r in d.reasons],
        }
        for d in decision.items
    ]
    if output == "json":
        emit(
            {
                "user_id": user_id,
                "model_version": model.version,
                "segment": decision.segment,
                "experiment": decision.experiment_key,
                "variant": decision.variant,
                "items": items,
            },
            output,
        )
    else:
        message(
            f"user {user_id}: segment {decision.segment or '(none)'}, experiment "
            f"{decision.experiment_key or '(none)'}, variant {decision.variant or '(none)'}, "
            f"model {model.version}"
        )
        emit([{**i, "reason_codes": " ".join(i["reason_codes"])} for i in items], output)
    # Asked twice, the same question gets other discounts: not a bug to chase.
    drawn = {d.rule.name for d in decision.items if d.rule and d.priced.drawn_from}
    for name in sorted(drawn):
        message(
            f"rule {name!r} draws each discount at random among CHOICES=n percents: this shows "
            "one draw, and another run may show another (discountd keeps a shopper's draw for "
            "an offer's lifetime)"
        )
