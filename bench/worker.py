#!/usr/bin/env python
"""A job worker's stages, each measured alone, against the whole worker, in one run.

    python bench/worker.py [--models models] [--model mnist-ae-q3] [--items 4096]
                           [--chunk-size 256] [--batch 1024] [--rounds 3]
                           [--kinds compress,reconstruct,sample] [--intra-op-threads 1]
                           [--coder-processes 0] [--json out.json]

On a real Redis (the embedded Valkey unless --redis), for each job kind, each round:

- every stage of the worker alone, on the same items the job holds, in the worker's
  batches (``--batch``): unpacking the chunk inputs (raw images or codes), the network
  (encoder, decoder, or sampling), the coder (symbols <-> codes), PNG encoding of image
  results, packing a chunk's results, and the Redis round trips (XREADGROUP, BEGIN,
  STORE of the finished value);
- the whole worker (``consumer.Worker``, in process, burst mode), from its first read to
  the last chunk stored: one step at a time (``serial``: ``--overlap false``), with a
  store thread (``overlap``: ``--pipeline-calls false``), and with the store thread plus
  a stage thread that runs each call's second half (coder of a compress call, network
  of a reconstruct call) while the next call's first half runs (``pipelined``: the
  worker's defaults).

It prints items/s per stage (median of the rounds), the whole worker's each way, and
whole / slowest stage (goal, issue 17: >= 0.85). The stored values of every worker run
are checked byte-identical to the stages' own results (the unpipelined reference).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "images-idx3-ubyte.gz"

STAGES = ("unpack", "network", "coder", "png", "pack", "redis")


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def batches(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from latentserve.service.server.embedded_redis import start_embedded_redis
        from latentserve.worker.codec.coderpool import CoderPool
        from latentserve.worker.jobqueue.config import QueueConfig
        from latentserve.worker.jobqueue.store import JobStore, connect
        from latentserve.worker.runtime.engine import EngineConfig
        from latentserve.worker.runtime.images import read_idx
        from latentserve.worker.runtime.pipeline import Pipeline

        self.args = args
        found = read_idx(args.images)
        self.images = np.concatenate([found] * -(-args.items // len(found)))[:args.items]
        self.tmp = tempfile.TemporaryDirectory(prefix="bench-worker-")
        self.embedded = (None if args.redis
                         else start_embedded_redis(self.tmp.name, persist=False))
        self.url = args.redis or self.embedded.url  # type: ignore[union-attr]
        self.client = connect(self.url)
        self.client.flushdb()
        self.queue = QueueConfig(chunk_size=args.chunk_size, max_job_items=args.items,
                                 max_queued_chunks=100_000, max_chunk_bytes=1 << 30)
        self.store = JobStore(self.client, self.queue)
        self.coder_pool = CoderPool(args.coder_processes) if args.coder_processes else None
        self.pipeline = Pipeline(args.models,
                                 EngineConfig(intra_op_threads=args.intra_op_threads,
                                              max_batch=args.batch),
                                 coder_pool=self.coder_pool)
        self.codec = self.pipeline.codec(args.model)
        self.codes = self.pipeline.compress(args.model, self.images)
        self.consumers = 0

    def close(self) -> None:
        if self.coder_pool is not None:
            self.coder_pool.close()
        self.client.close()
        if self.embedded is not None:
            self.embedded.stop()

    # -- the job -------------------------------------------------------------------------
    def submit(self, kind: Any) -> Any:
        from latentserve.worker.jobqueue.records import JobKind

        a = self.args
        items = (self.images if kind is JobKind.COMPRESS else
                 self.codes if kind is JobKind.RECONSTRUCT else None)
        return self.store.submit(kind, a.model, items=items,
                                 count=a.items if kind is JobKind.SAMPLE else 0,
                                 chunk_size=a.chunk_size, seed=7)

    # -- each stage alone ------------------------------------------------------------------
    def stages(self, kind: Any) -> tuple[dict[str, float], list[bytes]]:
        """Seconds per stage over the job's items; and the packed value of every chunk."""
        from latentserve.worker.jobqueue.chunkwork import Held, pack_results
        from latentserve.worker.jobqueue.packing import pack_images, pack_items, unpack_failures
        from latentserve.worker.jobqueue.records import ChunkTask, ImageFormat, JobKind
        from latentserve.worker.runtime.images import encode_png

        a = self.args
        n = a.items
        cs = a.chunk_size
        spans = batches(n, a.batch)
        out: dict[str, float] = {}
        runtime = self.codec.runtime
        images: np.ndarray
        if kind is JobKind.COMPRESS:
            payloads = [pack_images(self.images[lo:hi]) for lo, hi in batches(n, cs)]
            out["unpack"], unpacked = timed(lambda: [unpack_failures(p) for p in payloads])
            assert np.array_equal(np.concatenate([u[0] for u in unpacked]), self.images)
            out["network"], symbols = timed(
                lambda: [runtime.encode(self.images[lo:hi]) for lo, hi in spans])
            out["coder"], codes = timed(lambda: [c for s in symbols for c in self.codec.encode(s)])
            parts: list[Any] = codes
        elif kind is JobKind.RECONSTRUCT:
            payloads = [pack_items(self.codes[lo:hi]) for lo, hi in batches(n, cs)]
            out["unpack"], unpacked = timed(lambda: [unpack_failures(p) for p in payloads])
            out["coder"], symbols = timed(
                lambda: [self.codec.decode(self.codes[lo:hi]) for lo, hi in spans])
            out["network"], decoded = timed(lambda: [runtime.decode(s) for s in symbols])
            images = np.concatenate(decoded)
            out["png"], parts = timed(lambda: [encode_png(im) for im in images])
        else:
            out["network"], drawn = timed(lambda: [
                self.pipeline.sample(a.model, hi - lo, seed=7, start=lo) for lo, hi in spans])
            images = np.concatenate(drawn)
            out["png"], parts = timed(lambda: [encode_png(im) for im in images])
        task = ChunkTask(kind=kind, model=a.model, chunk_size=cs, seed=7, temperature=1.0,
                         image_format=ImageFormat.PNG, payload=None)
        held = []
        for c, (lo, hi) in enumerate(batches(n, cs)):
            h = Held(pool="default", entry_id=str(c), job_id="bench", chunk=c, n=hi - lo,
                     deliveries=1, task=task)
            h.parts = [parts[lo:hi]]
            held.append(h)
        out["pack"], packed = timed(lambda: [pack_results(h) for h in held])
        out["redis"] = self.redis_alone(kind, packed)
        return out, packed

    def redis_alone(self, kind: Any, packed: list[bytes]) -> float:
        """A worker's Redis round trips for the job: read, BEGIN and STORE every chunk."""
        from latentserve.worker.jobqueue.keys import as_text

        job = self.submit(kind)
        self.consumers += 1
        consumer = f"bench-redis-{self.consumers}"
        pool = self.queue.pool_for(self.args.model)
        stream = self.queue.keys.stream(pool)
        self.store.ensure_group(pool)
        t0 = time.perf_counter()
        done = 0
        while done < len(packed):
            reply = self.client.xreadgroup(self.queue.keys.group, consumer, {stream: ">"},
                                           count=4, block=100)
            for _, entries in reply or []:
                for eid, fields in entries:
                    f = {as_text(k): as_text(v) for k, v in fields.items()}
                    c = int(f["chunk"])
                    task = self.store.begin_chunk(pool, f["job"], c, as_text(eid))
                    assert not isinstance(task, str), task
                    self.store.store_chunk(pool, f["job"], c, int(f["n"]), packed[c],
                                           as_text(eid))
                    done += 1
        seconds = time.perf_counter() - t0
        self.client.xgroup_delconsumer(stream, self.queue.keys.group, consumer)
        self.store.delete(job.id)
        return seconds

    # -- the whole worker --------------------------------------------------------------------
    def whole(self, kind: Any, way: str) -> tuple[float, list[bytes]]:
        from latentserve.worker.config import WorkerConfig
        from latentserve.worker.jobqueue.consumer import create_worker

        a = self.args
        job = self.submit(kind)
        self.consumers += 1
        flags: dict[str, Any] = {}
        if HAS_OVERLAP:
            flags["overlap"] = way != "serial"
        if HAS_PIPELINE and way != "serial":
            flags["pipeline_calls"] = way == "pipelined"
        if a.gil_switch_ms is not None:
            flags["gil_switch_ms"] = a.gil_switch_ms
        config = WorkerConfig(redis_url=self.url, queue=self.queue, models=str(a.models),
                              intra_op_threads=a.intra_op_threads, batch_items=a.batch,
                              read_count=a.read_count, block_ms=10, burst=True,
                              preload=False, heartbeat_s=0.5, claim_idle_s=30.0,
                              consumer=f"bench-worker-{self.consumers}", **flags)
        worker = create_worker(config, self.pipeline, self.client)
        seconds, stats = timed(worker.run)
        if stats.items != a.items:
            raise SystemExit(f"{kind.value}: the worker stored {stats.items} of {a.items} items")
        values = []
        for c in range(-(-a.items // a.chunk_size)):
            value = self.store.chunk_results(job.id, c)
            if value is None:
                raise SystemExit(f"{kind.value}: chunk {c} was not stored")
            values.append(value)
        self.store.delete(job.id)
        return seconds, values


def _has_field(name: str) -> bool:
    from dataclasses import fields

    from latentserve.worker.config import WorkerConfig

    return any(f.name == name for f in fields(WorkerConfig))


HAS_OVERLAP = HAS_PIPELINE = False


def main(argv: list[str] | None = None) -> int:
    global HAS_OVERLAP, HAS_PIPELINE
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--model", default="mnist-ae-q3")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--items", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1024, help="worker batch_items")
    ap.add_argument("--read-count", type=int, default=4, help="worker read_count")
    ap.add_argument("--rounds", type=int, default=3, help="medians of this many rounds")
    ap.add_argument("--kinds", default="compress,reconstruct,sample")
    ap.add_argument("--intra-op-threads", type=int, default=1)
    ap.add_argument("--coder-processes", type=int, default=0)
    ap.add_argument("--gil-switch-ms", type=float, default=None,
                    help="worker gil_switch_ms for the overlap and pipelined runs "
                         "[default: the worker's default]")
    ap.add_argument("--redis", default=None, help="Redis URL [default: embedded Valkey]")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    HAS_OVERLAP, HAS_PIPELINE = _has_field("overlap"), _has_field("pipeline_calls")

    from latentserve.worker.jobqueue.records import JobKind

    kinds = [JobKind(k) for k in args.kinds.split(",")]
    bench = Bench(args)
    ways = ("serial", "overlap", "pipelined")[:1 + HAS_OVERLAP + HAS_PIPELINE]
    seconds: dict[str, dict[str, list[float]]] = {k.value: {} for k in kinds}
    try:
        for kind in kinds:  # warm up: models loaded, caches filled, one run each
            bench.stages(kind)
            for way in ways:
                bench.whole(kind, way)
        for _ in range(args.rounds):
            for kind in kinds:
                stage_s, reference = bench.stages(kind)
                for name, s in stage_s.items():
                    seconds[kind.value].setdefault(name, []).append(s)
                for way in ways:
                    s, values = bench.whole(kind, way)
                    if values != reference:
                        bad = [i for i, (x, y) in enumerate(zip(values, reference, strict=True))
                               if x != y]
                        raise SystemExit(f"{kind.value} ({way}): stored results differ from "
                                         f"the unpipelined reference in chunks {bad[:8]}")
                    seconds[kind.value].setdefault(f"whole_{way}", []).append(s)
    finally:
        bench.close()

    n = args.items
    print(f"bench/worker.py: {args.model}, {n} items per job, chunks of {args.chunk_size}, "
          f"batch {args.batch}, read_count {args.read_count}, intra-op threads "
          f"{args.intra_op_threads}, coder processes {args.coder_processes}, "
          f"gil_switch_ms {args.gil_switch_ms if args.gil_switch_ms is not None else 'default'}, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} rounds (items/s)")
    header = f"{'job':<12}" + "".join(f"{s:>9}" for s in STAGES)
    header += "".join(f"{'whole ' + w:>17}{'/slowest':>9}" for w in ways)
    print(header)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    for kind in kinds:
        got = seconds[kind.value]
        rate = {name: n / statistics.median(s) for name, s in got.items()}
        slowest = min(rate[s] for s in STAGES if s in rate)
        row = f"{kind.value:<12}" + "".join(
            f"{rate[s]:9.0f}" if s in rate else f"{'-':>9}" for s in STAGES)
        for w in ways:
            whole = rate[f"whole_{w}"]
            row += f"{whole:17.0f}{whole / slowest:9.2f}"
            rate[f"ratio_{w}"] = whole / slowest
        print(row)
        results[kind.value] = rate
    print("goal (issue 17): whole / slowest >= 0.85; stored results byte-identical to the "
          "stages' own (checked)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
