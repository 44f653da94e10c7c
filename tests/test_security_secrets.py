"""Secrets stay secret: database passwords, offer keys and client tokens never appear in --help,
error messages or logs of discountctl and discountd (the one-time token at creation aside)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from cli import ctl
from click.testing import CliRunner

from admin.cli import cli
from core.store.clients import digest
from server.main import main as discountd_main

PASSWORD = "pw-Zq8s3cret"
OFFER_KEY = "offer-key-Zq8-" + "x" * 32
# Nothing listens on port 1: every command fails to connect and must say so without the password.
SECRET_URL = f"postgresql+psycopg://admin:{PASSWORD}@127.0.0.1:1/shop"
SECRETS = (PASSWORD, OFFER_KEY)
DISCOUNTD = Path(sys.executable).with_name("discountd")


def commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
    assert "Traceback" not in text


def test_help_never_shows_secrets_from_the_environment() -> None:
    env = {"DISCOUNT_DB_URL": SECRET_URL, "DISCOUNT_OFFER_KEY": OFFER_KEY}
    runner = CliRunner()
    for path in [(), *commands(cli)]:
        result = runner.invoke(cli, [*path, "--help"], env=env)
        assert result.exit_code == 0, path
        assert_no_secret(result.output)
    result = runner.invoke(discountd_main, ["--help"], env=env)
    assert result.exit_code == 0
    assert_no_secret(result.output)


@pytest.mark.parametrize(
    "url",
    [
        SECRET_URL,
        f"postgresql+psycopg://admin:{PASSWORD}@127.0.0.1:notaport/shop",
        f"mysql://admin:{PASSWORD}@127.0.0.1/shop",
        f"admin:{PASSWORD}",
        f"postgresql+psycopg://admin@127.0.0.1:1/shop?password={PASSWORD}",
        f"postgresql+psycopg://admin@127.0.0.1:1/shop?sslmode=require&sslpassword={PASSWORD}",
        # A bare @ in the password: the URL splits at the first one, its tail reads as the host.
        f"postgresql+psycopg://admin:pre@{PASSWORD}@127.0.0.1:1/shop",
    ],
)
def test_store_errors_mask_the_password(url: str) -> None:
    for args in (("segments", "list"), ("db", "current"), ("clients", "create", "x")):
        result = CliRunner().invoke(cli, ["--db-url", url, *args])
        assert result.exit_code == 1, result.output
        assert_no_secret(result.output)
    if f":{PASSWORD}@127.0.0.1:1/" in url:
        assert "admin:***@127.0.0.1:1/shop" in result.output
    if f"password={PASSWORD}" in url:
        assert "password=***" in result.output


def test_discountd_errors_and_logs_mask_the_password_and_never_show_the_key(
    tmp_path: Path,
) -> None:
    # Any folder will do: the store is checked, and refused, before a model is looked for.
    env = {**os.environ, "DISCOUNT_DB_URL": SECRET_URL, "DISCOUNT_OFFER_KEY": OFFER_KEY}
    result = subprocess.run(
        [str(DISCOUNTD), "--model-dir", str(tmp_path), "--port", "0", "--insecure"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 1
    assert "cannot use store" in result.stderr and "admin:***@127.0.0.1:1" in result.stderr
    assert result.stderr.count("cannot use") == 1  # said once, not "cannot use the store: cannot…"
    assert_no_secret(result.stderr + result.stdout)
    short = {**env, "DISCOUNT_OFFER_KEY": "short-Zq8-key"}
    result = subprocess.run(
        [str(DISCOUNTD), "--model-dir", str(tmp_path), "--insecure"],
        capture_output=True,
        text=True,
        env=short,
        timeout=60,
    )
    assert result.returncode == 2 and "at least 32 bytes" in result.stderr
    assert "short-Zq8-key" not in result.stderr


def test_a_client_token_is_shown_once_and_stored_only_as_a_digest(db_url: str) -> None:
    created = ctl(db_url, "clients", "create", "checkout", "-o", "json")
    token = json.loads(created.stdout)["token"]
    assert token not in created.stderr  # data on stdout only, never in the message
    later = [
        ctl(db_url, *args)
        for args in (
            ("clients", "list", "-o", "json"),
            ("clients", "list"),
            ("audit", "list", "-o", "json"),
            ("clients", "revoke", "checkout", "--yes", "-o", "json"),
        )
    ]
    # Each command worked and named the client: its output is where a token could have leaked.
    for result in later:
        assert result.exit_code == 0 and "checkout" in result.output, result.output
        assert token not in result.output and digest(token) not in result.output
    conflict = ctl(db_url, "clients", "create", "checkout")
    assert conflict.exit_code == 1 and "already exists" in conflict.output
    assert token not in conflict.output
