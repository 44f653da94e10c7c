"""TLS and mutual TLS on the gRPC port, with a throwaway CA made at test time: TLS clients get
in, plaintext and untrusting clients do not, mTLS requires a certificate from the configured CA,
SIGHUP swaps the certificate in a running discountd, and bad files are refused in one line."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from certs import Authority, Pem
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from secure_server import ServerThread, settings

from core.store import migrate
from core.store.db import Store
from discount.v1 import discount_pb2 as pb
from discount.v1 import discount_pb2_grpc as pb_grpc
from server.main import main
from server.settings import SettingsError, resolve
from server.tls import TlsCredentials, TlsError, TlsFiles, load

pytestmark = pytest.mark.timeout(120)
RECOMMEND = pb.RecommendRequest(user_id="user-0", limit=3)
DISCOUNTD = Path(sys.executable).with_name("discountd")


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority.create("discountd test CA")


@pytest.fixture(scope="module")
def client_ca() -> Authority:
    return Authority.create("discountd test client CA")


@pytest.fixture
def server_files(tmp_path: Path, ca: Authority) -> TlsFiles:
    cert, key = ca.issue("discountd", server=True).write(tmp_path / "tls", "server")
    return TlsFiles(cert, key)


def code_of(channel: grpc.Channel) -> grpc.StatusCode:
    try:
        pb_grpc.DiscountServiceStub(channel).Recommend(RECOMMEND, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def tls_channel(target: str, trust: Authority, client: Pem | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=trust.pem.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(target, credentials)


@pytest.fixture
def tls_server(model_store: Path, server_files: TlsFiles) -> Iterator[ServerThread]:
    running = ServerThread(settings(model_store, None, tls=server_files))
    yield running
    running.close()


def test_tls_clients_get_in_plaintext_and_untrusting_ones_do_not(
    tls_server: ServerThread, ca: Authority
) -> None:
    with tls_channel(tls_server.target, ca) as channel:
        assert code_of(channel) == grpc.StatusCode.OK
    with grpc.insecure_channel(tls_server.target) as channel:
        assert code_of(channel) == grpc.StatusCode.UNAVAILABLE
    stranger = Authority.create("someone else's CA")
    with tls_channel(tls_server.target, stranger) as channel:
        assert code_of(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(
    model_store: Path, server_files: TlsFiles, tmp_path: Path, ca: Authority, client_ca: Authority
) -> None:
    ca_file = tmp_path / "clients-ca.crt"
    ca_file.write_bytes(client_ca.pem.cert)
    files = TlsFiles(server_files.cert, server_files.key, ca_file)
    running = ServerThread(settings(model_store, None, tls=files))
    try:
        with tls_channel(running.target, ca) as channel:
            assert code_of(channel) == grpc.StatusCode.UNAVAILABLE
        good = client_ca.issue("checkout", server=False)
        with tls_channel(running.target, ca, good) as channel:
            assert code_of(channel) == grpc.StatusCode.OK
        forged = Authority.create("forger").issue("checkout", server=False)
        with tls_channel(running.target, ca, forged) as channel:
            assert code_of(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        running.close()


# Serves each file named after the pipe, one per open of the pipe by process PID, waiting for
# that process to close it before the next (an open while a reader holds the pipe would join
# that reader). A process, not a thread: OpenSSL may block in open() holding the GIL.
PIPE_WRITER = """
import os, sys, time
pipe, pid, *contents = sys.argv[1:]
def held():
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == pipe:
                return True
        except OSError:
            pass
    return False
for content in contents:
    with open(pipe, "wb") as f:
        f.write(open(content, "rb").read())
        f.flush()
        # Until this end closes the reader cannot finish: wait for its fd to show, so that the
        # wait below cannot mistake a reader still opening for one that has closed.
        while not held():
            time.sleep(0.001)
    while held():
        time.sleep(0.001)
"""


def test_files_that_change_while_being_checked_are_refused(
    server_files: TlsFiles, ca: Authority, tmp_path: Path
) -> None:
    """A rotation between the check and the read would hand gRPC a certificate nobody checked
    against the key. The certificate is a pipe here, so each open gets the next content: the
    checked certificate twice, then another server's."""
    other = tmp_path / "other.crt"
    other.write_bytes(ca.issue("another server", server=True).cert)
    pipe = tmp_path / "rotating.crt"
    os.mkfifo(pipe)
    contents = [str(server_files.cert), str(server_files.cert), str(other)]
    writer = subprocess.Popen(
        [sys.executable, "-c", PIPE_WRITER, str(pipe), str(os.getpid()), *contents]
    )
    try:
        with pytest.raises(TlsError, match="changed while being checked"):
            load(TlsFiles(pipe, server_files.key))
    finally:
        writer.kill()
        writer.wait(timeout=30)


def test_a_broken_certificate_on_reload_keeps_the_working_one(
    tls_server: ServerThread, server_files: TlsFiles, ca: Authority
) -> None:
    good_key = server_files.key.read_bytes()
    server_files.key.write_bytes(Authority.create("other").issue("x", server=True).key)
    assert tls_server.server.tls is not None and not tls_server.server.tls.reload()
    server_files.key.write_bytes(good_key)
    with tls_channel(tls_server.target, ca) as channel:
        assert code_of(channel) == grpc.StatusCode.OK


def test_sighup_swaps_the_certificate_of_a_running_discountd(
    model_store: Path, server_files: TlsFiles, ca: Authority, tmp_path: Path
) -> None:
    db_url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(db_url)
    migrate.upgrade(store)
    store.dispose()
    process = subprocess.Popen(
        [
            str(DISCOUNTD),
            *("--model-dir", str(model_store), "--host", "127.0.0.1", "--port", "0"),
            *("--device", "cpu", "--db-url", db_url, "--insecure-demo-key", "--auth", "off"),
            *("--tls-cert", str(server_files.cert), "--tls-key", str(server_files.key)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # Not this process's GRPC_VERBOSITY (importing server sets it): discountd's own choice.
        env={
            **{k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"},
            "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
        },
    )
    lines: queue.Queue[str] = queue.Queue()
    assert process.stderr is not None
    stderr = process.stderr
    reader = threading.Thread(target=lambda: [lines.put(line) for line in stderr], daemon=True)
    reader.start()
    seen: list[str] = []

    def wait_for(pattern: str) -> re.Match[str]:
        while True:
            seen.append(lines.get(timeout=60))
            if found := re.search(pattern, seen[-1]):
                return found

    try:
        port = wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
        target = f"127.0.0.1:{port}"
        with tls_channel(target, ca) as channel:
            assert code_of(channel) == grpc.StatusCode.OK
        renewed = Authority.create("renewed CA")
        renewed.issue("discountd", server=True).write(server_files.cert.parent, "server")
        process.send_signal(signal.SIGHUP)
        wait_for("TLS certificate reloaded")
        with tls_channel(target, renewed) as channel:
            assert code_of(channel) == grpc.StatusCode.OK
        with tls_channel(target, ca) as channel:
            assert code_of(channel) == grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(target) as channel:
            assert code_of(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    reader.join(timeout=30)
    seen.extend(lines.queue)
    # Failed handshakes (anyone who reaches the port can cause them) leave no plain-text line
    # of gRPC's own in the JSON log.
    for line in seen:
        assert isinstance(json.loads(line), dict), line


def discountd(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env={"DISCOUNT_OFFER_KEY": "k" * 32})
    return result.exit_code, result.output


def test_plaintext_only_when_asked_and_bad_files_refused_in_one_line(
    model_store: Path, server_files: TlsFiles, tmp_path: Path
) -> None:
    model = ("--model-dir", str(model_store))
    code, output = discountd(*model)
    assert code == 2 and "TLS is required" in output and "--insecure" in output
    code, output = discountd(*model, "--insecure", "--tls-cert", str(server_files.cert))
    assert code == 2 and "--insecure serves plaintext" in output
    other_key = tmp_path / "other.key"
    other_key.write_bytes(Authority.create("x").issue("y", server=True).key)
    code, output = discountd(
        *model, "--tls-cert", str(server_files.cert), "--tls-key", str(other_key)
    )
    assert code == 2 and f"cannot load certificate {server_files.cert}" in output
    assert "key must belong to the certificate" in output
    code, output = discountd(
        *model,
        *("--tls-cert", str(server_files.cert), "--tls-key", str(server_files.key)),
        *("--tls-client-ca", str(tmp_path / "missing.crt")),
    )
    assert code == 2 and "cannot load client CA" in output
    assert "Traceback" not in output and "PRIVATE KEY" not in output
    encrypted = tmp_path / "encrypted.key"
    key = serialization.load_pem_private_key(server_files.key.read_bytes(), password=None)
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    code, output = discountd(
        *model, "--tls-cert", str(server_files.cert), "--tls-key", str(encrypted)
    )
    assert code == 2 and f"TLS key {encrypted} is encrypted with a passphrase" in output
    assert "pass phrase:" not in output


def test_tls_auth_and_reflection_settings_fall_back_to_the_environment(
    model_store: Path, server_files: TlsFiles
) -> None:
    env = {
        "DISCOUNT_OFFER_KEY": "k" * 32,
        "DISCOUNT_TLS_CERT": str(server_files.cert),
        "DISCOUNT_TLS_KEY": str(server_files.key),
        "DISCOUNT_AUTH": "OFF",
        "DISCOUNT_REFLECTION": "off",
    }
    resolved = resolve({"model_dir": str(model_store)}, env=env)
    assert resolved.tls == server_files and resolved.auth == "off" and not resolved.reflection
    without = {k: v for k, v in env.items() if k not in ("DISCOUNT_AUTH", "DISCOUNT_REFLECTION")}
    defaults = resolve({"model_dir": str(model_store)}, env=without)
    assert defaults.auth == "required" and defaults.reflection
    with pytest.raises(SettingsError) as e:
        resolve(
            {"model_dir": str(model_store), "auth": "maybe", "reflection": "yes"},
            env={"DISCOUNT_OFFER_KEY": "k" * 32},
        )
    for fragment in ("--auth / DISCOUNT_AUTH: 'maybe'", "--reflection", "TLS is required"):
        assert fragment in str(e.value)


def test_a_key_other_users_can_read_is_warned_about(
    server_files: TlsFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="server.tls")
    server_files.key.chmod(0o600)
    credentials = TlsCredentials(server_files)
    assert credentials.reload()
    server_files.key.chmod(0o640)  # group-readable: the ssl-cert group convention
    assert credentials.reload()
    assert caplog.records == []
    for mode in (0o644, 0o660, 0o604):
        server_files.key.chmod(mode)
        assert credentials.reload()  # served anyway: a warning, not an outage
        (record,) = caplog.records
        assert f"TLS key {server_files.key}" in record.getMessage()
        assert f"mode {mode:04o}" in record.getMessage()
        assert f"chmod 600 {server_files.key}" in record.getMessage()
        caplog.clear()
    TlsCredentials(server_files)
    assert len(caplog.records) == 1
