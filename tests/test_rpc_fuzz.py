"""Random and malformed requests for every RPC against a real server with a store.

Typed requests with hostile field values, and raw bytes that are not (or are broken) protobuf
sent through a generic channel. The server may refuse anything, but never with INTERNAL or
UNKNOWN, and it still answers health checks SERVING afterwards. `pytest -s` prints how many
cases ran and which statuses they got.
"""

from __future__ import annotations

import math
import string
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from offer_server import ten_percent_off_everything
from secure_server import KEY
from server_thread import bad_requests
from sqlalchemy import select

from core.features import FEATURE_NAMES
from core.offer_token import OfferKeys
from core.store.db import Store
from core.store.tables import Event
from discount.v1 import discount_pb2 as pb
from server.limits import MAX_RECEIVE_MESSAGE_BYTES, shorten
from tests.conftest import RunningServer

FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# A caller's default limit on trailing metadata is 8 KiB (past it the call fails at random with
# "Stream removed"); an error status, whatever the request echoes, stays well under it.
STATUS_BYTES = 6 * 1024
# gRPC percent-encodes a status message except printable ASCII other than "%".
UNENCODED = "".join(c for c in string.printable if " " <= c <= "~" and c != "%")
# RESOURCE_EXHAUSTED: only for a request over the size limit (outcome checks).
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SQL = [
    "'; DROP TABLE discount.events; --",
    "Robert'); DROP TABLE students;--",
    "1 OR 1=1",
    '" OR ""="',
    "%' AND 1=0 UNION SELECT offer_id FROM offers --",
    "\\'; SELECT pg_sleep(10); --",
]
FUZZ = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
seen: Counter[tuple[str, str]] = Counter()

# Text that protobuf accepts (no lone surrogates: those only travel as raw bytes, below).
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(SQL),
    st.sampled_from(
        ["", " ", "\x00", "user-0", "00001", "🎁" * 50, "é" * 200_000, "x" * 1_000_000]
    ),
    st.text(alphabet=st.characters(min_codepoint=0x10000), max_size=20),
)
known_users = st.sampled_from(["user-0", "user-7", "user-39", "someone-new"])
known_items = st.lists(st.sampled_from([f"{i:05d}" for i in range(30)]), max_size=5)
id_lists = st.one_of(
    known_items,
    st.lists(texts, max_size=5),
    st.just([f"{i % 30:05d}" for i in range(1001)]),
    st.just([""] * 3),
)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
numbers_as_text = st.sampled_from(["nan", "NaN", "inf", "-inf", "1e309", "-0", "1e-400", "0x10"])
contexts = st.one_of(
    st.dictionaries(texts, texts, max_size=4),
    st.dictionaries(st.sampled_from(FEATURE_NAMES), st.one_of(numbers_as_text, texts), max_size=6),
    st.just({f"k{i}": "1" for i in range(65)}),
)
events = st.builds(
    pb.Event,
    event_id=texts,
    type=st.integers(-3, 9),
    user_id=texts,
    item_id=texts,
    offer_id=texts,
    revenue_cents=int64,
    quantity=int32,
    occurred_at=int64,
)
event_lists = st.one_of(
    st.lists(events, max_size=4),
    st.integers(1001, 1002).map(
        lambda n: [pb.Event(event_id=f"many-{i}", type=pb.EVENT_TYPE_CLICK) for i in range(n)]
    ),
)


@pytest.fixture(scope="module")
def running(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'store.db'}"
    ten_percent_off_everything(url)
    server = RunningServer(model_store, db_url=url, offer_keys=OfferKeys(KEY))
    server.wait_first_load()
    server.url = url  # type: ignore[attr-defined]
    yield server
    health = health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
    server.close()
    print(f"\nRPC fuzz: {sum(seen.values())} calls; statuses: {dict(sorted(seen.items()))}")
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def outcome(rpc: str, send: Callable[[], Any], size: int) -> grpc.StatusCode:
    """The call's status; RESOURCE_EXHAUSTED only for a request over the size limit (an echo
    of a huge field in a reply or an error message must not exceed the caller's limits)."""
    try:
        send()
        code = grpc.StatusCode.OK
    except grpc.RpcError as e:
        code = e.code()
        assert code not in FORBIDDEN, f"{rpc}: {code.name}: {e.details()}"
        assert status_bytes(e) <= STATUS_BYTES, f"{rpc}: {code.name}: {e.details()[:200]}"
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            assert size > MAX_RECEIVE_MESSAGE_BYTES, f"{rpc}, {size} bytes: {e.details()}"
    seen[(rpc, code.name)] += 1
    return code


def sent_len(message: str) -> int:
    return len(urllib.parse.quote(message, safe=UNENCODED))


def status_bytes(error: Any) -> int:
    """The error's trailing metadata as gRPC sent it: the message percent-encoded, binary
    values (the status details) in base64."""
    metadata = error.trailing_metadata() or ()
    return sent_len(error.details() or "") + sum(
        len(key) + (math.ceil(len(value) / 3) * 4 if key.endswith("-bin") else len(value))
        for key, value in metadata
    )


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(texts, st.text(max_size=300)), limit=st.integers(3, 400))
def test_shortened_text_fits_its_budget_as_sent(text: str, limit: int) -> None:
    short = shorten(text, limit)
    assert sent_len(short) <= limit
    if sent_len(text) <= limit:
        assert short == text
    else:
        assert short.endswith("...") and text.startswith(short[:-3])
        assert sent_len(text[: len(short) - 2]) > limit - 3  # no more of the text would fit


def test_the_largest_error_a_request_can_cause_stays_under_the_callers_limit(
    running: RunningServer,
) -> None:
    """Every GetOffers check fails at once, and the values echoed are long and non-ASCII."""
    context = {f"k{i}": "1" for i in range(64)} | {"avg_basket": "🎁" * 100_000}
    request = pb.GetOffersRequest(
        user_id="é" * 5000, item_ids=[""] * 1001, limit=-1, context=context
    )
    with pytest.raises(grpc.RpcError) as failed:
        running.stub.GetOffers(request, metadata=(("x-request-id", "r" * 4000),), timeout=30)
    error = failed.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert status_bytes(error) <= STATUS_BYTES
    assert ("x-request-id", "r" * 128) in error.trailing_metadata()
    bad = bad_requests(error)[0]
    fields = [v.field for v in bad.field_violations]
    assert fields == ["user_id", "limit", "item_ids", "item_ids", "context", "context[avg_basket]"]
    assert bad.field_violations[-1].description.endswith("...")


@FUZZ
@given(
    user_id=st.one_of(known_users, texts),
    limit=st.one_of(st.integers(0, 40), int32),
    exclude=id_lists,
    recent=id_lists,
    categories=id_lists,
    include=st.booleans(),
)
def test_recommend(
    running: RunningServer,
    user_id: str,
    limit: int,
    exclude: list[str],
    recent: list[str],
    categories: list[str],
    include: bool,
) -> None:
    request = pb.RecommendRequest(
        user_id=user_id,
        limit=limit,
        exclude_item_ids=exclude,
        recent_item_ids=recent,
        categories=categories,
        include_purchased=include,
    )
    code = outcome(
        "Recommend", lambda: running.stub.Recommend(request, timeout=30), request.ByteSize()
    )
    assert code in REFUSALS | {grpc.StatusCode.OK}


@FUZZ
@given(
    user_id=st.one_of(known_users, texts),
    item_ids=id_lists,
    limit=st.one_of(st.integers(0, 40), int32),
    context=st.one_of(st.just({}), contexts),
)
def test_get_offers(
    running: RunningServer, user_id: str, item_ids: list[str], limit: int, context: dict[str, str]
) -> None:
    request = pb.GetOffersRequest(user_id=user_id, item_ids=item_ids, limit=limit, context=context)
    code = outcome(
        "GetOffers", lambda: running.stub.GetOffers(request, timeout=30), request.ByteSize()
    )
    assert code in REFUSALS | {grpc.StatusCode.OK}


@FUZZ
@given(batch=event_lists)
def test_record_events(running: RunningServer, batch: list[pb.Event]) -> None:
    request = pb.RecordEventsRequest(events=batch)
    code = outcome(
        "RecordEvents", lambda: running.stub.RecordEvents(request, timeout=30), request.ByteSize()
    )
    assert code in REFUSALS | {grpc.StatusCode.OK}


@FUZZ
@given(token=st.one_of(texts, st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-=")))
def test_verify_offer(running: RunningServer, token: str) -> None:
    request = pb.VerifyOfferRequest(offer_token=token)
    code = outcome(
        "VerifyOffer", lambda: running.stub.VerifyOffer(request, timeout=30), request.ByteSize()
    )
    assert code in REFUSALS | {grpc.StatusCode.OK}


METHODS = [f"/discount.v1.DiscountService/{m}" for m in pb.DESCRIPTOR.services_by_name[
    "DiscountService"].methods_by_name]  # fmt: skip
# Hand-made wire bytes protobuf itself never writes: a lone surrogate and bare continuation
# bytes as field 1 (user_id, event's message, token), a length past the end, a wrong wire type.
BROKEN = [
    b"\x0a\x03\xed\xa0\x80",
    b"\x0a\x02\x80\x80",
    b"\x0a\x7f\x61",
    b"\x0d\x00\x00\xc0\x7f",  # field 1 as a fixed32 NaN
    b"\x11\x00\x00\x00\x00\x00\x00\xf0\x7f",  # field 2 as a double +inf
    b"\x0a\x05\x0a\x03\xed\xa0\x80",  # an Event whose event_id is a lone surrogate
    b"\xff" * 16,
]


@FUZZ
@given(
    method=st.sampled_from(METHODS),
    body=st.one_of(st.binary(max_size=512), st.sampled_from(BROKEN)),
)
def test_raw_bytes(running: RunningServer, method: str, body: bytes) -> None:
    call = running.channel.unary_unary(method)  # no serializers: the bytes go out as they are
    rpc = f"raw {method.rsplit('/', 1)[1]}"
    outcome(rpc, lambda: call(body, timeout=30), len(body))


def test_a_user_id_postgresql_cannot_store_gets_no_offer(running: RunningServer) -> None:
    """A NUL in the user id would make the offer log's insert fail on PostgreSQL for good,
    holding back every offer queued after it: refused before any token is handed out."""
    with pytest.raises(grpc.RpcError) as refused:
        running.stub.GetOffers(pb.GetOffersRequest(user_id="user-0\x00", limit=1))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "user_id: must not contain control characters" in refused.value.details()


@pytest.mark.parametrize("text", SQL)
def test_sql_looking_ids_are_stored_and_returned_literally(
    running: RunningServer, text: str
) -> None:
    # The fuzz tests may have stored `text` itself as an event id: this one is new.
    event_id = f"{text} /* literal */"
    event = pb.Event(event_id=event_id, type=pb.EVENT_TYPE_CLICK, user_id=text, item_id="00001")
    reply = running.stub.RecordEvents(pb.RecordEventsRequest(events=[event]))
    assert reply.results[0].event_id == event_id
    assert reply.results[0].status == pb.EVENT_STATUS_ACCEPTED
    store = Store(running.url)  # type: ignore[attr-defined]
    try:
        with store.transaction() as session:
            row = session.scalars(select(Event).where(Event.event_id == event_id)).one()
        assert row.user_id == text
    finally:
        store.dispose()
    offers = running.stub.GetOffers(pb.GetOffersRequest(user_id=text, limit=1)).offers
    verdict = running.stub.VerifyOffer(pb.VerifyOfferRequest(offer_token=offers[0].offer_token))
    assert verdict.validity == pb.OFFER_VALIDITY_VALID and verdict.user_id == text
