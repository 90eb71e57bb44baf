#!/usr/bin/env python
"""What the job queue costs, side by side in one run.

    python bench/job_queue.py [--models models] [--compress-model mnist-vae]
                          [--sample-model mnist-vae] [--items 20000] [--chunk-size 256]
                          [--redis URL] [--latency-runs 200] [--json out.json]

Workers are real ``latentserve worker`` processes (one onnxruntime thread each) on a
real Redis (the embedded Valkey unless --redis); jobs are submitted and their results
read back through ``JobStore``, as the gRPC service does. The in-process baseline runs
the worker's own loop (plan batches, pipeline call, PNG encoding, packing) on the same
chunks without Redis, one thread. For each of a compress job (``--items`` MNIST images)
and a sample job (``--items`` draws), from submit to the last result read back:

    in process | queue, 1 worker (ratio; goal >= 0.85) | queue, 2 workers (ratio)

then the submit-to-first-result latency of a one-chunk job (p50/p99) with an idle
worker waiting. Results of every path are checked byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "images-idx3-ubyte.gz"


def digest(chunks: list[bytes]) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()[:16]


@contextmanager
def workers(n: int, url: str, models: Path, batch: int,
            flags: Sequence[str] = ()) -> Iterator[list[subprocess.Popen]]:
    """``n`` worker processes, each with one onnxruntime thread (and ``flags``); SIGTERM
    on exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "latentserve.cli", "worker", "--redis", url, "--models",
         str(models), "--intra-op-threads", "1", "--batch-items", str(batch),
         "--heartbeat-s", "0.2",
         "--log-level", "WARNING", *flags], env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(60)


def wait_healthy(client: Any, n: int, timeout: float = 60.0, config: Any = None) -> None:
    """Until ``n`` workers are ready (``config``: the WorkerConfig whose keys they use)."""
    from latentserve.worker.jobqueue.consumer import worker_health

    end = time.monotonic() + timeout  # ready: every model loaded (the worker preloads)
    while sum(bool(w.get("ready")) for w in worker_health(client, config)) < n:
        if time.monotonic() > end:
            raise SystemExit(f"{n} workers did not report healthy within {timeout}s")
        time.sleep(0.05)


def run_queue(store: Any, kind: Any, model: str, *, images: np.ndarray | None, count: int,
              chunk_size: int, seed: int) -> tuple[float, str]:
    """Submit, then read every chunk back; returns (seconds, digest of the packed results)."""
    from latentserve.worker.jobqueue.packing import pack_items

    t0 = time.perf_counter()
    job = store.submit(kind, model, items=images, count=count, chunk_size=chunk_size, seed=seed)
    packed = [pack_items(list(items)) for _, items in store.iter_chunks(job.id, wait_s=5)]
    seconds = time.perf_counter() - t0
    store.delete(job.id)
    return seconds, digest(packed)


def run_in_process(pipeline: Any, kind: Any, model: str, *, images: np.ndarray | None,
                   count: int, chunk_size: int, seed: int, read_count: int,
                   batch_items: int) -> tuple[float, str]:
    """The worker's loop on the same chunks, minus Redis: (seconds, digest)."""
    from latentserve.worker.jobqueue.chunkwork import (
        Held,
        compute_batch,
        pack_results,
        plan_batches,
    )
    from latentserve.worker.jobqueue.packing import pack_images, unpack
    from latentserve.worker.jobqueue.records import ChunkTask, ImageFormat, JobKind

    t0 = time.perf_counter()
    n = count if kind is JobKind.SAMPLE else len(images)  # type: ignore[arg-type]
    task = ChunkTask(kind=kind, model=model, chunk_size=chunk_size, seed=seed,
                     temperature=1.0, image_format=ImageFormat.PNG, payload=None)
    chunks = []
    for c, lo in enumerate(range(0, n, chunk_size)):
        h = Held(pool="default", entry_id=str(c), job_id="bench", chunk=c,
                 n=min(chunk_size, n - lo), deliveries=1, task=task)
        if kind is JobKind.COMPRESS:  # the payload round trip a worker does
            h.inputs = unpack(pack_images(images[lo:lo + chunk_size]))  # type: ignore[index]
        chunks.append(h)
    packed = []
    for i in range(0, len(chunks), read_count):  # as read from the stream
        group = chunks[i:i + read_count]
        for batch in plan_batches(group, batch_items):
            for seg, out in zip(batch, compute_batch(pipeline, batch), strict=True):
                seg.held.parts.append(out)
        packed += [pack_results(h) for h in group]
    return time.perf_counter() - t0, digest(packed)


def latency(store: Any, model: str, images: np.ndarray, runs: int) -> list[float]:
    """Submit-to-first-result seconds of one-chunk compress jobs, an idle worker waiting."""
    from latentserve.worker.jobqueue.store import JobKind

    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        job = store.submit(JobKind.COMPRESS, model, items=images, chunk_size=len(images))
        next(store.iter_results(job.id, wait_s=5))
        out.append(time.perf_counter() - t0)
        store.delete(job.id)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--compress-model", default="mnist-vae")
    ap.add_argument("--sample-model", default="mnist-vae")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=256, help="worker batch_items")
    ap.add_argument("--read-count", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per path; the best counts")
    ap.add_argument("--latency-runs", type=int, default=200)
    ap.add_argument("--latency-items", type=int, default=16)
    ap.add_argument("--redis", default=None, help="Redis URL [default: embedded Valkey]")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from latentserve.service.server.embedded_redis import start_embedded_redis
    from latentserve.worker.jobqueue.config import QueueConfig
    from latentserve.worker.jobqueue.store import JobKind, JobStore, connect
    from latentserve.worker.runtime.engine import EngineConfig
    from latentserve.worker.runtime.images import read_idx
    from latentserve.worker.runtime.pipeline import Pipeline

    found = read_idx(args.images)
    # Fewer images than items (MNIST here has 9000): repeat them to fill the job.
    images = np.concatenate([found] * -(-args.items // len(found)))[:args.items]
    tmp = tempfile.TemporaryDirectory(prefix="bench-queue-")
    embedded = None if args.redis else start_embedded_redis(tmp.name, persist=False)
    url = args.redis or embedded.url  # type: ignore[union-attr]
    client = connect(url)
    client.flushdb()
    queue = QueueConfig(chunk_size=args.chunk_size, max_job_items=max(args.items, 1),
                        max_queued_chunks=100_000, max_chunk_bytes=1 << 30)
    store = JobStore(client, queue)
    pipeline = Pipeline(args.models, EngineConfig(intra_op_threads=1, max_batch=args.batch))
    jobs = {"compress": (JobKind.COMPRESS, args.compress_model, images, 0),
            "sample": (JobKind.SAMPLE, args.sample_model, None, args.items)}
    for kind, model, imgs, count in jobs.values():  # load models, warm caches
        run_in_process(pipeline, kind, model, images=None if imgs is None else imgs[:512],
                       count=min(count, 512), chunk_size=args.chunk_size, seed=1,
                       read_count=args.read_count, batch_items=args.batch)

    results: dict[str, Any] = {"items": args.items, "chunk_size": args.chunk_size,
                               "compress_model": args.compress_model,
                               "sample_model": args.sample_model, "cpus": os.cpu_count()}
    digests: dict[str, set[str]] = {name: set() for name in jobs}

    def best(key: str, seconds: float) -> None:
        results[key] = min(results.get(key, float("inf")), seconds)

    for n in (1, 2):
        with workers(n, url, args.models, args.batch):
            wait_healthy(client, n)
            for kind, model, imgs, count in jobs.values():  # warm each worker up
                run_queue(store, kind, model, images=None if imgs is None else imgs[:n * 512],
                          count=min(count, n * 512), chunk_size=args.chunk_size, seed=1)
            for _ in range(args.repeat):  # alternate the paths: load drifts over time
                for name, (kind, model, imgs, count) in jobs.items():
                    if n == 1:  # the idle worker waits on XREADGROUP: it costs no CPU
                        s, d = run_in_process(pipeline, kind, model, images=imgs,
                                              count=count, chunk_size=args.chunk_size, seed=7,
                                              read_count=args.read_count,
                                              batch_items=args.batch)
                        best(f"{name}_in_process_s", s)
                        digests[name].add(d)
                    s, d = run_queue(store, kind, model, images=imgs, count=count,
                                     chunk_size=args.chunk_size, seed=7)
                    best(f"{name}_queue{n}_s", s)
                    digests[name].add(d)
            if n == 1:
                lat = latency(store, args.compress_model, images[:args.latency_items],
                              args.latency_runs)
                results["latency_p50_ms"] = float(np.percentile(lat, 50) * 1e3)
                results["latency_p99_ms"] = float(np.percentile(lat, 99) * 1e3)
    for name, seen in digests.items():
        if len(seen) != 1:
            raise SystemExit(f"{name}: the paths gave different results: {seen}")

    print(f"bench/job_queue.py: {args.items} items per job, chunks of {args.chunk_size}, "
          f"{os.cpu_count()} CPUs, models {args.models}, best of {args.repeat} runs; "
          f"images: {len(found)} from {args.images.name}" + (", repeated" if len(found) <
                                                              args.items else ""))
    print(f"{'job':<26}{'in process':>14}{'queue, 1 worker':>24}{'queue, 2 workers':>24}")
    for name, (_, model, _, _) in jobs.items():
        base = args.items / results[f"{name}_in_process_s"]
        cells = [f"{base:9.0f} it/s"]
        for n in (1, 2):
            rate = args.items / results[f"{name}_queue{n}_s"]
            results[f"{name}_queue{n}_ratio"] = rate / base
            cells.append(f"{rate:9.0f} it/s ({rate / base:4.2f}x)")
        print(f"{name + ' ' + model:<26}{cells[0]:>14}{cells[1]:>24}{cells[2]:>24}")
    print(f"submit-to-first-result, one chunk of {args.latency_items} images, 1 idle worker: "
          f"p50 {results['latency_p50_ms']:.2f} ms, p99 {results['latency_p99_ms']:.2f} ms "
          f"({args.latency_runs} jobs)")
    print("goal: queue with 1 worker >= 0.85x in process; results identical on every path")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    client.close()
    if embedded is not None:
        embedded.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
