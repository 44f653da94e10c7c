"""discount-train estimate-policy: a shop's randomized log says what rules would earn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner, Result

from trainer.cli import main

TIERED = {"name": "tiered", "policy": "tiered_topk", "params": {"k1": 2, "d1": 15, "d2": 5},
          "max_discount_pct": 30, "min_margin_pct": 5}  # fmt: skip
BLANKET = {"name": "blanket", "policy": "tiered_topk", "params": {"k1": 1, "d1": 10, "d2": 10},
           "max_discount_pct": 30, "min_margin_pct": 0}  # fmt: skip
OPTIMAL = {"name": "best", "policy": "optimal", "params": {"grid": [10, 20, 30]},
           "max_discount_pct": 30, "min_margin_pct": 5}  # fmt: skip
LEARN = {"name": "learn", "policy": "randomized", "params": {"grid": [5, 10]}}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A simulated randomized log and a response model trained on it."""
    folder = tmp_path_factory.mktemp("shop")
    runner = CliRunner()
    made = runner.invoke(main, ["simulate", "--out", str(folder), "--users", "400", "--seed", "4"])
    assert made.exit_code == 0, made.output
    trained = runner.invoke(
        main,
        ["response", "--offers", str(folder / "offers.csv"), "--events",
         str(folder / "events.csv"), "--out", str(folder / "model"), "--hidden", "8"],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    return folder


def _estimate(shop: Path, rules: object, *more: str, offers: str = "offers.csv") -> Result:
    path = shop / f"rules-{abs(hash(json.dumps(rules)))}.json"
    path.write_text(json.dumps(rules))
    return CliRunner().invoke(
        main,
        ["estimate-policy", "--offers", str(shop / offers), "--events", str(shop / "events.csv"),
         "--rules", str(path), *more],
    )  # fmt: skip


def test_ips_is_the_propensity_weighted_margin_of_the_offers_a_rule_agrees_with(
    shop: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.json"
    result = _estimate(shop, [TIERED, BLANKET, OPTIMAL, LEARN], "--response-model",
                       str(shop / "model"), "--json", str(report))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "left out learn: a randomized rule is the experiment itself" in result.stderr
    estimates = json.loads(report.read_text())["policies"]
    assert list(estimates) == ["no_discount", "tiered", "blanket", "best"]

    offers = pd.read_csv(shop / "offers.csv", dtype={"offer_id": str})
    events = pd.read_csv(shop / "events.csv", dtype={"offer_id": str})
    sold = set(events.loc[events["type"].isin(["purchase", "redemption"]), "offer_id"])
    bought = offers["offer_id"].isin(sold)
    margin = np.where(bought, offers["price"] * (1 - offers["discount"]) - offers["cost"], 0)
    weight = 1 / offers["propensity"]
    for name, discount in (("no_discount", 0.0), ("blanket", 0.1)):
        agree = np.isclose(offers["discount"], discount)
        by_hand = float((agree * weight * margin).mean())
        assert estimates[name]["ips"]["mean"] == pytest.approx(by_hand)
        assert estimates[name]["supported"] == pytest.approx(agree.mean())
        assert estimates[name]["mean_discount"] == pytest.approx(discount)
    lift = estimates["no_discount"]["dr_lift"]
    assert lift["mean"] == lift["low"] == lift["high"] == 0
    # In this simulator a blanket discount loses money and the learned policy earns more.
    assert estimates["blanket"]["dr_lift"]["mean"] < 0 < estimates["best"]["dr_lift"]["low"]
    for row in estimates.values():
        assert row["dr"]["low"] < row["dr"]["mean"] < row["dr"]["high"]
    assert "no_discount" in result.stdout and "best" in result.stdout


def test_without_a_response_model_ips_alone_and_optimal_rules_are_refused(shop: Path) -> None:
    result = _estimate(shop, [TIERED])
    assert result.exit_code == 0, result.output
    assert "n/a" in result.stdout
    refused = _estimate(shop, [TIERED, OPTIMAL])
    assert refused.exit_code == 1
    assert "rule 'best' is `optimal`: give its response model (--response-model)" in refused.output


def test_an_optimal_grid_the_log_never_drew_is_refused(shop: Path) -> None:
    odd = {**OPTIMAL, "params": {"grid": [12]}}
    result = _estimate(shop, [odd], "--response-model", str(shop / "model"))
    assert result.exit_code == 1
    assert "rule 'best' chooses among [0.12] that the log never drew" in result.output


def test_a_log_without_undiscounted_offers_has_no_baseline(shop: Path) -> None:
    offers = pd.read_csv(shop / "offers.csv", dtype={"offer_id": str})
    offers[offers["discount"] > 0].to_csv(shop / "discounted.csv", index=False)
    result = _estimate(shop, [TIERED], offers="discounted.csv")
    assert result.exit_code == 1
    assert "no offer was logged without a discount" in result.output


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"policy": "tiered_topk"}], "rule 1 has no name"),
        ([{**TIERED, "params": {"k1": 0, "d1": 5, "d2": 5}}], "rule 'tiered': tiered_topk"),
        ([TIERED, TIERED], "rule names must be unique"),
        ([{**TIERED, "max_discount_pct": "lots"}], "max_discount_pct must be a number"),
    ],
)
def test_a_bad_rules_file_is_one_line(shop: Path, rules: object, message: str) -> None:
    result = _estimate(shop, rules)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
