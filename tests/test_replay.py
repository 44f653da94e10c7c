"""discount-train replay against a real discountd with a real store: what it records is what the
experiment report counts, a rerun counts nothing twice, and its shoppers and decisions follow
from the seed alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from certs import Authority, mutual_tls
from cli import ctl
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from secure_server import ServerThread
from secure_server import settings as server_settings
from sqlalchemy import func, select

from admin.report import report
from core.artifact import current_version_dir
from core.store.db import Store
from core.store.migrate import upgrade
from core.store.tables import Event
from discount.v1 import discount_pb2 as pb
from server.tls import TlsFiles
from trainer.cli import replay_command
from trainer.config import MarketConfig
from trainer.data import load_files
from trainer.market import make_market
from trainer.replay import (
    ReplayConfig,
    ReplayResult,
    pick_shoppers,
    read_users,
    relevance_of_rank,
    replay,
    shopper_events,
    shopper_rows,
)

pytestmark = pytest.mark.timeout(120)
EXPERIMENT = "tiered-ab"


@pytest.fixture
def shop_db(tmp_path: Path, model_store: Path) -> str:
    """A store governing the tiny shop: a tiered rule measured by a 50/50 experiment, the model
    version active (its costs give the report's margin)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    upgrade(store)
    store.dispose()
    steps = [
        ["rules", "create", "tier", "--policy", "tiered_topk", "--param", "k1=2",
         "--param", "d1=20", "--param", "d2=5", "--max-discount", "30"],
        ["experiments", "create", EXPERIMENT, "--variant", "control:50",
         "--variant", "treatment:50:tier", "--salt", "replay-test"],
        ["experiments", "start", EXPERIMENT],
        ["models", "register", str(current_version_dir(model_store))],
        ["models", "promote", current_version_dir(model_store).name],
    ]  # fmt: skip
    for args in steps:
        result = ctl(url, *args)
        assert result.exit_code == 0, result.output
    return url


@pytest.fixture
def token(shop_db: str) -> str:
    created = ctl(shop_db, "clients", "create", "replayer", "--output", "json")
    value: str = json.loads(created.stdout)["token"]
    return value


@pytest.fixture
def server(model_store: Path, shop_db: str, token: str) -> Iterator[ServerThread]:
    # The token exists before the server starts, so its first snapshot of clients knows it.
    running = ServerThread(server_settings(model_store, shop_db, auth="required"))
    yield running
    if not running.loop.is_closed():  # a test may have stopped it to read the offer log
        running.close()


def _events(url: str) -> dict[str, tuple[int, float]]:
    """type → (events, revenue) as stored."""
    store = Store(url)
    try:
        with store.transaction() as s:
            rows = s.execute(
                select(Event.type, func.count(), func.sum(Event.revenue)).group_by(Event.type)
            )
            return {kind: (int(n), float(revenue or 0)) for kind, n, revenue in rows}
    finally:
        store.dispose()


def _report(url: str) -> dict[str, dict[str, object]]:
    store = Store(url)
    try:
        with store.transaction() as s:
            rows = report(s, EXPERIMENT, datetime.now(UTC))["variants"]
            return {row["variant"]: row for row in rows}
    finally:
        store.dispose()


def test_replay_records_what_the_report_counts_and_a_rerun_counts_nothing_twice(
    server: ServerThread, shop_db: str, token: str
) -> None:
    known = [f"user-{u}" for u in range(40)]
    config = ReplayConfig(target=server.target, shoppers=120, seed=3, token=token, concurrency=4)
    first: ReplayResult = asyncio.run(replay(config, known))
    stored = _events(shop_db)
    tallies = first.variants.values()
    assert set(first.variants) == {"control", "treatment"}
    assert first.rejected == 0 and first.duplicate == 0
    assert first.accepted == sum(n for n, _ in stored.values())
    assert stored["impression"][0] == sum(t.offers for t in tallies)
    assert stored["click"][0] == sum(t.clicks for t in tallies)
    bought = stored.get("purchase", (0, 0.0))[0] + stored.get("redemption", (0, 0.0))[0]
    assert bought == sum(t.purchases for t in tallies) == stored["add_to_cart"][0] > 0
    revenue = stored.get("purchase", (0, 0.0))[1] + stored.get("redemption", (0, 0.0))[1]
    assert revenue == pytest.approx(sum(t.revenue_cents for t in tallies) / 100)
    # The control gives no discount, so everything it sold is a purchase, never a redemption.
    assert first.variants["control"].discounted == first.variants["control"].discount_cents == 0
    assert first.variants["treatment"].discounted == first.variants["treatment"].offers

    again = asyncio.run(replay(config, known))
    assert again.accepted == 0 and again.duplicate == first.accepted
    assert _events(shop_db) == stored

    server.close()  # graceful stop flushes the offer log the report reads
    rows = _report(shop_db)
    for variant, tally in first.variants.items():
        row = rows[variant]
        assert row["users_assigned"] == row["users_exposed"] == len(first.users[variant])
        assert row["discount_cost"] == pytest.approx(tally.discount_cents / 100)
        per_user = row["revenue_per_user"]
        assert isinstance(per_user, dict)
        assert per_user["value"] * len(first.users[variant]) == pytest.approx(
            tally.revenue_cents / 100
        )
    assert rows["treatment"]["discount_cost"] > 0


def test_cli_prints_a_summary_per_variant(server: ServerThread, token: str, tmp_path: Path) -> None:
    interactions = tmp_path / "interactions.csv"
    interactions.write_text(
        "user_id,item_id,timestamp\n" + "".join(f"user-{u},00001,1\n" for u in range(40))
    )
    args = ["--target", server.target, "--users-from", str(interactions), "--shoppers", "30",
            "--seed", "1", "--new-visitors", "0.2", "--token", token]  # fmt: skip
    result = CliRunner().invoke(replay_command, args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["variant", "users", "visits", "offers"]
    assert {line.split()[0] for line in lines[1:]} == {"control", "treatment"}
    assert sum(int(line.split()[2]) for line in lines[1:]) == 30
    assert "30/30 shoppers" in result.stderr and "0 rejected" in result.stderr


def test_over_tls_with_the_servers_ca(
    model_store: Path, shop_db: str, token: str, tmp_path: Path
) -> None:
    ca = Authority.create("replay test CA")
    cert, key = ca.issue("discountd", server=True).write(tmp_path / "tls", "server")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem.cert)
    running = ServerThread(
        server_settings(model_store, shop_db, auth="required", tls=TlsFiles(cert, key))
    )
    try:
        args = ["--target", running.target, "--users-from", str(_users_file(tmp_path)),
                "--shoppers", "4", "--token", token]  # fmt: skip
        plaintext = CliRunner().invoke(replay_command, [*args, "--wait", "1"])
        assert plaintext.exit_code == 1 and "not SERVING" in plaintext.output
        result = CliRunner().invoke(
            replay_command, [*args, "--tls-ca", str(ca_file), "--wait", "10"]
        )
        assert result.exit_code == 0, result.output
        assert "4/4 shoppers" in result.stderr
    finally:
        running.close()


def test_over_mutual_tls_with_a_client_certificate(
    model_store: Path, shop_db: str, token: str, tmp_path: Path
) -> None:
    tls = mutual_tls(tmp_path)
    running = ServerThread(server_settings(model_store, shop_db, auth="required", tls=tls.server))
    try:
        args = ["--target", running.target, "--users-from", str(_users_file(tmp_path)),
                "--shoppers", "4", "--token", token, "--tls-ca", str(tls.ca)]  # fmt: skip
        without = CliRunner().invoke(replay_command, [*args, "--wait", "1"])
        assert without.exit_code == 1 and "not SERVING" in without.output
        client = ["--tls-cert", str(tls.client_cert), "--tls-key", str(tls.client_key)]
        result = CliRunner().invoke(replay_command, [*args, *client, "--wait", "10"])
        assert result.exit_code == 0, result.output
        assert "4/4 shoppers" in result.stderr
        half = CliRunner().invoke(replay_command, [*args, "--tls-cert", str(tls.client_cert)])
        assert half.exit_code == 2 and "takes --tls-cert, --tls-key and --tls-ca" in half.output
    finally:
        running.close()


def test_without_a_token_the_cli_says_how_to_get_one(server: ServerThread, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        replay_command,
        ["--target", server.target, "--users-from", str(_users_file(tmp_path)), "--shoppers", "2"],
        env={"DISCOUNT_CLIENT_TOKEN": None},
    )
    assert result.exit_code == 1
    assert "UNAUTHENTICATED" in result.output and "pass --token TOKEN" in result.output
    assert "Traceback" not in result.output


def test_nothing_serving_is_one_line(tmp_path: Path) -> None:
    args = ["--target", "127.0.0.1:9", "--users-from", str(_users_file(tmp_path)), "--wait", "0.3"]
    result = CliRunner().invoke(replay_command, args)
    assert result.exit_code == 1
    assert result.output.startswith("Error: 127.0.0.1:9 not SERVING after 0s")
    assert "is discountd running there?" in result.output


def test_a_file_without_user_ids_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "items.csv"
    bad.write_text("item_id,price\n1,2.5\n")
    result = CliRunner().invoke(replay_command, ["--target", "x:1", "--users-from", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {bad}: cannot read user ids")
    assert result.output.count("\n") == 1


def test_online_retail_as_published_points_at_the_model_store(tmp_path: Path) -> None:
    """Its CustomerIDs read "17850.0"; the model knows 17850: the store has the ids as served."""
    retail = tmp_path / "online_retail.csv"
    retail.write_text(
        "InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID,Country\n"
        "536365,85123A,WHITE HANGING HEART,6,2010-12-01 08:26:00,2.55,17850.0,United Kingdom\n"
    )
    result = CliRunner().invoke(replay_command, ["--target", "x:1", "--users-from", str(retail)])
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: {retail}: cannot read user ids")
    assert result.output.endswith(
        "; it is UCI Online Retail as published: give --users-from the model store that "
        "`discount-train fit --format online-retail` wrote, whose users are the ids as "
        "discountd knows them\n"
    )


def test_a_file_with_a_header_and_no_users_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "users.csv"
    empty.write_text("user_id\n")
    result = CliRunner().invoke(replay_command, ["--target", "x:1", "--users-from", str(empty)])
    assert result.exit_code == 1
    assert result.output == (
        f"Error: {empty}: no user ids, so every shopper would be a new visitor; pass the shop's "
        "interactions or model store\n"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target", "127.0.0.1:99999"], "'127.0.0.1:99999': expected HOST:PORT with a port in"),
        (["--target", "localhost"], "'localhost': expected HOST:PORT"),
        (["--target", "x:1", "--tls-ca", "{users}"], "not a PEM certificate"),
    ],
)
def test_a_target_or_ca_that_cannot_work_is_refused_before_waiting(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    users = str(_users_file(tmp_path))
    args = ["--users-from", users, *(a.replace("{users}", users) for a in extra)]
    result = CliRunner().invoke(replay_command, args)
    assert result.exit_code == 2 and message in result.output


@pytest.mark.parametrize("token", ["secret\n", "sec\rret", "sécret", "sec\tret"])
@pytest.mark.parametrize("from_env", [False, True])
def test_a_token_grpc_cannot_send_is_refused_before_any_call(
    tmp_path: Path, token: str, from_env: bool
) -> None:
    """gRPC metadata is printable ASCII: anything else failed every call with a traceback."""
    args = ["--target", "127.0.0.1:9", "--users-from", str(_users_file(tmp_path)), "--wait", "5"]
    env = {"DISCOUNT_CLIENT_TOKEN": token} if from_env else {}
    result = CliRunner().invoke(
        replay_command, args if from_env else [*args, "--token", token], env=env
    )
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--token': must be printable ASCII" in result.output
    assert "not SERVING" not in result.output  # refused before waiting for the server
    assert token not in result.output  # a secret, not echoed


def _users_file(tmp_path: Path) -> Path:
    path = tmp_path / "users.csv"
    path.write_text("user_id\nuser-0\nuser-1\n")
    return path


@settings(max_examples=60, deadline=None)
@given(
    n_known=st.integers(0, 50),
    count=st.integers(1, 200),
    share=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_shoppers_follow_the_seed_and_visit_evenly(
    n_known: int, count: int, share: float, seed: int
) -> None:
    known = [f"k{i}" for i in range(n_known)]
    shoppers = pick_shoppers(known, count, share, seed)
    assert shoppers == pick_shoppers(known, count, share, seed)
    assert len(shoppers) == count
    visitors = [s for s in shoppers if s.startswith("visitor-")]
    assert len(visitors) == (round(count * share) if known else count)
    assert len(set(visitors)) == len(visitors)
    visits = [shoppers.count(k) for k in known]
    # Every known user comes once before anyone comes back.
    assert not visits or max(visits) - min(visits) <= 1


def test_relevance_falls_with_rank_and_unranked_items_are_least_relevant() -> None:
    values = [relevance_of_rank(r) for r in range(1, 30)]
    assert values == sorted(values, reverse=True) and values[0] > values[-1]
    assert relevance_of_rank(0) <= min(values)


MARKET = make_market(MarketConfig(n_users=50, n_items=1, seed=5))


def _reply(discounts: list[float]) -> pb.GetOffersResponse:
    offers = [
        pb.Offer(item_id=f"i{k}", base_price_cents=1000, discount_percent=100 * d,
                 final_price_cents=round(1000 * (1 - d)), offer_id=f"o{k}", rank=k + 1)
        for k, d in enumerate(discounts)
    ]  # fmt: skip
    return pb.GetOffersResponse(offers=offers, variant="treatment")


@settings(max_examples=100, deadline=None)
@given(
    index=st.integers(0, 49),
    low=st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.15]), min_size=1, max_size=8),
    extra=st.floats(0, 0.15),
)
def test_a_larger_discount_never_loses_a_sale(index: int, low: list[float], extra: float) -> None:
    """Same shopper, same draws, every discount raised: each sale still happens, events are
    well formed, and what is bought was carted, clicked and shown."""
    events_low, tally_low = shopper_events(MARKET, 9, index, index, "u", _reply(low))
    high = [d + extra for d in low]
    events_high, tally_high = shopper_events(MARKET, 9, index, index, "u", _reply(high))
    assert events_low == shopper_events(MARKET, 9, index, index, "u", _reply(low))[0]

    def sold(events: list[pb.Event]) -> set[str]:
        kinds = (pb.EVENT_TYPE_PURCHASE, pb.EVENT_TYPE_REDEMPTION)
        return {e.offer_id for e in events if e.type in kinds}

    assert sold(events_low) <= sold(events_high)
    for events in (events_low, events_high):
        carted = {e.offer_id for e in events if e.type == pb.EVENT_TYPE_ADD_TO_CART}
        clicked = {e.offer_id for e in events if e.type == pb.EVENT_TYPE_CLICK}
        shown = {e.offer_id for e in events if e.type == pb.EVENT_TYPE_IMPRESSION}
        assert sold(events) == carted <= clicked <= shown and len(shown) == len(low)
        assert len({e.event_id for e in events}) == len(events)
    for e in events_high:
        if e.type == pb.EVENT_TYPE_REDEMPTION:
            assert e.revenue_cents < 1000 and e.quantity == 1
        if e.type == pb.EVENT_TYPE_PURCHASE:
            assert e.revenue_cents == 1000
    assert tally_high.purchases >= tally_low.purchases


def test_a_user_who_comes_back_is_the_same_shopper() -> None:
    # Each visit's market row: a returning user keeps the row (discount behaviour, price
    # sensitivity) of their first visit; a new visitor id has its own.
    assert shopper_rows(["k1", "k2", "k1", "visitor-0", "k2"]) == [0, 1, 0, 3, 1]


def test_users_are_read_as_fit_reads_them(tmp_path: Path) -> None:
    """The model knows the ids fit read: a Parquet column of floats (an integer column with a
    null) as "17", not "17.0"; " 0042 " as "0042"; "NULL" as no user. Replay read them its own
    way, and drove such known users as new visitors."""
    items = tmp_path / "items.csv"
    items.write_text("item_id,price\n7,1.0\n")
    parquet = tmp_path / "i.parquet"
    pd.DataFrame(
        {"user_id": [17.0, None, 18.0], "item_id": ["7"] * 3, "timestamp": [1704164645] * 3}
    ).to_parquet(parquet)
    csv = tmp_path / "i.csv"
    csv.write_text("user_id,item_id,timestamp\n 0042 ,7,1704164645\nNULL,7,1704164645\n")
    for path in (parquet, csv):
        assert read_users(path) == load_files(path, items).dataset.user_ids
    assert read_users(parquet) == ["17", "18"] and read_users(csv) == ["0042"]
