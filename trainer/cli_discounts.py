"""``discount-train`` commands for discounts: simulate a market, fit the response model, and
evaluate policies against the simulator's truth. As in trainer.cli, each command imports what it
runs in its body."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import click

from core.artifact import ArtifactError, sha256_file
from core.files import replace_text
from core.response_log import LOGS
from trainer.config import EvalConfig, MarketConfig, ResponseConfig, UpliftConfig
from trainer.options import MAX_ROWS, SEED, FiniteFloat

if TYPE_CHECKING:
    import pandas as pd

PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _err(line: str) -> None:
    click.echo(line, err=True)


def ensure_writable(folder: Path, what: str) -> None:
    """Make folder (with its parents) and create a file in it: a place that cannot take what a
    command writes is refused before minutes of work, not after. The folders it made go again,
    so a run that fails later leaves none behind; the writer makes them when it writes."""
    made = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        Path(tempfile.mkdtemp(prefix=".probe-", dir=folder)).rmdir()
        for path in made:  # deepest first
            path.rmdir()
    except OSError as e:
        # mkdir says "File exists" or "Not a directory" without saying which path is the file.
        file = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        reason = f"{file} is a file, not a folder" if file else e.strerror or str(e)
        raise click.ClickException(f"{folder}: cannot write {what} ({reason})") from None


def refuse_existing(folder: Path, names: tuple[str, ...]) -> None:
    """Refuse to write over files a command would write: they carry the names of a shop's own
    files (interactions.csv, offers.csv), which a synthetic run must never silently replace."""
    there = [name for name in names if (folder / name).exists()]
    if there:
        raise click.ClickException(
            f"{folder}: already holds {', '.join(there)}; pick another --out or delete them"
        )


def _refuse_overwriting(
    written: Mapping[str, Path | None], read: Mapping[str, Path | None]
) -> None:
    """Refuse an output file that one of the inputs (or another output) names: written after the
    command read it, the report would replace the shop's log, its rules or a dataset."""
    taken = {path.resolve(): option for option, path in read.items() if path is not None}
    for option, path in written.items():
        if path is None:
            continue
        other = taken.setdefault(path.resolve(), option)
        if other != option:
            raise click.ClickException(
                f"{path}: {option} names the file of {other}, which it would replace; write "
                f"{option} to another file"
            )


def _writable(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            ensure_writable(path.parent, path.name)


def _write_json(path: Path, report: object) -> None:
    try:
        replace_text(path, json.dumps(report, indent=2) + "\n")
    except OSError as e:
        raise click.ClickException(f"{path}: cannot write ({e.strerror or e})") from None


def _read_log(offers: Path, events: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An offer log and its events, read as every file of a shop's is (trainer.data.read_table):
    ids as text, numbers as numbers."""
    from trainer.data import DataError, read_table
    from trainer.offer_log import EVENT_COLUMNS, IDS, OFFER_COLUMNS

    try:
        return (
            read_table(offers, OFFER_COLUMNS, IDS, as_text=False),
            read_table(events, EVENT_COLUMNS, IDS, as_text=False),
        )
    except DataError as e:
        raise click.ClickException(str(e)) from None


@click.command("simulate")
# No file_okay=False: a file in the way is refused in one line, exit 1, as fit refuses it.
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="folder for offers.csv and events.csv; refused if either is already there",
)
@click.option(
    "--users",
    type=click.IntRange(1, MAX_ROWS),
    default=5_000,
    show_default=True,
    help="simulated shoppers",
)
@click.option(
    "--visits",
    type=click.IntRange(1, 10_000),
    default=3,
    show_default=True,
    help=f"visits per shopper, {MarketConfig.offers_per_user} offers each",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="same seed, same log")
def simulate_command(out: Path, users: int, visits: int, seed: int) -> None:
    """Log a randomized discount experiment in the market simulator: offers.csv (discount and
    its propensity per offer) and events.csv (impressions, purchases, redemptions, in the
    RecordEvents shape). Each offer's discount is drawn uniformly from 0%, 5%, …, 30%.

    Example: discount-train simulate --out var/market --users 5000 --seed 1
    """
    from trainer.market import make_market, make_offers, randomized_discounts, simulate, write_logs

    refuse_existing(out, LOGS)
    ensure_writable(out, "the logs")
    market = make_market(MarketConfig(n_users=users, visits=visits, seed=seed))
    offers = make_offers(market, seed=seed)
    log = simulate(market, offers, *randomized_discounts(len(offers), seed), seed=seed)
    try:
        offers_path, events_path = write_logs(market, log, out)
    except OSError as e:
        raise click.ClickException(f"{out}: cannot write the logs ({e.strerror or e})") from None
    _err(f"logged {len(offers):,} offers to {users:,} users, {int(log.bought.sum()):,} purchases")
    click.echo(f"{offers_path}\n{events_path}")


@click.command("response")
@click.option(
    "--offers",
    "offers_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="offer log (CSV or Parquet): offer_id, user_id, discount, propensity, cf_score, price, "
    "cost and the user features",
)
@click.option(
    "--events",
    "events_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="events (CSV or Parquet): type and offer_id; a purchase or redemption naming an offer "
    "is a success",
)
# No file_okay=False: a file in the way is refused in one line, exit 1, as fit refuses it.
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="the model's folder: new, empty, or a response model folder, which is replaced whole",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=ResponseConfig.epochs,
    show_default=True,
    help=f"passes over the training offers; at least {ResponseConfig.min_steps} optimizer steps "
    f"(batches of {ResponseConfig.batch_size:,}) are taken, so small logs run more epochs, up to "
    f"{ResponseConfig.max_epochs}: the progress lines and the manifest's training.epochs_run say "
    "how many ran",
)
@click.option(
    "--hidden",
    type=click.IntRange(min=1),
    default=ResponseConfig.hidden,
    show_default=True,
    help="units in each of the model's two hidden layers",
)
@click.option(
    "--seed",
    type=SEED,
    default=ResponseConfig.seed,
    show_default=True,
    help="draws the held-out share, the cross-fitting folds and the initial weights",
)
def response_command(
    offers_path: Path, events_path: Path, out: Path, epochs: int, hidden: int, seed: int
) -> None:
    """Fit P(purchase | offer, discount) on logged offers with randomized discounts, measure it
    on a held-out share (log-loss, calibration error, AUC), and export it to ONNX with its own
    sealed manifest in OUT (a previous model there is replaced whole, never half-written). Each
    shopper's purchase rates per discount band in the log are features too; OUT holds their
    table for discountd to look users up in. The log is one of an experiment that drew each
    offer's discount at random: a `randomized` rule's, as `discountctl offers export` writes it
    from the store, or the simulator's, as `discount-train simulate` writes it
    (docs/DISCOUNTS.md, section 1).

    Example: discount-train response --offers var/market/offers.csv
    --events var/market/events.csv --out var/response
    """
    from core import response_artifact
    from trainer.offer_log import ResponseError
    from trainer.response import fit, from_logs, save

    config = ResponseConfig(epochs=epochs, hidden=hidden, seed=seed)
    try:
        response_artifact.check_out(out)
    except ArtifactError as e:
        raise click.ClickException(str(e)) from None
    ensure_writable(out.resolve().parent, "the model")
    try:
        logged = from_logs(*_read_log(offers_path, events_path), seed)
    except ResponseError as e:
        raise click.ClickException(str(e)) from None
    data = logged.data
    if logged.foreign_purchases:
        _err(
            f"note: {logged.foreign_purchases:,} purchases name an offer made to another user "
            "or for another item (a shared offer token): not counted as that offer's"
        )
    if logged.fixed_discounts:
        _err(
            f"WARNING: {logged.fixed_discounts:,} of {len(data):,} offers have propensity 1 (their "
            "discount was not drawn at random): from them the model learns whom that policy "
            "discounted as much as what the discount did; drop them to learn from the "
            "randomized offers alone"
        )
    grid = sorted({round(float(d), 4) for d in data.discount})
    _err(f"{len(data):,} offers, {int(data.bought.sum()):,} bought, discounts {grid}")

    def progress(epoch: int, epochs: int, loss: float) -> None:
        # Small logs run hundreds of short epochs, large ones a few long ones: about ten lines.
        if epoch == 1 or epoch % max(1, epochs // 10) == 0 or epoch == epochs:
            _err(f"epoch {epoch}/{epochs} loss {loss:.5f}")

    try:
        trained = fit(data, config, progress)
        manifest = save(
            trained,
            out,
            grid,
            config,
            {
                "offers": str(offers_path),
                "events": str(events_path),
                # So that estimate-policy knows a log this model was fitted to.
                "offers_sha256": sha256_file(offers_path),
                "events_sha256": sha256_file(events_path),
                "rows": len(data),
                "users": len(logged.history.user_ids),
            },
            logged.history,
        )
    except ResponseError as e:
        raise click.ClickException(str(e)) from None
    except (OSError, ArtifactError) as e:
        raise click.ClickException(f"{out}: cannot write the model ({e})") from None
    metrics = {**trained.metrics, **manifest.metrics}
    unmeasured = [name for name, value in metrics.items() if not math.isfinite(value)]
    if unmeasured:
        # AUC compares bought with not bought: a small log's hold-out can lack either.
        rate = trained.metrics["base_rate"]
        why = {0.0: "has no purchases", 1.0: "has only purchases"}.get(rate, "gave no number")
        _err(
            f"WARNING: the hold-out ({trained.metrics['rows']:,.0f} offers) {why}, so it cannot "
            f"measure {', '.join(unmeasured)}: null in the output, left out of manifest.json"
        )
    for name, value in metrics.items():
        _err(f"  {name:20s} {value:.6g}" if math.isfinite(value) else f"  {name:20s} n/a")
    shown = {name: value if math.isfinite(value) else None for name, value in metrics.items()}
    click.echo(json.dumps({"dir": str(out), "version": manifest.version, **shown}))


@click.command("evaluate-policy")
@click.option(
    "--seeds",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="how many seeds, not a seed: N runs seeds 0 to N-1, each its own simulated market, "
    "log and model; the intervals are over them",
)
@click.option(
    "--users",
    type=click.IntRange(100, MAX_ROWS),
    default=EvalConfig().market.n_users,
    show_default=True,
    help="simulated shoppers in each seed's market",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=EvalConfig().response.epochs,
    show_default=True,
    help=f"the response model's passes over its log; at least {ResponseConfig.min_steps} "
    f"optimizer steps are taken, so small logs run more epochs, up to {ResponseConfig.max_epochs} "
    "(the progress lines say how many)",
)
@click.option(
    "--train-visits",
    type=click.IntRange(min=1),
    default=EvalConfig().train_visits,
    show_default=True,
    help="visits of the randomized experiment the response model learns from (8 offers each "
    "per shopper); the 3 visits after them are the evaluation population",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    help="write margin vs discount spend per policy to this image (.png, .svg or .pdf)",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="full report"
)
def evaluate_policy_command(
    seeds: int,
    users: int,
    epochs: int,
    train_visits: int,
    plot: Path | None,
    json_path: Path | None,
) -> None:
    """Compare discount policies in the market simulator against its true response curves: no
    discount, blanket 10%, tiered_topk, threshold, linear, optimal (learned response model),
    bayes (each shopper's posterior under the simulator's own prior: the most a policy learned
    from the same log can earn in expectation) and the oracle (true curves). Prints expected
    outcomes per 1,000 offers, each policy's share of the oracle's incremental margin over no
    discount, and how far off-policy estimates (IPS, doubly robust) from a randomized log land
    from the truth; 95% intervals over seeds (n/a with one seed).

    Example: discount-train evaluate-policy --seeds 5 --plot docs/policy_margin.png
    """
    from trainer import policy_eval

    if plot is not None and plot.suffix.lower() not in PLOT_SUFFIXES:
        raise click.BadParameter(
            f"{plot}: name a .png, .svg or .pdf file (the format follows the suffix)",
            param_hint="'--plot'",
        )
    _refuse_overwriting({"--json": json_path, "--plot": plot}, {})
    _writable(json_path, plot)
    base = EvalConfig()
    evaluated = base.market.visits - base.train_visits
    config = replace(
        base,
        seeds=tuple(range(seeds)),
        market=replace(base.market, n_users=users, visits=train_visits + evaluated),
        train_visits=train_visits,
        response=replace(base.response, epochs=epochs),
    )
    _, summary = policy_eval.run(config, _err)
    summary["config"] = policy_eval.config_summary(config)
    click.echo(policy_eval.format_table(summary))
    try:
        if json_path is not None:
            replace_text(json_path, json.dumps(summary, indent=2) + "\n")
        if plot is not None:
            policy_eval.plot_margin_vs_spend(summary, plot)
    except OSError as e:
        raise click.ClickException(f"cannot write the report ({e.strerror or e})") from None


@click.command("estimate-policy")
@click.option(
    "--offers",
    "offers_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="randomized offer log (CSV or Parquet), as `discountctl offers export` writes it",
)
@click.option(
    "--events",
    "events_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="the sales naming those offers (CSV or Parquet), as `discountctl offers export` writes "
    "them",
)
@click.option(
    "--rules",
    "rules_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="the rules to estimate, as `discountctl rules list -o json` (or `rules show NAME -o "
    "json`) prints them; a rule without max_discount_pct or min_margin_pct gets `rules "
    "create`'s 30 and 0",
)
@click.option(
    "--response-model",
    type=click.Path(file_okay=False, path_type=Path),
    help="a folder `discount-train response` wrote: adds doubly robust estimates, and prices "
    "`optimal` rules (required for them)",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="also write the report as JSON: offers, left_out_fixed, unranked, grid, and per policy "
    "mean_discount, supported and the ips, dr and dr_lift intervals (null where none); not over "
    "an input, nor inside --response-model",
)
def estimate_policy_command(
    offers_path: Path,
    events_path: Path,
    rules_path: Path,
    response_model: Path | None,
    json_path: Path | None,
) -> None:
    """Estimate what each rule would earn from a randomized experiment's log, before it serves
    anyone: per rule (and no discount, the baseline) its mean discount, the share of offers
    where the log shows the discount it would give, and its mean margin per offer by inverse
    propensity (IPS; n/a for a rule the log never shows) and, with --response-model, doubly
    robust (DR) weighting, with 95% t-intervals over offers; DR's lift over no discount is
    paired offer by offer. Each rule prices every logged offer as discountd would, guardrails
    included, rounded down onto the discounts the log drew (a discount never drawn has no offers
    to learn from); its scope, budget and validity window are not applied. Offers whose
    discount was not drawn (propensity 1) are left out; tiered_topk rules need the offers' rank.
    A response model trained on this same log makes DR lean on the model where it fits the log
    best: train it on an earlier period.

    The log and rules come from the store: `discountctl offers export --rule learn --out
    var/responses` and `discountctl rules list -o json > var/rules.json`.

    Example: discount-train estimate-policy --offers var/responses/offers.csv
    --events var/responses/events.csv --rules var/rules.json --response-model var/response
    """
    from trainer import shop_estimate
    from trainer.offer_log import ResponseError

    read = {"--offers": offers_path, "--events": events_path, "--rules": rules_path}
    _refuse_overwriting({"--json": json_path}, read)
    if json_path and response_model and response_model.resolve() in json_path.resolve().parents:
        raise click.ClickException(
            f"{json_path}: is inside --response-model {response_model}, whose files are sealed (a "
            "file added or changed there breaks the model); write --json elsewhere"
        )
    _writable(json_path)
    try:
        rules, randomized = shop_estimate.read_rules(rules_path)
        log = shop_estimate.read_log(*_read_log(offers_path, events_path))
        probability = None
        if response_model is not None:
            probability = shop_estimate.predict(response_model, log)
            if shop_estimate.trained_on(response_model, offers_path):
                _err(
                    "WARNING: --response-model was trained on this offer log: DR's model term "
                    "fits the offers it corrects, so its intervals are too narrow; train the "
                    "model on an earlier period of the experiment"
                )
        estimates = shop_estimate.estimate(log, rules, probability, _err)
    except (shop_estimate.EstimateError, ResponseError) as e:
        raise click.ClickException(str(e)) from None
    except ArtifactError as e:
        raise click.ClickException(f"--response-model: {e}") from None
    if randomized:
        _err(f"left out {', '.join(randomized)}: a randomized rule is the experiment itself")
    if log.fixed:
        _err(
            f"left out {log.fixed:,} offer(s) of propensity 1: their discount was not drawn, so "
            "they say nothing of what another discount would have done"
        )
    if log.unranked and any(rule.policy == "tiered_topk" for _, rule in rules):
        _err(
            f"{log.unranked:,} offer(s) have no rank: tiered_topk rules give them d2, as "
            "discountd does an item the model did not rank"
        )
    for name, row in estimates.items():
        if row["ips"] is None:
            _err(
                f"{name}: no logged offer shows the discount it gives, so IPS has nothing to "
                "weigh (n/a), and DR, if any, is the response model's guess alone"
            )
    click.echo(shop_estimate.format_table(estimates, len(log.discount)))
    if json_path is not None:
        report = {
            "offers": len(log.discount),
            "left_out_fixed": log.fixed,
            "unranked": log.unranked,
            "grid": log.grid.tolist(),
            "policies": estimates,
        }
        _write_json(json_path, report)


@click.command("uplift")
@click.option(
    "--data",
    type=click.Path(dir_okay=False, path_type=Path),
    show_default="../shared/datasets/hillstrom/hillstrom.csv, beside the checkout (or under "
    "DISCOUNT_DATASETS)",
    help="the Hillstrom MineThatData e-mail experiment (hillstrom.csv)",
)
@click.option(
    "--seed",
    "seeds",
    type=SEED,
    multiple=True,
    default=(0,),
    show_default=True,
    help="split (and model) seed; repeat for several splits",
)
@click.option(
    "--hidden",
    type=click.IntRange(min=0),
    default=UpliftConfig.hidden,
    show_default=True,
    help="units in each of the model's two hidden layers; 0: linear in the features",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=UpliftConfig.epochs,
    show_default=True,
    help=f"passes over the fit half; at least {UpliftConfig.min_steps} optimizer steps "
    f"(batches of {UpliftConfig.batch_size:,}) are taken, so small data runs more epochs "
    "(the progress lines and the report's epochs_run say how many)",
)
@click.option(
    "--learning-rate",
    type=FiniteFloat(min=0, max=1, min_open=True),
    default=UpliftConfig.learning_rate,
    show_default=True,
    help="peak of the one-cycle schedule",
)
@click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="full report"
)
def uplift_command(
    data: Path | None,
    seeds: tuple[int, ...],
    hidden: int,
    epochs: int,
    learning_rate: float,
    json_path: Path | None,
) -> None:
    """Uplift on real data: e-mail (Mens or Womens) against none, outcomes visit and conversion,
    a 50/50 split stratified by treatment and outcomes. Qini coefficient (scikit-uplift's
    qini_auc_score) and uplift@30% of the response model's uplift variant next to
    scikit-uplift's ClassTransformation and TwoModels, all on the same split. A file with
    other segments, or a split half without both arms and, within each, both values of each
    outcome, is refused before any fitting.

    Example: discount-train uplift --seed 0 --json var/uplift.json

    With a 2 × 32 MLP body (the earlier default): --hidden 32 --epochs 30 --learning-rate 3e-3
    """
    from trainer import uplift
    from trainer.response import epochs_run

    try:
        uplift.require_baselines()
    except ImportError as e:
        raise click.ClickException(
            f"the uplift benchmark needs scikit-uplift and scikit-learn ({e}); install with: "
            "pip install -e '.[dev]'"
        ) from None
    data = data or uplift.HILLSTROM
    _refuse_overwriting({"--json": json_path}, {"--data": data})
    _writable(json_path)
    try:
        experiment = uplift.load_hillstrom(data)
        for seed in seeds:  # all of them before minutes of fitting
            uplift.check_split(data, experiment, seed)
    except uplift.UpliftError as e:
        raise click.ClickException(str(e)) from None
    config = UpliftConfig(hidden=hidden, epochs=epochs, learning_rate=learning_rate)
    reports = []
    for seed in seeds:
        fitted = len(uplift.split(experiment, seed)[0])
        _err(
            f"split seed {seed}: fitting on {fitted:,} customers "
            f"({epochs_run(fitted, config)} epochs)"
        )
        reports.append(uplift.benchmark(experiment, seed, config))
    click.echo(uplift.format_table(reports))
    if json_path is not None:
        _write_json(json_path, reports)


COMMANDS = (
    simulate_command,
    response_command,
    evaluate_policy_command,
    estimate_policy_command,
    uplift_command,
)
