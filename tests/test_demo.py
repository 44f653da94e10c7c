"""`make demo` at small scale: the whole flow through a real discountd process, and a failed
step that still leaves no server behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from cli import ctl
from click.testing import CliRunner, Result
from offer_server import eventually

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


def test_every_option_says_what_it_does() -> None:
    """`python -m tools.demo --help` is what a newcomer reads before `make demo DATA=...`."""
    silent = [p.opts[0] for p in main.params if isinstance(p, click.Option) and not p.help]
    assert silent == []


def test_demo_runs_end_to_end(tmp_path: Path, restore_env: None) -> None:
    out = tmp_path / "demo"
    result = _demo(out)
    assert result.exit_code == 0, result.output
    headings = [line for line in result.stderr.splitlines() if line.startswith("==> ")]
    assert [h.split("] ")[1].split()[0] for h in headings] == [f"{n}/11" for n in range(1, 12)]
    stdout = result.stdout
    assert "— known user" in stdout and "demo-new-visitor" in stdout  # the storefront's calls
    # discount-train response's JSON repeated the metrics the demo had just shown as a table.
    assert not [line for line in stdout.splitlines() if line.startswith("{")], stdout
    assert "100/100 shoppers" in result.stderr and "0 rejected" in result.stderr
    report_header = next(line for line in stdout.splitlines() if line.startswith("VARIANT"))
    assert "CONVERSION" in report_header and "MARGIN/USER" in report_header
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The last step estimates every rule from the randomized log, before it serves anyone.
    estimates = stdout[stdout.index("\npolicy ") + 1 :].splitlines()[1:4]
    assert [line.split()[0] for line in estimates] == ["no_discount", "demo-tiered", "demo-optimal"]
    assert "shutting down" in (out / "discountd.log").read_text()  # stopped by SIGTERM

    # The commands it prints are retypeable: it shows the store they need, which is not the
    # default one, before the first of them and again at the end.
    url = f"sqlite:///{out / 'discount.db'}"
    assert f"$ export DISCOUNT_DB_URL={url} DISCOUNT_ACTOR=demo\n$ discountctl db upgrade\n" in (
        result.stderr
    )
    assert result.stderr.rstrip().endswith(
        f"  export DISCOUNT_DB_URL={url}\n"
        "  discountctl experiments report demo-tiered-vs-optimal\n"
        "  discountctl audit list\n"
        f"  discountd --model-dir {out / 'models'} --response-model-dir {out / 'response'} "
        "--insecure --insecure-demo-key --auth off &\n"
        f"  python -m tools.demo_client --model-dir {out / 'models'}"
    )
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


def test_online_retail_without_the_dataset_keeps_the_last_demo(
    tmp_path: Path, restore_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It emptied the folder first, so a clone not beside ../shared lost its last demo to a
    # run that could not start.
    missing = tmp_path / "shared/datasets/online-retail/online_retail.csv.gz"
    monkeypatch.setattr("tools.demo.ONLINE_RETAIL", missing)
    out = tmp_path / "demo"
    out.mkdir()
    (out / "discount.db").write_bytes(b"the last demo's store")
    result = _demo(out, "--data", "online-retail")
    assert result.exit_code == 1
    assert f"Error: --data online-retail reads the UCI Online Retail data from {missing}" in (
        result.output
    )
    assert (out / "discount.db").read_bytes() == b"the last demo's store"


def test_online_retail_trains_on_the_file_it_names(
    tmp_path: Path, restore_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DISCOUNT_DATASETS elsewhere than ../shared/datasets: the step, the command it prints and
    the fit all name that file (it had said ../shared/datasets, and fit found its own)."""
    elsewhere = tmp_path / "datasets/online-retail/online_retail.csv.gz"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("InvoiceNo,StockCode\n536365,85123A\n")
    monkeypatch.setattr("tools.demo.ONLINE_RETAIL", elsewhere)
    result = _demo(tmp_path / "demo", "--data", "online-retail")
    assert result.exit_code == 1
    assert f"1/11 the Online Retail dataset ({elsewhere.parent})" in result.output
    assert f"--interactions {elsewhere} " in result.output
    assert f"Error: discount-train fit: {elsewhere}: " in result.output


def _gone(pid: int) -> bool:
    """Gone, or a zombie not yet reaped: either way it serves nothing."""
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_closed_terminal_leaves_no_server(tmp_path: Path, restore_env: None) -> None:
    # Closing the terminal sends SIGHUP to the whole foreground group: discountd takes it as
    # "reload" and kept serving, unsupervised, after the demo died of it.
    demo = subprocess.Popen(
        [sys.executable, "-m", "tools.demo", "--out", str(tmp_path / "demo"), *SMALL],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own group, as a terminal's foreground job is
    )
    assert demo.stderr is not None
    pid = None
    try:
        for line in demo.stderr:
            found = re.match(r"discountd pid (\d+) on ", line)
            if found:
                pid = int(found.group(1))
                break
        assert pid is not None, "the demo never started discountd"
        os.killpg(demo.pid, signal.SIGHUP)
        rest = demo.stderr.read()
        assert demo.wait(timeout=120) != 0
        eventually(lambda: _gone(pid), 60.0)
        assert "Traceback" not in rest
    finally:  # no orphan outlives a failed run
        demo.kill()
        demo.wait()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
