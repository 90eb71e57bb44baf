"""Typed, frozen configuration of the job queue and of a worker process.

``QueueConfig`` is what both sides of the queue agree on (key prefix, chunking, limits,
TTLs, which pool serves which model); the service embeds it. ``WorkerConfig`` adds what
one worker process needs. Both are built once at start-up from command-line flags and
``LATENTSERVE_*`` environment variables (flags win), validated, then passed down.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from .engine import PROVIDERS
from .errors import InvalidInput
from .keys import DEFAULT_POOL, DEFAULT_PREFIX, Keys, check_pool

ENV_PREFIX = "LATENTSERVE_"
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
    dead_letter_maxlen: int = 10_000
    pool_routes: tuple[tuple[str, str], ...] = ()  # model name -> pool; others: default

    def __post_init__(self) -> None:
        Keys(self.prefix)  # validates the prefix
        _positive(self, "chunk_size", "max_queued_chunks", "max_job_items", "max_chunk_bytes",
                  "job_ttl_s", "result_ttl_s", "dead_letter_maxlen")
        for _, pool in self.pool_routes:
            check_pool(pool)

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

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
    heartbeat_s: float = 0.0     # claim extension + health key period; 0 = claim_idle_s / 4
    max_deliveries: int = 3      # a chunk delivered more often than this is dead-lettered
    grace_s: float = 30.0        # SIGTERM: finish the current chunk within this, else release
    burst: bool = False          # exit once no work is left (tests, one-shot runs)
    preload: bool = True         # load every model's newest version before taking work

    def __post_init__(self) -> None:
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise InvalidInput(f"Redis URL {self.redis_url!r} must start with redis://, "
                               "rediss:// or unix://")
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
        if self.heartbeat_s == 0:
            object.__setattr__(self, "heartbeat_s", self.claim_idle_s / 4)
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


# -- helpers -----------------------------------------------------------------------------
def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not value > 0:
            raise InvalidInput(f"{type(obj).__name__}.{name} must be > 0, got {value!r}")


def _convert(name: str, text: str, kind: Any) -> Any:
    try:
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
