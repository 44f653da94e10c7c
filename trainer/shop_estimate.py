"""`discount-train estimate-policy`: what discount rules would earn, estimated from a shop's own
randomized log before any of them serves a shopper.

The log is the pair `discountctl offers export` writes from a `randomized` rule's offers (or the
simulator's, `discount-train simulate`); the rules are `discountctl rules list -o json`'s (or
`rules show`'s) JSON. Each rule prices every logged offer as discountd would (core.policy, its
guardrails included; its scope, budget and validity are not applied), and trainer.ope estimates
its mean margin per offer: IPS always, doubly robust too with a response model, which `optimal`
rules need anyway. No discount is always estimated, as the baseline of every lift.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from core import response_artifact
from core.artifact import sha256_file
from core.policy import UNRANKED, Guardrails, PolicyError, Rule, bad_rank, grid_choices
from core.response_artifact import OFFER_FEATURES
from core.response_history import HistoryTable
from trainer import ope
from trainer.dataset import Floats
from trainer.offer_log import read_offer_log

NO_DISCOUNT = "no_discount"
_FROM_STORE = "give the JSON `discountctl rules list -o json` prints"


class EstimateError(Exception):
    """Input the estimates cannot be made from; the message names the fix."""


@dataclass(frozen=True)
class ShopLog:
    """The offers whose discount was drawn at random, the ones estimates rest on."""

    user_ids: npt.NDArray[np.str_]
    features: Floats  # OFFER_FEATURES per offer
    rank: list[int] | None  # None: the log has no ranks
    discount: Floats
    propensity: Floats
    bought: npt.NDArray[np.bool_]
    grid: Floats  # the discounts the log holds, ascending, 0 among them
    fixed: int  # offers left out: their discount was not drawn (propensity 1)
    unranked: int  # offers without a rank, which policies rank after every ranked one

    @property
    def price(self) -> Floats:
        return self.features[:, OFFER_FEATURES.index("price")]

    @property
    def cost(self) -> Floats:
        return self.features[:, OFFER_FEATURES.index("cost")]

    @property
    def score(self) -> Floats:
        return self.features[:, OFFER_FEATURES.index("cf_score")]

    def margin(self) -> Floats:
        """Each offer's realized unit margin: final price less cost when bought, else 0."""
        margin: Floats = np.where(self.bought, self.price * (1 - self.discount) - self.cost, 0.0)
        return margin


def read_log(offers: pd.DataFrame, events: pd.DataFrame) -> ShopLog:
    """The offers and which were bought, checked as `discount-train response` checks them
    (ResponseError names what is wrong), less those whose discount was not drawn."""
    # The response rates from_logs adds are the model's features, not the estimates'.
    logged = read_offer_log(offers, events)
    # A percent has two decimals (core.policy): a log's 0.0999999 is 10%, as ope.SAME says.
    discount = np.round(logged.discount, 4)
    # Where the discount was fixed (a spent budget, an experiment's fixed variant, an item only
    # 0% keeps within the guardrails), no other discount had a chance: IPS would count such an
    # offer as earning nothing under every rule that prices it otherwise.
    drawn = np.flatnonzero(logged.propensity < 1)
    _check_weights(offers, logged.offer_features, logged.propensity)
    rank = _ranks(offers)
    grid = np.unique(discount[drawn])
    if grid[0] != 0:
        raise EstimateError(
            "offers: no offer was logged without a discount, so no policy's margin can be "
            "compared with no discount; log an experiment whose draws include 0"
        )
    return ShopLog(
        logged.user_ids[drawn],
        logged.offer_features[drawn],
        None if rank is None else [rank[k] for k in drawn],
        discount[drawn],
        logged.propensity[drawn],
        logged.bought[drawn],
        grid,
        fixed=len(discount) - len(drawn),
        unranked=0 if rank is None else sum(rank[k] == UNRANKED for k in drawn),
    )


def _check_weights(offers: pd.DataFrame, features: Floats, propensity: Floats) -> None:
    """Refuse propensities so small that the estimates overflow: no IPS or DR term exceeds
    (price + cost) / propensity + price, so with that bound squared times the offers finite,
    every mean and interval is too (else the report would say Infinity or NaN)."""
    price = features[:, OFFER_FEATURES.index("price")]
    cost = features[:, OFFER_FEATURES.index("cost")]
    with np.errstate(over="ignore"):
        bound = (price + cost) / propensity + price
        overflows = ~np.isfinite(bound * bound * len(bound))
    if overflows.any():
        k = int(np.argmin(np.where(overflows, propensity, np.inf)))
        offer, smallest = offers["offer_id"].iloc[k], float(propensity[k])
        raise EstimateError(
            f"offers: offer {offer!r} has propensity {smallest!r}, so "
            "small that its weight, 1/propensity, overflows the estimates; a propensity is the "
            "probability its discount was drawn with (1/n among n discounts)"
        )


def _ranks(offers: pd.DataFrame) -> list[int] | None:
    """Each offer's rank, UNRANKED where it is blank, as discountd ranks an item the model did
    not rank; None when no offer has one. Any other value that is no rank is refused: read as
    unranked, it would quietly move the offer to a tiered rule's lower tier."""
    if "rank" not in offers.columns:
        return None
    given = offers["rank"]
    blank = given.isna() | (given.astype(str).str.strip() == "")
    ranks = pd.to_numeric(given, errors="coerce")
    bad = ~blank & ~(np.isfinite(ranks) & (ranks >= 1) & (ranks % 1 == 0))
    if bad.any():
        k = int(np.argmax(bad.to_numpy()))
        raise EstimateError(
            f"offers: {int(bad.sum()):,} row(s) with a bad rank, e.g. offer "
            f"{offers['offer_id'].iloc[k]!r}: {bad_rank(str(given.iloc[k]))}; leave the rank "
            "blank where the model did not rank the item"
        )
    if blank.all():
        return None
    return [UNRANKED if b else int(r) for b, r in zip(blank, ranks, strict=True)]


def read_rules(path: Path) -> tuple[list[tuple[str, Rule]], list[str]]:
    """Rules as `discountctl rules list -o json` (a list) or `rules show -o json` (one) prints
    them: name, policy, params, max_discount_pct, min_margin_pct; and the names of the
    `randomized` ones, left out (such a rule is the experiment, not a policy to estimate)."""
    try:
        # utf-8-sig: Notepad and PowerShell's Out-File begin UTF-8 with a byte order mark.
        raw = json.loads(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise EstimateError(f"{path}: no such rules file") from None
    except UnicodeDecodeError as e:
        raise EstimateError(
            f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8, as `discountctl rules "
            "list -o json > FILE` writes it in a shell that keeps its bytes (Windows "
            "PowerShell's `>` writes UTF-16)"
        ) from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise EstimateError(f"{path}: not a JSON rules file ({e})") from None
    items = [raw] if isinstance(raw, dict) else raw
    if not isinstance(items, list):
        raise EstimateError(
            f"{path}: a list of rules (or one rule object) was expected, not "
            f"{json.dumps(raw)[:40]}; {_FROM_STORE}"
        )
    if not items:
        raise EstimateError(f"{path}: no rule to estimate (an empty list); {_FROM_STORE}")
    rules, randomized = [], []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise EstimateError(
                f"{path}: rule {n + 1} is {json.dumps(item)[:40]}, not an object; {_FROM_STORE}"
            )
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise EstimateError(f"{path}: rule {n + 1} has no name; {_FROM_STORE}")
        if "policy" not in item:
            raise EstimateError(f"{path}: rule {name!r} has no policy; {_FROM_STORE}")
        if item["policy"] == "randomized":
            randomized.append(name)
            continue
        try:
            limits = Guardrails.of(item.get("max_discount_pct", 30), item.get("min_margin_pct", 0))
            rules.append((name, Rule(str(item.get("policy")), item.get("params") or {}, limits)))
        except PolicyError as e:
            raise EstimateError(f"{path}: rule {name!r}: {e}") from None
    if len({name for name, _ in rules}) < len(rules) or NO_DISCOUNT in {n for n, _ in rules}:
        raise EstimateError(f"{path}: rule names must be unique and not {NO_DISCOUNT!r}")
    return rules, randomized


def predict(folder: Path, log: ShopLog) -> Floats:
    """The response model's P(buy) [offers, log grid], each user's rates from its history table
    as discountd looks them up (ArtifactError for a folder that is not a response model)."""
    # Here, not at the top: a run without --response-model needs no ONNX Runtime (0.25 s).
    import onnxruntime as ort

    manifest = response_artifact.load(folder)
    history = HistoryTable.load(folder / response_artifact.HISTORY)
    session = ort.InferenceSession(
        str(folder / response_artifact.GRAPH), providers=["CPUExecutionProvider"]
    )
    rows = np.column_stack([log.features, history.lookup(log.user_ids)]).astype(np.float32)
    grid = np.tile(response_artifact.as_trained(log.grid, manifest.grid), (len(rows), 1))
    [probability] = session.run(None, {"features": rows, "discounts": grid})
    return np.asarray(probability, dtype=np.float64)


def trained_on(folder: Path, offers: Path) -> bool:
    """Whether the response model in folder was trained on this very offer log (its manifest
    holds the log's sha256; a model trained before it did cannot tell, and says no)."""
    return response_artifact.load(folder).data.get("offers_sha256") == sha256_file(offers)


def estimate(
    log: ShopLog,
    rules: list[tuple[str, Rule]],
    probability: Floats | None,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Per policy (no discount first): mean discount, share of offers where the log shows the
    policy's discount, IPS and (with a model) DR mean margin per offer, and DR's lift over no
    discount, each with a 95% interval over offers. IPS is None for a policy the log never
    shows: it rests on no offer, and its 0 would read as a measured margin. progress hears of
    each rule before it prices the log, the long part."""
    for name, rule in rules:
        if rule.policy == "tiered_topk" and log.rank is None:
            raise EstimateError(
                f"rule {name!r} is `tiered_topk`, which discounts by rank, and no offer has a "
                "rank: give the offers' rank column (1 for the model's best item of a request), "
                "as `discountctl offers export` writes it"
            )
        if rule.policy == "optimal":
            if probability is None:
                raise EstimateError(
                    f"rule {name!r} is `optimal`: give its response model (--response-model)"
                )
            off = ope.off_grid(_choices(rule), log.grid)
            if off:
                raise EstimateError(
                    f"rule {name!r} chooses among {off} that the log never drew "
                    f"(it holds {[float(g) for g in log.grid]}): nothing to estimate them from"
                )
    margin = log.margin()
    expected = (
        None
        if probability is None
        else ope.expected_margin(probability, log.price, log.cost, log.grid)
    )
    rank = [UNRANKED] * len(margin) if log.rank is None else log.rank
    targets = {NO_DISCOUNT: np.zeros(len(margin))}
    for n, (name, rule) in enumerate(rules, 1):
        progress(f"pricing {len(margin):,} offers as rule {name!r} would ({n} of {len(rules)})")
        targets[name] = ope.rule_discounts(
            rule, log.price, log.cost, rank, log.score, log.grid, probability
        )
    out: dict[str, Any] = {}
    baseline: Floats | None = None
    for name, target in targets.items():
        supported = np.isclose(log.discount, target)
        ips = ope.ips_terms(log.discount, log.propensity, margin, target)
        row: dict[str, Any] = {
            "mean_discount": float(target.mean()),
            "supported": float(supported.mean()),
            "ips": ope.mean_interval(ips) if supported.any() else None,
        }
        if expected is not None:
            dr = ope.dr_terms(log.discount, log.propensity, margin, target, expected, log.grid)
            if baseline is None:
                baseline = dr
            row["dr"] = ope.mean_interval(dr)
            row["dr_lift"] = ope.mean_interval(dr - baseline)
        out[name] = row
    return out


def _choices(rule: Rule) -> list[float]:
    return [float(c) / 100 for c in grid_choices(rule.params)]


def format_table(estimates: dict[str, Any], offers: int) -> str:
    """The estimates as a table, each column as wide as its widest cell."""

    def ci(v: dict[str, float | None] | None) -> str:
        if v is None:
            return "n/a"
        if v["low"] is None or v["high"] is None:
            return f"{v['mean']:.4f}"
        return f"{v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]"

    header = ("policy", "discount", "in log", "IPS margin/offer (95% CI)",
              "DR margin/offer (95% CI)", "DR lift over no discount")  # fmt: skip
    rows = [header] + [
        (
            name,
            f"{row['mean_discount']:.2%}",
            f"{row['supported']:.1%}",
            ci(row["ips"]),
            ci(row.get("dr")),
            ci(row.get("dr_lift")),
        )
        for name, row in estimates.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(width) if i in (1, 2) else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    lines.append(
        f"{offers:,} offers with a drawn discount; margin in the catalog's currency per offer"
    )
    return "\n".join(lines)
