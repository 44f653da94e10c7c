"""The real `discountd` executable: starts without torch, reloads on SIGHUP, drains on SIGTERM,
and refuses bad settings with one clear message."""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from offer_server import ctl, eventually, ten_percent_off_everything
from sqlalchemy import create_engine, text

from core.artifact import CURRENT, set_current
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow  # each test starts a real discountd process

DISCOUNTD = Path(sys.executable).with_name("discountd")
ROOT = Path(__file__).resolve().parents[1]
TORCH_BLOCKER = '''
import sys

class BlockTorch:
    """Make `import torch` fail, as on a serving host without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked: discountd must not need torch")
        return None

sys.meta_path.insert(0, BlockTorch())
'''


EXITED = "<discountd closed its stderr>"


class Discountd:
    """A discountd subprocess; its log lines are collected as they come."""

    def __init__(
        self, model_dir: Path, blocker_dir: Path, db_url: str, *extra: str, host: str = "127.0.0.1"
    ) -> None:
        env = {**os.environ, "PYTHONPATH": f"{blocker_dir}{os.pathsep}{ROOT}"}
        self.process = subprocess.Popen(
            [
                str(DISCOUNTD),
                "--model-dir",
                str(model_dir),
                "--host",
                host,
                "--port",
                "0",
                "--device",
                "cpu",
                "--db-url",
                db_url,
                "--insecure-demo-key",
                "--insecure",
                "--auth",
                "off",
                "--log-level",
                "debug",
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        bare = host.strip("[]")
        address = f"[{bare}]" if ":" in bare else bare
        try:
            self.port = int(self.wait_for(rf"listening on {re.escape(address)}:(\d+)").group(1))
        except BaseException:  # a failed start must not leave the process behind
            self.process.kill()
            self.process.wait(timeout=30)
            raise
        self.channel = grpc.insecure_channel(f"{address}:{self.port}")
        self.stub = pb_grpc.DiscountServiceStub(self.channel)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(EXITED)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first new log line matching pattern (fails if discountd exits first)."""
        while True:
            try:
                line = self.lines.get(timeout=60)
            except queue.Empty:
                pytest.fail(f"discountd never logged {pattern!r}; log so far: {self.log}")
            if line is EXITED:
                pytest.fail(f"discountd exited before logging {pattern!r}; log: {self.log}")
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return match

    def drain_log(self) -> list[str]:
        """Every line logged so far; once the process has exited, every line it ever wrote."""
        exited = self.process.poll() is not None
        while exited or not self.lines.empty():
            line = self.lines.get(timeout=30)
            if line is EXITED:
                break
            self.log.append(line)
        return self.log

    def close(self) -> None:
        self.channel.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def blocker(tmp_path: Path) -> Path:
    folder = tmp_path / "no-torch"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(TORCH_BLOCKER)
    return folder


@pytest.fixture
def store(tmp_path: Path, model_store: Path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(model_store, copy)
    return copy


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty store at the schema head: discountd refuses to start on anything older."""
    from core.store.db import Store
    from core.store.migrate import upgrade

    path = tmp_path_factory.mktemp("db") / "discount.db"
    store = Store(f"sqlite:///{path}")
    upgrade(store)
    store.dispose()
    return path


@pytest.fixture
def db_url(tmp_path: Path, migrated_db: Path) -> str:
    shutil.copy(migrated_db, tmp_path / "discount.db")
    return f"sqlite:///{tmp_path / 'discount.db'}"


@pytest.fixture
def start(store: Path, blocker: Path, db_url: str) -> Iterator[type[Discountd]]:
    started: list[Discountd] = []

    class Started(Discountd):
        def __init__(self, *extra: str, host: str = "127.0.0.1") -> None:
            super().__init__(store, blocker, db_url, *extra, host=host)
            started.append(self)

    yield Started  # type: ignore[misc]
    for server in started:
        server.close()


def test_discountd_serves_with_torch_blocked(start: type[Discountd], blocker: Path) -> None:
    check = subprocess.run(
        [sys.executable, "-c", "import torch"],
        env={**os.environ, "PYTHONPATH": str(blocker)},
        capture_output=True,
        text=True,
    )
    assert check.returncode != 0 and "blocked" in check.stderr, "the blocker does not work"
    server = start()
    reply = server.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=3))
    assert len(reply.items) == 3
    info = server.stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.provider == "CPUExecutionProvider"
    assert not [line for line in server.drain_log() if "Traceback" in line]


def test_the_log_is_json_lines_even_where_cuda_fails_to_start(start: type[Discountd]) -> None:
    """On a host without CUDA's libraries ONNX Runtime writes coloured text lines of its own at
    every model load; at info they must not reach the log."""
    server = start("--device", "auto", "--log-level", "info")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=60) == 0
    lines = server.drain_log()
    assert any("listening on" in line for line in lines)
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def _no_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return True
    return False


@pytest.mark.skipif(_no_ipv6_loopback(), reason="this host has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_an_ipv6_host_serves_grpc_and_metrics(start: type[Discountd], host: str) -> None:
    server = start("--metrics-port", "0", host=host)
    health = health_pb2_grpc.HealthStub(server.channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
    port = server.wait_for(r"metrics on http://\[::1\]:(\d+)/metrics").group(1)
    with urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=10) as answer:
        assert b"discountd_model_info" in answer.read()


def test_sighup_reloads_the_version_current_names(
    start: type[Discountd], store: Path, flipped_version: Path
) -> None:
    server = start("--poll-interval", "0")
    old = (store / CURRENT).read_text().strip()
    shutil.copytree(flipped_version, store / flipped_version.name)
    set_current(store, flipped_version.name)
    assert server.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == old
    server.process.send_signal(signal.SIGHUP)
    server.wait_for(f"serving model {flipped_version.name} .*replacing {old}")
    assert server.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version == (
        flipped_version.name
    )


def test_sigterm_drains_in_flight_calls_and_exits_zero(start: type[Discountd]) -> None:
    # On a loaded machine the signal can land between calls, which tests nothing: another
    # server, then (each run checks everything else regardless).
    assert any(_drained_a_call(start) for _ in range(3)), "no call was in flight at SIGTERM"


def _drained_a_call(start: type[Discountd]) -> bool:
    """SIGTERM under load: every call the server began is answered OK, the rest are refused,
    and it exits 0. Whether a call was in flight when the drain began."""
    server = start("--grace", "3")
    health = health_pb2_grpc.HealthStub(server.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="discount.v1.DiscountService"))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    outcomes: list[grpc.StatusCode] = []
    stop = threading.Event()
    request = pb.RecommendRequest(user_id="user-1", limit=1000, include_purchased=True)

    def hammer() -> None:
        while not stop.is_set():
            try:
                server.stub.Recommend(request, timeout=30)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                outcomes.append(e.code())
                return

    workers = [threading.Thread(target=hammer) for _ in range(6)]
    for worker in workers:
        worker.start()
    # Calls are flowing (a worker that fails stops: then this fails, rather than waiting on).
    eventually(lambda: len(outcomes) >= 50, timeout=60)
    server.process.send_signal(signal.SIGTERM)
    # Health turns NOT_SERVING on the open Watch stream before the server stops.
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert server.process.wait(timeout=60) == 0
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    watch.cancel()
    log = server.drain_log()
    handled = [line for line in log if "/discount.v1.DiscountService/Recommend" in line]
    # Every call the server started, it finished: none was cut off, and each answer arrived.
    assert all(" OK " in line for line in handled), [line for line in handled if " OK " not in line]
    assert outcomes.count(grpc.StatusCode.OK) == len(handled)
    drain = log[next(i for i, line in enumerate(log) if "shutting down" in line) :]
    assert "stopped" in drain[-1]
    # The rest were refused: new calls find the port closed (UNAVAILABLE), and calls gRPC had
    # queued but not yet handed to the server are cancelled by gRPC itself at shutdown.
    assert set(outcomes) <= {
        grpc.StatusCode.OK,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
    }
    return any("Recommend OK" in line for line in drain)


def test_drain_delay_answers_calls_while_health_says_not_serving(start: type[Discountd]) -> None:
    """Balancers that poll Check need a window in which it says NOT_SERVING and calls are still
    answered; without --drain-delay the port closes as health turns."""
    server = start("--drain-delay", "30", "--grace", "1")
    health = health_pb2_grpc.HealthStub(server.channel)
    request = health_pb2.HealthCheckRequest(service="discount.v1.DiscountService")
    assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    server.process.send_signal(signal.SIGTERM)
    server.wait_for("shutting down: health NOT_SERVING for 30s")
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    eventually(lambda: health.Check(request, timeout=10).status == not_serving, timeout=10)
    reply = server.stub.Recommend(pb.RecommendRequest(user_id="user-0", limit=3), timeout=10)
    assert len(reply.items) == 3
    assert server.process.poll() is None


def test_sighup_does_not_reload_the_version_already_serving(start: type[Discountd]) -> None:
    server = start("--poll-interval", "0")
    server.process.send_signal(signal.SIGHUP)
    server.wait_for("is serving already: nothing to load")
    assert not [line for line in server.log if "replacing" in line]


def test_bad_settings_are_listed_together_and_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(DISCOUNTD), "--model-dir", str(tmp_path / "missing"), "--port", "http"],
        env={**os.environ, "DISCOUNT_DEVICE": "tpu", "DISCOUNT_DB_URL": "mysql://u:pw@h/db"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "missing is not a directory" in result.stderr
    assert "'tpu' is not one of auto, cpu, cuda" in result.stderr
    assert "'http' is not a port number" in result.stderr
    assert "backend 'mysql' is not supported" in result.stderr and "pw" not in result.stderr
    assert "Traceback" not in result.stderr


def test_a_store_without_a_model_exits_1_saying_how_to_fix(tmp_path: Path, db_url: str) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    result = subprocess.run(
        [
            str(DISCOUNTD),
            "--model-dir",
            str(empty),
            "--port",
            "0",
            "--device",
            "cpu",
            "--db-url",
            db_url,
            "--insecure-demo-key",
            "--insecure",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    # One line with the reason: the failed first load is not logged again as a reload that
    # left the server "still serving nothing".
    (reason,) = error_lines(result.stderr)
    assert reason.startswith("cannot serve:") and "discount-train fit" in reason, result.stderr
    assert "Traceback" not in result.stderr
    # The schema check's Alembic context logged "Will assume non-transactional DDL." at info.
    assert "alembic" not in result.stderr


def error_lines(stderr: str) -> list[str]:
    """The messages of the ERROR lines of a discountd that exited at start, every line of its
    log checked to be a JSON object (a log pipeline parses start-up failures too). gRPC's C
    core writes its own errors as plain text (docs/SERVING.md, --log-level): those are skipped.
    """
    errors = []
    for line in stderr.splitlines():
        if re.match(r"E\d{4} ", line):  # gRPC's C core, e.g. "E1130 09:40:29.393795 ..."
            continue
        record = json.loads(line)
        assert isinstance(record, dict), line
        if record["level"] == "ERROR":
            errors.append(record["msg"])
    return errors


def _exiting(*args: str) -> subprocess.CompletedProcess[str]:
    """A discountd expected to exit at start: args plus the local-trial flags."""
    local = ("--insecure-demo-key", "--insecure", "--auth", "off")
    return subprocess.run(
        [str(DISCOUNTD), *args, *local], capture_output=True, text=True, timeout=60
    )


def test_a_metrics_port_in_use_exits_1_in_one_line(store: Path, db_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _exiting(
            "--model-dir", str(store), "--host", "127.0.0.1", "--port", "0",
            "--metrics-port", str(port), "--device", "cpu", "--db-url", db_url,
        )  # fmt: skip
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        f"cannot serve metrics on 127.0.0.1:{port}: "
        f"[Errno {errno.EADDRINUSE}] Address already in use"
    ], result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_another_discountd_serves_is_refused(
    start: type[Discountd], store: Path, db_url: str
) -> None:
    # gRPC sets SO_REUSEPORT unless told not to, and the kernel would then let a second server
    # bind the same port and take half its calls, with its own model and keys.
    running = start()
    for workers in ("1", "2"):
        result = _exiting(
            "--model-dir", str(store), "--host", "127.0.0.1", "--port", str(running.port),
            "--device", "cpu", "--db-url", db_url, "--workers", workers,
        )  # fmt: skip
        assert result.returncode == 1, result.stderr
        refusal = f"cannot listen on 127.0.0.1:{running.port}: "
        assert f"{refusal}[Errno {errno.EADDRINUSE}] Address already in use" in error_lines(
            result.stderr
        )
        assert "Traceback" not in result.stderr
    assert running.stub.GetModelInfo(pb.GetModelInfoRequest()).model_version


def test_a_worker_that_fails_is_reported_not_silent(tmp_path: Path) -> None:
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from server.settings import Settings\n"
        "from server.workers import supervise\n"
        "async def serve(settings):\n"
        "    raise RuntimeError('boom in worker')\n"
        "logging.basicConfig()\n"
        f"sys.exit(supervise(Settings(Path({str(tmp_path)!r}), port=1, workers=2), serve))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "RuntimeError: boom in worker" in result.stderr


def test_workers_on_an_unknown_host_exit_1_in_one_line(tmp_path: Path) -> None:
    result = _exiting(
        "--model-dir", str(tmp_path), "--workers", "2", "--port", "0",
        "--host", "nosuchhost.invalid",
    )  # fmt: skip
    assert result.returncode == 1
    [refusal] = error_lines(result.stderr)
    assert refusal.startswith("cannot listen on nosuchhost.invalid:0: "), refusal
    assert "Traceback" not in result.stderr


def test_a_store_whose_rules_cannot_be_read_exits_1_naming_it(store: Path, tmp_path: Path) -> None:
    """Rules the first load cannot read (a budget SQLite keeps as text) were a traceback."""
    url = ten_percent_off_everything(f"sqlite:///{tmp_path / 'discount.db'}")
    ctl(url, "rules", "update", "all", "--budget", "100")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE rules SET budget = 'abc'"))
    engine.dispose()
    result = _exiting("--model-dir", str(store), "--port", "0", "--device", "cpu", "--db-url", url)
    assert result.returncode == 1, result.stderr
    assert any("cannot be read: InvalidOperation" in m for m in error_lines(result.stderr))
    assert "Traceback" not in result.stderr
