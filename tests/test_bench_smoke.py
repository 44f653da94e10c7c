"""`make bench` in miniature: a tiny catalog, short runs, real discountd and load processes.
Functional only: the table is produced and no call failed; no timing is asserted."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from click.testing import CliRunner
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from pg import pg_url_if_answering
from sqlalchemy import create_engine
from sqlalchemy import text as sql

from bench import load, purchases, report, serving


def test_bench_writes_its_section_and_keeps_the_others(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text(
        "# Benchmarks\n\n## Serving performance\n\nold\n\n### Notes on the serving figures\n\n"
        "by hand\n\n## Other\n\nkept\n"
    )
    postgres = pg_url_if_answering()  # the GetOffers run on a PostgreSQL store, when one answers
    result = CliRunner().invoke(
        serving.main,
        ["--sizes", "300", "--users", "40", "--duration", "0.5", "--concurrency", "4",
         "--warmup", "0", "--repeats", "2", "--cache", str(tmp_path / "cache"), "--doc", str(doc),
         "--pg-url", postgres],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    text = doc.read_text()
    assert "old" not in text and "## Other\n\nkept" in text
    assert text.index("| health Check") < text.index("by hand") < text.index("## Other")
    assert "Target Recommend" in text
    rows = [
        line for line in text.splitlines() if re.match(r"\| (health|Recommend|GetOffers)", line)
    ]
    cores = os.cpu_count() or 1
    assert [r.split(" | ")[0] for r in rows] == [
        "| health Check (ceiling)",
        "| Recommend, batched",
        "| Recommend, batched, 80% rate",
        *([f"| Recommend, batched, --ort-threads {os.cpu_count()}"] if cores > 1 else []),
        "| Recommend, unbatched",
        "| GetOffers, 20 items, tiered_topk",
        *(["| GetOffers, 20 items, PostgreSQL store"] if postgres else []),
        "| health Check, 2 workers (their ceiling)",
        "| Recommend, batched, 2 workers",
        "| GetOffers, 20 items, 2 workers",
    ]
    if postgres:  # the bench's database is gone
        engine = create_engine(postgres)
        with engine.connect() as conn:
            left = conn.scalar(
                sql("SELECT count(*) FROM pg_database WHERE datname LIKE 'discount_bench_%'")
            )
        engine.dispose()
        assert left == 0
    measured = json.loads((tmp_path / "cache" / "last.json").read_text())
    for row in measured["rows"]:
        assert row["load"]["requests"] > 0 and row["load"]["errors"] == {}, row
        assert row["load"]["cpu_seconds"] > 0, row
    assert [r["batch"] for r in measured["runtimes"]] == [1, 32, 256]
    assert all(r["same_top10"] for r in measured["runtimes"])


def test_a_postgresql_that_does_not_answer_stops_the_bench_before_any_run(tmp_path: Path) -> None:
    url = "postgresql+psycopg://bench:secret@127.0.0.1:1/none"
    result = CliRunner().invoke(serving.main, ["--pg-url", url, "--cache", str(tmp_path)])
    assert result.exit_code == 1
    assert (
        result.output.startswith("bench: --pg-url: cannot use store")
        and "secret" not in result.output
    )
    assert list(tmp_path.iterdir()) == []  # no version was built


def test_loadtest_config_is_valid_and_unknown_keys_are_refused(tmp_path: Path) -> None:
    """That flags override the config is checked where the options can be seen (test_bench_ghz)."""
    config = tmp_path / "load.json"
    config.write_text(json.dumps({"target": "127.0.0.1:1", "concurrency": 2, "nonsense": 1}))
    result = CliRunner().invoke(load.main, ["--config", str(config)])
    assert result.exit_code == 2 and "unknown keys nonsense" in result.output
    committed = json.loads(Path("bench/loadtest.json").read_text())
    assert load.Load(**committed).call == "recommend"


def load_health(servicer: health.HealthServicer, **options: Any) -> load.Report:
    """bench.load's health Check run against a bare gRPC server answering with servicer."""

    async def scenario() -> load.Report:
        server = aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            return await load.run(load.Load(target=f"127.0.0.1:{port}", call="check", **options))
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def test_calls_spread_over_the_connections_asked_for() -> None:
    """Each connection reaches one --workers process, so they must be distinct connections."""
    peers: list[str] = []

    class Recording(health.HealthServicer):
        async def Check(  # type: ignore[override]
            self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[Any, Any]
        ) -> health_pb2.HealthCheckResponse:
            peers.append(context.peer())
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    report = load_health(Recording(), concurrency=6, connections=3, total=60)
    assert report.requests == 60 and report.connections == 3
    assert len(set(peers)) == 3  # three client ports: three TCP connections


def test_the_load_generator_reaches_a_server_with_mutual_tls(
    tmp_path: Path, model_store: Path
) -> None:
    """A production discountd takes only TLS, often with client certificates; the load generator
    must be able to load one (it was plaintext only)."""
    from certs import mutual_tls
    from secure_server import ServerThread, settings

    tls = mutual_tls(tmp_path)
    running = ServerThread(settings(model_store, None, tls=tls.server))
    files = {"tls_ca": str(tls.ca), "tls_cert": str(tls.client_cert)}
    try:
        target = load.Load(target=running.target, call="recommend", total=20, concurrency=2)
        report = asyncio.run(load.run(replace(target, **files, tls_key=str(tls.client_key))))
        assert report.requests == 20 and report.errors == {}, report
        half = CliRunner().invoke(
            load.main, ["--target", running.target, "--tls-cert", files["tls_cert"]]
        )
        assert half.exit_code == 2 and "takes --tls-cert, --tls-key and --tls-ca" in half.output
    finally:
        running.close()


def test_a_token_grpc_cannot_send_is_refused_from_the_flag_and_the_config(tmp_path: Path) -> None:
    config = tmp_path / "load.json"
    config.write_text(json.dumps({"target": "127.0.0.1:1", "token": "sec\nret"}))
    for args in (["--config", str(config)], ["--target", "127.0.0.1:1", "--token", "sécret"]):
        result = CliRunner().invoke(load.main, args)
        assert result.exit_code == 2 and "must be printable ASCII" in result.output, result.output


def test_a_config_value_of_the_wrong_kind_is_a_usage_error(tmp_path: Path) -> None:
    """The token and TLS files are checked before any call: a number or a list where a string
    belongs was a traceback (TypeError) there, as a config that is no JSON object was."""
    config = tmp_path / "load.json"
    for values, fragment in (
        ({"token": 9876543210}, "token must be a string, got a JSON number"),
        ({"tls_ca": ["ca.pem"]}, "tls_ca must be a string, got a JSON array"),
        (["target"], "not a JSON object"),
    ):
        config.write_text(json.dumps(values))
        result = CliRunner().invoke(load.main, ["--config", str(config)])
        assert result.exit_code == 2 and fragment in result.output, result.output
        assert "9876543210" not in result.output  # the token is not echoed


def test_tls_files_in_the_config_that_cannot_be_read_are_a_usage_error(tmp_path: Path) -> None:
    config = tmp_path / "load.json"
    config.write_text(json.dumps({"target": "127.0.0.1:1", "tls_ca": str(tmp_path / "gone.crt")}))
    result = CliRunner().invoke(load.main, ["--config", str(config)])
    assert result.exit_code == 2 and "cannot read a TLS file" in result.output
    assert "gone.crt" in result.output


def test_the_load_generator_runs_without_the_training_extra() -> None:
    """bench.load is for anyone with a running discountd (make loadtest): a serving install
    has no torch, and importing it would also cost every load run seconds of start-up."""
    probe = "import sys, bench.load; print(sorted({'torch', 'trainer.export'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_at_a_fixed_rate_latency_counts_from_when_a_call_was_due() -> None:
    """The first call stalls 0.3 s; the calls due meanwhile (one every 20 ms, one worker) wait
    behind it. Timed from their send they would look instant and hide the stall (coordinated
    omission); timed from when they were due, most of them waited over 0.1 s."""
    stalled = asyncio.Event()

    class Stalling(health.HealthServicer):
        async def Check(  # type: ignore[override]
            self, request: health_pb2.HealthCheckRequest, context: aio.ServicerContext[Any, Any]
        ) -> health_pb2.HealthCheckResponse:
            if not stalled.is_set():
                stalled.set()
                await asyncio.sleep(0.3)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    report = load_health(Stalling(), concurrency=1, total=10, rate=50)
    assert report.requests == 10 and report.errors == {}
    assert report.p50_ms >= 100, report


def test_bench_purchases_writes_its_table(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    postgres = pg_url_if_answering()
    result = CliRunner().invoke(
        purchases.main,
        ["--purchases", "2500", "--users", "100", "--items", "50", "--doc", str(doc),
         "--pg-url", postgres],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = re.findall(
        r"^\| (SQLite|PostgreSQL) \| ([\d,]+) \|.* \| (\d+) \|$", doc.read_text(), re.M
    )
    assert [row[:2] for row in table] == [("SQLite", "2,500")] + (
        [("PostgreSQL", "2,500")] if postgres else []
    )
    assert all(int(row[2]) > 10 for row in table)  # bytes held per purchase: what was read is kept


def test_bench_report_times_a_report_that_counted_every_user(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    postgres = pg_url_if_answering()
    result = CliRunner().invoke(
        report.main,
        ["--users", "150", "--offers", "600", "--events", "2000", "--runs", "1",
         "--doc", str(doc), "--pg-url", postgres],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    table = re.findall(
        r"^\| (SQLite|PostgreSQL) \| ([\d,]+) \| [\d.]+ \| (\d+) \|$", doc.read_text(), re.M
    )
    assert [row[:2] for row in table] == [("SQLite", "2,000")] + (
        [("PostgreSQL", "2,000")] if postgres else []
    )
    assert all(int(row[2]) > 10 for row in table)  # a report process's peak RSS, in MB
