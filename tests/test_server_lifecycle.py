"""Readiness, reflection and model versions: a real server on port 0 over a copy of the store."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import onnx
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from onnx import TensorProto, helper

from core.artifact import CURRENT, load_manifest, seal, set_current
from discount.v1 import discount_pb2 as pb
from server.errors import DeviceUnavailable
from server.limits import MAX_HEALTH_SERVICE_CHARS, PROBE_SLOTS
from server.model import CUDA, load_version
from server.versions import ModelStore, ort_threads_for
from tests.conftest import RunningServer
from tests.offer_server import eventually

SERVICE = "discount.v1.DiscountService"
Serve = Callable[..., RunningServer]


def current_version(store: Path) -> str:
    return (store / CURRENT).read_text().strip()


@pytest.fixture
def store(tmp_path: Path, model_store: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(model_store, copy)
    return copy


def add_version(store: Path, source: Path, name: str) -> Path:
    target = store / name
    shutil.copytree(source, target)
    return target


def garden_user_taste(running: RunningServer) -> str:
    """The one category of user-0's top three (a mix fails here, not by luck of set order)."""
    reply = running.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=3))
    (taste,) = {item.category for item in reply.items}
    return taste


def test_health_is_not_serving_until_a_model_loads(
    tmp_path: Path, model_store: Path, serve: Serve
) -> None:
    empty = tmp_path / "empty-store"
    empty.mkdir()
    running = serve(empty, poll_interval=0.05)
    running.wait_first_load()
    health = health_pb2_grpc.HealthStub(running.channel)
    for service in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    for call, request in (
        (running.stub.Recommend, pb.RecommendRequest(user_id="user-0")),
        (running.stub.GetModelInfo, pb.GetModelInfoRequest()),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call(request)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no model loaded yet" in raised.value.details()

    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    version = current_version(model_store)
    add_version(empty, model_store / version, version)
    set_current(empty, version)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert running.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == version


def test_health_watch_streams_are_capped(store: Path, serve: Serve) -> None:
    # Health needs no token, and each open Watch holds a gRPC call slot: uncapped, a caller
    # could hold them all and leave the port answering nobody.
    # More streams than the probe slots, and a call cap of one: only slots of their own, on
    # top of gRPC's cap, leave room for the streams, a probe and a call all at once.
    cap = PROBE_SLOTS + 2
    running = serve(store, max_health_watches=cap, max_concurrent_rpcs=1)
    running.wait_first_load()
    health = health_pb2_grpc.HealthStub(running.channel)
    request = health_pb2.HealthCheckRequest(service=SERVICE)
    watches = [health.Watch(request, timeout=60) for _ in range(cap)]
    for watch in watches:
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as refused:
        next(health.Watch(request, timeout=30))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.details() == (
        f"{cap} health Watch streams open already; retry with backoff, or poll Check"
    )
    assert health.Check(request).status == health_pb2.HealthCheckResponse.SERVING
    assert running.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version
    # A closed stream gives its slot back.
    watches[0].cancel()
    eventually(lambda: running.server.health.watching == cap - 1, 10.0)
    reopened = health.Watch(request, timeout=30)
    assert next(reopened).status == health_pb2.HealthCheckResponse.SERVING
    reopened.cancel()
    for watch in watches[1:]:
        watch.cancel()


def test_a_health_watch_for_an_overlong_name_is_refused_at_once(store: Path, serve: Serve) -> None:
    # Anyone may Watch, and a stream held its request for as long as it stayed open: 64 of them
    # naming a 4 MiB service held 1 GB of the server's memory (~16 MB each), 256 held 5 GB.
    running = serve(store)
    running.wait_first_load()
    health = health_pb2_grpc.HealthStub(running.channel)
    overlong = health_pb2.HealthCheckRequest(service="x" * (MAX_HEALTH_SERVICE_CHARS + 1))
    with pytest.raises(grpc.RpcError) as refused:
        next(health.Watch(overlong, timeout=30))
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert "x" * 20 not in (refused.value.details() or "")
    assert running.server.health.watching == 0
    # A name within the limit that names nothing yet is watched, as the health protocol says.
    unknown = health.Watch(health_pb2.HealthCheckRequest(service="y" * 10), timeout=30)
    assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    unknown.cancel()


def test_a_connection_past_its_age_is_closed_and_its_client_reconnects(
    store: Path, serve: Serve
) -> None:
    running = serve(store, max_connection_age=1.0, max_connection_age_grace=0.5)
    running.wait_first_load()
    # A call whose request never arrives: it holds a slot of gRPC's call cap until its
    # connection goes, which the connection's age now decides, not the caller.
    never = threading.Event()

    def no_request() -> Iterator[bytes]:
        never.wait()
        yield b""

    stalled = running.channel.stream_stream(f"/{SERVICE}/Recommend")(no_request(), timeout=30)
    with pytest.raises(grpc.RpcError) as closed:
        next(stalled)
    never.set()
    assert closed.value.code() == grpc.StatusCode.UNAVAILABLE  # not DEADLINE_EXCEEDED
    # The same channel reconnects for the next call.
    assert running.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version


def test_reflection_lists_the_services(store: Path, serve: Serve) -> None:
    running = serve(store)
    database = ProtoReflectionDescriptorDatabase(running.channel)
    services = set(database.get_services())
    assert {SERVICE, "grpc.health.v1.Health"} <= services
    # A client with no .proto file (grpcurl, ghz) learns the request type this way.
    service = DescriptorPool(database).FindServiceByName(SERVICE)
    recommend = service.methods_by_name["Recommend"]
    assert recommend.input_type.full_name == "discount.v1.RecommendRequest"
    assert "user_id" in recommend.input_type.fields_by_name


def test_a_new_current_version_is_picked_up(
    store: Path, flipped_version: Path, serve: Serve
) -> None:
    running = serve(store, poll_interval=0.05)
    running.wait_first_load()
    assert garden_user_taste(running) == "garden"
    health = health_pb2_grpc.HealthStub(running.channel)
    add_version(store, flipped_version, flipped_version.name)
    set_current(store, flipped_version.name)
    running.call(asyncio.wait_for(serving(running, flipped_version.name), timeout=30))
    assert running.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == (
        flipped_version.name
    )
    assert garden_user_taste(running) == "kitchen"
    status = health.Check(health_pb2.HealthCheckRequest(service=SERVICE)).status
    assert status == health_pb2.HealthCheckResponse.SERVING


async def serving(running: RunningServer, version: str) -> None:
    """Return once the server's poller has switched to version."""
    while running.server.store.current is None or running.server.store.current.version != version:
        await asyncio.sleep(0.02)


def flip_a_byte(version: Path) -> None:
    model = version / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))


def wrong_signature(version: Path, graph_file: str = "model.onnx") -> None:
    """A valid ONNX graph with other inputs, resealed so its sha256 matches the manifest."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["user"], ["top_items"])],
        "other",
        [helper.make_tensor_value_info("user", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("top_items", TensorProto.INT64, ["batch"])],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
        version / graph_file,
    )
    seal(version, load_manifest(version, verify=False))


def wrong_score_signature(version: Path) -> None:
    wrong_signature(version, "score.onnx")


def format_1(version: Path) -> None:
    """A version written before score.onnx existed."""
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))


def drop_items_file(version: Path) -> None:
    (version / "items.json").unlink()


def unlisted_user_features(version: Path) -> None:
    """user_features.json left out of the manifest: its bytes would reach offers unverified."""
    manifest = json.loads((version / "manifest.json").read_text())
    del manifest["files"]["user_features.json"]
    (version / "manifest.json").write_text(json.dumps(manifest))


def items_without_categories(version: Path) -> None:
    """Sealed, so every sha256 matches, but items.json lacks a key the loader reads."""
    items = json.loads((version / "items.json").read_text())
    del items["category"]
    (version / "items.json").write_text(json.dumps(items))
    seal(version, load_manifest(version, verify=False))


def a_response_model(version: Path) -> None:
    """The folder `discount-train response` writes, named as a model version by mistake."""
    manifest = json.loads((version / "manifest.json").read_text())
    (version / "manifest.json").write_text(json.dumps({**manifest, "kind": "response"}))


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (flip_a_byte, "model.onnx does not match its sha256"),
        (wrong_signature, "model.onnx inputs are"),
        (wrong_score_signature, "score.onnx inputs are"),
        (drop_items_file, "items.json listed in the manifest is missing"),
        (unlisted_user_features, "user_features.json not listed in the manifest"),
        (items_without_categories, "malformed version (KeyError('category'))"),
        (format_1, "format_version 1, this build reads 2; train and export it again"),
        (a_response_model, "discountd takes it as --response-model-dir"),
    ],
)
def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(
    store: Path,
    flipped_version: Path,
    serve: Serve,
    break_it: Callable[[Path], None],
    reason: str,
) -> None:
    running = serve(store)
    running.wait_first_load()
    old = current_version(store)
    broken = add_version(store, flipped_version, "20991231-000000-broken")
    break_it(broken)
    set_current(store, broken.name)
    assert running.call(running.server.reload()) is False
    assert reason in (running.server.store.last_error or "")
    info = running.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.model_version == old
    assert garden_user_taste(running) == "garden"
    # Pointing CURRENT at a sound version again switches without a restart.
    set_current(store, flipped_version.name)
    add_version(store, flipped_version, flipped_version.name)
    assert running.call(running.server.reload(force=False)) is True
    assert running.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == (
        flipped_version.name
    )


def test_a_reload_asked_for_that_fails_again_is_logged_again(
    store: Path, flipped_version: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = ModelStore(store, "cpu", 1)
    broken = add_version(store, flipped_version, "20991231-000000-broken")
    flip_a_byte(broken)

    async def poll_twice_then_sighup() -> None:
        assert await models.reload()
        set_current(store, broken.name)
        for force in (False, False, True):
            assert await models.reload(force=force) is False

    with caplog.at_level(logging.ERROR, logger="server.versions"):
        asyncio.run(poll_twice_then_sighup())
    # The poller's repeat is not logged; the operator's retry is, or it looks ignored.
    refusals = [r for r in caplog.records if "refused 20991231-000000-broken" in r.message]
    assert len(refusals) == 2


def test_cuda_is_used_or_refused_never_silently_replaced(model_store: Path) -> None:
    version = model_store / current_version(model_store)
    try:
        model = load_version(version, "cuda")
    except DeviceUnavailable as e:
        assert "--device" in str(e)
    else:
        assert model.provider == CUDA


def test_onnx_runtime_threads_follow_the_catalog_unless_given(model_store: Path) -> None:
    n_items = load_manifest(model_store / current_version(model_store)).n_items
    for given, expected in ((0, ort_threads_for(os.cpu_count() or 1, 2, n_items)), (3, 3)):
        models = ModelStore(model_store, "cpu", given, workers=2)
        assert asyncio.run(models.reload()) is True
        assert models.current is not None
        options = models.current.session.get_session_options()
        assert options.intra_op_num_threads == expected


def test_a_current_that_is_not_utf8_is_refused_naming_the_file(store: Path) -> None:
    models = ModelStore(store, "cpu", 1)
    (store / CURRENT).write_bytes(b"\xff\xfe\x00bad")
    assert asyncio.run(models.reload(force=True)) is False
    assert f"{store / CURRENT}: not UTF-8 text" in (models.last_error or "")
