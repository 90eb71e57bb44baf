"""``latentserve worker --redis URL [--models DIR] [--provider cpu|cuda|auto] ...``.

Runs one job consumer until SIGTERM / SIGINT: it then stops taking work, finishes its
current chunk within ``--grace-s`` (or gives it back to the queue), and exits 0. A
second signal releases at once. ``--burst`` exits once the queues are empty.
Every flag is a ``WorkerConfig`` field and also reads ``LATENTSERVE_<NAME>``
(``REDIS_URL`` too for ``--redis``).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any


def register(sub: Any) -> None:
    """Add the ``worker`` subcommand: one flag per ``WorkerConfig`` field (queue included)."""
    from latentserve.worker.config import WorkerConfig

    p = sub.add_parser("worker", help="run a Redis Streams job worker",
                       description="Consume chunk tasks of bulk jobs (compress, reconstruct, "
                                   "sample) from Redis and store their results.")
    WorkerConfig.add_arguments(p)
    p.add_argument("--check-health", action="store_true",
                   help="do not run: exit 0 if a worker on this host has a live health key "
                        "in Redis (its heartbeat), else 1 (for container health checks)")
    p.add_argument("--log-level", default="INFO", help="logging level [INFO]")
    p.set_defaults(func=cmd_worker)


def cmd_worker(args: argparse.Namespace) -> int:
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.consumer import create_worker
    from latentserve.worker.jobqueue.redis_url import redact_url

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = WorkerConfig.from_sources(args)
    given = getattr(args, "redis_url", None)
    if given and redact_url(given) != given:
        logging.getLogger(__name__).warning(
            "the --redis URL holds a password, which other users of this host can read in "
            "the process list; set LATENTSERVE_REDIS_URL or REDIS_URL instead")
    if args.check_health:
        return check_health(config)
    if config.tracing:
        from latentserve.worker.tracing import configure_exporter

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
    from latentserve.errors import Unavailable
    from latentserve.worker.jobqueue.stats import QueueCollector

    worker.metrics.registry.register(QueueCollector(worker.r, config.keys, config.pools))
    try:
        return worker.metrics.serve_http(config.metrics_host, config.metrics_port)
    except OSError as exc:
        raise Unavailable(f"cannot serve metrics on {config.metrics_host}:"
                          f"{config.metrics_port}: {exc}") from None


def check_health(config: Any) -> int:
    """0 if a worker on this host has a live health record (ready), else 1."""
    import socket

    from latentserve.worker.jobqueue.consumer import worker_health
    from latentserve.worker.jobqueue.store import connect

    host = socket.gethostname()
    try:
        # Closed on the way out: a cluster client's node sockets are not closed by GC alone.
        with connect(config.redis_url) as client:
            records = [w for w in worker_health(client, config) if w["host"] == host]
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
