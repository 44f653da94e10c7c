"""`make demo` at small scale: the whole flow through a real discountd process, and a failed
step that still leaves no server behind."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli import ctl
from click.testing import CliRunner, Result

from tools.demo import main

pytestmark = pytest.mark.timeout(240)
SMALL = ["--users", "120", "--items", "30", "--shoppers", "100", "--seed", "3"]


@pytest.fixture
def restore_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The demo exports DISCOUNT_* for the commands it runs; keep them out of other tests."""
    for name in ("DISCOUNT_DB_URL", "DISCOUNT_ACTOR", "DISCOUNT_CLIENT_TOKEN"):
        monkeypatch.setenv(name, "unset-by-test")
        monkeypatch.delenv(name)
    yield


def _demo(out: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--out", str(out), *SMALL, *args])


def test_demo_runs_end_to_end(tmp_path: Path, restore_env: None) -> None:
    out = tmp_path / "demo"
    result = _demo(out)
    assert result.exit_code == 0, result.output
    headings = [line for line in result.stderr.splitlines() if line.startswith("==> ")]
    assert [h.split("] ")[1].split()[0] for h in headings] == [f"{n}/10" for n in range(1, 11)]
    stdout = result.stdout
    assert "— known user" in stdout and "demo-new-visitor" in stdout  # the storefront's calls
    assert "100/100 shoppers" in result.stderr and "0 rejected" in result.stderr
    report_header = next(line for line in stdout.splitlines() if line.startswith("VARIANT"))
    assert "CONVERSION" in report_header and "MARGIN/USER" in report_header
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "shutting down" in (out / "discountd.log").read_text()  # stopped by SIGTERM

    url = f"sqlite:///{out / 'discount.db'}"
    reported = json.loads(
        ctl(url, "experiments", "report", "demo-tiered-vs-optimal", "--output", "json").stdout
    )
    users = {v["variant"]: v["users_assigned"] for v in reported["variants"]}
    # 100 shoppers: 90 of the 120 known users and 10 new visitors, each once.
    assert set(users) == {"control", "tiered", "optimal"} and sum(users.values()) == 100
    cost = {v["variant"]: v["discount_cost"] for v in reported["variants"]}
    assert cost["control"] == 0 and cost["tiered"] > 0
    # The optimal variant is priced by the response model, not failed closed.
    log = (out / "discountd.log").read_text()
    assert "loaded for `optimal` rules" in log and "no response model" not in log


@pytest.mark.slow
def test_a_failed_step_leaves_no_server_and_says_why(tmp_path: Path, restore_env: None) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = _demo(tmp_path / "demo", "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 1
    assert "Error: discountd exited with status" in result.output
    assert "discountd's last log lines" in result.output
    assert "Traceback" not in result.output
