"""TLS and mutual TLS on the gRPC port, with certificates re-read on SIGHUP.

grpc asks ``fetch`` for a new configuration before each new connection's handshake; a reload
validates the files first and hands them over only when they load, so a half-copied or
mismatched certificate never replaces a working one. Connections already open keep theirs.
"""

from __future__ import annotations

import logging
import ssl
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class TlsError(Exception):
    """A certificate, key or CA file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    # With a client CA the server requires client certificates signed by it (mutual TLS).
    client_ca: Path | None = None


def load(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """Read and check the files: the key must match the certificate, the CA must parse.

    What gRPC gets is what was checked: the files are read before and after the check, and a
    rotation that changed them in between (a new certificate beside the old key) is refused."""
    read = _read(files)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # Asked for only by an encrypted key: without it OpenSSL would prompt on the terminal,
        # and gRPC cannot take a passphrase anyway.
        context.load_cert_chain(files.cert, files.key, password=_encrypted(files.key))
    except (OSError, ssl.SSLError) as e:
        raise _unusable_pair(files, e) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (OSError, ssl.SSLError) as e:
            raise _unusable_ca(files.client_ca, e) from None
    if _read(files) != read:
        raise TlsError(
            f"{files.cert}, {files.key} or the client CA changed while being checked (a "
            "rotation in progress?); nothing was replaced: reload once the new files are in place"
        )
    key, cert, ca = read
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


def _read(files: TlsFiles) -> tuple[bytes, bytes, bytes | None]:
    try:
        key, cert = files.key.read_bytes(), files.cert.read_bytes()
    except OSError as e:
        raise _unusable_pair(files, e) from None
    if files.client_ca is None:
        return key, cert, None
    try:
        return key, cert, files.client_ca.read_bytes()
    except OSError as e:
        raise _unusable_ca(files.client_ca, e) from None


def _unusable_pair(files: TlsFiles, error: OSError | ssl.SSLError) -> TlsError:
    return TlsError(
        f"cannot load certificate {files.cert} with key {files.key} ({_reason(error)}); both "
        "must be readable PEM files and the key must belong to the certificate"
    )


def _unusable_ca(ca: Path, error: OSError | ssl.SSLError) -> TlsError:
    return TlsError(
        f"cannot load client CA {ca} ({_reason(error)}); it must be a readable PEM file of CA "
        "certificates"
    )


def _encrypted(key: Path) -> Callable[[], str]:
    def refuse() -> str:
        raise TlsError(
            f"TLS key {key} is encrypted with a passphrase, which discountd cannot give gRPC; "
            f"store it decrypted with mode 600 (`openssl pkey -in {key} -out KEY`)"
        )

    return refuse


def warn_if_exposed(key: Path) -> None:
    """Log a warning when users other than the key's owner (and its group, read-only) may read
    or change the private key: whoever reads it can impersonate this server. A warning, not a
    refusal, since containers and secret mounts set modes their own way."""
    try:
        mode = stat.S_IMODE(key.stat().st_mode)
    except OSError:
        return  # load() has just read it; a file gone since is the next load's problem
    if mode & (stat.S_IWGRP | stat.S_IRWXO):
        log.warning(
            "TLS key %s is open to other users of this host (mode %04o): anyone who reads it "
            "can impersonate this server; restrict it with `chmod 600 %s`",
            key,
            mode,
            key,
        )


def _reason(error: OSError | ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLError):
        return error.reason or "not PEM"
    return error.strerror or type(error).__name__


class TlsCredentials:
    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._initial = load(files)
        warn_if_exposed(files.key)
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            # grpc documents None from the fetcher as "keep the current one"; its stub omits it.
            self._fetch,  # type: ignore[arg-type]
            require_client_authentication=self.files.client_ca is not None,
        )

    def reload(self) -> bool:
        """Re-read the files (SIGHUP); on failure keep serving the current certificate."""
        try:
            config = load(self.files)
        except TlsError as e:
            log.error("TLS reload refused, keeping the current certificate: %s", e)
            return False
        warn_if_exposed(self.files.key)
        with self._lock:
            self._pending = config
        log.info("TLS certificate reloaded from %s", self.files.cert)
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by grpc before each handshake; None keeps the configuration in use.
        with self._lock:
            pending, self._pending = self._pending, None
        return pending
