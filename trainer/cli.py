"""``discount-train``: the command group, with synth, fit and replay; the discount commands are in
trainer.cli_discounts.

Each command imports what it runs (torch, pandas, scipy, the gRPC stubs) in its body, and its
options take their defaults from trainer.config: --help and usage errors load none of that, so
they answer at once instead of after seconds of imports (tests/test_trainer_cli.py checks)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from core.artifact import MANIFEST
from core.store.events import MAX_BATCH
from trainer.cli_discounts import COMMANDS as DISCOUNT_COMMANDS
from trainer.cli_discounts import ensure_writable, refuse_existing
from trainer.client_auth import channel_credentials, client_options
from trainer.config import (
    ALPHA_GRID,
    BPR_REGULARIZATION_GRID,
    DEFAULT_MARGIN,
    OBJECTIVES,
    OFFSET_GRID,
    REGULARIZATION_GRID,
    ModelConfig,
    SynthConfig,
)
from trainer.options import MAX_ROWS, SEED, FiniteFloat

if TYPE_CHECKING:
    from trainer.data import Loaded

FORMATS = ("files", "online-retail", "movielens")


def _err(line: str) -> None:
    click.echo(line, err=True)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train discountd's models from a shop's history: the recommendation model (fit) and the
    discount response model (response); simulate, evaluate and replay shoppers to try them."""


@main.command()
# No file_okay=False: a file in the way is refused in one line, exit 1, as fit refuses it.
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="folder for interactions.csv and items.csv; refused if either is already there",
)
@click.option(
    "--users",
    type=click.IntRange(1, MAX_ROWS),
    default=SynthConfig.users,
    show_default=True,
    help="shoppers to draw",
)
@click.option(
    "--items",
    type=click.IntRange(8, MAX_ROWS),
    default=SynthConfig.items,
    show_default=True,
    help="items in the catalog",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="same seed, same shop")
def synth(out: Path, users: int, items: int, seed: int) -> None:
    """Write a synthetic shop (interactions.csv, items.csv) drawn from a known taste model.

    Example: discount-train synth --out var/shop --users 2000 --items 500 --seed 7
    """
    from trainer.synth import SHOP_FILES, make_shop, write_shop

    refuse_existing(out, SHOP_FILES)
    ensure_writable(out, "the shop")
    try:
        shop = make_shop(SynthConfig(users=users, items=items, seed=seed))
        interactions, items_path = write_shop(shop, out)
    except OSError as e:
        raise click.ClickException(f"{out}: cannot write the shop ({e.strerror or e})") from None
    _err(f"wrote {len(shop.interactions):,} purchases by {users:,} users of {items:,} items")
    click.echo(f"{interactions}\n{items_path}")


@main.command()
@click.option(
    "--format",
    "format_name",
    type=click.Choice(FORMATS),
    default="files",
    show_default=True,
    help="files: --interactions/--items in the documented columns (CSV or Parquet); "
    "online-retail / movielens: the public datasets, read as published.",
)
@click.option(
    "--interactions",
    type=click.Path(dir_okay=True, path_type=Path),
    help="interactions file (online-retail, movielens: defaults to the shared dataset)",
)
# dir_okay: a folder is named in one line by the reader, exit 1, as for --interactions.
@click.option("--items", type=click.Path(path_type=Path), help="items file (--format files)")
# No file_okay=False: a file in the way is an unwritable --out, exit 1 like the others, not 2.
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    required=True,
    help="the model store: the folder of versions and CURRENT, not a version in it",
)
@click.option(
    "--objective",
    type=click.Choice(OBJECTIVES),
    default=ModelConfig.objective,
    show_default=True,
    help="ials: implicit ALS on confidence-weighted interactions (views, clicks, carts, "
    "purchases); bpr: pairwise ranking",
)
@click.option(
    "--factors",
    type=click.IntRange(min=1),
    default=ModelConfig.factors,
    show_default=True,
    help="length of each user's and item's vector: more fit finer tastes and need more data",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=ModelConfig.max_epochs,
    show_default=True,
    help="most epochs; early stopping may use fewer",
)
@click.option(
    "--regularization",
    # λ = 0 leaves the fold-in matrix (YᵀY + λI)⁻¹ singular once factors outnumber items.
    type=FiniteFloat(min=0, min_open=True),
    multiple=True,
    show_default=f"{', '.join(map(str, REGULARIZATION_GRID))}; with bpr "
    f"{', '.join(map(str, BPR_REGULARIZATION_GRID))}",
    help="λ; repeat to try several, the best on validation wins",
)
@click.option(
    "--alpha",
    type=FiniteFloat(min=0),
    multiple=True,
    default=ALPHA_GRID,
    show_default=True,
    help="iALS confidence scale; repeat to try several",
)
@click.option(
    "--confidence-offset",
    type=FiniteFloat(min=0),
    multiple=True,
    default=OFFSET_GRID,
    show_default=True,
    help="c₀ in the iALS confidence c₀ + α·log(1 + w); repeat to try several",
)
@click.option(
    "--seed",
    type=SEED,
    default=ModelConfig.seed,
    show_default=True,
    help="draws the initial factors (and BPR's samples): same data and seed, same model",
)
@click.option(
    "--default-margin",
    type=FiniteFloat(0, 1, max_open=True),
    default=DEFAULT_MARGIN,
    show_default=True,
    help="margin assumed for items without a cost; discountd prices against it and marks "
    "those offers COST_ASSUMED (not with --format movielens, which has no prices)",
)
@click.option(
    "--current/--no-current",
    default=True,
    show_default=True,
    help="make the version CURRENT (served at once) when it beats popularity, or when the store "
    "has none yet; --no-current leaves that to `discountctl models register` and `promote`, for "
    "a shop that releases through the registry",
)
def fit(
    format_name: str,
    interactions: Path | None,
    items: Path | None,
    out: Path,
    objective: str,
    factors: int,
    epochs: int,
    regularization: tuple[float, ...],
    alpha: tuple[float, ...],
    confidence_offset: tuple[float, ...],
    seed: int,
    default_margin: float,
    current: bool,
) -> None:
    """Fit, evaluate on a time hold-out, and write a new model version into OUT.

    Example: discount-train fit --interactions shop/interactions.csv --items shop/items.csv
    --out var/models
    """
    from trainer.data import DataError
    from trainer.evaluate import protocol_for, purchases
    from trainer.export import ExportError
    from trainer.fit import fit as run_fit
    from trainer.fit import grid
    from trainer.model import Diverged

    ctx = click.get_current_context()
    given = [
        f"--{name.replace('_', '-')}"
        for name in ("alpha", "confidence_offset")
        if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT
    ]
    if objective == "bpr" and given:
        raise click.UsageError(f"{' and '.join(given)}: iALS settings; --objective bpr has none")
    if not regularization:
        regularization = BPR_REGULARIZATION_GRID if objective == "bpr" else REGULARIZATION_GRID
    if objective == "bpr":
        # BPR has no confidence: the default α × c₀ grid would train each λ four times over.
        alpha, confidence_offset = alpha[:1], confidence_offset[:1]
    margin_given = (
        ctx.get_parameter_source("default_margin") is not click.core.ParameterSource.DEFAULT
    )
    if format_name == "movielens" and margin_given:
        raise click.UsageError("--default-margin: MovieLens has no prices, so no margin to assume")
    if format_name != "files" and items is not None:
        raise click.UsageError(f"--items is for --format files; {format_name} has its own items")
    if format_name == "files" and (interactions is None or items is None):
        raise click.UsageError(
            "--interactions and --items are both required with --format files"
            + _published_hint(interactions)
        )
    base = ModelConfig(objective=objective, factors=factors, max_epochs=epochs, seed=seed)
    # α = c₀ = 0 gives every purchase zero confidence: nothing to learn. Only that pairing goes;
    # the default grid holds c₀ = 0, so --alpha 0 alone still has c₀ = 1 to pair with.
    candidates = [
        c
        for c in grid(base, regularization, alpha, confidence_offset)
        if objective == "bpr" or c.alpha or c.confidence_offset
    ]
    if not candidates:  # both flags given, each only 0: the defaults are not all 0
        raise click.UsageError(
            "--alpha 0 with --confidence-offset 0 gives every purchase zero confidence: "
            "nothing to learn"
        )
    if (out / MANIFEST).is_file():
        # A version nested in a version is served by nobody, yet fit would call it current.
        raise click.ClickException(
            f"{out}: is a model version (it has {MANIFEST}); give the model store folder above "
            f"it, --out {out.resolve().parent}"
        )
    ensure_writable(out, "the model")
    try:
        loaded = _load(format_name, interactions, items, default_margin)
    except DataError as e:
        hint = _published_hint(interactions) if format_name == "files" else ""
        raise click.ClickException(f"{e}{hint}") from None
    for line in loaded.summary_lines():
        _err(line)
    if not purchases(loaded.dataset).any():
        # Views, clicks and carts only weigh what a shopper bought; a model of none would still
        # become CURRENT in a new store.
        raise click.ClickException(
            f"{', '.join(map(str, loaded.sources))}: no purchases to learn from (every row kept "
            "is a view, click or cart); fit needs a purchase history"
        )
    try:
        outcome = run_fit(loaded, protocol_for(format_name), candidates, out, _err, current)
    except OSError as e:
        raise click.ClickException(f"{out}: cannot write the model ({e.strerror or e})") from None
    except ExportError as e:
        raise click.ClickException(
            f"the trained model failed its export check ({e}); nothing was written. "
            "A larger --regularization or fewer --factors usually fixes this."
        ) from None
    except Diverged as e:
        fix = "A smaller --alpha or a larger" if objective == "ials" else "A larger"
        raise click.ClickException(
            f"{e}; nothing was written. {fix} --regularization usually fixes this."
        ) from None
    _err(f"epochs: {outcome.epochs}")
    for name, value in outcome.metrics.items():
        _err(f"  {name:32s} {value:.4f}")
    if outcome.loses_to_popularity:
        _err("WARNING: this model loses to popularity on its validation or hold-out split (above)")
    click.echo(
        json.dumps(
            {
                "version_dir": str(outcome.version_dir),
                "current": outcome.current,
                "metrics": outcome.metrics,
            }
        )
    )


def _published_hint(interactions: Path | None) -> str:
    """How to read a public dataset given as a shop's own file, or ""."""
    from trainer.data import DATASET_NAMES, published_format

    found = None if interactions is None else published_format(interactions)
    if found is None:
        return ""
    return (
        f"; {interactions} is {DATASET_NAMES[found]} as published: read it with --format {found} "
        f"--interactions {interactions}"
    )


def _load(
    format_name: str, interactions: Path | None, items: Path | None, default_margin: float
) -> Loaded:
    from trainer.data import (
        MOVIELENS,
        ONLINE_RETAIL,
        DataError,
        load_files,
        load_movielens,
        load_online_retail,
    )

    default = {"online-retail": ONLINE_RETAIL, "movielens": MOVIELENS}.get(format_name)
    if interactions is None and default is not None and not default.exists():
        raise DataError(
            f"{default}: not found; the public datasets are looked for under DISCOUNT_DATASETS, "
            "else ../shared/datasets beside the checkout: set DISCOUNT_DATASETS or pass "
            "--interactions PATH"
        )
    if format_name == "online-retail":
        return load_online_retail(interactions or ONLINE_RETAIL, default_margin)
    if format_name == "movielens":
        return load_movielens(interactions or MOVIELENS)
    assert interactions is not None and items is not None  # checked with the other flags
    return load_files(interactions, items, default_margin)


@click.command("replay")
@click.option("--target", required=True, help="discountd address, HOST:PORT.")
@click.option(
    "--users-from",
    type=click.Path(path_type=Path, exists=True),
    required=True,
    help="Interactions file (CSV or Parquet, column user_id) or model store: the shop's users.",
)
@click.option(
    "--shoppers",
    type=click.IntRange(1, MAX_ROWS),
    default=1000,
    show_default=True,
    help="shopper visits to replay (a known user may come back for several)",
)
@click.option("--seed", type=SEED, default=0, show_default=True, help="Same seed, same shoppers.")
@click.option(
    "--offers-per-shopper",
    type=click.IntRange(1, 1000),
    default=5,
    show_default=True,
    help="offers each visit asks GetOffers for",
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="shoppers in flight at once",
)
@click.option(
    "--new-visitors",
    type=FiniteFloat(0, 1),
    default=0.1,
    show_default=True,
    help="Share of shoppers that are brand-new visitor ids.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, MAX_BATCH),
    default=500,
    show_default=True,
    help="Events per RecordEvents call.",
)
@client_options
@click.option(
    "--wait",
    type=FiniteFloat(min=0),
    default=30.0,
    show_default=True,
    help="Seconds to wait for SERVING.",
)
def replay_command(
    target: str,
    users_from: Path,
    shoppers: int,
    seed: int,
    offers_per_shopper: int,
    concurrency: int,
    new_visitors: float,
    batch_size: int,
    token: str | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    wait: float,
) -> None:
    """Replay simulated shoppers through a running discountd: GetOffers, then impressions,
    clicks, add-to-carts, purchases and redemptions through RecordEvents, decided by the market
    simulator's known response curves. An event a rerun repeats is not recorded twice; offers
    that differ (discountd excludes what the first run bought) lead to new events: replay once
    per store.

    Example: discount-train replay --target 127.0.0.1:50051 --users-from shop/interactions.csv
    --shoppers 3000 --seed 1 --token "$TOKEN"
    """
    from trainer.replay import ReplayConfig, ReplayError, format_table, read_users, replay

    host, _, port = target.rpartition(":")
    if not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise click.BadParameter(
            f"{target!r}: expected HOST:PORT with a port in 1-65535", param_hint="'--target'"
        )
    credentials = channel_credentials(tls_ca, tls_cert, tls_key)
    config = ReplayConfig(
        target=target,
        shoppers=shoppers,
        seed=seed,
        offers_per_shopper=offers_per_shopper,
        concurrency=concurrency,
        new_visitor_share=new_visitors,
        batch_size=batch_size,
        token=token,
        credentials=credentials,
        wait_s=wait,
    )
    step = max(1, shoppers // 10)

    def progress(done: int, total: int) -> None:
        if done % step == 0 or done == total:
            click.echo(f"  {done:,}/{total:,} shoppers", err=True)

    try:
        known = read_users(users_from)
        result = asyncio.run(replay(config, known, progress))
    except ReplayError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_table(result))
    click.echo(
        f"events: {result.accepted:,} accepted, {result.duplicate:,} duplicate "
        f"(already recorded), {result.rejected:,} rejected",
        err=True,
    )
    if result.rejected:
        raise click.ClickException(f"the server rejected events, e.g. {result.first_rejection}")


for _command in DISCOUNT_COMMANDS:
    main.add_command(_command)
main.add_command(replay_command)
