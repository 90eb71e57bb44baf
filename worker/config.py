"""``WorkerConfig``: the typed, frozen configuration of one job worker process.

Built once at start-up from ``latentserve worker`` flags and ``LATENTSERVE_*`` variables
(``latentserve.settings``: flags win), validated, then passed down. It embeds the
``QueueConfig`` both sides of the queue agree on; its fields are worker flags too.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from latentserve.errors import InvalidInput
from latentserve.settings import Settings, check_range, setting
from latentserve.worker.jobqueue.config import QueueConfig
from latentserve.worker.jobqueue.keys import DEFAULT_POOL, Keys, check_pool
from latentserve.worker.jobqueue.redis_url import check_redis_url
from latentserve.worker.runtime.settings import PROVIDERS, Provider

MAX_DEFAULT_HEARTBEAT_S = 2.0
MAX_CODER_PROCESSES = 64
REDIS_URL_HELP = (
    "Redis URL: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... for TLS "
    "(?ssl_ca_certs=CA&ssl_certfile=CERT&ssl_keyfile=KEY), unix://PATH; see docs/redis.md. "
    "An env var is better for a password: a flag shows in the process list")


def default_consumer() -> str:
    """A consumer name unique to this process: host, pid and a random suffix."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerConfig(Settings):
    """One worker process: where Redis is, which pools and models, how it claims work."""

    redis_url: str = setting("", flag="--redis", fallback_env=("REDIS_URL",),
                             metavar="URL", help=REDIS_URL_HELP)
    queue: QueueConfig = setting(default_factory=QueueConfig, help="the queue's settings")
    models: str = setting("models", aliases=("--repo",), metavar="DIR",
                          help="model repository folder")
    provider: Provider = setting("cpu", help="onnxruntime execution provider")
    intra_op_threads: int = setting(0, help="onnxruntime threads per run (0 = all cores)")
    pools: tuple[str, ...] = setting((DEFAULT_POOL,), metavar="P1,P2",
                                     help="comma-separated pools to consume")
    consumer: str = setting(default_factory=default_consumer, metavar="NAME",
                            help="consumer name (default host-pid-random)")
    batch_items: int = setting(256, help=(
        "most items in one pipeline call, merged across the chunks held"))
    read_count: int = setting(4, help="stream entries taken per read")
    block_ms: int = setting(1000, help="how long one read waits for new entries (ms)")
    claim_idle_s: float = setting(30.0, help=(
        "reclaim chunks no live worker extends after this long (a failed chunk's retry); "
        "a killed worker's go once its health key expires"))
    heartbeat_s: float = setting(0.0, help=(
        "claim extension and health key period; a worker silent for 3 is taken for dead "
        f"and its chunks reclaimed at once; 0 = claim-idle-s / 4, at most "
        f"{MAX_DEFAULT_HEARTBEAT_S:g}"))
    max_deliveries: int = setting(3, help="dead-letter a chunk delivered more often than this")
    grace_s: float = setting(30.0, help=(
        "on SIGTERM, finish the current chunk within this (s), else give it back"))
    burst: bool = setting(False, help="exit once no work is left (tests, one-shot runs)")
    preload: bool = setting(True, help=(
        "load every model's newest version before taking work (--no-preload: on first use)"))
    metrics_port: int | None = setting(None, help=(
        "serve Prometheus /metrics (worker counters, queue gauges) on this port; 0 = a free "
        "one (in the health record); none = off"))
    metrics_host: str = setting("127.0.0.1", metavar="ADDR", help=(
        "address the metrics port binds (0.0.0.0: all)"))
    tracing: bool = setting(False, help=(
        "OpenTelemetry: a span per chunk, child of its job's SubmitJob span, exported over "
        "OTLP as the OTEL_* variables say (pip install 'latentserve[tracing]')"))
    overlap: bool = setting(True, help=(
        "pipelined worker: a store thread PNG-encodes, packs and stores computed chunks "
        "while the next calls compute, so the worker runs near the pace of its slowest "
        "stage (bench/worker.py); false: every step in turn in one thread"))
    pipeline_calls: bool = setting(True, help=(
        "with --overlap: each call runs in two halves on two threads, so one batch's "
        "network runs while the next batch is coded (false: the store thread alone)"))
    gil_switch_ms: float = setting(0.0, help=(
        "with --overlap: the Python switch interval (ms) while the worker runs, so a "
        "thread back from a Redis round trip or an onnxruntime call waits at most this "
        "long for the GIL held by another stage's thread; 0 = Python's own (5 ms)"))
    coder_processes: int = setting(0, help=(
        "processes that entropy-code calls of >= 64 items, so coding uses every core; pays "
        "from about 512 items per call (--batch-items); 0 = code in the worker thread"))

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise InvalidInput("a worker needs a Redis URL: pass --redis URL or set "
                               "LATENTSERVE_REDIS_URL / REDIS_URL")
        check_redis_url(self.redis_url)
        if self.provider not in PROVIDERS:
            raise InvalidInput(f"provider {self.provider!r} is not one of {PROVIDERS}")
        if not self.pools:
            raise InvalidInput("a worker needs at least one pool to consume")
        for pool in self.pools:
            check_pool(pool)
        for name in ("batch_items", "read_count", "block_ms", "max_deliveries"):
            check_range(name, getattr(self, name), 1)
        for name in ("claim_idle_s", "grace_s"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        check_range("intra_op_threads", self.intra_op_threads, 0)
        if not self.heartbeat_s >= 0:
            raise InvalidInput(f"heartbeat_s must be >= 0, got {self.heartbeat_s}")
        check_range("coder_processes", self.coder_processes, 0, MAX_CODER_PROCESSES)
        if not 0 <= self.gil_switch_ms <= 100:
            raise InvalidInput(f"gil_switch_ms must be in [0, 100], got {self.gil_switch_ms}")
        if self.metrics_port is not None:
            check_range("metrics_port", self.metrics_port, 0, 65535)
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
