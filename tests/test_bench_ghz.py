"""bench.load hands its options to ghz when ghz is on PATH, and reads ghz's report back.

ghz cannot be installed here (it is neither on PyPI, Debian nor npm), so a stand-in takes its
place on PATH: it keeps the config it was given and answers with a report in ghz's JSON format
(ghz's runner/reporter.go). The requests in the config are parsed as the API's messages, as
ghz parses them through server reflection.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import ParseDict

from bench import ghz
from bench.load import Load
from discount.v1 import discount_pb2 as pb

STAND_IN = """#!{python}
import json, os, sys
if sys.argv[1:] == ["--version"]:
    print("0.120.0-stand-in")
    sys.exit(0)
assert sys.argv[1] == "--config", sys.argv
config = json.loads(open(sys.argv[2]).read())
open(os.environ["GHZ_SEEN"], "w").write(json.dumps(config))
ms = 1_000_000
print(json.dumps({{
    "count": 100, "total": 2_000 * ms, "average": 3 * ms, "fastest": ms, "slowest": 40 * ms,
    "rps": 50.0,
    "errorDistribution": {{"rpc error: code = Unavailable desc = draining": 3}},
    "statusCodeDistribution": {{"OK": 97, "Unavailable": 3}},
    "latencyDistribution": [{{"percentage": p, "latency": p * ms // 10}}
                            for p in (10, 25, 50, 75, 90, 95, 99)],
    "histogram": [], "details": [],
}}))
"""


def _load(
    tmp_path: Path, *args: str, path: str, token: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path, "GHZ_SEEN": str(tmp_path / "seen.json")}
    if token:
        env["DISCOUNT_CLIENT_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "bench.load", *args], capture_output=True, text=True, env=env
    )


def _with_stand_in(tmp_path: Path) -> str:
    """PATH with the ghz stand-in ahead of everything else."""
    stand_in = tmp_path / "bin" / "ghz"
    stand_in.parent.mkdir()
    stand_in.write_text(STAND_IN.format(python=sys.executable))
    stand_in.chmod(0o755)
    return f"{stand_in.parent}{os.pathsep}{os.environ['PATH']}"


def test_with_ghz_on_path_ghz_runs_the_same_options(tmp_path: Path) -> None:
    done = _load(
        tmp_path, "--target", "127.0.0.1:1", "--call", "offers", "--concurrency", "4",
        "--connections", "2", "--duration", "2", "--rate", "50", "--users", "30",
        "--items", "100", path=_with_stand_in(tmp_path), token="t0k",  # a flag shows in ps
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["generator"] == "ghz 0.120.0-stand-in"
    assert (report["requests"], report["errors"]) == (97, {"UNAVAILABLE": 3})
    assert (report["seconds"], report["rps"]) == (2.0, 48.5)
    assert (report["p50_ms"], report["p95_ms"], report["p99_ms"]) == (5.0, 9.5, 9.9)
    assert report["cpu_seconds"] >= 0

    config = json.loads((tmp_path / "seen.json").read_text())
    assert config["call"] == "discount.v1.DiscountService/GetOffers"
    assert (config["host"], config["insecure"], config["format"]) == ("127.0.0.1:1", True, "json")
    assert (config["concurrency"], config["connections"]) == (4, 2)
    assert (config["duration"], config["rps"]) == ("2s", 50)
    assert config["metadata"] == {"authorization": "Bearer t0k"}
    requests = [ParseDict(row, pb.GetOffersRequest()) for row in config["data"]]
    assert len({r.user_id for r in requests}) == 30
    assert all(len(set(r.item_ids)) == 20 for r in requests)


def test_a_config_file_gives_the_options_and_flags_override_it(tmp_path: Path) -> None:
    config = tmp_path / "load.json"
    config.write_text(
        json.dumps({"target": "127.0.0.1:1", "call": "offers", "concurrency": 2, "rate": 30})
    )
    done = _load(
        tmp_path, "--config", str(config), "--concurrency", "5", "--duration", "3",
        path=_with_stand_in(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    # From the file: target, call and rate; from the flags, over the file's 2: concurrency.
    assert (seen["host"], seen["call"], seen["rps"]) == (
        "127.0.0.1:1",
        "discount.v1.DiscountService/GetOffers",
        30,
    )
    assert (seen["concurrency"], seen["duration"]) == (5, "3s")


def test_tls_files_reach_ghz_as_its_own_options(tmp_path: Path) -> None:
    from certs import mutual_tls

    tls = mutual_tls(tmp_path)
    done = _load(
        tmp_path, "--target", "127.0.0.1:1", "--total", "5", "--tls-ca", str(tls.ca),
        "--tls-cert", str(tls.client_cert), "--tls-key", str(tls.client_key),
        path=_with_stand_in(tmp_path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen["insecure"] is False
    assert (seen["cacert"], seen["cert"], seen["key"]) == (
        str(tls.ca), str(tls.client_cert), str(tls.client_key)
    )  # fmt: skip


def test_ghz_asked_for_but_not_on_path_is_a_usage_error(tmp_path: Path) -> None:
    done = _load(tmp_path, "--generator", "ghz", path=str(tmp_path))
    assert done.returncode == 2
    assert "--generator ghz: no ghz on PATH" in done.stderr


def test_ghz_status_codes_read_as_grpc_names_them() -> None:
    """bench.load reports errors by grpc.StatusCode's names; ghz's report spells them as Go
    does, CANCELLED with one L."""
    go_names = {"Canceled": 1, "DeadlineExceeded": 2, "ResourceExhausted": 3, "OK": 4}
    report = ghz.report(
        Load(), {"count": 10, "total": 10**9, "statusCodeDistribution": go_names}, 0.0, "ghz"
    )
    assert report.errors == {"CANCELLED": 1, "DEADLINE_EXCEEDED": 2, "RESOURCE_EXHAUSTED": 3}
    assert set(report.errors) <= {code.name for code in grpc.StatusCode}
    assert report.requests == 4


def test_a_ghz_run_for_a_duration_waits_for_the_calls_in_flight() -> None:
    """ghz's default cancels the calls in flight when the duration ends and counts them as
    errors; bench.load waits for them, and ghz must count them the same way."""
    assert ghz.config(Load(duration=2))["duration-stop"] == "wait"
    assert "duration-stop" not in ghz.config(Load(total=100))
