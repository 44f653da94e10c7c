"""Micro-batched Recommend answers exactly what one-at-a-time Recommend answers."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from discount.v1 import discount_pb2 as pb
from tests.conftest import RunningServer, TinyShop
from tests.test_metrics import scrape, value


def requests(shop: TinyShop) -> list[pb.RecommendRequest]:
    """Known users, folded-in visitors and popularity, with every filter and several limits."""
    items = shop.dataset.catalog.item_ids
    out = []
    for n, user in enumerate(shop.dataset.user_ids[:24]):
        out.append(
            pb.RecommendRequest(
                user_id=user,
                limit=1 + n % 7,
                exclude_item_ids=items[n % 5 : n % 5 + n % 4],
                categories=[shop.taste_of_item[n]] if n % 3 == 0 else [],
                include_purchased=n % 4 == 0,
            )
        )
        out.append(
            pb.RecommendRequest(
                user_id=f"visitor-{n}", recent_item_ids=items[n : n + 1 + n % 3], limit=5
            )
        )
    out.append(pb.RecommendRequest(user_id="nobody"))
    return out


def answers(server: RunningServer, calls: list[pb.RecommendRequest]) -> list[pb.RecommendResponse]:
    # Futures put every call in flight at once, so the batcher sees them together.
    futures = [server.stub.Recommend.future(r) for r in calls]
    return [f.result(timeout=30) for f in futures]


def test_batched_equals_single(model_store: Path, tiny_shop: TinyShop) -> None:
    calls = requests(tiny_shop)
    single = RunningServer(model_store, batch_max_size=1, metrics_port=0)
    batched = RunningServer(
        model_store, batch_max_size=32, batch_max_wait_us=50_000, metrics_port=0
    )
    try:
        single.wait_first_load()
        batched.wait_first_load()
        alone = [single.stub.Recommend(r) for r in calls]
        together = answers(batched, calls)
        samples = scrape(batched)
        unbatched = scrape(single)
    finally:
        single.close()
        batched.close()
    assert together == alone
    runs = value(samples, "discountd_inference_batch_size_count")
    users = value(samples, "discountd_inference_batch_size_sum")
    assert users == len(calls) - 1, "every call but the popularity one ran the model"
    assert runs < users, "no two calls shared a run: nothing was batched"
    assert value(unbatched, "discountd_inference_batch_size_count") == len(calls) - 1


def test_a_bad_call_does_not_fail_its_batch(model_store: Path, tiny_shop: TinyShop) -> None:
    """A call refused by validation (an unknown category) fails alone; the one beside it is
    answered. Validation runs before a call joins a batch, so this guards that order."""
    server = RunningServer(model_store, batch_max_size=8, batch_max_wait_us=50_000)
    try:
        server.wait_first_load()
        good = server.stub.Recommend.future(pb.RecommendRequest(user_id="user-0", limit=3))
        bad = server.stub.Recommend.future(
            pb.RecommendRequest(user_id="user-1", categories=["no-such-category"])
        )
        assert len(good.result(timeout=30).items) == 3
        with pytest.raises(grpc.RpcError) as raised:
            bad.result(timeout=30)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.close()


def test_a_caller_gone_from_a_batch_does_not_fail_it(model_store: Path) -> None:
    """A call whose deadline passes while its batch gathers (50 ms here) is cancelled inside
    the batch; the run then finds its future done, and the others must still get answers."""
    server = RunningServer(model_store, batch_max_size=8, batch_max_wait_us=50_000)
    try:
        server.wait_first_load()
        alone = server.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=3))
        first = server.stub.Recommend.future(pb.RecommendRequest(user_id="user-0", limit=3))
        gone = server.stub.Recommend.future(
            pb.RecommendRequest(user_id="user-1", limit=3), timeout=0.01
        )
        last = server.stub.Recommend.future(pb.RecommendRequest(user_id="user-0", limit=3))
        with pytest.raises(grpc.RpcError) as raised:
            gone.result(timeout=30)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert first.result(timeout=30) == alone and last.result(timeout=30) == alone
    finally:
        server.close()
