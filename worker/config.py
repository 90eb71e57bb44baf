"""Typed, frozen configuration of the job queue and of a worker process.

``QueueConfig`` is what both sides of the queue agree on (key prefix, chunking, limits,
TTLs, which pool serves which model); the service embeds it. ``WorkerConfig`` adds what
one worker process needs. Both are built once at start-up from command-line flags and
``LATENTSERVE_*`` environment variables (flags win), validated, then passed down.
The Redis URL, the one Redis setting (password, ACL user and TLS included), is checked
here too (``check_redis_url``), hidden for logs (``redact_url``) and a failed first
contact with it explained (``explain_redis_failure``).
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from .engine import PROVIDERS
from .errors import InvalidInput
from .keys import DEFAULT_POOL, DEFAULT_PREFIX, Keys, check_pool

ENV_PREFIX = "LATENTSERVE_"
MAX_DEFAULT_HEARTBEAT_S = 2.0
MAX_CODER_PROCESSES = 64
T = TypeVar("T")


def parse_routes(text: str) -> tuple[tuple[str, str], ...]:
    """``"model=pool,model2=pool2"`` -> ((model, pool), ...); the model is a name, no version."""
    routes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        model, sep, pool = part.partition("=")
        if not sep or not model.strip():
            raise InvalidInput(f"pool route {part!r} must look like MODEL=POOL")
        routes.append((model.strip(), check_pool(pool.strip())))
    return tuple(routes)


@dataclass(frozen=True)
class QueueConfig:
    """Queue settings shared by the job service and the workers."""

    prefix: str = DEFAULT_PREFIX
    chunk_size: int = 256            # items per chunk task
    max_queued_chunks: int = 10_000  # per pool stream: beyond it SubmitJob is refused
    max_job_items: int = 1_000_000   # items (images, codes, samples) in one job
    max_chunk_bytes: int = 64 << 20  # packed inputs of one chunk
    job_ttl_s: float = 7 * 86400     # keys of an unfinished job expire after this
    result_ttl_s: float = 86400      # a finished job and its results live this long
    # A job still receiving inputs that gets no SubmitJob message for this long is failed
    # (its client or server died mid-upload, or Redis lost its seal) and its chunks dropped.
    receiving_timeout_s: float = 300.0
    dead_letter_maxlen: int = 10_000
    pool_routes: tuple[tuple[str, str], ...] = ()  # model name -> pool; others: default
    # Each pool's stream (and the job keys) split over this many hash slots, so a Redis
    # Cluster spreads the queue over that many masters (worker/keys.py). Every process of
    # a deployment must agree on it, like the prefix; changing it needs a drained queue.
    stream_shards: int = 1

    def __post_init__(self) -> None:
        Keys(self.prefix, self.stream_shards)  # validates the prefix and the shard count
        _positive(self, "chunk_size", "max_queued_chunks", "max_job_items", "max_chunk_bytes",
                  "job_ttl_s", "result_ttl_s", "receiving_timeout_s", "dead_letter_maxlen")
        for _, pool in self.pool_routes:
            check_pool(pool)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix, self.stream_shards)

    def pool_for(self, model_ref: str) -> str:
        """The pool whose stream carries jobs for ``model_ref`` (``name[:version]``)."""
        name = model_ref.partition(":")[0]
        for model, pool in self.pool_routes:
            if model == name:
                return pool
        return DEFAULT_POOL

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> QueueConfig:
        """Defaults <- ``LATENTSERVE_<FIELD>`` env vars <- ``overrides`` that are not None."""
        return _build(cls, os.environ if env is None else env, overrides)


def default_consumer() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig:
    """One worker process: where Redis is, which pools and models, how it claims work."""

    redis_url: str
    queue: QueueConfig = field(default_factory=QueueConfig)
    models: str = "models"
    provider: str = "cpu"
    intra_op_threads: int = 0
    pools: tuple[str, ...] = (DEFAULT_POOL,)
    consumer: str = field(default_factory=default_consumer)
    batch_items: int = 256       # max items in one pipeline call (merged across chunks)
    read_count: int = 4          # entries taken per XREADGROUP
    block_ms: int = 1000         # how long one XREADGROUP waits for new entries
    claim_idle_s: float = 30.0   # a pending entry idle this long is reclaimed (XAUTOCLAIM)
    # Claim extension + health key period; 0 = min(claim_idle_s / 4, MAX_DEFAULT_HEARTBEAT_S).
    heartbeat_s: float = 0.0
    max_deliveries: int = 3      # a chunk delivered more often than this is dead-lettered
    grace_s: float = 30.0        # SIGTERM: finish the current chunk within this, else release
    burst: bool = False          # exit once no work is left (tests, one-shot runs)
    preload: bool = True         # load every model's newest version before taking work
    metrics_port: int | None = None  # Prometheus /metrics; None = off, 0 = a free port
    metrics_host: str = "127.0.0.1"  # address the metrics endpoint binds (0.0.0.0: all)
    tracing: bool = False        # OpenTelemetry chunk spans exported over OTLP (OTEL_* env)
    # Processes that code kinds 1/2 of a call of >= 64 items (worker/coderpool.py); 0 = code
    # in the worker's own thread. Pays from about 512 items per call (bench/codec_speed.py).
    coder_processes: int = 0

    def __post_init__(self) -> None:
        check_redis_url(self.redis_url)
        if self.provider not in PROVIDERS:
            raise InvalidInput(f"provider {self.provider!r} is not one of {PROVIDERS}")
        if not self.pools:
            raise InvalidInput("a worker needs at least one pool to consume")
        for pool in self.pools:
            check_pool(pool)
        _positive(self, "batch_items", "read_count", "block_ms", "claim_idle_s",
                  "max_deliveries", "grace_s")
        if self.intra_op_threads < 0 or self.heartbeat_s < 0:
            raise InvalidInput("intra_op_threads and heartbeat_s must be >= 0, got "
                               f"{self.intra_op_threads} and {self.heartbeat_s}")
        if not 0 <= self.coder_processes <= MAX_CODER_PROCESSES:
            raise InvalidInput(f"coder_processes must be between 0 (off) and "
                               f"{MAX_CODER_PROCESSES}, got {self.coder_processes}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise InvalidInput(f"metrics_port must be between 0 and 65535 (0 = a free port), "
                               f"got {self.metrics_port}")
        if self.heartbeat_s == 0:
            # The health key outlives 3 heartbeats, and a consumer without one is taken
            # for dead (its chunks reclaimed at once): a short beat finds a killed worker
            # within seconds, whatever claim_idle_s is. A live worker stalled that long
            # loses its chunks too: they are computed twice, never lost or stored twice.
            object.__setattr__(self, "heartbeat_s",
                               min(self.claim_idle_s / 4, MAX_DEFAULT_HEARTBEAT_S))
        if self.heartbeat_s >= self.claim_idle_s:
            raise InvalidInput(f"heartbeat_s ({self.heartbeat_s}) must be shorter than "
                               f"claim_idle_s ({self.claim_idle_s}), or a healthy worker's "
                               "chunks would be reclaimed")

    @property
    def keys(self) -> Keys:
        return self.queue.keys

    @property
    def health_ttl_s(self) -> float:
        """A worker's health key outlives three missed heartbeats, no more."""
        return self.heartbeat_s * 3

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> WorkerConfig:
        """Defaults <- env (``LATENTSERVE_*``, ``REDIS_URL``) <- non-None ``overrides``.

        Queue fields may be passed as overrides too; they go into ``queue``.
        """
        env = os.environ if env is None else env
        queue_names = {f.name for f in fields(QueueConfig)}
        queue = QueueConfig.from_env(env, **{k: v for k, v in overrides.items()
                                              if k in queue_names})
        rest = {k: v for k, v in overrides.items() if k not in queue_names}
        if rest.get("redis_url") is None and not env.get(ENV_PREFIX + "REDIS_URL"):
            rest["redis_url"] = env.get("REDIS_URL")
        if rest.get("redis_url") is None and not env.get(ENV_PREFIX + "REDIS_URL"):
            raise InvalidInput("a worker needs a Redis URL: pass --redis URL or set "
                               "LATENTSERVE_REDIS_URL / REDIS_URL")
        return _build(cls, env, {**rest, "queue": queue})


# -- the Redis URL -------------------------------------------------------------------------
# Everything about reaching Redis travels in its URL, so that the service and every worker
# read one setting (REDIS_URL) and go through one ``jobstore.connect``:
#   redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]     rediss://... for TLS     unix://PATH
# plus the query parameters below, which redis-py passes on to its connection.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_PARAMS = frozenset({
    "db", "username", "password", "client_name", "protocol", "socket_timeout",
    "socket_connect_timeout", "socket_keepalive", "health_check_interval", "max_connections",
    "cluster"})  # cluster=true: a Redis Cluster (worker/cluster.py), not redis-py's own
REDIS_TLS_PARAMS = frozenset({
    "ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile", "ssl_password",
    "ssl_cert_reqs", "ssl_check_hostname", "ssl_min_version", "ssl_ciphers"})
_TLS_FILES = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
_SECRET_PARAM = re.compile(r"(?<=[?&])((?:ssl_)?password)=[^&#]*", re.IGNORECASE)
_USER = re.compile(r"[A-Za-z0-9._~%!$'()*+,;=-]*")


def redact_url(url: str) -> str:
    """``url`` fit for logs: its password and ``password`` / ``ssl_password`` values as ***.

    The user name stays when a password follows it (it says which ACL user was tried);
    a lone ``redis://WORD@host`` is hidden whole, since people write it meaning a
    password. The last ``@`` ends the credentials even when the password has an
    unescaped ``/`` or ``?`` that would fool a URL parser: this errs on hiding too much.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = rest.rfind("@")
    if cut >= 0:
        user, colon, _ = rest[:cut].partition(":")
        shown = f"{user}:***" if colon and _USER.fullmatch(user) else "***"
        rest = f"{shown}@{rest[cut + 1:]}"
    return f"{scheme}://{_SECRET_PARAM.sub(lambda m: m.group(1) + '=***', rest)}"


def check_redis_url(url: str) -> dict[str, str]:
    """Validate a Redis URL before any connection; returns its query parameters.

    Refuses (InvalidInput, the URL redacted) an unknown scheme, a query parameter that
    is not in REDIS_PARAMS (or REDIS_TLS_PARAMS with rediss://), a bad ``ssl_cert_reqs``
    and a TLS file that does not exist.
    """
    shown = redact_url(url)
    if not url.startswith(REDIS_SCHEMES):
        raise InvalidInput(f"Redis URL {shown!r} must start with redis://, rediss:// or "
                           "unix://")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is what raises on a bad one
    except ValueError as exc:
        raise InvalidInput(f"Redis URL {shown!r} is malformed ({exc}); percent-encode "
                           "@ : / ? # % in the password (e.g. %40 for @)") from None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    tls = parts.scheme == "rediss"
    for name, value in params.items():
        if name in REDIS_TLS_PARAMS and not tls:
            raise InvalidInput(f"Redis URL {shown!r}: {name} needs a rediss:// (TLS) URL")
        if name not in REDIS_PARAMS | REDIS_TLS_PARAMS:
            raise InvalidInput(f"Redis URL {shown!r}: unknown query parameter {name!r}; "
                               f"allowed: {', '.join(sorted(REDIS_PARAMS))}, and with "
                               f"rediss:// {', '.join(sorted(REDIS_TLS_PARAMS))}")
        if name == "ssl_cert_reqs" and value not in ("none", "optional", "required"):
            raise InvalidInput(f"Redis URL {shown!r}: ssl_cert_reqs={value!r} must be none, "
                               "optional or required")
        if name in _TLS_FILES and not Path(value).exists():  # parse_qsl unquoted it
            raise InvalidInput(f"Redis URL {shown!r}: {name} {value!r} does not exist")
    from .cluster import is_cluster_url

    try:
        is_cluster_url(url)
    except InvalidInput as exc:
        raise InvalidInput(f"Redis URL {shown!r}: {exc}") from None
    return params


def explain_redis_failure(url: str, exc: BaseException) -> tuple[bool, str]:
    """Why the first command on ``url`` failed: (permanent, message naming the URL redacted).

    Permanent: the server refused the credentials (NOAUTH, WRONGPASS, no password set,
    NOPERM) or the TLS handshake failed (certificate verify failed, client certificate
    required, unreadable files): retrying cannot help, so start-up stops. Otherwise
    (refused, timed out, reset) the server may just be starting, and callers retry.
    """
    import ssl

    where = f"Redis at {redact_url(url)}"
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and len(chain) < 8:  # what redis-py wrapped: SSLError, OSError
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = str(exc)
    low = " | ".join(str(x) for x in chain).lower()
    tls_errors = [x for x in chain if isinstance(x, ssl.SSLError)]
    reason = str(tls_errors[-1]) if tls_errors else text
    parts = urlsplit(url)
    user = unquote(parts.username or "")
    has_password = parts.password is not None or "password=" in parts.query
    tls = parts.scheme == "rediss"
    if "noauth" in low or "authentication required" in low or \
            "must be called with the client already authenticated" in low:
        return True, (f"{where} requires a password (NOAUTH) and the URL gives none: use "
                      "redis://:PASSWORD@HOST:PORT/DB, or redis://USER:PASSWORD@... for an "
                      "ACL user (rediss:// for TLS)")
    if "without any password configured" in low or "no password is set" in low:
        return True, (f"{where} has no password set, but the URL gives one: drop it from "
                      "the URL, or set requirepass (or an ACL user) on the server")
    if "wrongpass" in low or "invalid username-password" in low or "invalid password" in low:
        # The lone word is not echoed: it may well be the password, misplaced.
        hint = ("the URL gives a user name and no password (redis://WORD@HOST names a "
                "user); a password alone is written redis://:PASSWORD@HOST"
                if user and not has_password else
                f"check the password{f' of ACL user {user!r}' if user else ''} (percent-"
                "encode @ : / ? # % in it) and that the user is enabled")
        return True, f"{where} refused the credentials (WRONGPASS: {text}): {hint}"
    if "noperm" in low:
        return True, (f"{where}: ACL user {user or 'default'!r} may not run a command it "
                      f"needs ({text}); see docs/redis.md for the ACL rules")
    if "certificate verify failed" in low or "certificate_verify_failed" in low:
        if "mismatch" in low:
            return True, (f"{where}: TLS certificate verify failed ({reason}): the server's "
                          f"certificate does not name host {parts.hostname!r}: connect by a "
                          "name it lists, or add ssl_check_hostname=false to the URL")
        return True, (f"{where}: TLS certificate verify failed ({reason}): give the CA "
                      "that signed the server's certificate as ?ssl_ca_certs=/path/ca.pem "
                      "(ssl_cert_reqs=none skips the check: testing only)")
    if tls and ("certificate required" in low or "certificate_required" in low
                or "bad certificate" in low or "unknown ca" in low or "handshake failure"
                in low or "eof occurred in violation of protocol" in low):
        return True, (f"{where} ended the TLS handshake ({reason}): the server may require "
                      "a client certificate (mutual TLS): add ssl_certfile=/path/client.pem"
                      "&ssl_keyfile=/path/client.key, signed by a CA the server trusts")
    if tls_errors or "[ssl" in low or "[x509" in low:
        return True, (f"{where}: TLS failed ({reason}); if that port is not TLS use redis://, "
                      "else check the ssl_* files in the URL")
    if "invalid ssl" in low or not isinstance(exc, (OSError, _redis_transient())):
        return True, f"{where}: {text}"
    if not tls and ("reset by peer" in low or "closed by server" in low):
        return False, (f"{where} closed the connection ({text}); if that port speaks TLS, "
                       "use rediss://")
    if tls and "timeout" in low:
        return False, f"{where} timed out ({text}); if that port is not TLS, use redis://"
    return False, f"{where} is not reachable ({text})"


def _redis_transient() -> tuple[type[Exception], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError)


# -- helpers -----------------------------------------------------------------------------
def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise InvalidInput(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


def _convert(name: str, text: str, kind: Any) -> Any:
    try:
        if kind == "int | None":
            return None if text.strip().lower() in ("", "none", "off") else int(text)
        if kind in (int, "int"):
            return int(text)
        if kind in (float, "float"):
            return float(text)
        if kind in (bool, "bool"):
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(text)
        if name == "pools":
            return tuple(p.strip() for p in text.split(",") if p.strip())
        if name == "pool_routes":
            return parse_routes(text)
        return text
    except ValueError:
        raise InvalidInput(f"{ENV_PREFIX}{name.upper()}={text!r} is not a valid "
                           f"{getattr(kind, '__name__', kind)}") from None


def _build(cls: type[T], env: Mapping[str, str], overrides: Mapping[str, Any]) -> T:
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name == "queue":
            continue
        text = env.get(ENV_PREFIX + f.name.upper())
        if text is not None:
            values[f.name] = _convert(f.name, text, f.type)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = set(values) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise InvalidInput(f"unknown {cls.__name__} settings: {sorted(unknown)}")
    return cls(**values)
