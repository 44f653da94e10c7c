"""`discount-train fit` end to end: data in, a sealed model version out, honest metrics."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from core.artifact import CURRENT, current_version_dir, load_manifest
from core.features import FEATURE_NAMES
from trainer.cli import main
from trainer.config import SynthConfig
from trainer.synth import make_shop, write_shop

FAST = ["--factors", "8", "--epochs", "6", "--alpha", "1", "--confidence-offset", "1"]


def fit(shop_dir: Path, out: Path, *extra: str) -> tuple[dict[str, object], str]:
    result = CliRunner().invoke(
        main,
        [
            "fit",
            "--interactions", str(shop_dir / "interactions.csv"),
            "--items", str(shop_dir / "items.csv"),
            "--out", str(out),
            *FAST,
            *(extra or ("--regularization", "10")),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    stdout_line = result.stdout.strip().splitlines()[-1]
    return json.loads(stdout_line), result.stderr


@pytest.fixture(scope="module")
def tasteful(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shop")
    write_shop(make_shop(SynthConfig(users=300, items=40, seed=2, taste_concentration=0.1)), folder)
    return folder


@dataclass(frozen=True)
class Fitted:
    store: Path
    answer: dict[str, object]
    log: str


@pytest.fixture(scope="module")
def good(tasteful: Path, tmp_path_factory: pytest.TempPathFactory) -> Fitted:
    """tasteful fitted into a new store, the version that serves when a worse one comes: each
    fit is seconds (most of it the ONNX export), so it is made once. Read-only: serving_copy()
    gives a test a store of its own."""
    store = tmp_path_factory.mktemp("good") / "models"
    return Fitted(store, *fit(tasteful, store))


def serving_copy(good: Fitted, store: Path) -> str:
    """good's store copied to store, as if fitted there; the name of the version it serves."""
    shutil.copytree(good.store, store)
    return Path(str(good.answer["version_dir"])).name


def test_fit_writes_a_verified_version_with_metrics_and_config(
    tasteful: Path, good: Fitted
) -> None:
    answer, log = good.answer, good.log
    version = Path(str(answer["version_dir"]))
    assert current_version_dir(good.store) == version
    manifest = load_manifest(version)  # verifies every file's sha256
    assert manifest.n_users == 300 and manifest.n_items == 40
    for name in ("val_ndcg@10", "val_popularity_ndcg@10", "test_ndcg@10", "test_recall@10"):
        assert 0.0 <= manifest.metrics[name] <= 1.0
    assert manifest.metrics["loses_to_popularity"] == 0.0
    assert manifest.metrics["loses_to_popularity_on_test"] == 0.0
    assert manifest.training["factors"] == 8
    assert manifest.training["regularization"] == 10.0
    assert manifest.training["epochs"] == manifest.metrics["epochs"]
    assert "refit on all interactions" in manifest.training["shipped_model"]
    assert manifest.data["cleaning"]["rows_read"] == manifest.data["cleaning"]["rows_kept"]
    assert list(manifest.data["fingerprint_sha256"]) == [
        str(tasteful / "interactions.csv"),
        str(tasteful / "items.csv"),
    ]
    features = json.loads((version / "user_features.json").read_text())
    assert features["columns"] == list(FEATURE_NAMES)
    assert "epoch   1  loss" in log and "val NDCG@10" in log
    assert "kept" in log and "WARNING" not in log


def test_same_seed_same_model(tasteful: Path, good: Fitted, tmp_path: Path) -> None:
    first = good.answer
    second, _ = fit(tasteful, tmp_path / "b")
    assert first["metrics"] == second["metrics"]
    model = "model.onnx"
    a = load_manifest(Path(str(first["version_dir"]))).files[model]
    b = load_manifest(Path(str(second["version_dir"]))).files[model]
    assert a == b


def test_losing_to_popularity_is_loud(tasteful: Path, tmp_path: Path) -> None:
    # λ = 10⁶ shrinks every factor to ~0: an arbitrary ranking that any bestseller list beats.
    answer, log = fit(tasteful, tmp_path / "models", "--regularization", "1000000")
    metrics = answer["metrics"]
    assert isinstance(metrics, dict)
    assert metrics["loses_to_popularity"] == 1.0
    assert "WARNING: the model LOSES to popularity on its validation split" in log
    manifest = load_manifest(Path(str(answer["version_dir"])))
    assert manifest.metrics["loses_to_popularity"] == 1.0
    # The first version of a store is made current all the same: a server needs one.
    assert answer["current"] is True
    assert (tmp_path / "models" / CURRENT).read_text().strip() == manifest.version


def test_a_version_that_loses_to_popularity_does_not_replace_the_serving_one(
    tasteful: Path, good: Fitted, tmp_path: Path
) -> None:
    serving = serving_copy(good, tmp_path / "models")
    worse, log = fit(tasteful, tmp_path / "models", "--regularization", "1000000")
    assert worse["current"] is False
    assert f"NOT made CURRENT: it loses to popularity, so {serving} keeps serving" in log
    assert (tmp_path / "models" / CURRENT).read_text().strip() == serving
    assert Path(str(worse["version_dir"])).is_dir()  # written and sealed, to promote by hand


def _bestsellers_held_out(shop: Path, out: Path) -> Path:
    """shop, with every purchase of its last tenth (fit's hold-out) replaced by the best-selling
    item its buyer had not bought yet: a period where tastes stopped mattering, which the
    validation period before it does not foretell."""
    out.mkdir()
    frame = pd.read_csv(shop / "interactions.csv", dtype=str)
    order = np.argsort(pd.to_datetime(frame["timestamp"]).to_numpy(), kind="stable")
    held = order[-(len(frame) // 10) :]
    before = frame.drop(frame.index[held])
    ranked = list(before.groupby("item_id")["user_id"].nunique().sort_values(ascending=False).index)
    owned = before.groupby("user_id")["item_id"].agg(set).to_dict()
    for row in held:
        have = owned.setdefault(frame.at[row, "user_id"], set())
        frame.at[row, "item_id"] = next(i for i in ranked if i not in have)
        have.add(frame.at[row, "item_id"])
    frame.to_csv(out / "interactions.csv", index=False)
    (out / "items.csv").write_text((shop / "items.csv").read_text())
    return out


def test_a_version_that_loses_on_the_hold_out_does_not_replace_the_serving_one(
    tasteful: Path, good: Fitted, tmp_path: Path
) -> None:
    """Validation's figure is the best of every candidate and epoch; the hold-out chose nothing,
    and says the model loses here: that decides, as a loss on validation does."""
    serving = serving_copy(good, tmp_path / "models")
    shop = _bestsellers_held_out(tasteful, tmp_path / "shop")
    worse, log = fit(shop, tmp_path / "models")
    metrics = worse["metrics"]
    assert isinstance(metrics, dict)
    assert (metrics["loses_to_popularity"], metrics["loses_to_popularity_on_test"]) == (0.0, 1.0)
    assert "WARNING: on the hold-out the model LOSES to popularity" in log
    assert worse["current"] is False
    assert f"NOT made CURRENT: it loses to popularity, so {serving} keeps serving" in log


def test_no_current_leaves_the_release_to_the_registry(tasteful: Path, tmp_path: Path) -> None:
    staged, log = fit(tasteful, tmp_path / "models", "--no-current")
    version = Path(str(staged["version_dir"]))
    assert staged["current"] is False and load_manifest(version).version == version.name
    assert not (tmp_path / "models" / CURRENT).exists()  # not even a store's first version
    assert (
        f"CURRENT left alone (--no-current); to serve it: `discountctl models register {version}`"
    ) in log


def _one_purchase_per_shopper(shop: Path) -> Path:
    """Nobody has history before the validation period: fit trains blind."""
    shop.mkdir()
    (shop / "interactions.csv").write_text(
        "user_id,item_id,timestamp\n"
        + "".join(f"u{u},i{u % 10},{1_700_000_000 + u * 86_400}\n" for u in range(40))
    )
    (shop / "items.csv").write_text("item_id,price\n" + "".join(f"i{i},5\n" for i in range(10)))
    return shop


def test_without_validation_users_no_win_over_popularity_is_claimed(tmp_path: Path) -> None:
    answer, log = fit(_one_purchase_per_shopper(tmp_path / "shop"), tmp_path / "models")
    assert "WARNING: no validation users" in log
    metrics = load_manifest(Path(str(answer["version_dir"]))).metrics
    assert "loses_to_popularity" not in metrics and "val_ndcg@10" not in metrics


def test_a_version_never_compared_with_popularity_does_not_replace_the_serving_one(
    good: Fitted, tmp_path: Path
) -> None:
    blind = _one_purchase_per_shopper(tmp_path / "blind")
    first, _ = fit(blind, tmp_path / "first")
    assert first["current"] is True  # the first version of a store: a server needs one
    serving = serving_copy(good, tmp_path / "models")
    unmeasured, log = fit(blind, tmp_path / "models")
    assert "WARNING: no validation users" in log
    assert unmeasured["current"] is False
    name = Path(str(unmeasured["version_dir"])).name
    assert (
        "NOT made CURRENT: it was never compared with popularity (no validation users: trained "
        f"blind), so {serving} keeps serving; to serve it anyway, write {name} into "
        f"{tmp_path / 'models' / CURRENT}"
    ) in log
    assert (tmp_path / "models" / CURRENT).read_text().strip() == serving


def test_views_are_not_bestsellers_in_the_cold_start_list(tmp_path: Path) -> None:
    """Everyone views item v, a few buy item b: popularity.json puts b first."""
    shop = tmp_path / "shop"
    shop.mkdir()
    day = 86_400
    rows = [f"u{u},v,{1_700_000_000 + u * day},view\n" for u in range(40)]
    rows += [f"u{u},b,{1_700_000_000 + u * day + 1},purchase\n" for u in range(0, 40, 4)]
    rows += [f"u{u},i{u % 5},{1_700_000_000 + u * day + 2},purchase\n" for u in range(40)]
    (shop / "interactions.csv").write_text("user_id,item_id,timestamp,event\n" + "".join(rows))
    items = ["v", "b", *(f"i{i}" for i in range(5))]
    (shop / "items.csv").write_text("item_id,price\n" + "".join(f"{i},5\n" for i in items))
    answer, _ = fit(shop, tmp_path / "models")
    order = json.loads((Path(str(answer["version_dir"])) / "popularity.json").read_text())
    assert [items[i] for i in order] == ["b", "i0", "i1", "i2", "i3", "i4", "v"]
