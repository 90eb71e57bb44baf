"""Who is calling: bearer tokens checked in one server interceptor, and mTLS identities.

Tokens file (``serve --auth-tokens FILE``): one ``NAME sha256:HEX`` line per token,
``#`` comments and blank lines ignored. Only the SHA-256 of each token is stored: tokens
are 256-bit random strings (``latentserve token new``), so a fast hash is as good as a
slow one and a stolen file yields no usable token. The file is re-read when it changes
(checked at most once a second), so a token is revoked by deleting its line, without a
restart.

``AuthInterceptor`` runs before every RPC: health checks stay open (orchestrators probe
them without credentials); every other call needs ``authorization: Bearer <token>`` when a
tokens file is configured, else it gets UNAUTHENTICATED. The caller's identity (the
token's name, else the common name of a verified client certificate, else ``""``) reaches
servicers as ``caller(context)``; jobs belong to it. Token values never reach a log line,
a metric label or an error message.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import grpc

from latentserve.errors import InvalidInput
from latentserve.service.server.errors import Behavior, rewrap_handler

log = logging.getLogger(__name__)

ANONYMOUS = ""
TOKEN_PREFIX = "lst_"
# Health stays open so load balancers and orchestrators can probe without a token.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_LINE_RE = re.compile(r"^(\S+)\s+sha256:([0-9a-f]{64})$")


def new_token() -> str:
    """A fresh random bearer token (256 bits from the OS's CSPRNG)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """The hex SHA-256 a tokens file stores for ``token``."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_line(name: str, token: str) -> str:
    """The tokens-file line for ``token`` named ``name``."""
    check_name(name)
    return f"{name} sha256:{token_digest(token)}"


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise InvalidInput(f"token name {name!r} must be 1-64 characters of letters, digits "
                           "and . _ @ -, starting with a letter or digit")
    return name


def parse_tokens(text: str, *, source: str = "tokens file") -> dict[str, str]:
    """``{sha256 hex: name}`` from a tokens file's text; InvalidInput names a bad line."""
    table: dict[str, str] = {}
    names: set[str] = set()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            # Never echo the line: a mistaken file may hold a raw token.
            raise InvalidInput(f"{source} line {number}: expected 'NAME sha256:<64 hex "
                               "digits>' (make one with `latentserve token new NAME`)")
        name, digest = check_name(m.group(1)), m.group(2)
        if name in names:
            raise InvalidInput(f"{source} line {number}: token name {name!r} appears twice")
        if digest in table:
            raise InvalidInput(f"{source} line {number}: the same token is listed twice")
        names.add(name)
        table[digest] = name
    return table


class TokenTable:
    """The tokens file, re-read when it changes. Thread-safe."""

    RECHECK_S = 1.0

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._table, self._stamp = self._read()
        self._checked = time.monotonic()
        if not self._table:
            log.warning("tokens file %s lists no tokens: every call but health will be "
                        "refused", self.path)

    def _read(self) -> tuple[dict[str, str], tuple[int, int, int]]:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except OSError as exc:
            raise InvalidInput(f"cannot read the tokens file {self.path}: "
                               f"{exc.strerror or exc}") from None
        return (parse_tokens(text, source=f"tokens file {self.path}"),
                (st.st_mtime_ns, st.st_size, st.st_ino))

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.RECHECK_S:
            return
        with self._lock:
            if now - self._checked < self.RECHECK_S:
                return
            self._checked = now
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
                    return
                self._table, self._stamp = self._read()
                log.info("tokens file %s reloaded: %d tokens", self.path, len(self._table))
            except (OSError, InvalidInput) as exc:
                # Keep serving with the last good table rather than lock everyone out.
                log.error("tokens file %s not reloaded, keeping the previous %d tokens: %s",
                          self.path, len(self._table), exc)

    def name_for(self, token: str) -> str | None:
        """The name of ``token``, or None if it is not (or no longer) listed."""
        self._refresh()
        return self._table.get(token_digest(token))

    def __len__(self) -> int:
        return len(self._table)


def bearer_token(metadata: Collection[tuple[str, Any]] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` metadata entry, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def certificate_name(context: grpc.ServicerContext) -> str:
    """The common name of the verified client certificate (mutual TLS), else ``""``."""
    try:
        # types-grpcio says Mapping[str, bytes]; grpcio gives each key a list of values.
        auth = cast(Mapping[str, list[bytes]], context.auth_context())
    except Exception:  # noqa: BLE001 - insecure channels have no auth context to speak of
        return ANONYMOUS
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = auth.get(key) or []
        if values:
            value = values[0]
            return value.decode() if isinstance(value, bytes) else str(value)
    return ANONYMOUS


class CallerContext:
    """A servicer context that also knows who is calling (``caller(context)``)."""

    __slots__ = ("_context", "_token_name")

    def __init__(self, context: grpc.ServicerContext, token_name: str | None) -> None:
        self._context = context
        self._token_name = token_name

    @property
    def caller(self) -> str:
        if self._token_name is not None:
            return self._token_name
        return certificate_name(self._context)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def caller(context: Any) -> str:
    """The identity behind a call: token name, client-certificate name, or ``""``."""
    return getattr(context, "caller", ANONYMOUS)


def _refuse(message: str) -> Callable[[Behavior, bool], Behavior]:
    def around(behavior: Behavior, response_streaming: bool) -> Behavior:
        if response_streaming:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
                yield  # pragma: no cover - abort raises
            return stream

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        return unary
    return around


@functools.lru_cache(maxsize=1024)  # one wrapper per token name, not one per call
def _with_caller(token_name: str | None) -> Callable[[Behavior, bool], Behavior]:
    def around(behavior: Behavior, response_streaming: bool) -> Behavior:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            # CallerContext hands every other attribute on to the context it wraps.
            return behavior(request, cast(grpc.ServicerContext, CallerContext(context, token_name)))
        return call
    return around


def refusal(token: str | None) -> str:
    """What a caller with ``token`` (None: none sent) that is not listed is told."""
    return ("no bearer token: send metadata 'authorization: Bearer <token>' "
            "(the CLI's --token-file or LATENTSERVE_TOKEN)" if token is None
            else "the bearer token is not valid (unknown or revoked)")


class Authenticator:
    """Decides one call: allowed (and as whom) or refused (counted and logged)."""

    def __init__(self, tokens: TokenTable | None,
                 open_methods: frozenset[str] = OPEN_METHODS) -> None:
        self.tokens = tokens
        self.open_methods = open_methods
        self.refused = 0

    def decide(self, method: str, metadata: Collection[tuple[str, Any]] | None
               ) -> tuple[str | None, str | None]:
        """(the caller's token name, None) for an allowed call of ``method`` (name None
        without a tokens file, or for an open method); (None, why) for a refused one."""
        if self.tokens is None or method in self.open_methods:
            return None, None
        token = bearer_token(metadata)
        name = self.tokens.name_for(token) if token is not None else None
        if name is not None:
            return name, None
        self.refused += 1
        why = refusal(token)
        log.info("refused %s: %s", method, why.split(":")[0])
        return None, why


class AuthInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a listed bearer token (when ``tokens`` is set); tells
    servicers who is calling. (The server itself does this inside ``calls.CallInterceptor``,
    with the other per-call jobs; this one stands alone, e.g. for a server of your own.)"""

    def __init__(self, tokens: TokenTable | None,
                 open_methods: frozenset[str] = OPEN_METHODS) -> None:
        self.tokens = tokens
        self.open_methods = open_methods
        self.refused = 0

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        if handler is None or details.method in self.open_methods:
            return handler
        if self.tokens is None:
            return rewrap_handler(handler, _with_caller(None))
        token = bearer_token(details.invocation_metadata)
        name = self.tokens.name_for(token) if token is not None else None
        if name is None:
            self.refused += 1
            why = refusal(token)
            log.info("refused %s: %s", details.method, why.split(":")[0])
            return rewrap_handler(handler, _refuse(why))
        return rewrap_handler(handler, _with_caller(name))
