"""TLS material for gRPC servers and channels: every TCP channel is TLS.

`ServerTLS` is what the control plane listens with: its certificate chain and
key, and the CA bundle client certificates must chain to. `ClientTLS` is what a
client dials with: the CA bundle it pins (no trust on first use) and, for mTLS,
its own certificate and key, held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from tether.core.errors import ConfigError
from tether.crypto.pki import TrustBundle, parse_pem_certificates

ENV_CONTROL = "TETHER_CONTROL"
ENV_CA = "TETHER_TLS_CA"
ENV_CERT = "TETHER_TLS_CERT"
ENV_KEY = "TETHER_TLS_KEY"


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read {what} {path}: {err.strerror}") from err


@dataclass(frozen=True)
class ServerTLS:
    """A TLS server identity plus the CAs its clients' certificates must chain to."""

    cert_chain_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes

    def __repr__(self) -> str:  # never print the key
        return "ServerTLS(<key redacted>)"

    @classmethod
    def load(cls, cert: Path | str, key: Path | str, client_ca: Path | str) -> ServerTLS:
        """Loads PEM files.

        Raises:
            ConfigError: unreadable, or holding no certificate.
        """
        chain = _read(cert, "TLS certificate")
        if not parse_pem_certificates(chain):
            raise ConfigError(f"TLS certificate {cert} holds no PEM certificate")
        ca = _read(client_ca, "client CA bundle")
        if not parse_pem_certificates(ca):
            raise ConfigError(f"client CA bundle {client_ca} holds no PEM certificate")
        # The CA bundle may be a trust bundle: pass only its certificates to TLS.
        ca_only = TrustBundle.parse(ca, str(client_ca)).ca_pem
        return cls(chain, _read(key, "TLS key"), ca_only)

    def credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key_pem, self.cert_chain_pem)],
            root_certificates=self.client_ca_pem if require_client_cert else None,
            require_client_auth=require_client_cert,
        )


@dataclass(frozen=True)
class ClientTLS:
    """What a client trusts (CA bundle) and, for mTLS, presents (certificate and key)."""

    ca_pem: bytes
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    server_name: str | None = None
    """Overrides the name checked against the server certificate (its SANs)."""

    def __repr__(self) -> str:
        return f"ClientTLS(client_cert={self.cert_pem is not None}, key=<redacted>)"

    @classmethod
    def load(
        cls,
        ca: Path | str,
        cert: Path | str | None = None,
        key: Path | str | None = None,
        server_name: str | None = None,
    ) -> ClientTLS:
        """Loads PEM files; `ca` may be a trust bundle (its certificates are used).

        Raises:
            ConfigError: unreadable, no CA certificate, or a certificate without a key.
        """
        bundle = TrustBundle.parse(_read(ca, "CA bundle"), str(ca))
        if not bundle.ca_certs:
            raise ConfigError(f"{ca} holds no CA certificate")
        if (cert is None) != (key is None):
            raise ConfigError("a client certificate needs its key, and a key its certificate")
        return cls(
            bundle.ca_pem,
            _read(cert, "client certificate") if cert is not None else None,
            _read(key, "client key") if key is not None else None,
            server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca_pem, self.key_pem, self.cert_pem)

    def without_client_cert(self) -> ClientTLS:
        return ClientTLS(self.ca_pem, None, None, self.server_name)


def client_tls_from_env(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ClientTLS | None:
    """Client TLS from arguments, else TETHER_TLS_CA / TETHER_TLS_CERT / TETHER_TLS_KEY.

    Returns None when no CA is named anywhere (the caller decides whether
    plaintext is allowed).
    """
    ca = ca or os.environ.get(ENV_CA) or None
    cert = cert or os.environ.get(ENV_CERT) or None
    key = key or os.environ.get(ENV_KEY) or None
    if ca is None:
        if cert or key:
            raise ConfigError(
                f"--tls-cert/--tls-key need --tls-ca (or {ENV_CA}) to check the server"
            )
        return None
    return ClientTLS.load(ca, cert, key)


def open_channel(
    address: str, tls: ClientTLS | None, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Channel:
    """A channel to `address`: TLS with `tls`, plaintext only when `tls` is None."""
    opts = list(options)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    # A Unix socket has no host name for the certificate to name; gRPC would check
    # the socket path, so check "localhost" (a SAN of certificates from `keys init`).
    server_name = tls.server_name or ("localhost" if address.startswith("unix:") else None)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, tls.credentials(), options=opts)
