"""Recommend and GetModelInfo through a real server on port 0 and the generated stubs."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_thread import bad_requests

from core.artifact import CURRENT
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from server.model import load_version
from server.recommend import ColdStart, RecommendQuery, recommend
from tests.conftest import RunningServer, TinyShop, write_tiny_artifact
from trainer.dataset import Interactions

GARDEN_USER, KITCHEN_USER = "user-0", "user-39"


@pytest.fixture(scope="module")
def running(model_store: Path) -> Iterator[RunningServer]:
    server = RunningServer(model_store)
    server.wait_first_load()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stub(running: RunningServer) -> pb_grpc.DiscountServiceStub:
    return running.stub


@pytest.fixture(scope="module")
def item_taste(tiny_shop: TinyShop) -> dict[str, str]:
    return dict(zip(tiny_shop.dataset.catalog.item_ids, tiny_shop.taste_of_item, strict=True))


@pytest.fixture(scope="module")
def purchases(tiny_shop: TinyShop) -> dict[str, set[str]]:
    inter, ids = tiny_shop.dataset.interactions, tiny_shop.dataset.catalog.item_ids
    bought: dict[str, set[str]] = {}
    for u, i in zip(inter.user_index.tolist(), inter.item_index.tolist(), strict=True):
        bought.setdefault(tiny_shop.dataset.user_ids[u], set()).add(ids[i])
    return bought


def invalid_fields(stub: pb_grpc.DiscountServiceStub, request: pb.RecommendRequest) -> list[str]:
    """Call Recommend expecting INVALID_ARGUMENT; return the fields its BadRequest names."""
    with pytest.raises(grpc.RpcError) as raised:
        stub.Recommend(request)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    fields = []
    for bad in bad_requests(error):
        fields += [v.field for v in bad.field_violations]
        assert all(v.description for v in bad.field_violations)
    return fields


def test_known_user_gets_their_taste_without_purchases(
    stub: pb_grpc.DiscountServiceStub,
    running: RunningServer,
    item_taste: dict[str, str],
    purchases: dict[str, set[str]],
) -> None:
    reply = stub.Recommend(pb.RecommendRequest(user_id=GARDEN_USER, limit=5))
    ids = [item.item_id for item in reply.items]
    assert len(ids) == 5 and {item_taste[i] for i in ids} == {"garden"}
    assert not set(ids) & purchases[GARDEN_USER]
    assert [item.rank for item in reply.items] == [1, 2, 3, 4, 5]
    scores = [item.score for item in reply.items]
    assert scores == sorted(scores, reverse=True)
    assert all(item.category == "garden" for item in reply.items)
    assert not reply.cold_start and reply.cold_start_path == pb.COLD_START_UNSPECIFIED
    assert reply.model_version == running.server.store.require().version


def test_include_purchased_returns_bought_items(
    stub: pb_grpc.DiscountServiceStub, purchases: dict[str, set[str]]
) -> None:
    everything = stub.Recommend(
        pb.RecommendRequest(user_id=KITCHEN_USER, limit=1000, include_purchased=True)
    )
    ids = {item.item_id for item in everything.items}
    assert purchases[KITCHEN_USER] <= ids and len(ids) == 30
    default = stub.Recommend(pb.RecommendRequest(user_id=KITCHEN_USER, limit=1000))
    assert len(default.items) == 27
    assert not {item.item_id for item in default.items} & purchases[KITCHEN_USER]


def test_exclude_item_ids_are_never_returned(stub: pb_grpc.DiscountServiceStub) -> None:
    top = [i.item_id for i in stub.Recommend(pb.RecommendRequest(user_id=GARDEN_USER)).items]
    excluded = [*top[:3], "no-such-item"]  # unknown ids are simply not in the catalog
    reply = stub.Recommend(pb.RecommendRequest(user_id=GARDEN_USER, exclude_item_ids=excluded))
    ids = [item.item_id for item in reply.items]
    assert ids[:7] == top[3:] and not set(ids) & set(excluded)


def test_category_filter_returns_only_that_category(
    stub: pb_grpc.DiscountServiceStub, item_taste: dict[str, str]
) -> None:
    reply = stub.Recommend(
        pb.RecommendRequest(user_id=GARDEN_USER, limit=100, categories=["kitchen"])
    )
    assert len(reply.items) == 15
    assert {item_taste[item.item_id] for item in reply.items} == {"kitchen"}


def test_default_limit_is_ten(stub: pb_grpc.DiscountServiceStub) -> None:
    assert len(stub.Recommend(pb.RecommendRequest(user_id=KITCHEN_USER)).items) == 10


def test_unknown_user_is_folded_in_from_recent_items(
    stub: pb_grpc.DiscountServiceStub, item_taste: dict[str, str]
) -> None:
    kitchen_items = [i for i, t in item_taste.items() if t == "kitchen"][:3]
    reply = stub.Recommend(
        pb.RecommendRequest(
            user_id="new-shopper", limit=5, recent_item_ids=[*kitchen_items, "unknown-item"]
        )
    )
    ids = [item.item_id for item in reply.items]
    assert reply.cold_start and reply.cold_start_path == pb.COLD_START_FOLD_IN
    assert len(ids) == 5 and {item_taste[i] for i in ids} == {"kitchen"}
    assert not set(ids) & set(kitchen_items), "recent items count as already bought"


def test_unknown_user_without_known_items_gets_popular_items(
    stub: pb_grpc.DiscountServiceStub, model_store: Path, item_taste: dict[str, str]
) -> None:
    version = model_store / (model_store / CURRENT).read_text().strip()
    popular = json.loads((version / "popularity.json").read_text())
    item_ids = json.loads((version / "items.json").read_text())["item_id"]
    ranked = [item_ids[i] for i in popular]
    reply = stub.Recommend(
        pb.RecommendRequest(user_id="new-shopper", limit=4, recent_item_ids=["unknown-item"])
    )
    assert reply.cold_start and reply.cold_start_path == pb.COLD_START_POPULARITY
    assert [item.item_id for item in reply.items] == ranked[:4]
    filtered = stub.Recommend(
        pb.RecommendRequest(
            user_id="new-shopper",
            limit=3,
            categories=["garden"],
            exclude_item_ids=[ranked[0]],
        )
    )
    expected = [i for i in ranked[1:] if item_taste[i] == "garden"][:3]
    assert [item.item_id for item in filtered.items] == expected


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (pb.RecommendRequest(user_id=""), ["user_id"]),
        (pb.RecommendRequest(user_id="   "), ["user_id"]),
        (pb.RecommendRequest(user_id="user\x000"), ["user_id"]),
        (pb.RecommendRequest(user_id="u", limit=1001), ["limit"]),
        (pb.RecommendRequest(user_id="u", limit=-1), ["limit"]),
        (pb.RecommendRequest(user_id="u", categories=["toys"]), ["categories"]),
        (pb.RecommendRequest(user_id="u", exclude_item_ids=["x"] * 1001), ["exclude_item_ids"]),
        (pb.RecommendRequest(user_id="u", recent_item_ids=["x"] * 1001), ["recent_item_ids"]),
        (pb.RecommendRequest(user_id="u", categories=["garden"] * 1001), ["categories"]),
        (pb.RecommendRequest(user_id="", limit=5000), ["user_id", "limit"]),
        (
            pb.RecommendRequest(user_id="", limit=1001, categories=["toys"]),
            ["user_id", "limit", "categories"],
        ),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(
    stub: pb_grpc.DiscountServiceStub, request_: pb.RecommendRequest, fields: list[str]
) -> None:
    assert invalid_fields(stub, request_) == fields


def test_unknown_category_message_lists_known_ones(stub: pb_grpc.DiscountServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        stub.Recommend(pb.RecommendRequest(user_id="u", categories=["toys", "garden"]))
    assert "'toys'" in raised.value.details() and "'kitchen'" in raised.value.details()


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(limit=st.one_of(st.integers(-(2**31), -1), st.integers(1001, 2**31 - 1)))
def test_any_limit_out_of_range_is_refused(stub: pb_grpc.DiscountServiceStub, limit: int) -> None:
    assert invalid_fields(stub, pb.RecommendRequest(user_id=GARDEN_USER, limit=limit)) == ["limit"]


@settings(max_examples=30, deadline=None)
@given(
    # Any text a shop might use as an id; ids hold no control characters (core.store.validate).
    # Known users too, so that their purchases are left out as well.
    user_id=st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=30).filter(
        str.strip
    )
    | st.sampled_from([GARDEN_USER, KITCHEN_USER, "user-7"]),
    limit=st.integers(0, 1000),
    categories=st.lists(st.sampled_from(["garden", "kitchen"]), max_size=2),
)
def test_any_valid_request_answers_within_limit_and_filters(
    stub: pb_grpc.DiscountServiceStub,
    item_taste: dict[str, str],
    purchases: dict[str, set[str]],
    user_id: str,
    limit: int,
    categories: list[str],
) -> None:
    reply = stub.Recommend(pb.RecommendRequest(user_id=user_id, limit=limit, categories=categories))
    # As many as asked for, or every item the filters and the user's purchases leave.
    bought = purchases.get(user_id, set())
    left = [i for i, t in item_taste.items() if i not in bought and t in (categories or [t])]
    assert len(reply.items) == min(limit or 10, len(left))
    assert not {item.item_id for item in reply.items} & bought
    assert len({item.item_id for item in reply.items}) == len(reply.items)
    if categories:
        assert {item_taste[item.item_id] for item in reply.items} <= set(categories)
    assert all(np.isfinite(item.score) for item in reply.items)


def test_request_id_is_echoed_or_created(running: RunningServer) -> None:
    _, call = running.stub.Recommend.with_call(
        pb.RecommendRequest(user_id=GARDEN_USER), metadata=(("x-request-id", "abc-123"),)
    )
    assert ("x-request-id", "abc-123") in call.trailing_metadata()
    _, call = running.stub.Recommend.with_call(pb.RecommendRequest(user_id=GARDEN_USER))
    created = dict(call.trailing_metadata())["x-request-id"]
    assert len(created) == 32


def test_a_failed_call_echoes_its_request_id_too(running: RunningServer) -> None:
    metadata = (("x-request-id", "bad-1"),)
    # A rich status (BadRequest details) brings trailing metadata of its own; a plain one not.
    with pytest.raises(grpc.RpcError) as invalid:
        running.stub.Recommend(pb.RecommendRequest(user_id=""), metadata=metadata)
    with pytest.raises(grpc.RpcError) as unavailable:  # this server has no store
        running.stub.GetOffers(pb.GetOffersRequest(user_id=GARDEN_USER), metadata=metadata)
    for failed, code in ((invalid, grpc.StatusCode.INVALID_ARGUMENT),
                         (unavailable, grpc.StatusCode.UNAVAILABLE)):  # fmt: skip
        error = failed.value
        assert isinstance(error, grpc.Call) and error.code() == code
        assert ("x-request-id", "bad-1") in error.trailing_metadata()
    assert rpc_status.from_call(invalid.value) is not None  # the details survived the merge


def test_model_info_describes_the_serving_version(running: RunningServer) -> None:
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    model = running.server.store.require()
    assert info.model_version == model.version
    assert info.provider == "CPUExecutionProvider"
    assert (info.item_count, info.user_count) == (30, 40)
    assert dict(info.metrics) == {"ndcg@10": 0.5, "recall@10": 0.25}
    assert info.created_at == model.manifest.created_at
    assert info.requested_device == "cpu"


def test_access_log_names_method_status_and_request_id(
    stub: pb_grpc.DiscountServiceStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="discountd.access")
    with pytest.raises(grpc.RpcError):
        stub.Recommend(pb.RecommendRequest(user_id=""), metadata=(("x-request-id", "r-1"),))
    stub.Recommend(pb.RecommendRequest(user_id=GARDEN_USER), metadata=(("x-request-id", "r-2"),))
    lines = [r.getMessage() for r in caplog.records if r.name == "discountd.access"]
    assert any(
        "/discount.v1.DiscountService/Recommend INVALID_ARGUMENT" in line
        and "request_id=r-1" in line
        for line in lines
    ), lines
    assert any("Recommend OK" in line and "request_id=r-2" in line for line in lines), lines


def test_recent_items_nobody_bought_in_training_fall_back_to_popularity(
    tmp_path: Path, tiny_shop: TinyShop
) -> None:
    # A new arrival: in the catalog, bought by nobody in training, so its factors say nothing.
    bought = tiny_shop.dataset.interactions
    keep = bought.item_index != 0
    interactions = Interactions(
        bought.user_index[keep],
        bought.item_index[keep],
        bought.timestamp[keep],
        [e for e, k in zip(bought.event, keep, strict=True) if k],
        bought.quantity[keep],
        bought.price[keep],
    )
    shop = replace(tiny_shop, dataset=replace(tiny_shop.dataset, interactions=interactions))
    model = load_version(write_tiny_artifact(tmp_path, shop), "cpu")
    new_arrival, bestseller = "00000", model.item_ids[int(model.popularity[0])]

    alone = recommend(model, RecommendQuery("new-shopper", 5, recent_item_ids=[new_arrival]))
    assert alone.cold_start == ColdStart.POPULARITY
    assert alone.items[0].item_id == bestseller
    assert new_arrival not in {i.item_id for i in alone.items}, "recent items count as bought"

    with_signal = recommend(
        model, RecommendQuery("new-shopper", 5, recent_item_ids=[new_arrival, bestseller])
    )
    assert with_signal.cold_start == ColdStart.FOLD_IN
