"""How the project's own gRPC clients (`discount-train replay`, tools/demo_client, bench.load)
reach a discountd with auth and TLS: the --token, --tls-ca, --tls-cert and --tls-key options,
and the channel credentials the TLS files make."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import grpc

F = TypeVar("F", bound=Callable[..., object])
_PEM_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


def check_token(token: str | None) -> str | None:
    """The token, or a usage error (exit 2) for one gRPC cannot send: metadata takes printable
    ASCII only, and a newline left by `export DISCOUNT_CLIENT_TOKEN=$(cat file)` would fail
    every call with a traceback."""
    if token is not None and not all(" " <= c <= "~" for c in token):
        raise click.BadParameter(
            "must be printable ASCII, as gRPC metadata requires (it holds a newline, carriage "
            "return, tab or non-ASCII character); check --token or DISCOUNT_CLIENT_TOKEN",
            param_hint="'--token'",
        )
    return token


def client_options(command: F) -> F:
    """Add --token (env DISCOUNT_CLIENT_TOKEN), --tls-ca, --tls-cert and --tls-key (parameters
    token, tls_ca, tls_cert, tls_key)."""
    for option in reversed(
        (
            click.option(
                "--token",
                envvar="DISCOUNT_CLIENT_TOKEN",
                callback=lambda _ctx, _param, value: check_token(value),
                help="Client token (discountctl clients create) when discountd runs with --auth "
                "required (env DISCOUNT_CLIENT_TOKEN: a flag shows in ps).",
            ),
            click.option(
                "--tls-ca",
                type=_PEM_FILE,
                help="PEM CA that signed discountd's certificate; without it the channel is "
                "plaintext.",
            ),
            click.option(
                "--tls-cert",
                type=_PEM_FILE,
                help="PEM client certificate, for a discountd with mutual TLS (--tls-client-ca); "
                "with --tls-key and --tls-ca.",
            ),
            click.option("--tls-key", type=_PEM_FILE, help="PEM private key of --tls-cert."),
        )
    ):
        command = option(command)
    return command


def channel_credentials(
    tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None
) -> grpc.ChannelCredentials | None:
    """Credentials for a TLS channel, None for a plaintext one; a usage error (exit 2) for a CA
    that is not PEM or a client certificate without its key or the CA."""
    if (tls_cert is None) != (tls_key is None) or (tls_cert is not None and tls_ca is None):
        raise click.UsageError("a client certificate takes --tls-cert, --tls-key and --tls-ca")
    if tls_ca is None:
        return None
    ca = tls_ca.read_bytes()
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise click.BadParameter(
            f"{tls_ca}: not a PEM certificate (no BEGIN CERTIFICATE line)", param_hint="'--tls-ca'"
        )
    key = tls_key.read_bytes() if tls_key else None
    chain = tls_cert.read_bytes() if tls_cert else None
    return grpc.ssl_channel_credentials(ca, key, chain)
