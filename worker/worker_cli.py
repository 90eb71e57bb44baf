"""``latentserve worker --redis URL [--models DIR] [--provider cpu|cuda|auto] ...``.

Runs one job consumer until SIGTERM / SIGINT: it then stops taking work, finishes its
current chunk within ``--grace-s`` (or gives it back to the queue), and exits 0. A
second signal releases at once. ``--burst`` exits once the queues are empty.
Every flag also reads ``LATENTSERVE_<NAME>`` (``REDIS_URL`` for ``--redis``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

# (flag, config field, type, help) of the optional settings; None = "not given".
_FLAGS: tuple[tuple[str, str, Any, str], ...] = (
    ("--models", "models", str, "model repository folder [default models]"),
    ("--provider", "provider", str, "onnxruntime provider: cpu, cuda, tensorrt or auto"),
    ("--intra-op-threads", "intra_op_threads", int, "onnxruntime threads per run (0 = all)"),
    ("--pools", "pools", lambda s: tuple(p for p in s.split(",") if p),
     "comma-separated pools to consume [default: default]"),
    ("--consumer", "consumer", str, "consumer name [default host-pid-random]"),
    ("--batch-items", "batch_items", int, "max items in one pipeline call [256]"),
    ("--coder-processes", "coder_processes", int,
     "processes that entropy-code calls of >= 64 items, so coding uses every core; pays "
     "from about 512 items per call (--batch-items) [0 = off: code in the worker thread]"),
    ("--read-count", "read_count", int, "stream entries taken per read [4]"),
    ("--block-ms", "block_ms", int, "how long a read waits for new entries [1000]"),
    ("--claim-idle-s", "claim_idle_s", float,
     "reclaim chunks no live worker extends after this long (a failed chunk's retry); a "
     "killed worker's go once its health key expires [30]"),
    ("--heartbeat-s", "heartbeat_s", float,
     "claim extension and health key period; a worker silent for 3 is taken for dead and "
     "its chunks reclaimed at once [claim-idle-s / 4, at most 2]"),
    ("--max-deliveries", "max_deliveries", int,
     "dead-letter a chunk delivered more often than this [3]"),
    ("--grace-s", "grace_s", float, "on SIGTERM, finish the current chunk within this [30]"),
    ("--prefix", "prefix", str, "Redis key prefix [latentserve:]"),
    ("--stream-shards", "stream_shards", int,
     "streams (hash slots) each pool's queue is split over; the same on every process "
     "[1]"),
    ("--result-ttl-s", "result_ttl_s", float, "how long finished jobs are kept [86400]"),
    ("--receiving-timeout-s", "receiving_timeout_s", float,
     "fail a job whose upload sent nothing for this long, unsealed; run none of its chunks "
     "[300]"),
    ("--metrics-port", "metrics_port", int,
     "serve Prometheus /metrics (worker counters, queue gauges) on this port; 0 = a free "
     "one (in the health record) [default: off]"),
    ("--metrics-host", "metrics_host", str, "address the metrics port binds [127.0.0.1; 0.0.0.0 for all]"),
)


def register(sub: Any) -> None:
    """Add the ``worker`` subcommand."""
    p = sub.add_parser("worker", help="run a Redis Streams job worker",
                       description="Consume chunk tasks of bulk jobs (compress, reconstruct, "
                                   "sample) from Redis and store their results.")
    p.add_argument("--redis", dest="redis_url", metavar="URL", default=None,
                   help="Redis URL: redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... "
                        "for TLS (?ssl_ca_certs=CA&ssl_certfile=CERT&ssl_keyfile=KEY), "
                        "unix://PATH; see docs/redis.md [env LATENTSERVE_REDIS_URL or "
                        "REDIS_URL, better for a password: a flag shows in the process list]")
    for flag, dest, kind, text in _FLAGS:
        metavar = {"models": "DIR", "provider": "NAME", "pools": "P1,P2", "consumer": "NAME",
                   "prefix": "TEXT", "metrics_host": "ADDR"}.get(dest,
                                                                 "N" if kind is int else "S")
        p.add_argument(flag, dest=dest, type=kind, default=None, metavar=metavar, help=text)
    p.add_argument("--burst", action="store_true", default=None,
                   help="exit once no work is left (tests, one-shot runs)")
    p.add_argument("--no-preload", dest="preload", action="store_false", default=None,
                   help="load models on their first chunk instead of at start")
    p.add_argument("--tracing", action="store_true", default=None,
                   help="OpenTelemetry: a span per chunk, child of its job's SubmitJob span, "
                        "exported over OTLP as the OTEL_* variables say (pip install "
                        "'latentserve[tracing]') [env LATENTSERVE_TRACING]")
    p.add_argument("--check-health", action="store_true",
                   help="do not run: exit 0 if a worker on this host has a live health key "
                        "in Redis (its heartbeat), else 1 (for container health checks)")
    p.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from .config import WorkerConfig, redact_url
    from .consumer import create_worker

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {dest: getattr(args, dest) for _, dest, _, _ in _FLAGS}
    config = WorkerConfig.from_env(redis_url=args.redis_url, burst=args.burst,
                                   preload=args.preload, tracing=args.tracing, **overrides)
    if args.redis_url and redact_url(args.redis_url) != args.redis_url:
        logging.getLogger(__name__).warning(
            "the --redis URL holds a password, which other users of this host can read in "
            "the process list; set LATENTSERVE_REDIS_URL or REDIS_URL instead")
    if args.check_health:
        return check_health(config)
    if config.tracing:
        from .tracing import configure_exporter

        configure_exporter("latentserve-worker")
    worker = create_worker(config)
    metrics = serve_metrics(worker, config) if config.metrics_port is not None else None

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger(__name__).info("worker %s: %s, stopping (grace %.1fs)",
                                         config.consumer, signal.Signals(signum).name,
                                         config.grace_s)
        worker.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    where = (f", metrics on {config.metrics_host}:{metrics.port}" if metrics else "")
    print(f"worker {config.consumer}: pools {','.join(config.pools)}, models "
          f"{config.models}, provider {config.provider}, Redis {redact_url(config.redis_url)}"
          f"{where}", file=sys.stderr, flush=True)
    try:
        stats = worker.run()
    finally:
        if metrics is not None:
            metrics.stop()
    print(f"worker {config.consumer}: {stats.chunks} chunks, {stats.items} items, "
          f"{stats.released} released, {stats.dead_lettered} dead-lettered", file=sys.stderr)
    return 0


def serve_metrics(worker: Any, config: Any) -> Any:
    """Serve the worker's metrics and its pools' queue gauges; returns the server."""
    from .errors import Unavailable
    from .queue_stats import QueueCollector

    worker.metrics.registry.register(QueueCollector(worker.r, config.keys, config.pools))
    try:
        return worker.metrics.serve_http(config.metrics_host, config.metrics_port)
    except OSError as exc:
        raise Unavailable(f"cannot serve metrics on {config.metrics_host}:"
                          f"{config.metrics_port}: {exc}") from None


def check_health(config: Any) -> int:
    """0 if a worker on this host has a live health record (ready), else 1."""
    import socket

    from .consumer import worker_health
    from .jobstore import connect

    host = socket.gethostname()
    try:
        records = [w for w in worker_health(connect(config.redis_url), config)
                   if w["host"] == host]
    except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
        print(f"unhealthy: cannot read worker health from Redis: {exc}", file=sys.stderr)
        return 1
    ready = [w for w in records if w.get("ready") and not w.get("stopping")]
    for w in records:
        print(f"{w['consumer']}: {'ready' if w in ready else 'starting or stopping'}, "
              f"{w['chunks']} chunks, {w['items']} items, holding {len(w['holding'])}")
    if not ready:
        print(f"unhealthy: no ready worker on {host}", file=sys.stderr)
    return 0 if ready else 1
