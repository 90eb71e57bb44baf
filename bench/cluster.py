#!/usr/bin/env python
"""The job queue on a Redis Cluster vs a single Redis, side by side in one run (issue 21).

    python bench/cluster.py [--models models] [--model mnist-ae-q2] [--items 6000]
                            [--jobs 6] [--chunk-size 32] [--workers 3] [--rounds 2]
                            [--json out.json]

Backends, each with ``--workers`` real ``latentserve worker`` processes (one
onnxruntime thread each) started for it alone:

    redis        one redis-server
    cluster/1    a loopback cluster of 3 masters + 3 replicas (tests/redis_cluster.py),
                 the queue unsharded: every job on one slot, so one master
    cluster/3    the same cluster, --stream-shards 3: jobs spread over three masters

A round submits ``--jobs`` sample jobs of ``--items`` draws in all at once, then reads
every result back through ``JobStore`` (submit to last result). Rounds alternate the
backends (load drifts); the best round counts. Printed: items/s per backend, each as a
ratio to the single Redis (cluster/1 vs redis: what the cluster client and replication
cost; cluster/3 vs cluster/1: the cost, or gain, of sharding a stream). Results are
checked byte-identical on every backend. Small chunks of a cheap model load the queue
more than the models: the ratios are the queue's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, str(ROOT / "tests"))  # tests/redis_cluster.py

from redis_cluster import LocalCluster  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_queue", ROOT / "bench" / "job_queue.py")
assert _spec is not None and _spec.loader is not None
bench_queue = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_queue)  # its workers() and wait_healthy()


def start_redis(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """One redis-server on a free loopback port, as the cluster's nodes run (no AOF)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                             "--bind", "127.0.0.1", "--dir", str(root), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    return proc, f"redis://127.0.0.1:{port}/0"


def run_round(url: str, shards: int, args: argparse.Namespace) -> tuple[float, list[str]]:
    """Start the workers, warm them up, run one round: (seconds, result digest per job)."""
    from latentserve.worker.config import WorkerConfig
    from latentserve.worker.jobqueue.config import QueueConfig
    from latentserve.worker.jobqueue.store import JobKind, JobStore, connect

    client = connect(url)
    client.flushdb()
    queue = QueueConfig(chunk_size=args.chunk_size, max_job_items=args.items,
                        max_queued_chunks=100_000, stream_shards=shards)
    store = JobStore(client, queue)
    flags = ["--stream-shards", str(shards), "--read-count", "4"]
    with bench_queue.workers(args.workers, url, args.models, args.chunk_size, flags):
        bench_queue.wait_healthy(client, args.workers, config=WorkerConfig(redis_url=url,
                                                                           queue=queue))
        warm = [store.submit(JobKind.SAMPLE, args.model, count=args.chunk_size * 4, seed=1)
                for _ in range(args.workers * 2)]
        for job in warm:
            list(store.iter_chunks(job.id, wait_s=5))
        per_job = args.items // args.jobs
        t0 = time.perf_counter()
        jobs = [store.submit(JobKind.SAMPLE, args.model, count=per_job, seed=7 + i)
                for i in range(args.jobs)]
        digests = [bench_queue.digest([b"".join(items) for _, items in
                                       store.iter_chunks(job.id, wait_s=5)]) for job in jobs]
        seconds = time.perf_counter() - t0
        spread = len({store.keys.shard_of(j.id) for j in jobs})
    client.close()
    return seconds, [*digests, f"shards used: {spread}"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="mnist-ae-q2")
    ap.add_argument("--items", type=int, default=6000, help="draws over all jobs of a round")
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    redis_proc, redis_url = start_redis(tmp)
    cluster = LocalCluster(tmp / "cluster", node_timeout_ms=5000).start()
    backends = {"redis": (redis_url, 1), "cluster/1": (cluster.url, 1),
                "cluster/3": (cluster.url, 3)}
    best: dict[str, float] = {}
    results: dict[str, list[str]] = {}
    try:
        for _ in range(args.rounds):
            for name, (url, shards) in backends.items():
                seconds, digests = run_round(url, shards, args)
                best[name] = min(best.get(name, float("inf")), seconds)
                results[name] = digests
    finally:
        cluster.stop()
        redis_proc.terminate()
        redis_proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    first = [d[:-1] for d in results.values()]
    if any(d != first[0] for d in first):
        raise SystemExit(f"the backends gave different results: {results}")

    per_job = args.items // args.jobs
    print(f"bench/cluster.py: {args.jobs} sample jobs of {per_job} draws of {args.model} at "
          f"once, chunks of {args.chunk_size}, {args.workers} workers, {os.cpu_count()} CPUs, "
          f"best of {args.rounds} rounds; results identical on every backend")
    base = per_job * args.jobs / best["redis"]
    out: dict[str, Any] = {"items": per_job * args.jobs, "chunk_size": args.chunk_size,
                           "workers": args.workers, "cpus": os.cpu_count()}
    for name in backends:
        rate = per_job * args.jobs / best[name]
        out[name] = {"seconds": best[name], "items_per_s": rate, "ratio": rate / base,
                     "chunks_per_s": rate / args.chunk_size}
        print(f"  {name:<10} {rate:8.0f} items/s  {rate / args.chunk_size:7.1f} chunks/s  "
              f"{rate / base:5.2f}x redis   ({results[name][-1]})")
    print(f"sharding a stream (cluster/3 vs cluster/1): "
          f"{out['cluster/3']['items_per_s'] / out['cluster/1']['items_per_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
