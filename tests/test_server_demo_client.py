"""tools/demo_client against a real server: the tables `make demo` prints."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from tests.conftest import RunningServer
from tools.demo_client import main


def test_demo_client_prints_known_users_and_a_folded_in_visitor(
    model_store: Path, serve: Callable[..., RunningServer]
) -> None:
    running = serve(model_store)
    result = CliRunner().invoke(
        main, ["--target", f"127.0.0.1:{running.port}", "--model-dir", str(model_store)]
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.startswith(f"model {running.server.store.require().version} on CPUExecutionProvider")
    for user in ("user-0", "user-1", "user-2"):
        assert f"{user} — known user" in out
    assert "demo-new-visitor (recent: " in out and "folded in from recent items" in out
    assert out.count("rank  item_id") == 4


def test_demo_client_says_when_nothing_serves(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--target", "127.0.0.1:9", "--user", "u1", "--wait", "0.5"])
    assert result.exit_code == 1
    assert "not SERVING" in result.output and "is discountd running there?" in result.output


def test_demo_client_sends_its_token_when_auth_is_required(
    tmp_path: Path, model_store: Path
) -> None:
    from cli import ctl
    from secure_server import ServerThread, settings

    from core.store.db import Store
    from core.store.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    upgrade(store)
    store.dispose()
    token = json.loads(ctl(url, "clients", "create", "demo", "--output", "json").stdout)["token"]
    running = ServerThread(settings(model_store, url, auth="required"))
    try:
        args = ["--target", running.target, "--user", "user-0", "--wait", "5"]
        refused = CliRunner().invoke(main, args)
        assert refused.exit_code == 1 and "UNAUTHENTICATED" in refused.output
        assert refused.output.rstrip().endswith(
            "; pass --token TOKEN (or set DISCOUNT_CLIENT_TOKEN)"
        )
        allowed = CliRunner().invoke(main, [*args, "--token", token])
        assert allowed.exit_code == 0, allowed.output
        assert "user-0 — known user" in allowed.output
    finally:
        running.close()


def test_demo_client_reaches_a_server_with_mutual_tls(tmp_path: Path, model_store: Path) -> None:
    from certs import mutual_tls
    from secure_server import ServerThread, settings

    tls = mutual_tls(tmp_path)
    running = ServerThread(settings(model_store, None, tls=tls.server))
    try:
        args = ["--target", running.target, "--user", "user-0", "--wait", "2",
                "--tls-ca", str(tls.ca)]  # fmt: skip
        without = CliRunner().invoke(main, args)
        assert without.exit_code == 1 and "not SERVING" in without.output
        client = ["--tls-cert", str(tls.client_cert), "--tls-key", str(tls.client_key)]
        allowed = CliRunner().invoke(main, [*args, *client])
        assert allowed.exit_code == 0, allowed.output
        assert "user-0 — known user" in allowed.output
        half = CliRunner().invoke(main, [*args, "--tls-key", str(tls.client_key)])
        assert half.exit_code == 2 and "takes --tls-cert, --tls-key and --tls-ca" in half.output
    finally:
        running.close()


def test_a_token_grpc_cannot_send_is_refused_before_any_call() -> None:
    """As replay refuses it (trainer.client_auth): the demo client gave a traceback."""
    args = ["--target", "127.0.0.1:9", "--user", "user-0", "--wait", "5"]
    result = CliRunner().invoke(main, args, env={"DISCOUNT_CLIENT_TOKEN": "sec\nret"})
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--token': must be printable ASCII" in result.output
    assert "not SERVING" not in result.output
