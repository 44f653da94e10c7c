"""Readers: a shop's interactions and items (CSV or Parquet), Online Retail and MovieLens 100K.

Every reader returns a ``Loaded``: the ``Dataset`` plus what was read and what was dropped and
why, because real data is dirty and a silent drop hides a broken export. Ids are strings, always.
"""

from __future__ import annotations

import lzma
import os
import tarfile
import time
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.offer_token import MAX_PRICE
from core.shop import MAX_AMOUNT
from core.store.db import first_line
from core.store.tables import ID_LENGTH
from core.store.validate import CONTROL_CHARACTERS
from trainer.config import DEFAULT_MARGIN
from trainer.dataset import Catalog, Dataset, Interactions

EVENTS = ("purchase", "view", "click", "cart")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "price")
MAX_QUANTITY = 2**53  # larger quantities are not whole numbers in float64, nor sane ones
# What databases and pandas write for a null: an id like that is no id. Guest checkouts exported
# as "NULL" would otherwise merge into one enormous shopper.
NULL_IDS = frozenset({"", "null", "none", "nan", "na", "n/a"})
# The most an offer token and the offer log hold (core.offer_token.MAX_PRICE).
TOO_DEAR = f"items: price above {MAX_PRICE}, the most an offer holds"
BAD_PAID_PRICE = "paid prices that are not numbers ≥ 0, replaced by the catalog price"

# The public datasets (README, "The public datasets"): under DISCOUNT_DATASETS when set, else in
# ../shared/datasets beside the checkout.
DATASETS = Path(
    os.environ.get("DISCOUNT_DATASETS") or Path(__file__).resolve().parents[2] / "shared/datasets"
)
ONLINE_RETAIL = DATASETS / "online-retail/online_retail.csv.gz"
MOVIELENS = DATASETS / "ml-100k"
# Postage, fees, manual adjustments and vouchers: bookkeeping lines, not products anyone chose.
NON_PRODUCT_CODES = frozenset(
    {"POST", "D", "M", "DOT", "BANK CHARGES", "C2", "CRUK", "PADS", "AMAZONFEE", "S", "B"}
)
NON_PRODUCT_PREFIXES = ("GIFT_",)
MOVIELENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)  # fmt: skip


# A truncated or corrupt .gz raises these while pandas reads it, and neither is an OSError; click
# would turn an EOFError into a bare "Aborted!". (A file that is not gzip at all: BadGzipFile, an
# OSError.) pandas picks the decompressor by the file's name, and the others raise their own
# errors for a file that is not what its name says: .zip BadZipFile, .xz LZMAError, .tar and
# .tar.gz TarError; .zst needs the zstandard package, an ImportError that says to install it.
CORRUPT_COMPRESSED = (
    EOFError,
    zlib.error,
    zipfile.BadZipFile,
    lzma.LZMAError,
    tarfile.TarError,
    ImportError,
)


class DataError(Exception):
    """Input that cannot be trained on; the message names the file and the problem."""


@dataclass(frozen=True)
class Loaded:
    dataset: Dataset
    sources: tuple[Path, ...]
    rows_read: int
    dropped: dict[str, int]
    default_margin: float
    notes: tuple[str, ...] = field(default_factory=tuple)
    changed: dict[str, int] = field(default_factory=dict)  # rows kept with a value replaced

    def summary(self) -> dict[str, Any]:
        catalog = self.dataset.catalog
        return {
            "sources": [str(p) for p in self.sources],
            "rows_read": self.rows_read,
            "dropped": dict(self.dropped),
            "changed": dict(self.changed),
            "rows_kept": len(self.dataset.interactions.user_index),
            "users": len(self.dataset.user_ids),
            "items": len(catalog),
            "items_with_assumed_cost": int(catalog.cost_assumed.sum()),
            "default_margin": self.default_margin,
            "notes": list(self.notes),
        }

    def summary_lines(self) -> list[str]:
        s = self.summary()
        lines = [f"read {s['rows_read']:,} rows from {', '.join(s['sources'])}"]
        lines += [f"  dropped {n:>8,}  {reason}" for reason, n in s["dropped"].items()]
        lines += [f"  changed {n:>8,}  {reason}" for reason, n in s["changed"].items()]
        lines.append(
            f"kept {s['rows_kept']:,} interactions: {s['users']:,} users, {s['items']:,} items"
        )
        if s["items_with_assumed_cost"]:
            lines.append(
                f"  {s['items_with_assumed_cost']:,} items have no cost: "
                f"assumed a {self.default_margin:.0%} margin"
            )
        lines += [f"  note: {n}" for n in self.notes]
        return lines


def _regular(path: Path, expected: str) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file{expected}")
    if not path.is_file():
        # A pipe, as <(head shop.csv) passes, reads once: the manifest's fingerprint of the
        # data would hash nothing, or wait forever on a named one.
        raise DataError(
            f"{path}: not a regular file (a pipe?); discount-train reads its inputs more than "
            "once (the header first; fit also fingerprints them in the manifest): save it to a "
            "file first"
        )


def is_parquet(path: Path) -> bool:
    """Named .parquet, or a Parquet file by its first bytes whatever its name (.pq, .PARQUET):
    read as CSV, one failed with a UTF-8 decoding error."""
    if path.suffix.lower() == ".parquet":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"PAR1"


def _header(path: Path) -> list[str]:
    """The names of a CSV or Parquet file's columns, as written; refused when one is repeated
    (up to surrounding spaces).

    pandas renames a repeated CSV header (discount, discount.1) and reads on: which of the two
    holds the data is a question for the file's owner, not a guess for us. pyarrow refuses a
    repeated Parquet name in words about FieldRef."""
    if is_parquet(path):
        import pyarrow.parquet as pq

        names = list(pq.read_schema(path).names)
    else:
        header = pd.read_csv(path, dtype=str, header=None, nrows=1, keep_default_na=False)
        names = [str(c) for c in header.iloc[0]] if len(header) else []
    # Unnamed columns (a comma at the end of the header) are nameless, not one name repeated.
    named = [n.strip() for n in names if n.strip()]
    twice = sorted({n for n in named if named.count(n) > 1})
    if twice:
        raise DataError(
            f"{path}: column(s) {', '.join(twice)} appear more than once in the header; keep one "
            "column of each name"
        )
    return names


def read_table(
    path: Path, required: tuple[str, ...], ids: tuple[str, ...] = (), *, as_text: bool = True
) -> pd.DataFrame:
    """A CSV (optionally compressed) or Parquet file of a shop's, or DataError naming the file
    and what is wrong with it. Every reader of a shop's files reads through here: fit's
    interactions and items (Online Retail's too), replay's users, response's and
    estimate-policy's logs, uplift's Hillstrom file.

    ids names the id columns, read as text even where a Parquet file holds numbers. as_text:
    every column a string, "" for an empty cell; else the other columns as pandas infers them
    and an empty cell missing (a 480,000-offer log reads that way in about half the time as
    CSV, a fifteenth as Parquet, and its checks run faster on numbers too)."""
    if path.is_dir():
        raise DataError(f"{path}: is a directory; expected a CSV or Parquet file")
    _regular(path, "")
    try:
        names = _header(path)
        if is_parquet(path):
            frame = pd.read_parquet(path)
            for name in frame.columns:
                is_id = str(name).strip() in ids
                if as_text or is_id:
                    frame[name] = _parquet_text(frame[name], path, is_id)
        else:
            # Only an empty cell is missing: pandas would read the ids "NA", "None" or "null"
            # (a storefront's user, a SKU) as missing too.
            options: dict[str, Any] = (
                {"dtype": str, "keep_default_na": False, "na_values": []}
                if as_text
                else {
                    "dtype": {name: str for name in names if name.strip() in ids},
                    "keep_default_na": False,
                    "na_values": [""],
                }
            )
            frame = pd.read_csv(path, **options)
            if not isinstance(frame.index, pd.RangeIndex):
                frame = _without_trailing_fields(path, frame, options)
    except UnicodeDecodeError as e:
        # Excel's "CSV" is Windows-1252 and its "Unicode text" UTF-16: a guessed encoding would
        # spell an id other than the storefront sends it, so the file's owner converts it.
        raise DataError(
            f"{path}: not UTF-8 text ({first_line(e)}); save the CSV as UTF-8 (Excel: CSV UTF-8) "
            "or write Parquet"
        ) from None
    except (
        OSError,
        ValueError,
        pd.errors.ParserError,
        *CORRUPT_COMPRESSED,
    ) as e:
        raise DataError(f"{path}: unreadable as CSV or Parquet ({first_line(e)})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in required if c not in frame.columns]
    if missing:
        separator = _separator(frame)
        separated = (
            f" (a header separated by {separator}: fields must be separated by commas)"
            if separator
            else ""
        )
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; "
            f"found {', '.join(frame.columns) or 'none'}{separated}"
        )
    return frame


def _separator(frame: pd.DataFrame) -> str:
    """What separates the names of a header read as one column, when not a comma: semicolons,
    as Excel writes where the decimal mark is a comma; tabs, which a message shows as spaces."""
    if len(frame.columns) == 1:
        for name, separator in (("semicolons", ";"), ("tabs", "\t"), ("'|'", "|")):
            if separator in str(frame.columns[0]):
                return name
    return ""


def _without_trailing_fields(
    path: Path, frame: pd.DataFrame, options: dict[str, Any]
) -> pd.DataFrame:
    """The file read again without the fields its rows hold beyond the header's names.

    When the first row has more fields than the header, pandas takes the first ones as row
    labels and every value lands one column left of its name: user_id reads the item, timestamp
    the next field. Empty ones are a comma at the end of each row, as some exports write, and
    are dropped; values would be data without a name, which the file's owner must name."""
    extra = frame.index.nlevels
    separator = _separator(frame)
    if separator:  # "1,5" in a field, a decimal comma, made the rows look longer
        raise DataError(
            f"{path}: a header separated by {separator} ({frame.columns[0]}): fields must be "
            "separated by commas"
        )
    trailing = frame.iloc[:, -extra:]
    if (trailing.notna() & (trailing != "")).any(axis=None):
        raise DataError(
            f"{path}: rows hold {extra} more field(s) than the header names "
            f"({', '.join(map(str, frame.columns))}); give every column a name in the header"
        )
    with warnings.catch_warnings():
        # "loss of data": the fields dropped are the empty ones checked above.
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        return pd.read_csv(path, index_col=False, **options)


def _parquet_text(column: pd.Series, path: Path, is_id: bool) -> pd.Series:
    """A Parquet column as the text a CSV would hold: "" for a null."""
    if is_id and pd.api.types.is_float_dtype(column):
        # pandas turns an integer column with one null into floats: id 17 must stay "17".
        given = column.dropna()
        fraction = given[(given % 1 != 0) | (given.abs() > MAX_QUANTITY)]
        if len(fraction):
            raise DataError(
                f"{path}: column {column.name} holds ids that are not whole numbers "
                f"(e.g. {fraction.iloc[0]}); write ids as text or integers"
            )
        column = column.astype("Int64")
    return column.astype(str).where(column.notna(), "")


# Unix seconds a pandas Timestamp can hold (years 1677-2262), as ISO 8601 text can give. Beyond
# them lie "inf" and Unix milliseconds, which would overflow int64 or every date computed later.
MAX_UNIX_SECONDS = pd.Timestamp.max.value // 10**9
# Unix seconds before 1990 predate nearly every shop's records: such a number is more likely a
# day count, a year or a row number than a time.
EARLIEST_UNIX_SECONDS = int(pd.Timestamp("1990-01-01", tz="UTC").timestamp())
EARLY_TIMESTAMP = "timestamp a number before 1990 as Unix seconds (days, a year, a row number?)"
# Unix milliseconds of any date since April 1970 are past 2262 as seconds: "neither ISO 8601 nor
# Unix seconds" would leave the user puzzling over what look like good Unix timestamps.
LATE_TIMESTAMP = "timestamp a number past 2262 as Unix seconds (milliseconds?)"
# A shop's clock running a little fast is no reason to drop a row; a date years ahead (a typo, a
# placeholder such as 2099-01-01) would stretch the hold-out and make every shopper look lapsed.
CLOCK_SKEW_SECONDS = 86_400


def future_timestamps(seconds: pd.Series) -> tuple[str, pd.Series]:
    """A drop reason naming the latest row dated after now plus a day of clock skew, and those
    rows."""
    future = seconds > time.time() + CLOCK_SKEW_SECONDS
    latest = int(seconds[future].max()) if future.any() else 0
    when = (
        datetime.fromtimestamp(latest, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        if latest <= MAX_UNIX_SECONDS
        else f"{latest} Unix seconds, past 2262"
    )
    return f"timestamp more than a day after the time of the fit (latest {when})", future


def parse_timestamps(values: pd.Series) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Unix seconds from ISO 8601 text (naive means UTC, 20240131 a date) or Unix seconds; NaN
    where neither. The masks mark the numbers refused as Unix seconds before 1990 and the finite
    ones past 2262 (NaN too)."""
    values = values.str.strip()
    # 20240131 is both a number and an ISO 8601 basic date; as Unix seconds it is August 1970.
    eight_digits = values.where(values.str.fullmatch(r"\d{8}"))
    basic = pd.to_datetime(eight_digits, format="%Y%m%d", errors="coerce").notna()
    numeric = pd.to_numeric(values.where(~basic), errors="coerce").astype("float64")
    late = np.isfinite(numeric) & (numeric > MAX_UNIX_SECONDS)
    numeric = numeric.where(numeric.abs() <= MAX_UNIX_SECONDS)
    early = numeric < EARLIEST_UNIX_SECONDS
    numeric[early] = np.nan
    text = values[numeric.isna() & ~early & ~late]
    if len(text):
        parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
        seconds = (parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
        numeric[text.index] = seconds.astype("float64").where(parsed.notna(), np.nan)
    return numeric, early, late


class _Drops:
    """Applies filters in order and counts each reason once per row."""

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame
        self.counts: dict[str, int] = {}

    def drop(self, reason: str, mask: pd.Series) -> None:
        n = int(mask.sum())
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n
            self.frame = self.frame.loc[~mask]


UNSTORABLE_ID = f"longer than {ID_LENGTH} characters or with control characters"


def _missing(ids: pd.Series) -> pd.Series:
    return ids.str.lower().isin(NULL_IDS)


def _missing_reason(column: str) -> str:
    return f"missing {column} (empty, NULL, None, NaN, NA or N/A)"


def _unstorable(ids: pd.Series) -> pd.Series:
    """Ids the store's columns cannot hold: discountd would log their offers and events into
    a table that refuses them (PostgreSQL, for a NUL or past the column's width)."""
    return (ids.str.len() > ID_LENGTH) | ids.str.contains(CONTROL_CHARACTERS.pattern, regex=True)


def load_files(interactions: Path, items: Path, default_margin: float = DEFAULT_MARGIN) -> Loaded:
    """Interactions and items in the DESIGN.md columns."""
    catalog_frame = read_table(items, ITEM_COLUMNS, ids=("item_id",))
    catalog_frame["item_id"] = catalog_frame["item_id"].str.strip()
    item_drops = _Drops(catalog_frame)
    item_drops.drop(f"items: {_missing_reason('item_id')}", _missing(item_drops.frame["item_id"]))
    item_drops.drop(f"items: {UNSTORABLE_ID}", _unstorable(item_drops.frame["item_id"]))
    price = pd.to_numeric(item_drops.frame["price"], errors="coerce")
    bad_price = ~(np.isfinite(price) & (price >= 0))
    # discountd gives such an item no offer (NO_PRICE): no token or offer log holds its price.
    dear = np.isfinite(price) & (price > MAX_AMOUNT)
    priceless = item_drops.frame.loc[bad_price | dear, "item_id"]
    item_drops.drop("items: price missing, not a number or negative", bad_price)
    item_drops.drop(TOO_DEAR, dear.loc[item_drops.frame.index])
    item_drops.drop(
        "items: duplicate item_id (first kept)", item_drops.frame["item_id"].duplicated()
    )
    if item_drops.frame.empty:
        raise DataError(f"{items}: no usable item rows{_dropped(item_drops.counts)}")
    cat = item_drops.frame
    # A negative or infinite cost, or one above what an offer holds, is a broken export, not a
    # cost: assume one like a missing cost.
    cost = pd.to_numeric(cat["cost"] if "cost" in cat else pd.Series(np.nan, cat.index), "coerce")
    catalog = pd.DataFrame(
        {
            "item_id": cat["item_id"],
            "title": cat.get("title", ""),
            "category": cat["category"].str.strip() if "category" in cat else "",
            "price": pd.to_numeric(cat["price"]),
            "cost": cost.where(np.isfinite(cost) & (cost >= 0) & (cost <= MAX_AMOUNT)),
        }
    )

    frame = read_table(interactions, INTERACTION_COLUMNS, ids=("user_id", "item_id"))
    rows_read = len(frame)
    drops = _Drops(frame)
    for column in ("user_id", "item_id"):
        drops.frame = drops.frame.assign(**{column: drops.frame[column].str.strip()})
        drops.drop(_missing_reason(column), _missing(drops.frame[column]))
        drops.drop(f"{column} {UNSTORABLE_ID}", _unstorable(drops.frame[column]))
    # A copied line would count a purchase twice, in the model's weights and in lifetime value.
    drops.drop("exact duplicate rows", drops.frame.duplicated())
    ts, early, late = parse_timestamps(drops.frame["timestamp"])
    drops.drop(EARLY_TIMESTAMP, early)
    drops.drop(LATE_TIMESTAMP, late.loc[drops.frame.index])
    drops.drop("timestamp neither ISO 8601 nor Unix seconds", ts.loc[drops.frame.index].isna())
    drops.frame = drops.frame.assign(timestamp=ts.loc[drops.frame.index].astype("int64"))
    drops.drop(*future_timestamps(drops.frame["timestamp"]))
    if "event" in drops.frame:
        event = drops.frame["event"].str.strip().str.lower().replace("", "purchase")
        drops.frame = drops.frame.assign(event=event)
        drops.drop(f"event not one of {', '.join(EVENTS)}", ~event.isin(EVENTS))
    else:
        drops.frame = drops.frame.assign(event="purchase")
    if "quantity" in drops.frame:
        qty = pd.to_numeric(drops.frame["quantity"].str.strip().replace("", "1"), errors="coerce")
        # Quantities are whole units (int64): 2.5 units is no count, and 1e30 or inf do not fit.
        whole = (qty >= 1) & (qty <= MAX_QUANTITY) & (qty % 1 == 0)
        # An order line with units returned, the way shops export returns (Online Retail too).
        returned = (-qty >= 1) & (-qty <= MAX_QUANTITY) & (qty % 1 == 0)
        returns = drops.frame.loc[returned & (drops.frame["event"] == "purchase")]
        drops.drop("quantity not a positive whole number", ~whole)
        drops.frame = drops.frame.assign(quantity=qty.loc[drops.frame.index])
        purchases = drops.frame.loc[drops.frame["event"] == "purchase"]
        columns = {"user_id": "user", "item_id": "item"}
        taken_back = _reversed(
            purchases[["user_id", "item_id", "quantity", "timestamp"]].rename(columns=columns),
            returns[["user_id", "item_id", "timestamp"]]
            .rename(columns=columns)
            .assign(quantity=-qty.loc[returns.index]),
        )
        drops.drop(
            "purchases a later return reverses in full (same user, item, quantity)",
            pd.Series(drops.frame.index.isin(taken_back), index=drops.frame.index),
        )
    else:
        drops.frame = drops.frame.assign(quantity=1)
    # The items file has these ids, so "not in the items file" would send the user looking
    # for ids that are there.
    in_catalog = drops.frame["item_id"].isin(catalog["item_id"])
    drops.drop(
        "item dropped from the items file (bad price)",
        ~in_catalog & drops.frame["item_id"].isin(priceless),
    )
    drops.drop("item_id not in the items file", ~drops.frame["item_id"].isin(catalog["item_id"]))
    if drops.frame.empty:
        raise DataError(
            f"{interactions}: no usable interaction rows after cleaning{_dropped(drops.counts)}"
        )
    paid_text = (
        drops.frame["price"].str.strip()
        if "price" in drops.frame
        else pd.Series("", index=drops.frame.index)
    )
    paid = pd.to_numeric(paid_text, errors="coerce")
    usable = np.isfinite(paid) & (paid >= 0)
    # An empty price was not recorded; anything else that is no price is a broken export.
    bad_paid = int((~usable & (paid_text != "")).sum())
    drops.frame = drops.frame.assign(price=paid.where(usable))
    return Loaded(
        dataset=build_dataset(drops.frame, catalog, default_margin),
        sources=(interactions, items),
        rows_read=rows_read,
        dropped={**item_drops.counts, **drops.counts},
        default_margin=default_margin,
        changed={BAD_PAID_PRICE: bad_paid} if bad_paid else {},
    )


def _dropped(counts: dict[str, int]) -> str:
    """The drop counts for an error message: why nothing was left."""
    if not counts:
        return ""
    return " (dropped: " + "; ".join(f"{n:,} {reason}" for reason, n in counts.items()) + ")"


def _reversed(bought: pd.DataFrame, returned: pd.DataFrame) -> pd.Index:
    """The rows of ``bought`` that a row of ``returned`` takes back in full. Both have the
    columns user, item, quantity (units, positive) and timestamp. Each return takes back the
    latest line of the same user and item with as many units bought at or before it, one line
    per return. A partial return matches no line and the purchase stays: the data does not say
    which units went back."""
    key = ["user", "item", "quantity"]
    bought = bought.loc[bought.set_index(key).index.isin(returned.set_index(key).index)]
    # At one timestamp the purchase comes first: an order cancelled within its minute.
    lines = pd.concat(
        [bought.assign(is_return=False), returned.assign(is_return=True)]
    ).sort_values([*key, "timestamp", "is_return"], kind="stable")
    taken_back: list[Any] = []
    open_lines: dict[tuple[Any, ...], list[Any]] = {}
    for index, user, item, quantity, _, is_return in lines[
        [*key, "timestamp", "is_return"]
    ].itertuples(name=None):
        stack = open_lines.setdefault((user, item, quantity), [])
        if not is_return:
            stack.append(index)
        elif stack:
            taken_back.append(stack.pop())
    return pd.Index(taken_back)


ONLINE_RETAIL_COLUMNS = (
    "InvoiceNo", "StockCode", "Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID",
)  # fmt: skip
DATASET_NAMES = {"online-retail": "UCI Online Retail", "movielens": "MovieLens 100K"}


def published_format(path: Path) -> str | None:
    """The --format that reads this file or folder, when it is a public dataset as published:
    a shop trying discountd on one passes it as its own file first."""
    if (path / "u.data").is_file() or (path.name == "u.data" and path.is_file()):
        return "movielens"
    if not path.is_file():
        # A named pipe would hold the command until someone writes to it (_regular).
        return None
    try:
        names = {name.strip() for name in _header(path)}
    except (DataError, OSError, ValueError, pd.errors.ParserError, *CORRUPT_COMPRESSED):
        return None
    return "online-retail" if set(ONLINE_RETAIL_COLUMNS) <= names else None


def load_online_retail(
    path: Path = ONLINE_RETAIL, default_margin: float = DEFAULT_MARGIN
) -> Loaded:
    """UCI Online Retail, cleaned: only real purchases of real products by known customers."""
    frame = read_table(path, ONLINE_RETAIL_COLUMNS)
    rows_read = len(frame)
    drops = _Drops(frame)
    qty = pd.to_numeric(frame["Quantity"], errors="coerce")
    cancelled = frame["InvoiceNo"].str.upper().str.startswith("C")
    cancellations = frame.loc[cancelled & (qty < 0)].drop_duplicates()
    drops.drop("cancellations and returns (InvoiceNo C…, Quantity ≤ 0)", cancelled | ~(qty > 0))
    drops.drop("no CustomerID", _missing(drops.frame["CustomerID"].str.strip()))
    drops.drop("exact duplicate rows", drops.frame.duplicated())

    def lines(frame: pd.DataFrame, sign: int) -> pd.DataFrame:
        ts, _, _ = parse_timestamps(frame["InvoiceDate"])
        return pd.DataFrame(
            {
                "user": frame["CustomerID"].str.strip(),
                "item": frame["StockCode"].str.strip(),
                "quantity": sign * pd.to_numeric(frame["Quantity"], errors="coerce"),
                "timestamp": ts,
            },
            index=frame.index,
        ).dropna()

    taken_back = _reversed(lines(drops.frame, 1), lines(cancellations, -1))
    drops.drop(
        "purchases a later cancellation reverses in full (same customer, item, quantity)",
        pd.Series(drops.frame.index.isin(taken_back), index=drops.frame.index),
    )
    code = drops.frame["StockCode"].str.strip().str.upper()
    drops.drop(
        "non-product codes (postage, fees, adjustments, vouchers)",
        code.isin(NON_PRODUCT_CODES) | code.str.startswith(NON_PRODUCT_PREFIXES),
    )
    unit_price = pd.to_numeric(drops.frame["UnitPrice"], errors="coerce")
    drops.drop("zero, negative or missing UnitPrice", ~(unit_price > 0))
    ts, _, _ = parse_timestamps(drops.frame["InvoiceDate"])
    drops.drop("unparseable InvoiceDate", ts.isna())
    drops.drop(*future_timestamps(ts.loc[drops.frame.index]))
    kept = drops.frame
    if kept.empty:
        raise DataError(f"{path}: no usable purchase rows after cleaning{_dropped(drops.counts)}")
    # CustomerID is written as a float ("17850.0"); the id is the integer part.
    user = kept["CustomerID"].str.strip().str.removesuffix(".0")
    item = kept["StockCode"].str.strip()
    rows = pd.DataFrame(
        {
            "user_id": user,
            "item_id": item,
            "timestamp": ts.loc[kept.index].astype("int64"),
            "event": "purchase",
            "quantity": pd.to_numeric(kept["Quantity"]),
            "price": pd.to_numeric(kept["UnitPrice"]),
            "title": kept["Description"].str.strip(),
        }
    )
    # The data has no catalog: an item's price is its median paid price, robust to the odd
    # wholesale or mistyped line; the title is the most frequent description.
    by_item = rows.groupby("item_id", sort=True)
    catalog = pd.DataFrame(
        {
            "price": by_item["price"].median(),
            "title": by_item["title"].agg(lambda t: t.value_counts().index[0]),
        }
    ).reset_index()
    catalog["category"] = ""
    catalog["cost"] = np.nan
    return Loaded(
        dataset=build_dataset(rows, catalog, default_margin),
        sources=(path,),
        rows_read=rows_read,
        dropped=drops.counts,
        default_margin=default_margin,
        notes=(
            "item price = median unit price paid",
            "no categories in this data",
            "order_count counts distinct purchase days",
        ),
    )


def load_movielens(directory: Path = MOVIELENS) -> Loaded:
    """MovieLens 100K: every rating is an interaction; a film's first genre is its category."""
    ratings_path = directory / "u.data" if directory.is_dir() else directory
    directory = ratings_path.parent
    _regular(ratings_path, " (expected MovieLens 100K's u.data)")
    try:
        ratings = pd.read_csv(
            ratings_path, sep="\t", header=None, dtype=str, names=["user", "item", "r", "ts"]
        )
        ts = pd.to_numeric(ratings["ts"], errors="raise").astype("int64")
    except (OSError, ValueError, OverflowError, pd.errors.ParserError, *CORRUPT_COMPRESSED) as e:
        # OverflowError: a timestamp of 20 digits, past any int64 of seconds.
        raise DataError(f"{ratings_path}: not MovieLens u.data ({type(e).__name__})") from None
    if ratings.empty:
        raise DataError(f"{ratings_path}: no ratings")
    rows = pd.DataFrame(
        {
            "user_id": ratings["user"].str.strip(),
            "item_id": ratings["item"].str.strip(),
            "timestamp": ts,
            "event": "purchase",
            "quantity": 1,
            "price": np.nan,
        }
    )
    drops = _Drops(rows)
    drops.drop(*future_timestamps(rows["timestamp"]))
    rows = drops.frame
    if rows.empty:
        raise DataError(f"{ratings_path}: no usable ratings{_dropped(drops.counts)}")
    notes = ["a rating of any value counts as an interaction", "no prices in this data"]
    items_path = directory / "u.item"
    item_ids = sorted(set(rows["item_id"]), key=lambda s: (len(s), s))
    titles = dict.fromkeys(item_ids, "")
    categories = dict.fromkeys(item_ids, "")
    if items_path.is_file():
        try:
            item_table = pd.read_csv(
                items_path,
                sep="|",
                header=None,
                dtype=str,
                encoding="latin-1",
                keep_default_na=False,
            )
        except (OSError, ValueError, pd.errors.ParserError, *CORRUPT_COMPRESSED) as e:
            raise DataError(f"{items_path}: not MovieLens u.item ({type(e).__name__})") from None
        for row in item_table.itertuples(index=False):
            flags = [str(f) == "1" for f in row[5 : 5 + len(MOVIELENS_GENRES)]]
            genre = next((g for g, on in zip(MOVIELENS_GENRES, flags, strict=False) if on), "")
            if str(row[0]) in titles:
                titles[str(row[0])] = str(row[1])
                categories[str(row[0])] = genre
    else:
        notes.append(
            f"{items_path.name} not found beside {ratings_path.name}: items have no "
            "category or title"
        )
    catalog = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": [titles[i] for i in item_ids],
            "category": [categories[i] for i in item_ids],
            "price": 0.0,
            "cost": 0.0,
        }
    )
    return Loaded(
        dataset=build_dataset(rows, catalog, DEFAULT_MARGIN),
        sources=(ratings_path,),
        rows_read=len(ratings),
        dropped=drops.counts,
        default_margin=DEFAULT_MARGIN,
        notes=tuple(notes),
    )


def build_dataset(rows: pd.DataFrame, catalog: pd.DataFrame, default_margin: float) -> Dataset:
    """Index users (sorted ids) and items (catalog order) and pack into the shared dataclasses."""
    user_ids = sorted(set(rows["user_id"]))
    user_pos = {u: i for i, u in enumerate(user_ids)}
    item_ids = [str(i) for i in catalog["item_id"]]
    item_pos = {it: i for i, it in enumerate(item_ids)}
    prices = catalog["price"].to_numpy(dtype=np.float64)
    costs = pd.to_numeric(catalog["cost"], errors="coerce").to_numpy(dtype=np.float64)
    assumed = ~np.isfinite(costs)
    costs = np.where(assumed, prices * (1.0 - default_margin), costs)
    order = np.argsort(rows["timestamp"].to_numpy(), kind="stable")
    rows = rows.iloc[order]
    return Dataset(
        user_ids=user_ids,
        catalog=Catalog(
            item_ids=item_ids,
            categories=[str(c) for c in catalog["category"]],
            titles=[str(t) for t in catalog["title"]],
            prices=prices,
            costs=costs,
            cost_assumed=assumed,
        ),
        interactions=Interactions(
            user_index=rows["user_id"].map(user_pos).to_numpy(dtype=np.int64),
            item_index=rows["item_id"].map(item_pos).to_numpy(dtype=np.int64),
            timestamp=rows["timestamp"].to_numpy(dtype=np.int64),
            event=[str(e) for e in rows["event"]],
            quantity=rows["quantity"].to_numpy(dtype=np.int64),
            price=pd.to_numeric(rows["price"], errors="coerce").to_numpy(dtype=np.float64),
        ),
    )
