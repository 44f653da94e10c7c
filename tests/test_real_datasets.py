"""The real public datasets beside the checkout (../shared/datasets, each folder's SOURCE.md),
whole where they are small and in slices where not: what the readers make of the real files,
and a model trained on a slice of Online Retail, served by a real discountd that prices it.
Skipped, saying why, where the datasets are not there (README, "The public datasets")."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner, Result
from offer_server import OfferServer, ctl, ten_percent_off_everything

from discount.v1 import discount_pb2 as pb
from trainer.cli import main as train
from trainer.data import MOVIELENS, ONLINE_RETAIL, load_movielens, load_online_retail
from trainer.uplift import HILLSTROM, load_hillstrom

# Online Retail's first rows: 1-9 December 2010, every kind of row its reader drops.
SLICE_ROWS = 20_000


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path}: the public datasets are not beside this checkout")
    return path


@pytest.fixture(scope="module")
def retail_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Online Retail's header and first SLICE_ROWS rows, bytes as published."""
    path = tmp_path_factory.mktemp("retail") / "online_retail_slice.csv.gz"
    with gzip.open(need(ONLINE_RETAIL), "rb") as source, gzip.open(path, "wb") as out:
        for _ in range(SLICE_ROWS + 1):
            out.write(next(source))
    return path


def fit_slice(retail_slice: Path, models: Path, epochs: int) -> Result:
    """discount-train fit of the slice into models, as a shop would run it; it must succeed."""
    fitted = CliRunner().invoke(
        train,
        ["fit", "--format", "online-retail", "--interactions", str(retail_slice),
         "--out", str(models), "--epochs", str(epochs), "--factors", "8"],
    )  # fmt: skip
    assert fitted.exit_code == 0, fitted.output
    return fitted


def test_movielens_100k_reads_whole_as_its_readme_counts_it() -> None:
    loaded = load_movielens(need(MOVIELENS))
    dataset = loaded.dataset
    assert (loaded.rows_read, loaded.dropped) == (100_000, {})
    assert (len(dataset.user_ids), len(dataset.catalog.item_ids)) == (943, 1682)
    assert len(dataset.interactions.user_index) == 100_000


def test_hillstrom_reads_whole_with_the_published_shares() -> None:
    """SOURCE.md: 64,000 customers, two thirds e-mailed, mean visit 0.14678, conversion
    0.00903."""
    experiment = load_hillstrom(need(HILLSTROM))
    assert (len(experiment.treatment), int(experiment.treatment.sum())) == (64_000, 42_694)
    assert {k: int(v.sum()) for k, v in experiment.outcomes.items()} == {
        "visit": 9394,
        "conversion": 578,
    }


def test_online_retail_slice_drops_what_is_no_sale_and_keeps_ids_as_written(
    retail_slice: Path,
) -> None:
    loaded = load_online_retail(retail_slice)
    assert loaded.rows_read == SLICE_ROWS
    assert loaded.dropped == {
        "cancellations and returns (InvoiceNo C…, Quantity ≤ 0)": 309,
        "no CustomerID": 6574,
        "exact duplicate rows": 314,
        "purchases a later cancellation reverses in full (same customer, item, quantity)": 23,
        "non-product codes (postage, fees, adjustments, vouchers)": 54,
        "zero, negative or missing UnitPrice": 1,
    }
    dataset = loaded.dataset
    assert (len(dataset.user_ids), len(dataset.catalog.item_ids)) == (526, 1946)
    # Stock codes with letters, customer ids without the file's ".0".
    assert {"85123A", "10123C"} <= set(dataset.catalog.item_ids)
    assert "17850" in dataset.user_ids
    assert dataset.catalog.cost_assumed.all()  # the data has no costs


def test_a_purchase_cancelled_in_full_is_no_sale_in_features_or_training(
    retail_slice: Path, tmp_path: Path
) -> None:
    """Customer 14409 ordered 72 of 22834 at 2.10 on 6 December 2010 at 15:03, 96 at 1.85 at
    15:06, and cancelled the first order at 15:07 (C537413, -72). Counted, the cancelled line
    was lifetime value (for 12346, who cancelled 74,215 jars, £77,184 of it) and a purchase
    to learn from; the 96 he kept stay."""
    fitted = fit_slice(retail_slice, tmp_path / "models", epochs=2)
    assert "purchases a later cancellation reverses in full" in fitted.output
    rows = pd.read_csv(retail_slice, dtype={"StockCode": str, "CustomerID": str})
    his = rows[(rows["CustomerID"] == "14409.0") & ~rows["InvoiceNo"].str.startswith("C")]
    cancelled = (his["StockCode"] == "22834") & (his["Quantity"] == 72)
    assert cancelled.sum() == 1
    kept = his[~cancelled].drop_duplicates()
    version = json.loads(fitted.stdout.splitlines()[-1])["version_dir"]
    features = json.loads((Path(version) / "user_features.json").read_text())
    users = json.loads((Path(version) / "users.json").read_text())
    row = features["rows"][users.index("14409")]
    ltv = row[features["columns"].index("lifetime_value")]
    assert ltv == pytest.approx((kept["Quantity"] * kept["UnitPrice"]).sum())


def test_a_model_of_the_slice_serves_and_prices_its_customers(
    retail_slice: Path, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    fit_slice(retail_slice, models, epochs=3)
    slice_rows = pd.read_csv(retail_slice, dtype={"StockCode": str}, encoding="latin-1")
    his = slice_rows[(slice_rows["CustomerID"] == 17850) & (slice_rows["Quantity"] > 0)]
    bought = set(his["StockCode"])
    url = ten_percent_off_everything(f"sqlite:///{tmp_path / 'store.db'}")
    # An assumed cost of 70% of the price and a 30% margin: the floor, 91%, is above 10% off.
    ctl(url, "rules", "update", "all", "--min-margin", "30")
    running = OfferServer(models, url)
    try:
        answer = running.stub.Recommend(pb.RecommendRequest(user_id="17850", limit=10))
        ranked = [item.item_id for item in answer.items]
        assert len(ranked) == 10 and answer.cold_start == pb.COLD_START_UNSPECIFIED
        assert len(bought) == 21 and not bought & set(ranked)  # bought: not recommended
        offers = running.stub.GetOffers(
            pb.GetOffersRequest(user_id="17850", item_ids=["85123A", "22423"])
        ).offers
        assert [o.item_id for o in offers] == ["85123A", "22423"]
        for offer in offers:
            # No costs in the data: the fit assumed a 30% margin, and the offer says so.
            reasons = set(offer.reason_codes)
            assert {"COST_ASSUMED", "GUARDRAIL_MARGIN_FLOOR"} <= reasons and offer.offer_token
            base, final = offer.base_price_cents, offer.final_price_cents
            assert base * 0.91 <= final < base
    finally:
        running.close()


def test_discount_datasets_names_where_the_datasets_are(tmp_path: Path) -> None:
    """A checkout not beside ../shared/datasets (a CI clone, a laptop) points at them."""
    probe = (
        "from trainer.data import ONLINE_RETAIL, MOVIELENS; from trainer.uplift import HILLSTROM;"
        " print(ONLINE_RETAIL, MOVIELENS, HILLSTROM)"
    )
    env = {**os.environ, "DISCOUNT_DATASETS": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.split() == [
        str(tmp_path / "online-retail/online_retail.csv.gz"),
        str(tmp_path / "ml-100k"),
        str(tmp_path / "hillstrom/hillstrom.csv"),
    ]
