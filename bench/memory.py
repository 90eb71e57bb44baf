#!/usr/bin/env python
"""Memory stays flat under load: a server's and a worker's RSS after a warm-up and at the end.

    python bench/memory.py [--models models] [--requests 10000] [--clients 8]
                           [--chunks 1000] [--chunk-size 4] [--warmup 0.1] [--limit 0.10]
                           [--only server|worker] [--malloc-arena-max N] [--json out.json]

Server: a real ``latentserve serve`` process on 127.0.0.1 (bench/service.py's ``serve``,
with its Jobs service on an embedded Valkey and a job worker inside, as the plain
command runs) gets ``--requests`` mixed calls from ``--clients`` threads, each with its
own channel (bench/memory_load.py): Compress (raw batches, raw and PNG images),
CompressStream, Reconstruct (codes of several models in one call), ReconstructStream,
Sample (PNG and RAW), GetModel / ListModels, bad requests (unknown model, corrupt code,
not an image, bad temperature), calls cancelled mid-flight (``future.cancel()``, a
stream cancelled after its first reply), calls with deadlines of a few ms, and small
jobs (submitted, fetched, some cancelled). The first ``--warmup`` of the calls run, the
clients stop, and once the server has been idle long enough to hand its free heap back
(``engine.TRIM_IDLE_S``) its VmRSS (/proc/PID/status) is read; the rest run and VmRSS is
read the same way. PASS when the two differ by less than ``--limit``. The VmRSS read
while calls are in flight is printed too ("on the way"): it includes their buffers.

Worker: a real ``latentserve worker`` process (bench/job_queue.py's ``workers``) on a
Valkey consumes compress, reconstruct and sample jobs (PNG and RAW, a few cancelled
after their first chunk) in chunks of ``--chunk-size`` items until ``--chunks`` chunks
are stored; its VmRSS is read after the first ``--warmup`` of them and at the end.

Both processes set glibc's MALLOC_ARENA_MAX to ``engine.MALLOC_ARENA_MAX`` themselves
unless the environment sets it (``--malloc-arena-max`` does, to compare). Counts and
time are bounded (``--max-seconds`` per part): a part cut short says so and fails.
Exit status 0 only when every part passes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, str(ROOT))
MIB = 1 << 20


def load_bench(name: str) -> ModuleType:
    """Another bench script as a module (by path: ``queue`` is a standard module name)."""
    if f"bench_{name}" in sys.modules:
        return sys.modules[f"bench_{name}"]
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(_HERE) / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


load = load_bench("memory_load")  # the loads: CallMix, drive, JobRounds


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict (``VmRSS`` -> ``"123456 kB"``)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS)."""
    return int(proc_status(pid)["VmRSS"].split()[0]) * 1024


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of a process so far, in clock ticks (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def settled(pid: int, settle_s: float, timeout: float = 30.0) -> tuple[int, int]:
    """(VmRSS, threads) of a process once idle: first its CPU time stops growing (calls
    cancelled by their clients, or chunks, may still be computing), then ``settle_s`` more,
    in which a process that runs models hands its free heap back (``TRIM_IDLE_S``)."""
    end = time.monotonic() + timeout
    last = cpu_ticks(pid)
    while time.monotonic() < end:
        time.sleep(0.5)  # another process's state: there is no event to wait on
        now = cpu_ticks(pid)
        if now - last <= 2:  # at most 2 ticks (20 ms at 100 Hz) in 0.5 s: idle
            break
        last = now
    time.sleep(settle_s)
    status = proc_status(pid)
    return int(status["VmRSS"].split()[0]) * 1024, int(status["Threads"])


def default_settle_s() -> float:
    from latentserve.worker.runtime.engine import TRIM_IDLE_S

    return 2 * TRIM_IDLE_S + 0.5


def child_pid(marker: str) -> int:
    """The pid of this process's child whose command line holds ``marker``."""
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == me and marker in cmdline:
            return int(entry.name)
    raise SystemExit(f"no child process of {me} runs {marker!r}")


@dataclass
class Measurement:
    """VmRSS of one process after the warm-up and at the end of a bounded load."""

    what: str
    warmup_done: int           # calls (or chunks) when the first RSS was read
    total_done: int            # calls (or chunks) when the second was read
    warmup_rss: int            # bytes
    end_rss: int
    warmup_threads: int
    end_threads: int
    seconds: float
    cut_short: bool = False    # --max-seconds ran out first
    outcomes: dict[str, int] = field(default_factory=dict)    # "kind status" -> count
    unexpected: list[str] = field(default_factory=list)       # a few examples
    trajectory: list[tuple[int, int]] = field(default_factory=list)  # (done, rss bytes)

    @property
    def ratio(self) -> float:
        return self.end_rss / self.warmup_rss

    def passed(self, limit: float) -> bool:
        return abs(self.ratio - 1) < limit and not self.unexpected and not self.cut_short

    def report(self, limit: float) -> str:
        verdict = "PASS" if self.passed(limit) else "FAIL"
        lines = [
            f"{self.what}: VmRSS after the warm-up ({self.warmup_done}): "
            f"{self.warmup_rss / MIB:.1f} MiB, {self.warmup_threads} threads; at the end "
            f"({self.total_done}): {self.end_rss / MIB:.1f} MiB, {self.end_threads} threads; "
            f"ratio {self.ratio:.3f} ({(self.ratio - 1) * 100:+.1f}%, limit "
            f"{limit * 100:.0f}%): {verdict}  [{self.seconds:.0f} s]"]
        if self.trajectory:
            lines.append("  VmRSS on the way, MiB: " + ", ".join(
                f"{n}: {r / MIB:.1f}" for n, r in self.trajectory))
        if self.outcomes:
            lines.append("  outcomes: " + ", ".join(f"{k} {v}" for k, v in
                                                    sorted(self.outcomes.items())))
        if self.cut_short:
            lines.append("  cut short by --max-seconds: fewer calls than asked")
        for u in self.unexpected:
            lines.append(f"  unexpected: {u}")
        return "\n".join(lines)


def measure_server(target: str, pid: int, *, requests: int, clients: int, warmup: float,
                   images: np.ndarray | None, max_images: int = 16, max_codes: int = 16,
                   max_samples: int = 8, kinds: list[str] | None = None, seed: int = 0,
                   timeout: float = 60.0,
                   max_seconds: float = 900.0, points: int = 10,
                   settle_s: float | None = None) -> Measurement:
    """``requests`` mixed calls against the server at ``target`` (process ``pid``);
    ``kinds``: which kinds of call (keys of ``load.WEIGHTS``; default all)."""
    kinds = list(load.WEIGHTS) if kinds is None else kinds
    if not kinds or set(kinds) - set(load.WEIGHTS):
        raise ValueError(f"kinds {kinds} must be some of {', '.join(load.WEIGHTS)}")
    t0 = time.monotonic()
    models = load.load_models(target, images, timeout)
    deadline = t0 + max_seconds
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    trajectory: list[tuple[int, int]] = []
    step = max(1, requests // points)

    def on_call(done: int) -> None:
        if done % step == 0:  # in flight: for the picture only, not the verdict
            trajectory.append((done, rss_bytes(pid)))

    def make(phase: int) -> Callable[[int], Any]:
        return lambda i: load.CallMix(
            target, models, seed=seed * 1_000_003 + phase * 1000 + i, max_images=max_images,
            max_codes=max_codes, max_samples=max_samples, timeout=timeout, kinds=kinds)

    settle = default_settle_s() if settle_s is None else settle_s
    first = max(1, int(requests * warmup))
    done = load.drive(make(0), clients, 0, first, deadline, outcomes, unexpected, on_call)
    warm = settled(pid, settle)
    warm_done = done
    done += load.drive(make(1), clients, first, requests, deadline, outcomes, unexpected, on_call)
    end = settled(pid, settle)
    return Measurement("server", warm_done, done, warm[0], end[0], warm[1], end[1],
                       time.monotonic() - t0, cut_short=done < requests, outcomes=dict(outcomes),
                       unexpected=unexpected, trajectory=trajectory)


def measure_worker(url: str, models: Path, *, chunks: int, chunk_size: int, warmup: float,
                   images: np.ndarray | None, batch_items: int = 64, seed: int = 0,
                   max_seconds: float = 900.0, settle_s: float | None = None) -> Measurement:
    """One ``latentserve worker`` process on the Redis at ``url`` over ``chunks`` chunks."""
    from latentserve.worker.jobqueue.config import QueueConfig
    from latentserve.worker.jobqueue.store import JobStore, connect
    from latentserve.worker.runtime.repository import ModelRepository

    bench_queue = load_bench("job_queue")
    entries = ModelRepository(models).entries()
    newest = {e.manifest.name: e.manifest for e in entries}
    shapes = {m.image_shape for m in newest.values()}
    if len(shapes) != 1:
        raise SystemExit(f"the worker bench needs models of one image shape, got {shapes}")
    shape = shapes.pop()
    rng = np.random.default_rng(seed)
    pool = (images[rng.choice(len(images), 512)] if images is not None
            and images.shape[1:] == shape else
            rng.integers(256, size=(512, *shape), dtype=np.uint8))
    client = connect(url)
    store = JobStore(client, QueueConfig(chunk_size=chunk_size, max_queued_chunks=100_000))
    rounds = load.JobRounds(store, sorted(m.ref for m in newest.values()), pool,
                            chunk_size=chunk_size, seed=seed)
    t0 = time.monotonic()
    deadline = t0 + max_seconds
    trajectory: list[tuple[int, int]] = []
    try:
        with bench_queue.workers(1, url, models, batch_items) as procs:
            bench_queue.wait_healthy(client, 1)
            pid = procs[0].pid
            settle = default_settle_s() if settle_s is None else settle_s
            ok = rounds.run_until(max(1, int(chunks * warmup)), deadline)
            warm_done = rounds.chunks
            warm = settled(pid, settle)
            step = max(1, chunks // 10)
            while ok and rounds.chunks < chunks:
                ok = rounds.run_until(min(chunks, (rounds.chunks // step + 1) * step), deadline)
                trajectory.append((rounds.chunks, rss_bytes(pid)))
            end = settled(pid, settle)
    finally:
        client.close()
    unexpected = [k for k in rounds.outcomes if k.endswith("SHORT")]
    return Measurement("worker", warm_done, rounds.chunks, warm[0], end[0], warm[1], end[1],
                       time.monotonic() - t0, cut_short=not ok, outcomes=dict(rounds.outcomes),
                       unexpected=unexpected, trajectory=trajectory)


# -- the command ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, default=ROOT / "models")
    ap.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "mnist" /
                    "images-idx3-ubyte.gz", help="IDX images (else random pixels)")
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-images", type=int, default=16, help="per request (cancels: all)")
    ap.add_argument("--max-codes", type=int, default=16, help="per reconstruct request")
    ap.add_argument("--max-samples", type=int, default=8)
    ap.add_argument("--kinds", default=",".join(load.WEIGHTS),
                    help="the kinds of call to the server, comma-separated [all]: no 'job' "
                         "runs the server without its job API")
    ap.add_argument("--chunks", type=int, default=1000)
    ap.add_argument("--chunk-size", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=0.1, help="share of the load before the "
                    "first reading")
    ap.add_argument("--limit", type=float, default=0.10, help="allowed RSS growth")
    ap.add_argument("--only", choices=("server", "worker"), default=None)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="per part")
    ap.add_argument("--redis", default=None, help="Redis URL for the worker [embedded Valkey]")
    ap.add_argument("--malloc-arena-max", type=int, default=None, metavar="N",
                    help="set MALLOC_ARENA_MAX=N for the server and worker processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from latentserve.worker.runtime.images import read_idx

    if args.malloc_arena_max is not None:  # the children inherit it
        os.environ["MALLOC_ARENA_MAX"] = str(args.malloc_arena_max)
    images = read_idx(args.images) if args.images.is_file() else None
    from latentserve.worker.runtime.engine import MALLOC_ARENA_MAX

    arenas = os.environ.get("MALLOC_ARENA_MAX", f"unset (so {MALLOC_ARENA_MAX})")
    print(f"bench/memory.py: models {args.models}, {os.cpu_count()} CPUs, MALLOC_ARENA_MAX "
          f"{arenas}, warm-up {args.warmup:.0%}, limit {args.limit:.0%}", flush=True)
    results: list[Measurement] = []
    if args.only in (None, "server"):
        serve = load_bench("service").serve
        # The job API with a worker inside the server, as a plain ``latentserve serve``.
        kinds = [k for k in args.kinds.split(",") if k]
        extra = ("--embedded-worker", "yes") if "job" in kinds else ("--redis", "none")
        with serve(args.models, *extra) as target:
            m = measure_server(target, child_pid("latentserve.cli serve"),
                               requests=args.requests, clients=args.clients,
                               warmup=args.warmup, images=images, max_images=args.max_images,
                               max_codes=args.max_codes, max_samples=args.max_samples,
                               kinds=kinds, seed=args.seed, max_seconds=args.max_seconds)
        print(f"server, {args.requests} calls from {args.clients} clients:\n"
              f"{m.report(args.limit)}", flush=True)
        results.append(m)
    if args.only in (None, "worker"):
        from latentserve.service.server.embedded_redis import start_embedded_redis

        with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
            embedded = None if args.redis else start_embedded_redis(tmp, persist=False)
            url = args.redis or embedded.url  # type: ignore[union-attr]
            try:
                m = measure_worker(url, args.models, chunks=args.chunks,
                                   chunk_size=args.chunk_size, warmup=args.warmup,
                                   images=images, seed=args.seed, max_seconds=args.max_seconds)
            finally:
                if embedded is not None:
                    embedded.stop()
        print(f"worker, {args.chunks} chunks of {args.chunk_size} items:\n"
              f"{m.report(args.limit)}", flush=True)
        results.append(m)
    if args.json:
        args.json.write_text(json.dumps([asdict(m) | {"ratio": m.ratio,
                                                      "passed": m.passed(args.limit)}
                                         for m in results], indent=1))
    return 0 if all(m.passed(args.limit) for m in results) else 1


if __name__ == "__main__":
    sys.exit(main())
