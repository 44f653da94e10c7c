"""The uplift variant of the response model and the Hillstrom benchmark's split and scoring."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from trainer.cli import main
from trainer.config import UpliftConfig
from trainer.response import Standardize
from trainer.uplift import (
    OUTCOMES,
    UpliftError,
    UpliftNet,
    fit_uplift,
    load_hillstrom,
    predict_uplift,
    scores,
    split,
)

torch.set_num_threads(1)
FAST = {"linear": UpliftConfig(epochs=20), "MLP": UpliftConfig(epochs=8, hidden=16)}


def _hillstrom_like(n: int, seed: int) -> pd.DataFrame:
    """Rows in Hillstrom's columns where an e-mail lifts visits only for web customers."""
    rng = np.random.default_rng(seed)
    channel = rng.choice(["Web", "Phone", "Multichannel"], n)
    segment = rng.choice(["Mens E-Mail", "Womens E-Mail", "No E-Mail"], n)
    treated = segment != "No E-Mail"
    p_visit = 0.08 + 0.25 * (treated & (channel == "Web"))
    visit = rng.random(n) < p_visit
    return pd.DataFrame(
        {
            "recency": rng.integers(1, 13, n),
            "history_segment": "2) $100 - $200",
            "history": np.round(rng.exponential(200, n), 2),
            "mens": rng.integers(0, 2, n),
            "womens": rng.integers(0, 2, n),
            "zip_code": rng.choice(["Urban", "Surburban", "Rural"], n),
            "newbie": rng.integers(0, 2, n),
            "channel": channel,
            "segment": segment,
            "visit": visit.astype(int),
            "conversion": (visit & (rng.random(n) < 0.2)).astype(int),
            "spend": 0.0,
        }
    )


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hillstrom") / "hillstrom.csv"
    _hillstrom_like(3000, 0).to_csv(path, index=False)
    return path


def test_reads_treatment_outcomes_and_one_hot_features(csv: Path) -> None:
    frame = pd.read_csv(csv)
    experiment = load_hillstrom(csv)
    assert len(experiment.treatment) == len(frame)
    assert np.array_equal(experiment.treatment, (frame["segment"] != "No E-Mail").astype(int))
    assert {"channel_Web", "zip_code_Rural", "recency", "history"} <= set(experiment.columns)
    for outcome in OUTCOMES:
        assert np.array_equal(experiment.outcomes[outcome], frame[outcome])


def test_a_file_that_is_not_hillstrom_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.csv"
    pd.DataFrame({"user_id": ["1"], "visit": [0]}).to_csv(path, index=False)
    with pytest.raises(UpliftError, match="missing column"):
        load_hillstrom(path)
    with pytest.raises(UpliftError, match=r"no such file; pass --data PATH to hillstrom\.csv"):
        load_hillstrom(tmp_path / "nothing.csv")


def test_split_is_half_and_half_stratified_and_fixed_by_the_seed(csv: Path) -> None:
    experiment = load_hillstrom(csv)
    train, test = split(experiment, seed=0)
    again, _ = split(experiment, seed=0)
    other, _ = split(experiment, seed=1)
    n = len(experiment.treatment)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == n
    assert abs(len(train) - len(test)) <= 8  # at most one row per stratum
    t, visit = experiment.treatment, experiment.outcomes["visit"]
    for part in (train, test):
        assert abs(t[part].mean() - t.mean()) < 0.002
        assert abs(visit[part].mean() - visit.mean()) < 0.002


@settings(max_examples=40, deadline=None)
@given(
    arrays(np.float64, (5, 13), elements=st.floats(-50, 500)),
    st.integers(0, 1000),
    st.sampled_from([0, 8]),
)
def test_uplift_is_never_negative_by_construction(x: np.ndarray, seed: int, hidden: int) -> None:
    """An e-mail can only raise the purchase probability, whatever the weights."""
    torch.manual_seed(seed)
    model = UpliftNet(Standardize(torch.randn(64, 13)), hidden=hidden)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 2)
    assert np.all(predict_uplift(model.eval(), x) >= 0)


@pytest.mark.parametrize("body", FAST)
def test_finds_the_customers_an_email_moves(csv: Path, body: str) -> None:
    experiment = load_hillstrom(csv)
    train, test = split(experiment, seed=0)
    x, t, y = experiment.features, experiment.treatment, experiment.outcomes["visit"]
    model = fit_uplift(x[train], t[train], y[train], FAST[body])
    uplift = predict_uplift(model, x[test])
    web = x[test][:, experiment.columns.index("channel_Web")] == 1
    assert uplift[web].mean() > 2 * uplift[~web].mean()
    assert scores(y[test], uplift, t[test])["qini"] > 0.1


def test_cli_reports_the_model_next_to_both_baselines(csv: Path, tmp_path: Path) -> None:
    report = tmp_path / "uplift.json"
    result = CliRunner().invoke(
        main, ["uplift", "--data", str(csv), "--epochs", "3", "--json", str(report)]
    )
    assert result.exit_code == 0, result.output
    for name in ("uplift variant (linear)", "ClassTransformation", "TwoModels"):
        assert name in result.stdout
    (run,) = json.loads(report.read_text())
    assert set(run["outcomes"]) == set(OUTCOMES)
    assert run["train_rows"] + run["test_rows"] == 3000


def test_cli_fits_the_mlp_variant_when_asked(csv: Path) -> None:
    result = CliRunner().invoke(
        main, ["uplift", "--data", str(csv), "--hidden", "8", "--epochs", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "uplift variant (2 × 8 MLP)" in result.stdout


def test_cli_says_how_many_epochs_ran(csv: Path, tmp_path: Path) -> None:
    """1,499 customers to fit are two batches an epoch: at least 300 steps make it 150 epochs."""
    report = tmp_path / "report.json"
    result = CliRunner().invoke(
        main, ["uplift", "--data", str(csv), "--epochs", "1", "--json", str(report)]
    )
    assert result.exit_code == 0, result.output
    assert "split seed 0: fitting on 1,499 customers (150 epochs)" in result.stderr
    (written,) = json.loads(report.read_text())
    assert (written["config"]["epochs"], written["epochs_run"]) == (1, 150)


def test_cli_names_a_missing_data_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["uplift", "--data", str(tmp_path / "none.csv")])
    assert result.exit_code == 1
    assert (
        "none.csv: no such file; pass --data PATH to hillstrom.csv" in result.output
        and "Traceback" not in result.output
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "unreadable as CSV or Parquet (No columns to parse from file)"),
        (",".join(_hillstrom_like(1, 0).columns) + "\n", "a header and no customers"),
        (
            _hillstrom_like(4, 0).assign(history=["1.5", "abc", "2", ""]).to_csv(index=False),
            "2 row(s) where history is missing or not a number, e.g. line 3; fix or drop them",
        ),
        (
            _hillstrom_like(3, 0).assign(visit=[0, 1, 2]).to_csv(index=False),
            "1 row(s) where visit is not 0 or 1, e.g. line 4; fix or drop them",
        ),
    ],
)
def test_cli_refuses_a_broken_file_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "hillstrom.csv"
    path.write_text(text)
    result = CliRunner().invoke(main, ["uplift", "--data", str(path), "--epochs", "1"])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {path}: ") and result.output.count("\n") == 1
    assert message in result.output


HILLSTROM = _hillstrom_like(3000, 0)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (
            HILLSTROM.replace({"segment": {"No E-Mail": "no e-mail", "Mens E-Mail": "Mens"}}),
            "segment 'Mens', 'no e-mail' is not one of Mens E-Mail, Womens E-Mail, No E-Mail; "
            "fix or drop those rows",
        ),
        (
            HILLSTROM[HILLSTROM["segment"] != "No E-Mail"],
            "split seed 0 leaves no No E-Mail customer in the fit half; no No E-Mail customer "
            "in the score half; each half needs",
        ),
        (
            HILLSTROM.assign(conversion=0),
            "split seed 0 leaves no conversion = 1 among e-mailed in the fit half; ",
        ),
        (
            _hillstrom_like(12, 1),
            "split seed 0 leaves no visit = 1 among e-mailed in the fit half; ",
        ),
    ],
    ids=["unknown segment", "no control", "one class", "tiny"],
)
def test_cli_refuses_data_it_cannot_fit_or_score_before_fitting(
    tmp_path: Path, frame: pd.DataFrame, message: str
) -> None:
    path = tmp_path / "hillstrom.csv"
    frame.to_csv(path, index=False)
    result = CliRunner().invoke(main, ["uplift", "--data", str(path), "--epochs", "1"])
    assert result.exit_code == 1
    # One line and nothing before it: no "fitting on" progress, no traceback.
    assert result.output.startswith(f"Error: {path}: {message}")
    assert result.output.count("\n") == 1


@pytest.mark.parametrize("missing", ["sklift", "sklearn"])
def test_cli_without_the_baselines_libraries_says_so_before_fitting(
    csv: Path, tmp_path: Path, missing: str
) -> None:
    """The baselines import lazily: a missing library was a traceback after the first model."""
    stub = tmp_path / "stub" / missing
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text(
        f'raise ModuleNotFoundError("No module named {missing!r}", name={missing!r})\n'
    )
    path = os.pathsep.join([str(stub.parent), *sys.path])
    command = "from trainer.cli import main; main()"
    done = subprocess.run(
        [sys.executable, "-c", command, "uplift", "--data", str(csv), "--epochs", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    assert done.returncode == 1
    assert done.stderr == (
        f"Error: the uplift benchmark needs scikit-uplift and scikit-learn (No module named "
        f"'{missing}'); install with: pip install -e '.[dev]'\n"
    )


def test_cli_never_writes_its_report_over_the_data(csv: Path, tmp_path: Path) -> None:
    """--json naming the --data file replaced the dataset with the report after reading it."""
    data = tmp_path / "hillstrom.csv"
    data.write_bytes(csv.read_bytes())
    result = CliRunner().invoke(
        main, ["uplift", "--data", str(data), "--json", str(data), "--epochs", "1"]
    )
    assert result.exit_code == 1, result.output
    assert result.output == (
        f"Error: {data}: --json names the file of --data, which it would replace; write --json "
        "to another file\n"
    )
    assert data.read_bytes() == csv.read_bytes()


def test_cli_reads_the_data_as_every_shop_file_is_read(tmp_path: Path) -> None:
    """--data goes through trainer.data.read_table: a second `conversion` column was read as
    `conversion.1` and the first one benchmarked, and a Latin-1 file's "can't decode" was no
    advice; with any refusal, where to find the dataset."""
    frame = HILLSTROM
    path = tmp_path / "hillstrom.csv"
    cases = {
        frame.assign(extra=frame["conversion"])
        .rename(columns={"extra": "conversion"})
        .to_csv(index=False): "column(s) conversion appear more than once in the header",
        frame.assign(channel="Téléphone").to_csv(index=False): "not UTF-8 text",
    }
    for text, message in cases.items():
        path.write_bytes(text.encode("latin-1"))
        result = CliRunner().invoke(main, ["uplift", "--data", str(path), "--epochs", "1"])
        assert result.exit_code == 1, result.output
        assert result.output.startswith(f"Error: {path}: {message}"), result.output
        assert result.output.endswith("; pass --data PATH to hillstrom.csv\n")
        assert result.output.count("\n") == 1
