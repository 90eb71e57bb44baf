"""How many workers one Redis (one cluster shard) feeds: Redis CPU per chunk, measured.

    python bench/redis_load.py [--workers 2] [--items 6000] [--chunk-size 32]

Starts Debian's redis-server on a free loopback port, runs ``--workers`` real
``latentserve worker`` processes on a sample job of a cheap model (small chunks: the
queue's heaviest case per item), and reads Redis's own CPU time (``INFO cpu``:
used_cpu_user + used_cpu_sys) before and after. Printed: chunks/s of the workers,
Redis CPU seconds per chunk, the chunks/s one Redis core would sustain at that cost, and
so the workers one shard feeds at the measured per-worker rate (and at a GPU worker's
rate, given with ``--gpu-chunks-per-s``). Idle polling is included: it is part of what a
worker costs Redis.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))


def redis_cpu(client: Any) -> float:
    """Redis's CPU seconds so far (main thread and background threads)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="mnist-ae-q2")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--items", type=int, default=6000)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--gpu-chunks-per-s", type=float, default=400.0,
                    help="a GPU worker's rate to size a shard for (100k img/s / 256-item "
                         "chunks ~ 400 chunks/s)")
    args = ap.parse_args(argv)
    server = shutil.which("redis-server")
    if server is None:
        print("bench/redis_load.py: redis-server is not installed; nothing measured")
        return 0
    import importlib.util

    import redis

    from latentserve.worker.jobqueue.config import QueueConfig
    from latentserve.worker.jobqueue.store import JobKind, JobStore, connect

    spec = importlib.util.spec_from_file_location("bench_job_queue",
                                                  Path(_HERE) / "job_queue.py")
    assert spec is not None and spec.loader is not None
    bench_queue = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_queue)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as state:
        proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1",
                                 "--dir", state, "--save", "", "--appendonly", "no"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            url = f"redis://127.0.0.1:{port}/0"
            raw = redis.Redis(host="127.0.0.1", port=port)
            for _ in range(100):
                try:
                    raw.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.05)
            client = connect(url)
            store = JobStore(client, QueueConfig(chunk_size=args.chunk_size))
            store.ensure_group("default")
            with bench_queue.workers(args.workers, url, args.models, args.chunk_size):
                bench_queue.wait_healthy(client, args.workers)
                # Warm: one small job, so model loading is not in the figure.
                bench_queue.run_queue(store, JobKind.SAMPLE, args.model, images=None,
                                      count=args.chunk_size * args.workers,
                                      chunk_size=args.chunk_size, seed=0)
                cpu0, t0 = redis_cpu(raw), time.perf_counter()
                seconds, _ = bench_queue.run_queue(store, JobKind.SAMPLE, args.model,
                                                   images=None, count=args.items,
                                                   chunk_size=args.chunk_size, seed=1)
                cpu = redis_cpu(raw) - cpu0
                wall = time.perf_counter() - t0
            client.close()
            raw.close()
        finally:
            proc.terminate()
            proc.wait(30)
    chunks = -(-args.items // args.chunk_size)
    per_chunk = cpu / chunks
    per_worker = chunks / seconds / args.workers
    core = 1 / per_chunk if per_chunk > 0 else float("inf")
    print(f"bench/redis_load.py: {args.workers} workers, sample job of {args.items} "
          f"{args.model} draws in chunks of {args.chunk_size}, {os.cpu_count()} CPUs")
    print(f"  {chunks / seconds:.1f} chunks/s ({per_worker:.1f} per worker); Redis CPU "
          f"{cpu:.2f} s over {wall:.1f} s = {1e3 * per_chunk:.3f} ms per chunk "
          "(polling included)")
    print(f"  one Redis core at that cost: {core:.0f} chunks/s = "
          f"{core / per_worker:.0f} workers like these, "
          f"{core / args.gpu_chunks_per_s:.1f} GPU workers at {args.gpu_chunks_per_s:g} "
          "chunks/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
