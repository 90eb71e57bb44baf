"""A client's connection settings: the server, TLS files, bearer token (no grpc import).

``ClientSettings`` is every client command's configuration (``latentserve.settings``):
``--target`` (``LATENTSERVE_TARGET``), ``--tls-ca``, ``--tls-cert`` / ``--tls-key``
(``LATENTSERVE_CLIENT_CERT`` / ``_KEY``: ``LATENTSERVE_TLS_CERT`` is the server's own),
``--tls-server-name``, ``--token-file``, or the token itself in ``LATENTSERVE_TOKEN``.
One rule for the target in every command: commands that only a server can answer (job,
models load|unload|reload) call ``--target``, by default 127.0.0.1:50051; commands that
can also run in this process (compress, reconstruct, sample, models) call a server when a
target is given (flag or env) and run locally otherwise or with ``--local``.
``security()`` gives the ``ClientSecurity`` that ``channel.open_channel`` turns into a
channel.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from latentserve.errors import InvalidInput
from latentserve.settings import Settings, setting

DEFAULT_TARGET = "127.0.0.1:50051"


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


@dataclass(frozen=True, repr=False)
class ClientSettings(Settings):
    """Where a client connects and how it proves who it is."""

    target: str | None = setting(None, metavar="HOST:PORT", help=(
        f"the latentserve server to call (commands that need one: default {DEFAULT_TARGET})"))
    timeout: float | None = setting(None, metavar="S", help=(
        "deadline of each call (seconds); none = no deadline"))
    tls_ca: Path | None = setting(None, metavar="FILE.pem", help=(
        "use TLS, trusting this CA certificate"))
    client_cert: Path | None = setting(None, flag="--tls-cert", metavar="FILE.pem", help=(
        "client certificate for mutual TLS"))
    client_key: Path | None = setting(None, flag="--tls-key", metavar="FILE.pem", help=(
        "the private key of --tls-cert"))
    tls_server_name: str | None = setting(None, metavar="NAME", help=(
        "expect this name in the server certificate instead of the target's host"))
    token_file: Path | None = setting(None, metavar="FILE", help=(
        "file holding a bearer token (or the token itself in LATENTSERVE_TOKEN)"))
    token: str | None = setting(None, cli=False, help="the bearer token itself")

    def __repr__(self) -> str:  # never print the token
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token"}
        return f"ClientSettings({shown}, token={'set' if self.token else None})"

    @property
    def server(self) -> str:
        """The target, or the default one for commands that always call a server."""
        return self.target or DEFAULT_TARGET

    def security(self) -> ClientSecurity:
        """The TLS files and the token (read from ``token_file`` when one is given)."""
        token = self.token.strip() if self.token else None
        if self.token_file is not None:
            try:
                token = self.token_file.read_text().strip()
            except OSError as exc:
                raise InvalidInput(f"cannot read the token file {self.token_file}: "
                                   f"{exc.strerror or exc}") from None
            if not token:
                raise InvalidInput(f"the token file {self.token_file} is empty")
        return ClientSecurity(tls_ca=self.tls_ca, tls_cert=self.client_cert,
                              tls_key=self.client_key, tls_server_name=self.tls_server_name,
                              token=token or None)


def add_client_arguments(parser: Any, *, target: bool = True) -> None:
    """The client's flags in a group of their own (``target=False``: the command adds its
    own ``--target`` beside ``--local``)."""
    group = parser.add_argument_group("connection (to a server)")
    ClientSettings.add_arguments(group, exclude=() if target else ("target",))


def client_settings(args: Any) -> ClientSettings:
    """The ``ClientSettings`` of a parsed command line (flags over env vars)."""
    return ClientSettings.from_sources(args)
