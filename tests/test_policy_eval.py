"""Policy evaluation: the oracle bounds every policy, guardrails hold, off-policy estimators are
unbiased where the answer is known."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from core.policy import Guardrails, Rule, floor_price, price_after, to_cents
from trainer.cli import main
from trainer.config import EvalConfig, MarketConfig, ResponseConfig
from trainer.market import GRID, Log, Offers
from trainer.policy_eval import (
    POLICY_ORDER,
    SeedResult,
    allowed_discounts,
    best_discounts,
    doubly_robust,
    ips,
    rule_discounts,
    run_seed,
    summarize,
)

torch.set_num_threads(1)
TINY = EvalConfig(
    seeds=(0,),
    market=MarketConfig(n_users=150, n_items=50, visits=4),
    train_visits=2,
    response=ResponseConfig(epochs=1, min_steps=100, batch_size=256, hidden=8, threads=1),
)


@pytest.fixture(scope="module")
def result() -> SeedResult:
    return run_seed(0, TINY)


def test_oracle_earns_at_least_as_much_as_every_policy_on_the_truth(result: SeedResult) -> None:
    assert set(result.outcomes) == set(POLICY_ORDER)
    oracle = result.outcomes["oracle"].margin
    for name, outcome in result.outcomes.items():
        assert outcome.margin <= oracle + 1e-9, name
    assert oracle > result.outcomes["no_discount"].margin  # there is something to win
    # The Bayes bound learns from the same log as optimal, and knows the market's prior too.
    assert result.outcomes["bayes"].margin > result.outcomes["optimal"].margin
    assert result.outcomes["no_discount"].discount_spend == 0


def test_the_gap_bench_reproduces_optimal_and_bayes(result: SeedResult) -> None:
    """bench.policy_gap swaps the response model's per-shopper columns; with the rates it must
    be evaluate-policy's optimal, or its other columns say nothing about this table."""
    from bench.policy_gap import COLUMNS, shares

    o = result.outcomes
    lift = o["oracle"].margin - o["no_discount"].margin
    got = shares(0, TINY, COLUMNS, bayes=True)
    assert got["rates"] == pytest.approx((o["optimal"].margin - o["no_discount"].margin) / lift)
    assert got["bayes"] == pytest.approx((o["bayes"].margin - o["no_discount"].margin) / lift)
    assert all(np.isfinite(v) for v in got.values())


def test_shares_are_measured_against_the_oracle(result: SeedResult) -> None:
    summary = summarize([result])
    assert summary["policies"]["oracle"]["share_of_oracle_lift"]["mean"] == pytest.approx(1)
    assert summary["policies"]["no_discount"]["share_of_oracle_lift"]["mean"] == 0
    for name in POLICY_ORDER:
        assert summary["policies"][name]["share_of_oracle_lift"]["mean"] <= 1 + 1e-9


def _offers(price: np.ndarray, cost: np.ndarray, rank: np.ndarray | None = None) -> Offers:
    n = len(price)
    return Offers(
        offer_id=[str(k) for k in range(n)],
        user=np.zeros(n, dtype=np.int64),
        item=np.arange(n, dtype=np.int64),
        rank=np.zeros(n, dtype=np.int64) if rank is None else rank,
        visit=np.zeros(n, dtype=np.int64),
        cf_score=np.linspace(-2, 2, n),
        price=price,
        cost=cost,
    )


money = st.decimals(Decimal("0.5"), Decimal("500"), places=2).map(float)


def test_the_margin_floor_is_the_exact_costs_as_the_server_prices() -> None:
    # 6.3649 × 1.1 = 7.0014, a floor of 7.01: 30% off 10.00 (7.00) is below it, though the cost
    # rounded to cents (6.36 × 1.1 = 6.996) would allow it.
    allowed = allowed_discounts(np.array([10.0]), np.array([6.3649]), Guardrails.of(30, 10))
    assert dict(zip(GRID, allowed[0], strict=True)) == {d: d <= 0.25 for d in GRID}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(money, st.floats(0.05, 1.3)), min_size=1, max_size=20),
    st.sampled_from([0, 10, 20, 30]),
    st.sampled_from([0, 5, 25]),
    st.integers(0, 2**32 - 1),
)
def test_optimal_never_breaks_a_guardrail(
    items: list[tuple[float, float]], max_pct: int, min_margin: int, seed: int
) -> None:
    price = np.array([p for p, _ in items])
    cost = price * np.array([c for _, c in items])  # not whole cents, as simulated costs
    limits = Guardrails.of(max_pct, min_margin)
    allowed = allowed_discounts(price, cost, limits)
    # Any model, even a random one, must be held to the guardrails.
    random_p = np.sort(np.random.default_rng(seed).random((len(price), len(GRID))), axis=1)
    chosen = best_discounts(random_p, price, cost, allowed)
    for p, c, d in zip(price, cost, chosen, strict=True):
        pct = Decimal(str(round(d * 100, 2)))
        assert pct <= Decimal(max_pct)
        if d > 0:  # a discount never takes a price under the margin floor
            # The floor of the exact cost, as the server prices (core.offers' candidates).
            floor = floor_price(Decimal(str(c)), Decimal(min_margin))
            assert price_after(to_cents(p), pct) >= floor


def test_classic_rules_are_priced_by_core_policy_and_rounded_down_onto_the_grid() -> None:
    offers = _offers(np.array([40.0, 40.0, 40.0, 10.0]), np.array([10.0, 10.0, 10.0, 9.0]))
    offers = Offers(**{**offers.__dict__, "rank": np.array([0, 1, 2, 0])})
    limits = Guardrails.of(30, 5)
    tiered = Rule("tiered_topk", {"k1": 2, "d1": 15, "d2": 5}, limits)
    # The last item's floor is 9.45: 15% would price it at 8.50, so the floor binds (5.5%)
    # and the grid rounds that down to 5%.
    assert list(rule_discounts(tiered, offers)) == [0.15, 0.15, 0.05, 0.05]
    linear = Rule("linear", {"a": 7.49, "b": 0, "min": 0, "max": 30}, limits)
    # cf scores -2, -0.67, 0.67, 2 give 0%, 0%, 4.99% and 14.98%; the last hits the floor
    # (5.5%): 0, 0, 0 and 5% on the grid.
    assert list(rule_discounts(linear, offers)) == [0.0, 0.0, 0.0, 0.05]
    offers = Offers(**{**offers.__dict__, "cost": np.array([10.0, 10.0, 10.0, 5.0])})
    assert list(rule_discounts(linear, offers)) == [0.0, 0.0, 0.0, 0.10]


def _known_case(n: int, seed: int) -> tuple[Log, np.ndarray, np.ndarray, np.ndarray]:
    """Two kinds of offer with known curves, logged under a non-uniform random policy."""
    rng = np.random.default_rng(seed)
    kind = rng.integers(0, 2, n)
    offers = _offers(np.where(kind == 0, 20.0, 50.0), np.where(kind == 0, 8.0, 40.0))
    grid = np.asarray(GRID)
    curves = np.where(kind[:, None] == 0, 0.1 + grid, 0.3 + 0.2 * grid)  # true P(buy | d)
    weights = np.array([4, 1, 1, 2, 1, 1, 2], dtype=np.float64)
    weights /= weights.sum()
    column = rng.choice(len(GRID), n, p=weights)
    bought = rng.random(n) < curves[np.arange(n), column]
    log = Log(offers, grid[column], weights[column], bought)
    target = np.where(kind == 0, 0.2, 0.0)  # discount the cheap, high-margin kind only
    margin = offers.price[:, None] * (1 - grid) - offers.cost[:, None]
    expected = curves * margin
    truth = expected[np.arange(n), np.searchsorted(grid, target)].mean()
    return log, target, curves, np.array([truth])


def test_ips_and_dr_are_unbiased_on_a_known_case() -> None:
    """Averaged over many logs, each estimate lands on the truth; DR does so even with a wrong
    model (that is what 'doubly robust' promises) and is exact in expectation with the right one."""
    ips_runs, dr_wrong, dr_right, truths = [], [], [], []
    for seed in range(40):
        log, target, curves, truth = _known_case(4000, seed)
        wrong = np.full_like(curves, 0.5)
        ips_runs.append(ips(log, target))
        dr_wrong.append(doubly_robust(log, target, wrong))
        dr_right.append(doubly_robust(log, target, curves))
        truths.append(truth[0])
    truth_mean = float(np.mean(truths))
    for name, runs in (("ips", ips_runs), ("dr wrong model", dr_wrong), ("dr", dr_right)):
        error = np.mean(runs) - truth_mean
        standard_error = np.std(runs, ddof=1) / np.sqrt(len(runs))
        assert abs(error) < 4 * standard_error + 1e-3, name
    # The right model leaves only the purchase noise, so DR varies less than IPS.
    assert np.std(np.subtract(dr_right, truths)) < np.std(np.subtract(ips_runs, truths))


def test_evaluate_policy_cli_writes_the_report_and_the_plot(tmp_path: Path) -> None:
    plot, report = tmp_path / "margin.png", tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        [
            "evaluate-policy", "--seeds", "2", "--users", "120", "--epochs", "1",
            "--plot", str(plot), "--json", str(report),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in ("optimal", "bayes", "oracle"))
    summary = json.loads(report.read_text())
    assert summary["seeds"] == [0, 1]
    assert list(summary["policies"]) == list(POLICY_ORDER)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("command", "option"),
    [("evaluate-policy", "--json"), ("evaluate-policy", "--plot"), ("uplift", "--json")],
)
def test_a_report_path_that_cannot_be_written_is_refused_before_the_work(
    tmp_path: Path, command: str, option: str
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = CliRunner().invoke(main, [command, option, str(blocker / "out.png")])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {blocker}: cannot write out.png (")


def test_a_report_in_a_folder_not_made_yet_is_written_there(tmp_path: Path) -> None:
    report = tmp_path / "new" / "dir" / "report.json"
    result = CliRunner().invoke(
        main, ["evaluate-policy", "--seeds", "1", "--users", "120", "--epochs", "1",
               "--json", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["seeds"] == [0]


def test_train_visits_set_how_long_the_experiment_runs_before_the_evaluation(
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["evaluate-policy", "--seeds", "1", "--users", "120", "--epochs", "1",
         "--train-visits", "5", "--json", str(path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["config"]["train_visits"] == 5 and report["config"]["market"]["visits"] == 8
    # 120 shoppers × 8 offers × 3 evaluated visits, whatever the training length.
    assert report["offers_per_seed"] == [2880]


def test_one_seed_has_no_interval(tmp_path: Path) -> None:
    """A 95% interval over one seed is no interval: n/a in the table, null in the report."""
    plot, report = tmp_path / "margin.png", tmp_path / "report.json"
    result = CliRunner().invoke(
        main,
        ["evaluate-policy", "--seeds", "1", "--users", "100", "--epochs", "1",
         "--train-visits", "1", "--json", str(report), "--plot", str(plot)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = result.stdout.splitlines()[1 : 1 + len(POLICY_ORDER)]
    assert all(" n/a " in row and "[" not in row for row in rows), rows
    summary = json.loads(report.read_text())
    for figures in [*summary["policies"].values(), summary["response_model_holdout"]]:
        for v in figures.values():
            if isinstance(v, dict):
                assert v["low"] is None and v["high"] is None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_json_report_and_a_plot_of_one_name_are_refused_before_running(tmp_path: Path) -> None:
    """The plot, written second, replaced the JSON report after minutes of simulation."""
    path = tmp_path / "report.png"
    result = CliRunner().invoke(
        main, ["evaluate-policy", "--seeds", "1", "--json", str(path), "--plot", str(path)]
    )
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: {path}: --plot names the file of --json, which it would replace; write --plot "
        "to another file\n"
    )
    assert not path.exists()
