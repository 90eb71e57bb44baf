#!/usr/bin/env python
"""Where a whole worker loses against its slowest stage: a timeline of each thread's calls.

    python bench/worker_timeline.py [--kind compress|reconstruct|sample] [--way pipelined]
                                    [--runs 3] [--items 4096] [--batch 1024] [--show]
                                    [--gil-switch-ms MS]

Runs bench/worker.py's stages alone once, then the whole worker (in process, burst
mode) ``--runs`` times, timing every network run, coder call, Redis round trip (read,
BEGIN, STORE), PNG encoding, packing and wait of each thread (the functions are
wrapped, so the whole worker is a little slower than in bench/worker.py). Per run it
prints whole vs the slowest stage alone, when the first network starts and how long
before the end the last one ends (the pipeline's fill and drain), the network's busy
time (against its time alone: slower beside the other threads?), and each thread's
total per activity; ``--show`` prints every call (start, end, thread, what).
"""

from __future__ import annotations

import argparse
import collections
import functools
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import worker as bench  # noqa: E402  (bench/worker.py)

EVENTS: list[tuple[str, str, float, float]] = []  # (thread, what, start, end)


def wrap(owner: Any, name: str, label: str) -> None:
    real = getattr(owner, name)

    @functools.wraps(real)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            EVENTS.append((threading.current_thread().name.split("-")[0], label, t0,
                           time.perf_counter()))

    setattr(owner, name, timed)


def instrument() -> None:
    from latentserve.worker.codec.codes import LatentCodec
    from latentserve.worker.jobqueue import consumer
    from latentserve.worker.jobqueue.store import JobStore
    from latentserve.worker.runtime.engine import ModelRuntime

    wrap(ModelRuntime, "_run", "network")
    wrap(LatentCodec, "encode", "coder")
    wrap(LatentCodec, "decode_stacked", "coder")
    wrap(JobStore, "begin_chunk", "begin")
    wrap(JobStore, "store_chunk", "store")
    wrap(consumer, "encode_parts", "png")
    wrap(consumer, "pack_results", "pack")
    wrap(consumer, "unpack_failures", "unpack")
    wrap(consumer.Worker, "_read_shard", "read")
    wrap(consumer.Worker, "_reclaim", "reclaim")
    wrap(consumer.Worker, "_wait_stage", "wait-stage")
    wrap(consumer.Worker, "_wait_store", "wait-store")
    wrap(consumer.Worker, "_wait_idle", "wait-idle")
    wrap(consumer.Worker, "_process", "process")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kind", default="compress", choices=["compress", "reconstruct", "sample"])
    ap.add_argument("--way", default="pipelined", choices=["serial", "overlap", "pipelined"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--models", type=Path, default=bench.ROOT / "models")
    ap.add_argument("--model", default="mnist-ae-q3")
    ap.add_argument("--images", type=Path, default=bench.DEFAULT_IMAGES)
    ap.add_argument("--items", type=int, default=4096)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--read-count", type=int, default=4)
    ap.add_argument("--intra-op-threads", type=int, default=1)
    ap.add_argument("--gil-switch-ms", type=float, default=None)
    ap.add_argument("--show", action="store_true", help="print every timed call")
    a = ap.parse_args(argv)
    args = argparse.Namespace(**vars(a), rounds=1, coder_processes=0, redis=None)
    bench.HAS_OVERLAP, bench.HAS_PIPELINE = (bench._has_field("overlap"),
                                             bench._has_field("pipeline_calls"))
    instrument()

    from latentserve.worker.jobqueue.records import JobKind

    kind = JobKind(a.kind)
    b = bench.Bench(args)
    try:
        b.whole(kind, a.way)  # warm up
        stage_s, reference = b.stages(kind)
        slowest = max(stage_s.values())
        print(f"{a.model} {a.kind}, {a.items} items, batch {a.batch}; stages alone (ms): "
              + ", ".join(f"{k} {v * 1000:.0f}" for k, v in stage_s.items()))
        for _ in range(a.runs):
            EVENTS.clear()
            t0 = time.perf_counter()
            seconds, values = b.whole(kind, a.way)
            t1 = time.perf_counter()
            if values != reference:
                raise SystemExit("stored results differ from the stages' own")
            # Every onnxruntime run, of any thread (a sample call's sampler network too).
            nets = sorted((s, e) for _, what, s, e in EVENTS if what == "network")
            print(f"{a.way}: whole {seconds * 1000:.0f} ms, slowest stage alone "
                  f"{slowest * 1000:.0f} ms, whole / slowest {slowest / seconds:.2f}")
            if nets:
                print(f"  network busy {sum(e - s for s, e in nets) * 1000:.0f} ms (alone "
                      f"{stage_s['network'] * 1000:.0f}); first starts "
                      f"{(nets[0][0] - t0) * 1000:.0f} ms after the job's submission, last "
                      f"ends {(t1 - nets[-1][1]) * 1000:.0f} ms before the results are read")
            totals: dict[tuple[str, str], float] = collections.defaultdict(float)
            for th, what, s, e in EVENTS:
                totals[(th, what)] += e - s
            print("  per thread (ms): " + ", ".join(
                f"{th}:{what} {v * 1000:.0f}" for (th, what), v in sorted(totals.items())))
            if a.show:
                for th, what, s, e in sorted(EVENTS, key=lambda ev: ev[2]):
                    print(f"    {(s - t0) * 1000:8.1f} {(e - t0) * 1000:8.1f}  {th:<11} {what}")
    finally:
        b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
