"""A client's connection settings: TLS files, server name, bearer token (no grpc import).

``ClientSecurity`` holds the client's flags (``--tls-ca``, ``--tls-cert``, ``--tls-key``,
``--tls-server-name``, ``--token-file``) and their env vars (``LATENTSERVE_TLS_CA``,
``LATENTSERVE_CLIENT_CERT``, ``LATENTSERVE_CLIENT_KEY``, ``LATENTSERVE_TLS_SERVER_NAME``,
``LATENTSERVE_TOKEN_FILE`` or the token itself in ``LATENTSERVE_TOKEN``);
``channel.open_channel`` turns them into a channel.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from latentserve.worker.errors import InvalidInput


@dataclass(frozen=True, repr=False)
class ClientSecurity:
    """TLS and token settings of a client; all None = plaintext, no token."""

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    token: str | None = None

    def __repr__(self) -> str:  # never print the token
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token"}
        return f"ClientSecurity({shown}, token={'set' if self.token else None})"

    @property
    def tls(self) -> bool:
        return any(v is not None for v in (self.tls_ca, self.tls_cert, self.tls_key,
                                           self.tls_server_name))

    @classmethod
    def from_args(cls, args: argparse.Namespace | None,
                  environ: Mapping[str, str] | None = None) -> ClientSecurity:
        """Flags (``add_arguments``) over ``LATENTSERVE_*`` env vars."""
        env = os.environ if environ is None else environ
        a = args or argparse.Namespace()

        def path(flag: str, var: str) -> Path | None:
            value = getattr(a, flag, None) or env.get(var)
            return Path(value).expanduser() if value else None

        token_file = path("token_file", "LATENTSERVE_TOKEN_FILE")
        if token_file is not None:
            try:
                token = token_file.read_text().strip()
            except OSError as exc:
                raise InvalidInput(f"cannot read the token file {token_file}: "
                                   f"{exc.strerror or exc}") from None
            if not token:
                raise InvalidInput(f"the token file {token_file} is empty")
        else:
            token = env.get("LATENTSERVE_TOKEN", "").strip() or None
        # Not LATENTSERVE_TLS_CERT/KEY: those are the server's (``serve``) certificate.
        return cls(tls_ca=path("tls_ca", "LATENTSERVE_TLS_CA"),
                   tls_cert=path("tls_cert", "LATENTSERVE_CLIENT_CERT"),
                   tls_key=path("tls_key", "LATENTSERVE_CLIENT_KEY"),
                   tls_server_name=getattr(a, "tls_server_name", None)
                   or env.get("LATENTSERVE_TLS_SERVER_NAME") or None,
                   token=token)


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """The client's TLS and token flags (each also an env var)."""
    g = parser.add_argument_group("connection security (with --target)")
    g.add_argument("--tls-ca", metavar="FILE.pem",
                   help="use TLS, trusting this CA certificate [env LATENTSERVE_TLS_CA]")
    g.add_argument("--tls-cert", metavar="FILE.pem",
                   help="client certificate for mutual TLS [env LATENTSERVE_CLIENT_CERT]")
    g.add_argument("--tls-key", metavar="FILE.pem",
                   help="its private key [env LATENTSERVE_CLIENT_KEY]")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="expect this name in the server certificate instead of the target's "
                        "host [env LATENTSERVE_TLS_SERVER_NAME]")
    g.add_argument("--token-file", metavar="FILE",
                   help="file holding a bearer token [env LATENTSERVE_TOKEN_FILE; or the token "
                        "itself in LATENTSERVE_TOKEN]")
