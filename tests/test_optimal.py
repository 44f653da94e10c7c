"""The `optimal` policy: the shared argmax under guardrails (core), and discountd serving it with
a real response model (ONNX) through a real server, matching the trainer's choice."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from offer_server import OfferServer, ctl
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.artifact import ArtifactError
from core.offers import ItemInput, RuleDef, Snapshot, decide
from core.optimal import expected_margin
from core.policy import (
    Candidate,
    Guardrails,
    Reason,
    Rule,
    allowed_percents,
    floor_price,
    grid_choices,
    price_after,
    price_items,
    to_cents,
)
from core.response_artifact import GRAPH, HISTORY, ResponseManifest, feature_rows
from core.response_artifact import write as write_response
from core.response_history import HistoryTable
from discount.v1 import discount_pb2 as pb
from server.settings import Settings
from trainer.config import MarketConfig, ResponseConfig
from trainer.market import GRID, make_market, make_offers, randomized_discounts
from trainer.market import simulate as simulate_market
from trainer.policy_eval import allowed_discounts, best_discounts, training_data
from trainer.response import Trained, fit, predict, save

pytestmark = pytest.mark.timeout(120)
torch.set_num_threads(1)

money = st.integers(min_value=1, max_value=10_000_000).map(lambda m: Decimal(m) / 100)
# Catalog costs need not be whole cents (a cost derived from a margin, an average landed cost).
costs = st.one_of(money, st.integers(min_value=1, max_value=1_000_000_000).map(
    lambda m: Decimal(m) / 10_000
))  # fmt: skip
probability = st.floats(min_value=0, max_value=1, allow_nan=False)


@st.composite
def optimal_cases(draw: st.DrawFn) -> tuple[Rule, Candidate]:
    grid = sorted(draw(st.sets(st.integers(1, 9_999), min_size=1, max_size=8)))
    limits = Guardrails(
        draw(st.integers(0, 9_999).map(lambda m: Decimal(m) / 100)),
        draw(st.integers(0, 10_000).map(lambda m: Decimal(m) / 100)),
    )
    rule = Rule("optimal", {"grid": [g / 100 for g in grid]}, limits)
    n = len(grid_choices(rule.params))
    p = tuple(draw(st.lists(probability, min_size=n, max_size=n)))
    item = Candidate("a", draw(money), draw(costs), 1, score=0.5, purchase_probability=p)
    return rule, item


@settings(max_examples=300, deadline=None)
@given(optimal_cases())
def test_optimal_respects_guardrails_and_takes_the_best_allowed_choice(
    case: tuple[Rule, Candidate],
) -> None:
    rule, item = case
    [priced] = price_items(rule, [item])
    base, cost = to_cents(item.base_price), to_cents(item.cost)
    assert priced.final_price == price_after(base, priced.discount_pct) <= base
    assert priced.discount_pct <= rule.guardrails.max_discount_pct
    if priced.discount_pct > 0:
        assert priced.final_price >= floor_price(item.cost, rule.guardrails.min_margin_pct)
    assert priced.reasons[0] == Reason.POLICY_OPTIMAL
    assert priced.reasons[1].startswith("EXPECTED_UPLIFT_CENTS=")
    # The choice is one the guardrails allow as priced: none of them had to move it.
    assert Reason.GUARDRAIL_MARGIN_FLOOR not in priced.reasons
    assert Reason.GUARDRAIL_MAX_DISCOUNT not in priced.reasons
    # A candidate too small to take a cent off is no choice: the customer would see the base
    # price, not the discount the model was asked about.
    assert Reason.ROUNDED_TO_NO_DISCOUNT not in priced.reasons
    # The choice is an allowed one, and no allowed choice has a larger expected margin.
    choices = grid_choices(rule.params)
    allowed = allowed_percents(base, item.cost, choices, rule.guardrails)
    assert allowed[choices.index(priced.discount_pct)]
    value = expected_margin(
        np.array([item.purchase_probability]),
        np.array([float(base)]),
        np.array([float(cost)]),
        np.array([float(c) / 100 for c in choices]),
    )[0]
    allowed = [ok and (c == 0 or price_after(base, c) < base) for c, ok in zip(
        choices, allowed, strict=True
    )]  # fmt: skip
    chosen = value[choices.index(priced.discount_pct)]
    assert all(chosen >= v for v, ok in zip(value, allowed, strict=True) if ok)
    # Ties go to the smaller discount.
    assert all(
        v < chosen for c, v, ok in zip(choices, value, allowed, strict=True)
        if ok and c < priced.discount_pct
    )  # fmt: skip
    uplift = int(priced.reasons[1].split("=")[1])
    assert uplift == round((chosen - value[0]) * 100)
    assert uplift >= 0


def test_optimal_checks_the_floor_of_the_catalog_cost_not_of_the_cost_in_cents() -> None:
    # Floor 6.3649 × 1.10 = 7.00139 -> 7.01; the cost in cents (6.36) would give 7.00, which
    # 30% off 10.00 reaches. 30% is not allowed: no discount, not 29.90% set by the floor.
    rule = Rule("optimal", {"grid": [30]}, Guardrails.of(30, 10))
    item = Candidate(
        "a", Decimal("10.00"), Decimal("6.3649"), 1, score=0.5, purchase_probability=(0.1, 0.9)
    )
    [priced] = price_items(rule, [item])
    assert priced.discount_pct == 0 and priced.final_price == Decimal("10.00")
    assert priced.reasons == (Reason.POLICY_OPTIMAL, "EXPECTED_UPLIFT_CENTS=0")


def test_a_discount_that_takes_no_cent_off_is_no_choice() -> None:
    # At 0.05, 5% and 10% off round back up to 0.05: the shopper would see the base price, so
    # the model's P(buy) at those discounts says nothing about this offer. 20% (0.04) is real,
    # and better than no discount: 0.7 × 0.03 > 0.1 × 0.04.
    rule = Rule("optimal", {"grid": [5, 10, 20]}, Guardrails.of(30))
    item = Candidate(
        "a",
        Decimal("0.05"),
        Decimal("0.01"),
        1,
        score=0.5,
        purchase_probability=(0.1, 0.5, 0.6, 0.7),
    )
    [priced] = price_items(rule, [item])
    assert priced.discount_pct == 20 and priced.final_price == Decimal("0.04")
    assert priced.reasons == (Reason.POLICY_OPTIMAL, "EXPECTED_UPLIFT_CENTS=2")
    # Nothing real to offer: no discount, and no uplift claimed for one the shopper never sees.
    rule = Rule("optimal", {"grid": [5, 10]}, Guardrails.of(30))
    [priced] = price_items(rule, [replace(item, purchase_probability=(0.1, 0.5, 0.6))])
    assert priced.discount_pct == 0
    assert priced.reasons == (Reason.POLICY_OPTIMAL, "EXPECTED_UPLIFT_CENTS=0")


@pytest.mark.parametrize(
    "p", [(0.1, float("nan"), 0.2), (float("nan"),) * 3, (0.1, 1.5, 0.2), (-0.1, 0.2, 0.3)]
)
def test_no_probability_from_the_response_model_means_no_discount(
    p: tuple[float, ...],
) -> None:
    rule = Rule("optimal", {"grid": [10, 20]}, Guardrails.of(30))
    item = Candidate("a", Decimal(10), Decimal(1), 1, score=0.5, purchase_probability=p)
    [priced] = price_items(rule, [item])
    assert priced.discount_pct == 0 and priced.reasons == (Reason.NO_RESPONSE_MODEL,)


def test_a_probability_per_choice_is_required() -> None:
    rule = Rule("optimal", {"grid": [5, 10]}, Guardrails.of(30))
    short = Candidate("a", Decimal(10), Decimal(1), 1, score=0.5, purchase_probability=(0.1,))
    unscored = Candidate("b", Decimal(10), Decimal(1), 1, purchase_probability=(0.1, 0.2, 0.3))
    assert [p.reasons for p in price_items(rule, [short, unscored])] == [
        (Reason.NO_RESPONSE_MODEL,),
        (Reason.NO_SCORE,),
    ]


def test_one_response_call_per_answer_over_the_union_of_grids() -> None:
    limits = Guardrails.of(30)
    rules = tuple(
        RuleDef(n, f"r{n}", Rule("optimal", {"grid": grid}, limits), categories=frozenset({cat}))
        for n, (grid, cat) in enumerate((([5, 10], "a"), ([10, 20], "b")), start=1)
    )
    items = [
        ItemInput("x", "a", 10.0, 1.0, 1, 0.9),
        ItemInput("y", "b", 10.0, 1.0, 2, 0.5),
        ItemInput("z", "b", 10.0, 1.0, 0, None),  # unscored: not sent to the model
    ]
    calls: list[tuple[str, list[str], list[float]]] = []

    def respond(
        user_id: str,
        user: Mapping[str, float | str],
        rows: Sequence[ItemInput],
        grid: Sequence[float],
    ) -> np.ndarray:
        calls.append((user_id, [r.item_id for r in rows], list(grid)))
        return np.tile(0.1 + np.asarray(grid) * 2, (len(rows), 1))

    decision = decide(Snapshot(rules=rules), "u", {}, items, datetime.now(UTC), respond)
    assert calls == [("u", ["x", "y"], [0.0, 0.05, 0.1, 0.2])]
    reasons = [d.reasons for d in decision.items]
    assert "POLICY_OPTIMAL" in reasons[0] and "POLICY_OPTIMAL" in reasons[1]
    assert "NO_SCORE" in reasons[2]
    # P(buy) = 0.1 + 2d at price 10, cost 1: expected margins 0.9, 1.7, 2.4 at 0, 5, 10% (r1)
    # and 0.9, 2.4, 3.5 at 0, 10, 20% (r2).
    assert [d.priced.discount_pct for d in decision.items] == [
        Decimal("10.00"),
        Decimal("20.00"),
        Decimal("0.00"),
    ]


# --- a real discountd with a response model -----------------------------------------------

GRID_PCT = [round(g * 100) for g in GRID if g > 0]  # the rule's grid: the trainer's, less 0


@pytest.fixture(scope="module")
def response_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trained]:
    """A response model fit in seconds on a small randomized simulator log whose shoppers are
    named like the tiny shop's, so that the server finds user-0's past responses."""
    market = make_market(MarketConfig(n_users=300, n_items=60, visits=3, seed=0))
    market = replace(market, user_ids=[f"user-{u}" for u in range(len(market.user_ids))])
    offers = make_offers(market, seed=0)
    log = simulate_market(market, offers, *randomized_discounts(len(offers), 0), seed=0)
    config = ResponseConfig(epochs=2, min_steps=200, batch_size=512, hidden=16, threads=1)
    logged = training_data(market, log, seed=0)
    trained = fit(logged.data, config)
    folder = tmp_path_factory.mktemp("response") / "model"
    save(trained, folder, list(GRID), config, {"source": "tests/test_optimal.py"}, logged.history)
    return folder, trained


# Minimum margins: 10% leaves the whole grid allowed (the model's choice is interior), 50%
# puts the floor at 9.00 and allows at most 10% off (the guardrail binds).
@pytest.fixture(params=[10, 50])
def optimal_server(
    request: pytest.FixtureRequest,
    model_store: Path,
    db_url: str,
    response_model: tuple[Path, Trained],
) -> Iterator[tuple[OfferServer, int]]:
    ctl(
        db_url, "rules", "create", "best", "--policy", "optimal",
        "--param", f"grid={GRID_PCT}", "--max-discount", "30", "--min-margin", str(request.param),
    )  # fmt: skip
    running = OfferServer(model_store, db_url, response_model_dir=response_model[0])
    yield running, request.param
    running.close()


def _scores(server: OfferServer, limit: int) -> dict[str, float]:
    response = server.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=limit))
    return {item.item_id: item.score for item in response.items}


def test_server_picks_the_argmax_the_onnx_model_implies_as_the_trainer_would(
    optimal_server: tuple[OfferServer, int], response_model: tuple[Path, Trained]
) -> None:
    server, min_margin = optimal_server
    response = server.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=8))
    scores = _scores(server, 8)
    offers = list(response.offers)
    assert len(offers) == 8 and [o.item_id for o in offers] == list(scores)
    # The tiny shop: every item at price 10.00, cost 6.00.
    price, cost = np.full(8, 10.0), np.full(8, 6.0)
    history = HistoryTable.load(response_model[0] / HISTORY)
    assert history.rates("user-0") != history.prior  # the server must look user-0 up
    rows = feature_rows(
        {"order_count": 3.0},
        history.rates("user-0"),
        [(scores[o.item_id], 10.0, 6.0) for o in offers],
    )
    session = ort.InferenceSession(str(response_model[0] / GRAPH))
    grid = np.tile(np.asarray(GRID, dtype=np.float32), (8, 1))
    [p_onnx] = session.run(None, {"features": rows, "discounts": grid})
    value = expected_margin(p_onnx.astype(np.float64), price, cost, np.asarray(GRID))
    floor = 6.0 * (1 + min_margin / 100)
    allowed = 10.0 * (1 - np.asarray(GRID)) >= floor - 1e-9
    best = np.where(allowed, value, -np.inf).argmax(axis=1)
    served = [o.discount_percent / 100 for o in offers]
    assert served == pytest.approx([GRID[b] for b in best])
    assert all(10.0 * (1 - d) >= floor - 1e-9 for d in served)
    for offer, b, v in zip(offers, best, value, strict=True):
        assert offer.final_price_cents == round(1000 * (1 - GRID[b]))
        assert "POLICY_OPTIMAL" in offer.reason_codes
        assert f"EXPECTED_UPLIFT_CENTS={round((v[b] - v[0]) * 100)}" in offer.reason_codes
    # The trainer's policy evaluation, with the torch model on the same rows, chooses the same.
    limits = Guardrails.of(30, min_margin)
    p_torch = predict(response_model[1].model, rows.astype(np.float64), grid.astype(np.float64))
    trainer_choice = best_discounts(p_torch, price, cost, allowed_discounts(price, cost, limits))
    assert served == pytest.approx(list(trainer_choice))


def test_server_without_a_response_model_fails_closed_and_says_so_once(
    model_store: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ctl(db_url, "rules", "create", "best", "--policy", "optimal", "--param", "grid=[5,10]")
    running = OfferServer(model_store, db_url)
    try:
        with caplog.at_level(logging.WARNING, logger="server.response"):
            for _ in range(3):
                response = running.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=3))
                assert all(
                    o.discount_percent == 0 and "NO_RESPONSE_MODEL" in o.reason_codes
                    for o in response.offers
                )
    finally:
        running.close()
    told = [r for r in caplog.records if "no response model is loaded" in r.getMessage()]
    assert len(told) == 1


def test_rules_simulate_shows_the_optimal_choice(
    model_store: Path, db_url: str, response_model: tuple[Path, Trained]
) -> None:
    ctl(db_url, "rules", "create", "best", "--policy", "optimal", "--param", "grid=[5,10]")
    args = ["rules", "simulate", "--user", "user-0", "--model-dir", str(model_store)]
    without = ctl(db_url, *args, "--output", "json").output
    assert "NO_RESPONSE_MODEL" in without and "POLICY_OPTIMAL" not in without
    served = ctl(
        db_url, *args, "--response-model-dir", str(response_model[0]), "--output", "json"
    ).output
    assert "POLICY_OPTIMAL" in served and "EXPECTED_UPLIFT_CENTS=" in served


def test_a_folder_that_is_no_response_model_refuses_to_start(model_store: Path) -> None:
    from server.app import create_server

    settings = Settings(model_dir=model_store, response_model_dir=model_store, port=0)
    with pytest.raises(ArtifactError, match="train one with `discount-train response"):
        create_server(settings)


def _load_failures(server: OfferServer) -> dict[str, float]:
    text = generate_latest(server.server.metrics.registry).decode()
    return {
        sample.labels["model"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "discountd_model_load_failures_total"
    }


def test_a_response_model_swapped_into_its_folder_is_served_and_a_broken_one_is_not(
    model_store: Path,
    db_url: str,
    response_model: tuple[Path, Trained],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A nightly `discount-train response --out DIR` replaces DIR whole; the next model poll (a
    SIGHUP here) serves it, and a folder that is no response model leaves the old one serving."""
    folder = tmp_path / "response"
    history = HistoryTable.load(response_model[0] / HISTORY)
    config = ResponseConfig(epochs=2, min_steps=200, batch_size=512, hidden=16, threads=1)
    save(response_model[1], folder, list(GRID), config, {"run": "first"}, history)
    ctl(db_url, "rules", "create", "best", "--policy", "optimal", "--param", "grid=[5,10,15]")
    running = OfferServer(model_store, db_url, response_model_dir=folder)
    try:
        assert running.server.offering is not None
        first = running.server.offering.respond
        running.call(running.server.reload())
        assert running.server.offering.respond is first  # nothing new: not loaded again

        save(response_model[1], folder, list(GRID), config, {"run": "second"}, history)
        running.call(running.server.reload())
        second = running.server.offering.respond
        assert second is not first
        offers = running.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=3)).offers
        assert all("POLICY_OPTIMAL" in o.reason_codes for o in offers)

        graph = (folder / GRAPH).read_bytes()
        (folder / GRAPH).write_bytes(b"not a graph")  # no longer matches its manifest
        (folder / "manifest.json").touch()  # as a new folder's would, its stamp moves
        with caplog.at_level(logging.ERROR, logger="server.app"):
            running.call(running.server.reload(force=False))  # a poll
            running.call(running.server.reload(force=False))  # the next: told once
        assert running.server.offering.respond is second
        told = [r for r in caplog.records if "not loaded" in r.getMessage()]
        assert len(told) == 1 and "keeps serving" in told[0].getMessage()
        # Health stays SERVING: the counter is what an alert can watch.
        assert _load_failures(running) == {"recommend": 0, "response": 1}
        # Mended in place, the manifest untouched: polls do not look again, SIGHUP does.
        (folder / GRAPH).write_bytes(graph)
        running.call(running.server.reload(force=False))
        assert running.server.offering.respond is second
        running.call(running.server.reload(force=True))
        assert running.server.offering.respond is not second
    finally:
        running.close()


def _answering(folder: Path, history: HistoryTable, scale: float, offset: float) -> Path:
    """A response model folder whose graph answers offset + scale · d whatever the features:
    with scale 5 it says more than 1 from 16% off; with scale -2 it falls with the discount."""
    from onnx import TensorProto, helper, save_model

    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 12])
    discounts = helper.make_tensor_value_info("discounts", TensorProto.FLOAT,
                                              ["batch", "candidates"])  # fmt: skip
    answer = helper.make_tensor_value_info("purchase_probability", TensorProto.FLOAT,
                                           ["batch", "candidates"])  # fmt: skip
    constants = [
        helper.make_tensor("scale", TensorProto.FLOAT, [], [scale]),
        helper.make_tensor("offset", TensorProto.FLOAT, [], [offset]),
    ]
    nodes = [
        helper.make_node("Mul", ["discounts", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["purchase_probability"]),
    ]
    graph = helper.make_graph(nodes, "answer", [features, discounts], [answer], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8

    def write_files(staging: Path) -> dict[str, float]:
        history.save(staging / HISTORY)
        save_model(model, str(staging / GRAPH))
        return {}

    write_response(folder, ResponseManifest("", "", list(GRID)), write_files)
    return folder


def test_a_response_model_answering_no_probability_or_a_falling_curve_grants_nothing(
    model_store: Path, db_url: str, response_model: tuple[Path, Trained], tmp_path: Path
) -> None:
    """Through discountd and ONNX Runtime: answers above 1 are no probabilities (no discount,
    NO_RESPONSE_MODEL, not INTERNAL); a curve falling with the discount makes none worth it."""
    history = HistoryTable.load(response_model[0] / HISTORY)
    ctl(db_url, "rules", "create", "best", "--policy", "optimal", "--param", f"grid={GRID_PCT}",
        "--max-discount", "30")  # fmt: skip
    cases = [
        (5.0, 0.2, ["NO_RESPONSE_MODEL"]),
        (-2.0, 0.9, ["POLICY_OPTIMAL", "EXPECTED_UPLIFT_CENTS=0"]),
    ]
    for scale, offset, codes in cases:
        folder = _answering(tmp_path / f"answer-{scale}", history, scale, offset)
        running = OfferServer(model_store, db_url, response_model_dir=folder)
        try:
            offers = running.stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=3)).offers
        finally:
            running.close()
        assert len(offers) == 3
        for offer in offers:
            assert (offer.discount_percent, offer.final_price_cents) == (0, 1000)
            assert list(offer.reason_codes[-len(codes) :]) == codes
