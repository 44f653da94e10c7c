"""Client auth through a real server and real discountctl: deny by default, health open,
revocation reaches the running server, the client's name (never its token) in the access log,
reflection switchable."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cli import ctl
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from offer_server import eventually
from secure_server import ServerThread
from secure_server import settings as server_settings

from core.store import migrate
from core.store.clients import Clients
from core.store.db import Store
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from server import decoding
from server.auth import ClientRegistry, bearer_token

pytestmark = pytest.mark.timeout(120)
RECOMMEND = pb.RecommendRequest(user_id="user-0", limit=3)


def create_client(db_url: str, name: str) -> str:
    result = ctl(db_url, "clients", "create", name, "--output", "json")
    assert result.exit_code == 0, result.output
    token = json.loads(result.stdout)["token"]
    assert isinstance(token, str) and token.startswith("dct_") and len(token) > 40
    return token


def wait_until_accepted(stub: pb_grpc.DiscountServiceStub, token: str) -> None:
    """The server hears about a new client at its next refresh (NOTIFY, or a 0.2 s poll)."""
    eventually(
        lambda: (
            status_of(lambda: stub.Recommend(RECOMMEND, metadata=bearer(token)))[0]
            == grpc.StatusCode.OK
        ),
        timeout=10,
    )


@pytest.fixture
def server(model_store: Path, db_url: str) -> Iterator[ServerThread]:
    # On PostgreSQL a slow poll: only LISTEN/NOTIFY can make client changes visible in 10 s.
    poll = 0.2 if db_url.startswith("sqlite") else 30.0
    running = ServerThread(
        server_settings(model_store, db_url, auth="required", rules_poll_interval=poll)
    )
    yield running
    running.close()


@pytest.fixture
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def status_of(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


def test_every_rpc_but_health_needs_a_valid_token(
    server: ServerThread, channel: grpc.Channel, db_url: str
) -> None:
    stub = pb_grpc.DiscountServiceStub(channel)
    code, details = status_of(lambda: stub.Recommend(RECOMMEND))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer TOKEN" in details
    assert "discountctl clients create NAME" in details
    for wrong in ("dct_not-a-token", ""):
        code, details = status_of(lambda w=wrong: stub.Recommend(RECOMMEND, metadata=bearer(w)))
        assert code == grpc.StatusCode.UNAUTHENTICATED, wrong
    for call in (
        lambda: stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=2)),
        lambda: stub.RecordEvents(pb.RecordEventsRequest()),
        lambda: stub.VerifyOffer(pb.VerifyOfferRequest(offer_token="x")),
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest()),
    ):
        assert status_of(call)[0] == grpc.StatusCode.UNAUTHENTICATED
    health = health_pb2_grpc.HealthStub(channel)
    check = health.Check(health_pb2.HealthCheckRequest(service=""))
    assert check.status == health_pb2.HealthCheckResponse.SERVING

    token = create_client(db_url, "checkout")
    wait_until_accepted(stub, token)
    assert len(stub.Recommend(RECOMMEND, metadata=bearer(token)).items) == 3
    offers = stub.GetOffers(pb.GetOffersRequest(user_id="user-0", limit=2), metadata=bearer(token))
    assert len(offers.offers) == 2
    # The scheme is case-insensitive (RFC 6750 §2.1); the token is not.
    assert stub.Recommend(RECOMMEND, metadata=(("authorization", f"bearer {token}"),)).items
    code, _ = status_of(lambda: stub.Recommend(RECOMMEND, metadata=bearer(token.upper())))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_a_token_sent_without_the_bearer_scheme_is_named_as_such(
    server: ServerThread, channel: grpc.Channel, db_url: str
) -> None:
    # A bare token (or another scheme) is there but unusable: "missing" would send the caller
    # looking for metadata it did send. The value, maybe the token itself, is never echoed.
    stub = pb_grpc.DiscountServiceStub(channel)
    token = create_client(db_url, "storefront")
    wait_until_accepted(stub, token)
    for value in (token, f"Token {token}", f"Bearer{token}"):
        code, details = status_of(
            lambda v=value: stub.Recommend(RECOMMEND, metadata=(("authorization", v),))
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED, value
        assert "must be `Bearer TOKEN`" in details and "missing" not in details, details
        assert token not in details
    code, details = status_of(lambda: stub.Recommend(RECOMMEND))
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details.startswith("missing `authorization: Bearer TOKEN` metadata")


def test_without_a_token_nobody_learns_which_methods_exist(
    server: ServerThread, channel: grpc.Channel, db_url: str
) -> None:
    made_up = ("/discount.v1.DiscountService/ListCustomers", "/admin.v1.Admin/Dump")

    def code_of(method: str, streaming: bool, token: str = "") -> grpc.StatusCode:
        metadata = bearer(token) if token else ()
        if streaming:
            stream = channel.stream_stream(method, bytes, bytes)
            return status_of(lambda: list(stream(iter([b""]), metadata=metadata, timeout=10)))[0]
        unary = channel.unary_unary(method, bytes, bytes)
        return status_of(lambda: unary(b"", metadata=metadata, timeout=10))[0]

    for method in made_up:
        for streaming in (False, True):
            assert code_of(method, streaming) == grpc.StatusCode.UNAUTHENTICATED
    token = create_client(db_url, "prober")
    eventually(lambda: code_of(made_up[0], False, token) == grpc.StatusCode.UNIMPLEMENTED, 10)
    assert code_of(made_up[1], True, token) == grpc.StatusCode.UNIMPLEMENTED


def test_a_refused_call_is_never_decoded(
    model_store: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # protobuf grows a 4 MiB request of empty events into ~200 MB: a caller without a token
    # must not be able to make the server parse one, let alone many at once.
    decoded: list[str] = []
    real_decoder = decoding._decoder

    def counting(message: type[Message]) -> Callable[[bytes], Any]:
        decode = real_decoder(message)

        def counted(data: bytes) -> Any:
            decoded.append(message.DESCRIPTOR.name)
            return decode(data)

        return counted

    monkeypatch.setattr(decoding, "_decoder", counting)
    running = ServerThread(server_settings(model_store, db_url, auth="required"))
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.DiscountServiceStub(channel)
            events = pb.RecordEventsRequest(events=[pb.Event()] * 10_000)
            for metadata in ((), bearer("dct_wrong")):
                code, _ = status_of(lambda m=metadata: stub.RecordEvents(events, metadata=m))
                assert code == grpc.StatusCode.UNAUTHENTICATED
            assert decoded == []
            token = create_client(db_url, "events")
            eventually(
                lambda: (
                    status_of(
                        lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=bearer(token))
                    )[0]
                    == grpc.StatusCode.OK
                ),
                timeout=10,
            )
            assert "GetModelInfoRequest" in decoded
    finally:
        running.close()


def test_revocation_reaches_the_running_server(
    server: ServerThread, channel: grpc.Channel, db_url: str
) -> None:
    stub = pb_grpc.DiscountServiceStub(channel)
    keep, drop = create_client(db_url, "storefront"), create_client(db_url, "email")
    eventually(
        lambda: (
            status_of(lambda: stub.Recommend(RECOMMEND, metadata=bearer(drop)))[0]
            == grpc.StatusCode.OK
        ),
        timeout=10,
    )
    assert ctl(db_url, "clients", "revoke", "email", "--yes").exit_code == 0
    code, details = eventually(
        lambda: (
            result
            if (result := status_of(lambda: stub.Recommend(RECOMMEND, metadata=bearer(drop))))[0]
            != grpc.StatusCode.OK
            else None
        ),
        timeout=10,
    )
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details
    assert stub.Recommend(RECOMMEND, metadata=bearer(keep)).items
    listed = json.loads(ctl(db_url, "clients", "list", "-o", "json").stdout)
    assert {(c["name"], c["active"]) for c in listed} == {("storefront", True), ("email", False)}
    assert all("token" not in c for c in listed)


def test_access_log_names_the_client_never_the_token(
    server: ServerThread, channel: grpc.Channel, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    stub = pb_grpc.DiscountServiceStub(channel)
    token = create_client(db_url, "cart")
    caplog.set_level(logging.DEBUG)
    wait_until_accepted(stub, token)
    status_of(lambda: stub.Recommend(RECOMMEND, metadata=bearer("dct_wrong")))

    def access_lines() -> list[str] | None:
        lines = [r.getMessage() for r in caplog.records if r.name == "discountd.access"]
        # A refused call's line can land just after the caller has its status: wait for it.
        denied = any("Recommend UNAUTHENTICATED" in line and "client=-" in line for line in lines)
        return lines if denied else None

    lines = eventually(access_lines, timeout=10)
    assert any("Recommend OK" in line and "client=cart" in line for line in lines), lines
    assert token not in caplog.text and "dct_wrong" not in caplog.text


def reflect(channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


def test_reflection_needs_a_token_when_auth_is_on(
    server: ServerThread, channel: grpc.Channel, db_url: str
) -> None:
    with pytest.raises(grpc.RpcError) as e:
        reflect(channel)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    token = create_client(db_url, "grpcurl")
    eventually(
        lambda: status_of(lambda: reflect(channel, bearer(token)))[0] == grpc.StatusCode.OK,
        timeout=10,
    )
    assert "discount.v1.DiscountService" in reflect(channel, bearer(token))


def test_reflection_can_be_switched_off(model_store: Path, db_url: str) -> None:
    running = ServerThread(server_settings(model_store, db_url, reflection=False))
    try:
        with grpc.insecure_channel(running.target) as channel:
            with pytest.raises(grpc.RpcError) as e:
                reflect(channel)
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
            stub = pb_grpc.DiscountServiceStub(channel)
            assert stub.Recommend(RECOMMEND).items  # auth off: no token needed
    finally:
        running.close()


def near_misses(token: str) -> st.SearchStrategy[str]:
    """Strings one small edit away from the token, and arbitrary text."""
    cut = st.integers(0, len(token) - 1)
    return st.one_of(
        st.text(max_size=80),
        cut.map(lambda i: token[:i] + token[i + 1 :]),
        cut.map(lambda i: token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]),
        st.text(min_size=1, max_size=3).map(lambda extra: token + extra),
        st.just(token.upper()),
        st.just(token[4:]),  # without the dct_ prefix
    )


def test_only_the_exact_token_of_an_active_client_is_accepted(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    migrate.upgrade(store)
    with store.transaction() as session:
        _, token = Clients(session, "tester").create("svc")
        _, revoked = Clients(session, "tester").create("gone")
        Clients(session, "tester").revoke("gone")
    registry = ClientRegistry()
    with store.transaction() as session:
        registry.load_from(session)
    store.dispose()
    assert registry.name_for(token) == "svc" and registry.name_for(revoked) is None

    @settings(max_examples=300, deadline=None, database=None)
    @given(
        candidate=near_misses(token), scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", ""])
    )
    def check(candidate: str, scheme: str) -> None:
        assert (registry.name_for(candidate) == "svc") == (candidate == token)
        parsed = bearer_token([("authorization", scheme + candidate), ("x-other", b"\x00\xff")])
        if scheme.lower() != "bearer ":
            assert parsed is None
        else:
            assert parsed == candidate.strip()

    check()
