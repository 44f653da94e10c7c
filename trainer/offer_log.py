"""A randomized discount log as a shop exports it (offers and the events naming them), checked
and joined: what `discount-train response` trains on and `estimate-policy` estimates from.

Apart from trainer.response, which imports torch: estimate-policy trains nothing, and torch took
most of its run to import."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd

from core.offer_token import MAX_PRICE
from core.response_artifact import OFFER_FEATURES
from core.store.tables import EVENT_TYPES
from trainer.dataset import Floats

IDS = ("offer_id", "user_id", "item_id")
OFFER_COLUMNS = ("offer_id", "user_id", "discount", "propensity", *OFFER_FEATURES)
EVENT_COLUMNS = ("type", "offer_id")
FLOAT32_MAX = float(np.finfo(np.float32).max)


class ResponseError(Exception):
    """Logged data a response model cannot be trained on; the message names the fix."""


@dataclass(frozen=True)
class OfferLog:
    """A randomized log's offers, checked, and which of them were bought (read_offer_log)."""

    offer_features: Floats  # OFFER_FEATURES per offer
    user_ids: npt.NDArray[np.str_]
    discount: Floats
    bought: npt.NDArray[np.bool_]
    propensity: Floats
    foreign_purchases: int  # purchases naming an offer of another user or item: not counted
    fixed_discounts: int  # offers with propensity 1


def read_offer_log(offers: pd.DataFrame, events: pd.DataFrame) -> OfferLog:
    """Check the offer log and join it with purchase events by offer_id: an offer is bought when
    a purchase or a redemption names it (a storefront records a line bought at the offer's
    discounted price as a redemption, docs/OFFERS.md). ResponseError names what is wrong."""
    missing = [c for c in OFFER_COLUMNS if c not in offers.columns]
    if missing:
        raise ResponseError(
            f"offers: missing column(s) {', '.join(missing)}; needed: {OFFER_COLUMNS}"
        )
    if offers.empty:
        raise ResponseError("offers: the file has a header and no rows; nothing to learn from")
    # pandas reads an empty CSV cell as NaN, which str() makes the id "nan".
    no_id = _blank(offers["offer_id"])
    if no_id.any():
        raise ResponseError(
            f"offers: offer_id is empty in {int(no_id.sum())} row(s), e.g. data row "
            f"{int(np.argmax(no_id)) + 1}; events name offers by it, so every offer needs one"
        )
    no_user = _blank(offers["user_id"])
    if no_user.any():
        raise ResponseError(
            f"offers: user_id is empty in {int(no_user.sum())} row(s), e.g. offer "
            f"{offers['offer_id'].iloc[int(np.argmax(no_user))]!r}; each shopper's past responses "
            "are features, so every offer must name its user"
        )
    missing = [c for c in EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ResponseError(f"events: missing column(s) {', '.join(missing)}")
    repeated = offers["offer_id"].duplicated().to_numpy()
    if repeated.any():
        raise ResponseError(
            f"offers: offer_id {offers['offer_id'].iloc[int(np.argmax(repeated))]!r} repeats "
            f"({int(repeated.sum()):,} row(s) repeat an id); each offer must appear once"
        )
    numeric = offers[["discount", "propensity", *OFFER_FEATURES]].apply(
        pd.to_numeric, errors="coerce"
    )
    _refuse_rows(
        offers,
        ~np.isfinite(numeric.to_numpy(dtype=np.float64)).all(axis=1),
        "a missing, non-numeric or infinite value",
        "fix or drop them",
    )
    # No offer is priced above what the store and an offer token hold; pricing's cents cannot
    # even represent a price or cost of 1e26 or more.
    money = numeric[["price", "cost"]]
    _refuse_rows(
        offers,
        ((money < 0) | (money > float(MAX_PRICE))).any(axis=1).to_numpy(),
        f"a price or cost outside [0, {MAX_PRICE}]",
        "fix or drop them",
    )
    # The response model and discountd take the features as float32, where a larger magnitude is
    # infinite: the model trained to NaN on one such offer, and was saved.
    _refuse_rows(
        offers,
        (numeric[list(OFFER_FEATURES)].abs() > FLOAT32_MAX).any(axis=1).to_numpy(),
        f"a number beyond ±{FLOAT32_MAX:.4g}, the largest a float32 holds",
        "fix or drop them",
    )
    d = numeric["discount"].to_numpy(dtype=np.float64)
    _refuse_rows(
        offers,
        (d < 0) | (d >= 1),
        "a discount outside [0, 1)",
        "a discount is a fraction of the price, 0.15 for 15%",
    )
    p = numeric["propensity"].to_numpy(dtype=np.float64)
    _refuse_rows(
        offers,
        (p <= 0) | (p > 1),
        "a propensity outside (0, 1]",
        "log the probability the discount shown had of being drawn",
    )
    fixed = p == 1
    if fixed.all():
        # A deterministic policy discounts whom it chose to (the top ranks, the optimal policy's
        # picks): a model of such a log learns who was discounted, not what a discount does.
        raise ResponseError(
            "offers: every propensity is 1, so no offer's discount was drawn at random (the log "
            "of a fixed rule or of the optimal policy itself), and a model of it would learn "
            "whom that policy discounted, not what a discount does; log an experiment that draws "
            "each offer's discount from a grid, with the probability of the one drawn as its "
            "propensity"
        )
    if len(np.unique(d)) < 2:
        raise ResponseError(
            "offers: every offer has the same discount; a response model needs randomized "
            "discounts (run an experiment that draws them from a grid)"
        )
    # The store writes "purchase"; RecordEvents names it EVENT_TYPE_PURCHASE: both, in any case.
    kind = events["type"].astype(str).str.strip().str.lower().str.removeprefix("event_type_")
    unknown = ~kind.isin(EVENT_TYPES)
    if unknown.any():
        raise ResponseError(
            f"events: {int(unknown.sum()):,} of {len(events):,} rows have a type that is not one "
            f"of {', '.join(EVENT_TYPES)} (e.g. {events['type'][unknown].iloc[0]!r}); "
            "fix or drop them"
        )
    sold = kind.isin(("purchase", "redemption"))
    sales = events[sold]
    row = _offer_rows(offers["offer_id"], sales["offer_id"])
    foreign = _foreign(offers, sales, row)
    bought = np.zeros(len(offers), dtype=np.bool_)
    bought[row[(row >= 0) & ~foreign]] = True
    if not bought.any():
        raise ResponseError(
            f"events: no purchase or redemption event names a logged offer "
            f"({int(sold.sum()):,} such events of {len(events):,}, {len(offers):,} offers); "
            "events must carry the offer_id of the offer log"
        )
    return OfferLog(
        numeric[list(OFFER_FEATURES)].to_numpy(dtype=np.float64),
        offers["user_id"].astype(str).to_numpy(dtype=str),
        d,
        bought,
        p,
        foreign_purchases=int(foreign.sum()),
        fixed_discounts=int(fixed.sum()),
    )


def _blank(ids: pd.Series) -> npt.NDArray[np.bool_]:
    return np.asarray(ids.isna() | (ids.astype(str).str.strip() == ""), dtype=np.bool_)


def _refuse_rows(offers: pd.DataFrame, rows: npt.NDArray[np.bool_], what: str, fix: str) -> None:
    """ResponseError when any of rows is set: how many offers have what, the first by its id,
    and how to fix it."""
    if rows.any():
        raise ResponseError(
            f"offers: {int(rows.sum())} row(s) with {what}, e.g. offer "
            f"{offers['offer_id'].iloc[int(np.argmax(rows))]!r}; {fix}"
        )


def _offer_rows(offer_ids: pd.Series, named: pd.Series) -> npt.NDArray[np.intp]:
    """The offer row each event names by offer_id (as text: a Parquet log's 17 is a CSV's
    "17"), -1 where it names none. One hash lookup per event: Series.isin over Arrow strings
    made a Python object of every offer id, most of a 960,000-offer log's reading time."""
    row = pd.Index(offer_ids.astype(str)).get_indexer(named.astype(str))
    return np.where(named.notna().to_numpy(), row, -1)


def _foreign(
    offers: pd.DataFrame, sold: pd.DataFrame, row: npt.NDArray[np.intp]
) -> npt.NDArray[np.bool_]:
    """Per purchase event, whether it names (row, from _offer_rows) a logged offer made to
    another user or for another item: a shopper who used someone else's offer token bought, but
    not because of the discount that offer showed its own user, so it does not count as that
    offer's purchase. When most do, the events come from another log than the offers (another
    run's events.csv beside this offer log), and training would learn nothing true:
    ResponseError."""
    named = row >= 0
    foreign = np.zeros(len(sold), dtype=np.bool_)
    for column in ("user_id", "item_id"):
        if column in sold.columns and column in offers.columns:
            theirs = offers[column].iloc[row[named]].astype(str).to_numpy()
            said = sold[column][named]
            foreign[named] |= ~_blank(said) & (said.astype(str).to_numpy() != theirs)
    if foreign.sum() * 2 > named.sum():
        first = sold[foreign].iloc[0]
        raise ResponseError(
            f"events: {int(foreign.sum()):,} of {int(named.sum()):,} purchases naming a logged "
            f"offer are by another user or of another item than the offer (e.g. event "
            f"{first.get('event_id')!r} names offer {first['offer_id']!r}); the events come from "
            "another log than the offers"
        )
    return foreign
