"""Readers: ids stay strings, Online Retail is cleaned on purpose, bad files fail in one line."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from trainer.cli import main
from trainer.data import DataError, load_files, load_movielens, load_online_retail, read_table

ITEMS = "item_id,title,category,price,cost\n007,Seven,kitchen,10.0,6.0\n7,Plain seven,garden,4.0,\n"
T = 1704164645  # 2024-01-02T03:04:05Z in Unix seconds


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_ids_keep_leading_zeros_and_both_timestamp_forms(tmp_path: Path) -> None:
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp,quantity,price\n"
        "0042,007,2024-01-02T03:04:05Z,2,9.5\n"
        "42,7,1704164645,,\n",
    )
    loaded = load_files(inter, write(tmp_path / "items.csv", ITEMS))
    ds = loaded.dataset
    assert ds.user_ids == ["0042", "42"]
    assert ds.catalog.item_ids == ["007", "7"]
    assert ds.interactions.item_index.tolist() == [0, 1]
    assert ds.interactions.timestamp.tolist() == [1704164645, 1704164645]
    assert ds.interactions.quantity.tolist() == [2, 1]
    assert ds.interactions.price[0] == 9.5 and np.isnan(ds.interactions.price[1])
    # Item "7" has no cost: the default margin is assumed, flagged and reported.
    assert ds.catalog.cost_assumed.tolist() == [False, True]
    assert ds.catalog.costs.tolist() == [6.0, pytest.approx(4.0 * 0.7)]
    assert any("assumed a 30% margin" in line for line in loaded.summary_lines())


def test_parquet_reads_like_csv(tmp_path: Path) -> None:
    pd.DataFrame(
        {"user_id": ["001", "002"], "item_id": ["007", "007"], "timestamp": [T, T + 1]}
    ).to_parquet(tmp_path / "i.parquet")
    pd.DataFrame({"item_id": ["007"], "price": [3.5]}).to_parquet(tmp_path / "items.parquet")
    ds = load_files(tmp_path / "i.parquet", tmp_path / "items.parquet").dataset
    assert ds.user_ids == ["001", "002"]
    assert ds.catalog.item_ids == ["007"]
    assert ds.interactions.event == ["purchase", "purchase"]


def test_unusable_rows_are_dropped_and_counted(tmp_path: Path) -> None:
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp,event,quantity\n"
        "u1,007,2024-01-01,view,1\n"
        "u1,007,yesterday,purchase,1\n"
        "u1,999,2024-01-01,purchase,1\n"
        "u1,007,2024-01-01,wishlist,1\n"
        "u1,007,2024-01-01,purchase,-3\n"
        ",007,2024-01-01,purchase,1\n",
    )
    loaded = load_files(inter, write(tmp_path / "items.csv", ITEMS))
    assert loaded.rows_read == 6
    assert loaded.dataset.interactions.event == ["view"]
    assert loaded.dropped == {
        "missing user_id (empty, NULL, None, NaN, NA or N/A)": 1,
        "timestamp neither ISO 8601 nor Unix seconds": 1,
        "event not one of purchase, view, click, cart": 1,
        "quantity not a positive whole number": 1,
        "item_id not in the items file": 1,
    }


def test_out_of_range_timestamps_and_quantities_are_dropped_not_overflowed(
    tmp_path: Path,
) -> None:
    """inf, 1e30 and Unix milliseconds are no Unix seconds; quantities must be whole units."""
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp,quantity\n"
        "u1,007,inf,1\n"
        "u1,007,1e30,1\n"
        "u1,007,1704164645000,1\n"
        "u1,007, 2024-01-02T03:04:05Z ,1\n"
        "u1,007,1704164645,inf\n"
        "u1,007,1704164645,1e30\n"
        "u1,007,1704164645,0.3\n"
        "u1,7,1704164645,2.0\n",
    )
    loaded = load_files(inter, write(tmp_path / "items.csv", ITEMS))
    assert loaded.dropped == {
        "timestamp a number past 2262 as Unix seconds (milliseconds?)": 2,
        "timestamp neither ISO 8601 nor Unix seconds": 1,
        "quantity not a positive whole number": 3,
    }
    assert loaded.dataset.interactions.timestamp.tolist() == [1704164645, 1704164645]
    assert loaded.dataset.interactions.quantity.tolist() == [1, 2]


def test_ids_the_store_cannot_hold_are_dropped(tmp_path: Path) -> None:
    """Offers and events name these ids in columns of 128 characters that hold no control
    characters: a model serving such an id would jam the offer log on PostgreSQL."""
    long_id = "u" * 129
    inter = write(
        tmp_path / "i.csv",
        f"user_id,item_id,timestamp\nu1,007,{T}\n{long_id},007,{T}\nu\x01x,007,{T}\nu2,bad\x02,{T}\n",
    )
    items = write(tmp_path / "items.csv", f"{ITEMS}bad\x02,B,garden,3.0,1.0\n{'i' * 129},I,,1.0,\n")
    loaded = load_files(inter, items)
    assert loaded.dropped == {
        "items: longer than 128 characters or with control characters": 2,
        "user_id longer than 128 characters or with control characters": 2,
        "item_id longer than 128 characters or with control characters": 1,
    }
    assert loaded.dataset.user_ids == ["u1"]


def test_item_prices_must_be_finite_and_bad_costs_are_assumed(tmp_path: Path) -> None:
    items = write(
        tmp_path / "items.csv",
        "item_id,price,cost\nfree,inf,1\na,10,inf\nb,10,-4\nc,10,6\n",
    )
    inter = write(tmp_path / "i.csv", f"user_id,item_id,timestamp\nu1,a,{T}\nu1,b,{T}\nu1,c,{T}\n")
    loaded = load_files(inter, items)
    assert loaded.dropped == {"items: price missing, not a number or negative": 1}
    catalog = loaded.dataset.catalog
    assert catalog.item_ids == ["a", "b", "c"]
    assert catalog.cost_assumed.tolist() == [True, True, False]
    assert catalog.costs.tolist() == [pytest.approx(7.0), pytest.approx(7.0), 6.0]


def test_prices_above_what_an_offer_holds_are_dropped_and_such_costs_assumed(
    tmp_path: Path,
) -> None:
    """An offer token and the offer log hold at most 9999999999.99: discountd could never offer
    an item priced above it, and a cost above it is no cost."""
    items = write(
        tmp_path / "items.csv",
        "item_id,price,cost\ntop,9999999999.99,1\ndear,2e10,1\nabsurd,1e30,1\n"
        "a,10,1e30\nb,10,2e10\nc,10,6\n",
    )
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp\n"
        + "".join(f"u1,{i},{T}\n" for i in ("top", "dear", "absurd", "a", "b", "c")),
    )
    loaded = load_files(inter, items)
    assert loaded.dropped == {
        "items: price above 9999999999.99, the most an offer holds": 2,
        "item dropped from the items file (bad price)": 2,
    }
    assert "  dropped        2  items: price above 9999999999.99, the most an offer holds" in (
        loaded.summary_lines()
    )
    catalog = loaded.dataset.catalog
    assert catalog.item_ids == ["top", "a", "b", "c"]
    assert catalog.cost_assumed.tolist() == [False, True, True, False]
    assert catalog.costs.tolist() == [1.0, pytest.approx(7.0), pytest.approx(7.0), 6.0]


OR_HEADER = "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
OR_GOOD = "536365,85123A,WHITE HANGING HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"


def test_online_retail_drops_each_reason_on_purpose(tmp_path: Path) -> None:
    path = write(
        tmp_path / "retail.csv",
        OR_HEADER
        + OR_GOOD
        + OR_GOOD  # exact duplicate
        + "536366,00123,SMALL THING,2,2010-12-02 09:00:00,1.00,13047.0,United Kingdom\n"
        + "536366,00123,SMALL THING,1,2010-12-03 09:00:00,3.00,13047.0,United Kingdom\n"
        + "536367,00123,SMALL THING,1,2010-12-04 09:00:00,5.00,13047.0,United Kingdom\n"
        + "C536379,85123A,WHITE HANGING HEART,-1,2010-12-01 09:41:00,2.55,17850.0,UK\n"
        + "536380,85123A,WHITE HANGING HEART,-5,2010-12-01 09:41:00,2.55,17850.0,UK\n"
        + "536381,85123A,WHITE HANGING HEART,1,2010-12-01 09:41:00,2.55,,UK\n"
        + "536382,POST,POSTAGE,1,2010-12-01 09:41:00,18.0,12583.0,France\n"
        + "536383,gift_0001_20,VOUCHER,1,2010-12-01 09:41:00,16.0,12583.0,France\n"
        + "536384,BANK CHARGES,Bank Charges,1,2010-12-01 09:41:00,15.0,12583.0,France\n"
        + "536385,22222,FREEBIE,1,2010-12-01 09:41:00,0.0,12583.0,France\n"
        + "536386,22223,TYPO YEAR,1,2099-12-01 09:41:00,1.0,12583.0,France\n",
    )
    loaded = load_online_retail(path)
    assert loaded.rows_read == 13
    assert loaded.dropped == {
        "cancellations and returns (InvoiceNo C…, Quantity ≤ 0)": 2,
        "no CustomerID": 1,
        "exact duplicate rows": 1,
        "non-product codes (postage, fees, adjustments, vouchers)": 3,
        "zero, negative or missing UnitPrice": 1,
        "timestamp more than a day after the time of the fit (latest 2099-12-01 09:41:00 UTC)": 1,
    }
    ds = loaded.dataset
    assert ds.user_ids == ["13047", "17850"]
    assert ds.catalog.item_ids == ["00123", "85123A"]
    # The catalog price is the median paid price; no costs in the data, so all are assumed.
    assert ds.catalog.prices.tolist() == [3.0, 2.55]
    assert ds.catalog.cost_assumed.all()
    assert ds.catalog.categories == ["", ""]
    assert len(ds.interactions.user_index) == 4


def test_movielens_reads_every_rating_with_genre_as_category(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t10\t5\t881250949\n2\t10\t1\t881250950\n1\t020\t3\t881250951\n")
    flags = ["0"] * 19
    flags[8] = "1"  # Drama
    write(tmp_path / "u.item", "10|A Film (1995)|01-Jan-1995||url|" + "|".join(flags) + "\n")
    ds = load_movielens(tmp_path).dataset
    assert len(ds.interactions.user_index) == 3
    assert ds.catalog.item_ids == ["10", "020"]
    assert ds.catalog.categories == ["Drama", ""]


@pytest.mark.parametrize(
    ("ratings", "films", "message"),
    [
        ("", None, "u.data: no ratings"),
        ("1\t10\t5\t881250949\n", "", "u.item: not MovieLens u.item (EmptyDataError)"),
    ],
)
def test_broken_movielens_files_are_data_errors(
    tmp_path: Path, ratings: str, films: str | None, message: str
) -> None:
    write(tmp_path / "u.data", ratings)
    if films is not None:
        write(tmp_path / "u.item", films)
    with pytest.raises(DataError, match=re.escape(message)):
        load_movielens(tmp_path)


@pytest.mark.parametrize(
    ("interactions", "items", "message"),
    [
        ("user_id,item_id\nu1,007\n", ITEMS, "i.csv: missing column(s) timestamp"),
        ("user_id,item_id,timestamp\n", ITEMS, "i.csv: no usable interaction rows"),
        (f"user_id,item_id,timestamp\nu1,404,{T}\n", ITEMS, "i.csv: no usable interaction rows"),
        (
            f"user_id,item_id,timestamp\nu1,007,{T}\n",
            "item_id,title\n007,x\n",
            "missing column(s) price",
        ),
        (
            f"user_id,item_id,timestamp\nu1,007,{T}\n",
            "item_id,price\n007,free\n",
            "no usable item rows",
        ),
        ('user_id,item_id,timestamp\n"u1,007,1\n', ITEMS, "i.csv: unreadable as CSV or Parquet"),
        (
            f"user_id,item_id,timestamp\nu1,007,yesterday\nu1,404,{T}\n",
            ITEMS,
            "i.csv: no usable interaction rows after cleaning (dropped: 1 timestamp neither "
            "ISO 8601 nor Unix seconds; 1 item_id not in the items file)",
        ),
        (
            f"user_id,item_id,timestamp\nu1,007,{T}\n",
            "item_id,price\n007,-1\n",
            "no usable item rows (dropped: 1 items: price missing, not a number or negative)",
        ),
    ],
)
def test_bad_files_are_one_line_errors(
    tmp_path: Path, interactions: str, items: str, message: str
) -> None:
    inter = write(tmp_path / "i.csv", interactions)
    catalog = write(tmp_path / "items.csv", items)
    result = CliRunner().invoke(
        main,
        [
            "fit",
            "--interactions",
            str(inter),
            "--items",
            str(catalog),
            "--out",
            str(tmp_path / "m"),
        ],
    )
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")


def test_missing_file_and_missing_flag(tmp_path: Path) -> None:
    runner = CliRunner()
    missing = runner.invoke(
        main,
        ["fit", "--format", "online-retail", "--interactions", str(tmp_path / "nope.csv"),
         "--out", str(tmp_path / "m")],
    )  # fmt: skip
    assert missing.exit_code == 1
    assert missing.output == f"Error: {tmp_path / 'nope.csv'}: no such file\n"
    usage = runner.invoke(main, ["fit", "--interactions", "x.csv", "--out", str(tmp_path / "u")])
    assert usage.exit_code == 2
    assert "--interactions and --items are both required" in usage.output
    assert not (tmp_path / "u").exists()  # a usage error leaves nothing behind


def test_a_public_dataset_given_as_a_shops_file_names_its_format(tmp_path: Path) -> None:
    """A shop trying discountd on Online Retail or MovieLens first passes the file it has; the
    refusal said which flags or columns were missing, not that --format reads it as published."""
    retail = write(tmp_path / "online_retail.csv", OR_HEADER + OR_GOOD)
    movielens = tmp_path / "ml-100k"
    movielens.mkdir()
    write(movielens / "u.data", "196\t242\t3\t881250949\n")
    out = str(tmp_path / "m")
    runner = CliRunner()
    for given, name, title in (
        (retail, "online-retail", "UCI Online Retail"),
        (movielens, "movielens", "MovieLens 100K"),
    ):
        alone = runner.invoke(main, ["fit", "--interactions", str(given), "--out", out])
        assert alone.exit_code == 2
        assert f"{given} is {title} as published: read it with --format {name} " in alone.output
    items = str(write(tmp_path / "items.csv", ITEMS))
    paired = runner.invoke(
        main, ["fit", "--interactions", str(retail), "--items", items, "--out", out]
    )
    assert paired.exit_code == 1
    assert paired.output.startswith(f"Error: {retail}: missing column(s) user_id, item_id")
    assert paired.output.endswith(
        f"; {retail} is UCI Online Retail as published: read it with --format online-retail "
        f"--interactions {retail}\n"
    )


def test_a_directory_for_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        ["fit", "--interactions", str(tmp_path), "--items", str(write(tmp_path / "i.csv", ITEMS)),
         "--out", str(tmp_path / "m")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output == f"Error: {tmp_path}: is a directory; expected a CSV or Parquet file\n"


def test_data_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"retail\.csv: missing column\(s\) CustomerID"):
        load_online_retail(write(tmp_path / "retail.csv", "InvoiceNo,StockCode,Description,"
                                 "Quantity,InvoiceDate,UnitPrice\n"))  # fmt: skip


def fit_cli(tmp_path: Path, interactions: Path, items: Path, *extra: str) -> Result:
    return CliRunner().invoke(
        main,
        ["fit", "--interactions", str(interactions), "--items", str(items),
         "--out", str(tmp_path / "m"), *extra],
    )  # fmt: skip


def test_basic_iso_dates_are_dates_and_numbers_before_1990_are_no_unix_seconds(
    tmp_path: Path,
) -> None:
    """20260708 as Unix seconds lands in August 1970 without a word; any Unix seconds before 1990
    are more likely days, a year or a row number. MovieLens' 1997 seconds are still seconds."""
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp\n"
        "u1,007,20260708\n"
        "u2,007,881250949\n"
        "u3,007,2024\n"
        "u4,007,-86400\n"
        "u5,007,20261340\n",  # no valid date: as seconds, 1970
    )
    loaded = load_files(inter, write(tmp_path / "items.csv", ITEMS))
    assert loaded.dataset.user_ids == ["u1", "u2"]
    assert sorted(loaded.dataset.interactions.timestamp.tolist()) == [
        881250949,
        int(pd.Timestamp("2026-07-08", tz="UTC").timestamp()),
    ]
    assert loaded.dropped == {
        "timestamp a number before 1990 as Unix seconds (days, a year, a row number?)": 3
    }


def test_parquet_float_ids_are_whole_numbers_or_refused(tmp_path: Path) -> None:
    """pandas stores an integer column with a null as floats: 17 must not become "17.0"."""
    pd.DataFrame(
        {"user_id": [17.0, None, 18.0], "item_id": [7, 7, 7], "timestamp": [T, T, T]}
    ).to_parquet(tmp_path / "i.parquet")
    pd.DataFrame({"item_id": [7.0, 8.0], "price": [3.5, 1.0]}).to_parquet(tmp_path / "it.parquet")
    loaded = load_files(tmp_path / "i.parquet", tmp_path / "it.parquet")
    assert loaded.dataset.user_ids == ["17", "18"]
    assert loaded.dataset.catalog.item_ids == ["7", "8"]
    assert loaded.dropped == {"missing user_id (empty, NULL, None, NaN, NA or N/A)": 1}
    pd.DataFrame({"user_id": ["a"], "item_id": [7.5], "timestamp": [T]}).to_parquet(
        tmp_path / "bad.parquet"
    )
    result = fit_cli(tmp_path, tmp_path / "bad.parquet", tmp_path / "it.parquet")
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {tmp_path / 'bad.parquet'}: column item_id holds ids that are not whole "
        "numbers (e.g. 7.5); write ids as text or integers\n"
    )


def test_paid_prices_that_are_no_prices_are_replaced_and_counted(tmp_path: Path) -> None:
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp,price\n"
        + "".join(f"u{n},007,{T},{price}\n" for n, price in enumerate(
            ["nan", "-5", "inf", "abc", "", " ", "9.5"]
        )),
    )  # fmt: skip
    loaded = load_files(inter, write(tmp_path / "items.csv", ITEMS))
    assert loaded.dropped == {}
    assert loaded.changed == {
        "paid prices that are not numbers ≥ 0, replaced by the catalog price": 4
    }
    assert (
        "  changed        4  paid prices that are not numbers ≥ 0, replaced by the catalog price"
        in loaded.summary_lines()
    )
    price = loaded.dataset.interactions.price
    assert np.isnan(price[:6]).all() and price[6] == 9.5


def test_exact_duplicates_and_fractional_quantities_are_dropped(tmp_path: Path) -> None:
    """A copied line doubles a purchase's weight and its lifetime value; 2.5 units is no count."""
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp,quantity\n"
        f"u1,007,{T},2\n"
        f"u1,007,{T},2\n"
        f"u1,007,{T + 1},2\n"
        f"u2,007,{T},2.5\n",
    )
    loaded = load_files(inter, write(tmp_path / "items.csv", ITEMS))
    assert loaded.dropped == {
        "exact duplicate rows": 1,
        "quantity not a positive whole number": 1,
    }
    assert loaded.dataset.interactions.quantity.tolist() == [2, 2]


def test_online_retail_cancelled_orders_are_no_sale(tmp_path: Path) -> None:
    """The file's own first customer: 74,215 jars bought and cancelled 16 minutes later."""
    path = write(
        tmp_path / "retail.csv",
        OR_HEADER
        + OR_GOOD
        + "541431,23166,MEDIUM CERAMIC TOP STORAGE JAR,74215,2011-01-18 10:01:00,1.04,12346.0,UK\n"
        + "C541433,23166,MEDIUM CERAMIC TOP STORAGE JAR,-74215,2011-01-18 10:17:00,1.04,12346.0,"
        + "UK\n",
    )
    loaded = load_online_retail(path)
    assert loaded.dropped == {
        "cancellations and returns (InvoiceNo C…, Quantity ≤ 0)": 1,
        "purchases a later cancellation reverses in full (same customer, item, quantity)": 1,
    }
    assert loaded.dataset.user_ids == ["17850"]


def test_a_return_takes_back_the_purchase_it_reverses_in_full(tmp_path: Path) -> None:
    """A shop's order lines with returns as negative quantities (Online Retail's shape): a
    purchase returned whole is no sale, in lifetime value or in training. Each return takes
    back one line, the latest of that many units at or before it; a partial return, or one
    with no such purchase before it, takes back nothing."""
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp,quantity,price\n"
        f"u1,007,{T},5,10\n"
        f"u1,007,{T + 60},5,9\n"
        f"u1,007,{T + 120},-5,9\n"  # takes back the line at T + 60, not the one at T
        f"u2,007,{T},3,10\n"
        f"u2,007,{T},-3,10\n"  # cancelled within the same second
        f"u3,007,{T},4,10\n"
        f"u3,007,{T + 60},-1,10\n"  # partial: which unit went back is unknown
        f"u4,007,{T + 60},2,10\n"
        f"u4,007,{T},-2,10\n",  # before the purchase: a return of an older order
    )
    loaded = load_files(inter, write(tmp_path / "items.csv", ITEMS))
    assert loaded.dropped == {
        "quantity not a positive whole number": 4,
        "purchases a later return reverses in full (same user, item, quantity)": 2,
    }
    dataset = loaded.dataset
    users = [dataset.user_ids[u] for u in dataset.interactions.user_index]
    assert list(zip(users, dataset.interactions.quantity.tolist(), strict=True)) == [
        ("u1", 5),
        ("u3", 4),
        ("u4", 2),
    ]
    assert dataset.interactions.price.tolist() == [10, 10, 10]


def test_interactions_of_items_dropped_for_their_price_say_so(tmp_path: Path) -> None:
    items = write(tmp_path / "items.csv", "item_id,price\nfree,-1\na,10\n")
    inter = write(
        tmp_path / "i.csv", f"user_id,item_id,timestamp\nu1,a,{T}\nu1,free,{T}\nu1,b,{T}\n"
    )
    loaded = load_files(inter, items)
    assert loaded.dropped == {
        "items: price missing, not a number or negative": 1,
        "item dropped from the items file (bad price)": 1,
        "item_id not in the items file": 1,
    }


@pytest.mark.parametrize("null", ["NULL", "None", "nan", "NaN", "null", "NA", " n/a ", "N/A"])
def test_null_markers_are_missing_ids_not_one_big_shopper(tmp_path: Path, null: str) -> None:
    inter = write(
        tmp_path / "i.csv",
        f"user_id,item_id,timestamp\n{null},007,{T}\n{null},7,{T}\nu1,{null},{T}\nu1,7,{T}\n",
    )
    items = write(tmp_path / "items.csv", f"{ITEMS}{null},Null,,1.0,\n")
    loaded = load_files(inter, items)
    assert loaded.dataset.user_ids == ["u1"]
    assert loaded.dropped == {
        "items: missing item_id (empty, NULL, None, NaN, NA or N/A)": 1,
        "missing user_id (empty, NULL, None, NaN, NA or N/A)": 2,
        "missing item_id (empty, NULL, None, NaN, NA or N/A)": 1,
    }


def test_online_retail_with_no_usable_row_says_what_was_dropped(tmp_path: Path) -> None:
    """US-format dates fail every row: the error says so rather than only "nothing left"."""
    path = write(
        tmp_path / "retail.csv",
        OR_HEADER + "536365,85123A,WHITE HANGING HEART,6,12/1/2010 8:26,2.55,17850.0,UK\n",
    )
    result = CliRunner().invoke(
        main,
        ["fit", "--format", "online-retail", "--interactions", str(path),
         "--out", str(tmp_path / "m")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {path}: no usable purchase rows after cleaning (dropped: 1 unparseable "
        "InvoiceDate)\n"
    )


def test_rows_dated_after_the_fit_are_dropped_naming_the_latest(tmp_path: Path) -> None:
    """One 2099 row would stretch the hold-out and date every user's features from 2099."""
    skewed = int(time.time()) + 3600  # a shop clock an hour fast: kept
    inter = write(
        tmp_path / "i.csv",
        "user_id,item_id,timestamp\n"
        + "".join(f"u{u},{item},{T + d * 86_400}\n" for u in range(30) for d, item in
                  enumerate(("007", "7", "007", "7")))
        + f"u0,7,{skewed}\nu1,007,2099-01-01\nu2,7,2099-06-01T12:00:00Z\n",
    )  # fmt: skip
    items = write(tmp_path / "items.csv", ITEMS)
    reason = "timestamp more than a day after the time of the fit (latest 2099-06-01 12:00:00 UTC)"
    assert load_files(inter, items).dropped == {reason: 2}
    result = fit_cli(tmp_path, inter, items, "--factors", "2", "--epochs", "1")
    assert result.exit_code == 0, result.output
    assert f"  dropped        2  {reason}\n" in result.output
    version = json.loads(result.stdout.strip().splitlines()[-1])["version_dir"]
    data = json.loads((Path(version) / "manifest.json").read_text())["data"]
    assert data["reference_time"] == pd.Timestamp(skewed, unit="s", tz="UTC").isoformat()


def test_future_ratings_are_dropped_from_movielens_too(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t10\t5\t881250949\n2\t10\t1\t4102444800\n")
    loaded = load_movielens(tmp_path)
    assert loaded.dataset.user_ids == ["1"]
    assert loaded.dropped == {
        "timestamp more than a day after the time of the fit (latest 2100-01-01 00:00:00 UTC)": 1
    }
    # Past any calendar a datetime holds: still one counted drop, not a traceback.
    write(tmp_path / "u.data", "1\t10\t5\t881250949\n2\t10\t1\t99999999999999\n")
    assert load_movielens(tmp_path).dropped == {
        "timestamp more than a day after the time of the fit (latest 99999999999999 Unix seconds, "
        "past 2262)": 1
    }
    write(tmp_path / "u.data", "1\t10\t5\t881250949\n2\t10\t1\t99999999999999999999\n")
    with pytest.raises(DataError, match=r"not MovieLens u\.data \(OverflowError\)"):
        load_movielens(tmp_path)


def test_movielens_without_u_item_says_items_have_no_category_or_title(tmp_path: Path) -> None:
    write(tmp_path / "u.data", "1\t10\t5\t881250949\n2\t20\t1\t881250950\n")
    loaded = load_movielens(tmp_path)
    assert loaded.dataset.catalog.categories == ["", ""]
    assert "  note: u.item not found beside u.data: items have no category or title" in (
        loaded.summary_lines()
    )


def test_an_items_directory_is_a_one_line_error_like_interactions(tmp_path: Path) -> None:
    folder = tmp_path / "items"
    folder.mkdir()
    result = fit_cli(tmp_path, write(tmp_path / "i.csv", f"user_id,item_id,timestamp\nu,7,{T}\n"),
                     folder)  # fmt: skip
    assert result.exit_code == 1
    assert result.output == f"Error: {folder}: is a directory; expected a CSV or Parquet file\n"


def test_a_pipe_is_named_as_one_not_as_a_missing_file(tmp_path: Path) -> None:
    """`--items <(head -2 items.csv)`: the shell passes a pipe, which fit could read only once
    though it reads its inputs twice (to train, then to fingerprint them)."""
    pipe = tmp_path / "items.csv"
    os.mkfifo(pipe)
    with pytest.raises(DataError, match=r"items\.csv: not a regular file \(a pipe\?\)"):
        read_table(pipe, ("item_id", "price"), ids=("item_id",))


def test_a_required_column_named_twice_is_refused(tmp_path: Path) -> None:
    inter = write(tmp_path / "i.csv", f"user_id,item_id,user_id,timestamp\nu1,007,u2,{T}\n")
    items = write(tmp_path / "items.csv", ITEMS)
    with pytest.raises(DataError, match=r"i\.csv: column\(s\) user_id appear more than once"):
        load_files(inter, items)


@pytest.mark.parametrize(
    ("interactions", "items", "column"),
    [
        (f"user_id,item_id,timestamp,price,price\nu1,007,{T},9.5,1\n", ITEMS, "price"),
        (f"user_id,item_id,timestamp\nu1,007,{T}\n", "item_id,price,cost, cost\n007,10,6,1\n",
         "cost"),
        (f"user_id,item_id,timestamp,quantity,event,quantity\nu1,007,{T},1,view,5\n", ITEMS,
         "quantity"),
    ],
)  # fmt: skip
def test_any_column_named_twice_is_refused_by_fit_naming_file_and_column(
    tmp_path: Path, interactions: str, items: str, column: str
) -> None:
    """pandas reads a repeated name as another column (price.1) and fit read the first: a
    file's owner says which one holds the data, not fit."""
    inter = write(tmp_path / "i.csv", interactions)
    catalog = write(tmp_path / "items.csv", items)
    result = CliRunner().invoke(
        main,
        ["fit", "--interactions", str(inter), "--items", str(catalog), "--out",
         str(tmp_path / "m")],
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    named = catalog if column == "cost" else inter
    assert result.output == (
        f"Error: {named}: column(s) {column} appear more than once in the header; keep one "
        "column of each name\n"
    )


def test_a_parquet_column_named_twice_is_refused_like_a_csv_one(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ["user_id", "item_id", "timestamp", "price", "price"]
    values = [["u1"], ["007"], [str(T)], ["9.5"], ["1"]]
    pq.write_table(pa.table([pa.array(v) for v in values], names=names), tmp_path / "i.parquet")
    with pytest.raises(DataError) as raised:
        load_files(tmp_path / "i.parquet", write(tmp_path / "items.csv", ITEMS))
    assert str(raised.value) == (
        f"{tmp_path / 'i.parquet'}: column(s) price appear more than once in the header; keep "
        "one column of each name"
    )


def test_a_comma_at_the_end_of_each_row_shifts_no_column(tmp_path: Path) -> None:
    """A row with a field more than the header made pandas take its first field as a row label:
    every value sat one column left of its name (user_id held the item, timestamp the empty
    last field), and fit dropped every row for its timestamp."""
    inter = write(
        tmp_path / "i.csv",
        f"user_id,item_id,timestamp,quantity\n0042,007,{T},2,\n42,7,{T},1,\n",
    )
    items = write(tmp_path / "items.csv", "item_id,price,\n007,10.0,\n7,4.0,\n")
    loaded = load_files(inter, items)
    assert loaded.dataset.user_ids == ["0042", "42"]
    assert loaded.dataset.catalog.item_ids == ["007", "7"]
    assert loaded.dataset.catalog.prices.tolist() == [10.0, 4.0]
    assert loaded.dataset.interactions.quantity.tolist() == [2, 1]
    assert loaded.dropped == {}


def test_values_the_header_does_not_name_are_refused(tmp_path: Path) -> None:
    inter = write(tmp_path / "i.csv", f"user_id,item_id,timestamp\nu1,007,{T},purchase\n")
    result = fit_cli(tmp_path, inter, write(tmp_path / "items.csv", ITEMS))
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {inter}: rows hold 1 more field(s) than the header names "
        "(user_id, item_id, timestamp); give every column a name in the header\n"
    )


@pytest.mark.parametrize("name", ["i.csv.zip", "i.csv.xz", "i.csv.tar", "i.tar.gz", "i.csv.zst"])
def test_a_file_not_compressed_as_its_name_says_is_one_line(tmp_path: Path, name: str) -> None:
    """pandas decompresses by the name: zip, xz and tar raised their own errors (a traceback),
    and .zst without the zstandard package an ImportError."""
    if name.endswith(".zst") and importlib.util.find_spec("zstandard"):
        pytest.skip("zstandard is installed: a .zst name is read as zstd")
    inter = write(tmp_path / name, f"user_id,item_id,timestamp\nu1,007,{T}\n")
    result = fit_cli(tmp_path, inter, write(tmp_path / "items.csv", ITEMS))
    assert result.exit_code == 1, result.output
    unreadable = f"Error: {inter}: unreadable as CSV or Parquet ("
    assert result.output.startswith(unreadable), result.output
    assert result.output.count("\n") == 1, result.output


def test_unix_milliseconds_are_named_as_such(tmp_path: Path) -> None:
    """A file in Unix milliseconds was refused as "neither ISO 8601 nor Unix seconds", of what
    looked like good Unix timestamps; now as numbers past 2262 in seconds, milliseconds?"""
    pd.DataFrame(
        {"user_id": ["u1", "u2", "u3"], "item_id": ["007"] * 3, "timestamp": [T * 1000, 20, T]}
    ).to_parquet(tmp_path / "i.parquet")
    items = write(tmp_path / "items.csv", ITEMS)
    loaded = load_files(tmp_path / "i.parquet", items)
    assert loaded.dataset.user_ids == ["u3"]
    assert loaded.dropped == {
        "timestamp a number before 1990 as Unix seconds (days, a year, a row number?)": 1,
        "timestamp a number past 2262 as Unix seconds (milliseconds?)": 1,
    }
    only_ms = write(tmp_path / "ms.csv", f"user_id,item_id,timestamp\nu1,007,{T * 1000}\n")
    result = fit_cli(tmp_path, only_ms, items)
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {only_ms}: no usable interaction rows after cleaning (dropped: 1 timestamp a "
        "number past 2262 as Unix seconds (milliseconds?))\n"
    )


@pytest.mark.parametrize("name", ["i.pq", "i.PARQUET", "interactions"])
def test_a_parquet_file_is_read_whatever_its_name(tmp_path: Path, name: str) -> None:
    """Only a .parquet name was read as Parquet: any other was read as CSV and refused with
    "'utf-8' codec can't decode byte 0x93", of a file its owner knew to be Parquet."""
    pd.DataFrame({"user_id": ["001"], "item_id": ["007"], "timestamp": [T]}).to_parquet(
        tmp_path / name
    )
    pd.DataFrame({"item_id": ["007"], "price": [3.5]}).to_parquet(tmp_path / "items.pq")
    loaded = load_files(tmp_path / name, tmp_path / "items.pq")
    assert loaded.dataset.user_ids == ["001"]
    assert loaded.dataset.catalog.item_ids == ["007"]


def test_a_csv_not_in_utf8_says_to_save_it_so(tmp_path: Path) -> None:
    """Excel's "CSV" is Windows-1252: the error named a byte and a codec, not the fix."""
    inter = tmp_path / "i.csv"
    inter.write_bytes(f"user_id,item_id,timestamp\ncafé,007,{T}\n".encode("cp1252"))
    result = fit_cli(tmp_path, inter, write(tmp_path / "items.csv", ITEMS))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {inter}: not UTF-8 text ('utf-8' codec can't decode")
    assert result.output.endswith("; save the CSV as UTF-8 (Excel: CSV UTF-8) or write Parquet\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"user_id;item_id;timestamp\nu1;007;{T}\n",
            "missing column(s) user_id, item_id, timestamp; found user_id;item_id;timestamp "
            "(a header separated by semicolons: fields must be separated by commas)",
        ),
        (
            f"user_id\titem_id\ttimestamp\nu1\t007\t{T}\n",
            "missing column(s) user_id, item_id, timestamp; found user_id\titem_id\ttimestamp "
            "(a header separated by tabs: fields must be separated by commas)",
        ),
        (  # the decimal comma makes each row two fields under a header of one
            f"user_id;item_id;timestamp;price\nu1;007;{T};1,5\n",
            "a header separated by semicolons (user_id;item_id;timestamp;price): fields must be "
            "separated by commas",
        ),
    ],
    ids=["semicolons", "tabs", "decimal comma"],
)
def test_a_file_separated_otherwise_is_named_so(tmp_path: Path, text: str, message: str) -> None:
    """A tab-separated header showed as names with spaces between them, missing."""
    inter = write(tmp_path / "i.csv", text)
    result = fit_cli(tmp_path, inter, write(tmp_path / "items.csv", ITEMS))
    assert result.exit_code == 1
    assert result.output == f"Error: {inter}: {message}\n"


def test_a_log_read_with_its_numbers_keeps_its_ids_as_written(tmp_path: Path) -> None:
    """read_table(as_text=False), as response and estimate-policy read their logs: numbers are
    numbers, an empty cell is missing, and an id is the text written, even under a header with
    spaces around its name."""
    path = write(tmp_path / "offers.csv", " offer_id , user_id,discount\n007,0042,0.1\n008,,0.2\n")
    frame = read_table(path, ("offer_id",), ("offer_id", "user_id"), as_text=False)
    assert list(frame["offer_id"]) == ["007", "008"]
    assert frame["user_id"][0] == "0042" and pd.isna(frame["user_id"][1])
    assert list(frame["discount"]) == [0.1, 0.2]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("with_items", [True, False])
def test_a_named_pipe_as_interactions_is_refused_not_waited_on(
    tmp_path: Path, with_items: bool
) -> None:
    """A named pipe nobody writes to: the refusal's look for a public dataset as published
    opened it to read its header, and fit waited for ever instead of saying it is a pipe."""
    pipe = tmp_path / "interactions.csv"
    os.mkfifo(pipe)
    items = write(tmp_path / "items.csv", ITEMS)
    given = ["--items", str(items)] if with_items else []
    result = CliRunner().invoke(
        main, ["fit", "--interactions", str(pipe), *given, "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == (1 if with_items else 2), result.output
    expected = "not a regular file (a pipe?)" if with_items else "are both required"
    assert expected in result.output and "as published" not in result.output
