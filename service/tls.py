"""TLS material for the server and its clients: PEM files read once, with clear errors."""

from __future__ import annotations

from pathlib import Path

import grpc

from latentserve.errors import InvalidInput


def read_pem(path: Path, what: str, *, marker: bytes) -> bytes:
    """The bytes of a PEM file, or InvalidInput saying which file and what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or marker not in data:
        raise InvalidInput(f"the {what} {path} is not a PEM file holding a "
                           f"{marker.decode().strip('- ').lower()}")
    return data


def read_cert(path: Path, what: str) -> bytes:
    return read_pem(path, what, marker=b"CERTIFICATE-----")


def read_key(path: Path, what: str) -> bytes:
    return read_pem(path, what, marker=b"PRIVATE KEY-----")


def server_credentials(cert: Path, key: Path,
                       client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS with ``cert``/``key``; with ``client_ca``, clients must present a certificate
    it signed (mutual TLS)."""
    chain = read_cert(cert, "TLS certificate (--tls-cert)")
    private = read_key(key, "TLS private key (--tls-key)")
    ca = read_cert(client_ca, "client CA (--tls-client-ca)") if client_ca else None
    return grpc.ssl_server_credentials([(private, chain)], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(ca: Path | None, cert: Path | None,
                        key: Path | None) -> grpc.ChannelCredentials:
    """Client TLS: trust ``ca`` (None: the system roots); ``cert``+``key`` for mutual TLS."""
    if (cert is None) != (key is None):
        raise InvalidInput("--tls-cert and --tls-key go together (a client certificate and "
                           "its private key, for mutual TLS)")
    return grpc.ssl_channel_credentials(
        root_certificates=read_cert(ca, "CA certificate (--tls-ca)") if ca else None,
        private_key=read_key(key, "client private key (--tls-key)") if key else None,
        certificate_chain=read_cert(cert, "client certificate (--tls-cert)") if cert else None)
