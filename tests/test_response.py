"""The response model: monotone in the discount, reproducible, and the same in ONNX Runtime."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core import response_artifact
from core.artifact import ArtifactError
from core.response_artifact import FEATURES, GRAPH, ResponseManifest
from trainer.cli import main
from trainer.market import (
    GRID,
    MarketConfig,
    events_frame,
    make_market,
    make_offers,
    offers_frame,
    randomized_discounts,
    simulate,
)
from trainer.response import (
    ResponseConfig,
    ResponseData,
    ResponseError,
    ResponseNet,
    Trained,
    fit,
    from_logs,
    log_loss,
    predict,
    save,
)

torch.set_num_threads(1)
SMALL = ResponseConfig(epochs=2, min_steps=300, batch_size=512, hidden=16, threads=1)


def _logs(seed: int = 0, users: int = 400) -> tuple[pd.DataFrame, pd.DataFrame]:
    market = make_market(MarketConfig(n_users=users, n_items=80, visits=3, seed=seed))
    offers = make_offers(market, seed=seed)
    log = simulate(market, offers, *randomized_discounts(len(offers), seed), seed=seed)
    return offers_frame(market, log), events_frame(market, log)


@pytest.fixture(scope="module")
def data() -> ResponseData:
    return from_logs(*_logs())


@pytest.fixture(scope="module")
def trained(data: ResponseData) -> ResponseNet:
    return fit(data, SMALL).model


def _random_net(seed: int) -> ResponseNet:
    torch.manual_seed(seed)
    net = ResponseNet(torch.zeros(len(FEATURES)), torch.ones(len(FEATURES)), hidden=8)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.normal_(0, 2)  # large weights: steep, odd curves, monotone all the same
    return net.eval()


feature_rows = arrays(
    np.float64,
    (3, len(FEATURES)),
    elements=st.floats(0.01, 1000, allow_nan=False, allow_infinity=False),
)


@settings(max_examples=40, deadline=None)
@given(
    feature_rows,
    arrays(np.float64, (3, 12), elements=st.floats(0, 0.9)),
    st.integers(0, 1000),
)
def test_probability_is_non_decreasing_in_the_discount_for_any_weights(
    features: np.ndarray, discounts: np.ndarray, seed: int
) -> None:
    """Monotone by construction: true for random weights, not just for a lucky trained model."""
    ordered = np.sort(discounts, axis=1)
    p = predict(_random_net(seed), features, ordered)
    assert np.all(np.diff(p, axis=1) >= -1e-6)


@settings(max_examples=25, deadline=None)
@given(feature_rows, st.floats(0, 0.5), st.floats(0, 0.5))
def test_trained_model_is_monotone_too(
    trained: ResponseNet, features: np.ndarray, a: float, b: float
) -> None:
    low, high = sorted((a, b))
    p = predict(trained, features, np.array([[low, high]] * len(features)))
    assert np.all(p[:, 1] >= p[:, 0] - 1e-6)


def test_same_seed_same_model_other_seed_other_model(data: ResponseData) -> None:
    grid = np.tile(np.asarray(GRID), (50, 1))
    rows = data.features[:50]
    first = predict(fit(data, SMALL).model, rows, grid)
    again = predict(fit(data, SMALL).model, rows, grid)
    other = predict(fit(data, ResponseConfig(**{**SMALL.__dict__, "seed": 1})).model, rows, grid)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_learns_more_than_the_base_rate(data: ResponseData) -> None:
    result = fit(data, SMALL)
    held_out = data.bought[result.holdout_rows]
    assert result.metrics["log_loss"] < log_loss(held_out, np.full(len(held_out), held_out.mean()))
    assert result.metrics["auc"] > 0.6
    assert result.metrics["ece"] < 0.05


@pytest.fixture(scope="module")
def exported(
    data: ResponseData, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Trained, Path, ResponseManifest]:
    result = fit(data, SMALL)
    folder = tmp_path_factory.mktemp("export") / "response"
    manifest = save(result, folder, list(GRID), SMALL, {"rows": len(data)})
    return result, folder, manifest


def test_export_scores_a_whole_grid_in_one_inference_like_pytorch(
    data: ResponseData, exported: tuple[Trained, Path, ResponseManifest]
) -> None:
    result, folder, manifest = exported
    assert response_artifact.load(folder) == manifest
    assert manifest.metrics["onnx_max_abs_diff"] < 1e-5
    assert set(manifest.files) == {GRAPH}

    session = ort.InferenceSession(str(folder / GRAPH), providers=["CPUExecutionProvider"])
    rows = data.features[:33].astype(np.float32)
    grid = np.tile(np.asarray(GRID, dtype=np.float32), (33, 1))
    (onnx_p,) = session.run(None, {"features": rows, "discounts": grid})
    assert onnx_p.shape == (33, len(GRID))
    np.testing.assert_allclose(onnx_p, predict(result.model, rows, grid), atol=1e-5)
    assert np.all(np.diff(onnx_p, axis=1) >= -1e-6)


def test_a_tampered_or_foreign_folder_is_refused(
    exported: tuple[Trained, Path, ResponseManifest], tmp_path: Path
) -> None:
    folder = tmp_path / "response"
    shutil.copytree(exported[1], folder)
    with (folder / GRAPH).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        response_artifact.load(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "kind": "recommender"}))
    with pytest.raises(ArtifactError, match="not a response model"):
        response_artifact.load(folder)
    with pytest.raises(ArtifactError, match="discount-train response"):
        response_artifact.load(tmp_path / "nothing")


def test_logs_a_model_cannot_learn_from_are_refused_with_the_fix() -> None:
    offers, events = _logs(users=50)
    with pytest.raises(ResponseError, match=r"missing column.*propensity"):
        from_logs(offers.drop(columns=["propensity"]), events)
    with pytest.raises(ResponseError, match="randomized discounts"):
        from_logs(offers.assign(discount=0.1), events)
    with pytest.raises(ResponseError, match="propensity must be in"):
        from_logs(offers.assign(propensity=0.0), events)
    with pytest.raises(ResponseError, match="non-numeric"):
        from_logs(offers.assign(price="n/a"), events)


def test_cli_simulates_fits_and_exports(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(
        main, ["simulate", "--out", str(tmp_path / "log"), "--users", "300", "--seed", "2"]
    )
    assert out.exit_code == 0, out.output
    result = runner.invoke(
        main,
        [
            "response",
            "--offers", str(tmp_path / "log/offers.csv"),
            "--events", str(tmp_path / "log/events.csv"),
            "--out", str(tmp_path / "model"),
            "--hidden", "8",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["onnx_max_abs_diff"] < 1e-5
    assert response_artifact.load(tmp_path / "model").grid == list(GRID)


def test_cli_names_a_missing_file_in_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "response",
            "--offers", str(tmp_path / "nope.csv"),
            "--events", str(tmp_path / "nope.csv"),
            "--out", str(tmp_path / "model"),
        ],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "nope.csv: no such offers file" in result.output
    assert "Traceback" not in result.output
