"""TLS for the project's own gRPC clients (`discount-train replay`, tools/demo_client,
bench.load): the --tls-ca, --tls-cert and --tls-key options and the channel credentials they
make."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click
import grpc

F = TypeVar("F", bound=Callable[..., object])
_PEM_FILE = click.Path(path_type=Path, dir_okay=False, exists=True)


def tls_client_options(command: F) -> F:
    """Add --tls-ca, --tls-cert and --tls-key (parameters tls_ca, tls_cert, tls_key)."""
    for option in reversed(
        (
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
