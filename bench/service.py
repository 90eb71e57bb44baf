#!/usr/bin/env python
"""What the gRPC layer costs, side by side in one run, on one model.

    python bench/service.py [--models models] [--model mnist-vae] [--seconds 4]
                            [--images ../shared/data/mnist/images-idx3-ubyte.gz] [--json out.json]

The server runs as a real ``latentserve serve`` process on loopback (as deployed);
the in-process baseline is the same Pipeline with the same engine settings:

(a) Compress throughput, batch 256: gRPC vs ``Pipeline.compress`` called in process,
    each with as many calls in flight as the server has compute workers. Goal >= 0.90.
(b) 32 concurrent clients, one image per call, closed loop: dynamic batching on vs
    off (two server processes). Goal: throughput ratio >= 3; p50/p99 latency of both.
    Beside it, the ceiling: in-process images/s at 32 images per call vs 1 per call
    (what batching can save at most, when nothing else costs anything).
(c) One client, one image per call: p50/p99 latency of Compress vs the in-process call,
    and the floor: a GetModel round trip, which does no work.

Each of the 9 phases runs ``--seconds`` in all (at most ``--max-calls`` calls per round),
split into ``--rounds`` interleaved rounds, after a warm-up: the machine is shared,
so a drift in its load hits both sides of every ratio alike.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "mnist" / "images-idx3-ubyte.gz"


def percentile_ms(samples: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(samples) * 1e3, q)) if samples else float("nan")


@contextmanager
def serve(models: Path, *extra: str) -> Iterator[str]:
    """A ``latentserve serve`` process on a free loopback port; yields its target.

    The job API shares the process: its embedded Valkey gets a temporary folder and no
    in-process job worker runs, so only the Inference service does work.
    """
    with (tempfile.TemporaryDirectory(prefix="bench-service-") as state,
          open(Path(state) / "stderr.log", "w+") as log):
        cmd = [sys.executable, "-m", "latentserve.cli", "serve", "--host", "127.0.0.1",
               "--port", "0", "--metrics-port", "none", "--models", str(models),
               "--grace-s", "2", "--state-dir", state, "--embedded-worker", "no", *extra]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"serving on 127\.0\.0\.1:(\d+)", line)
            if not match:
                log.seek(0)
                raise SystemExit(f"the server did not start: {line!r}\n{log.read()[-2000:]}")
            yield f"127.0.0.1:{match[1]}"
        finally:
            proc.terminate()
            proc.wait(30)
            proc.stdout.close()  # type: ignore[union-attr]


def timed_loop(fn: Callable[[], Any], seconds: float, max_calls: int) -> list[float]:
    """Call ``fn`` until ``seconds`` or ``max_calls``; returns each call's duration."""
    durations: list[float] = []
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop and len(durations) < max_calls:
        t0 = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - t0)
    return durations


def concurrent_loops(make_call: Callable[[int], Callable[[], Any]], clients: int,
                     seconds: float, max_calls: int) -> tuple[int, float, list[float]]:
    """``clients`` closed loops at once; returns (calls, seconds, every call's latency)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def loop(i: int) -> None:
        call = make_call(i)
        start.wait()
        while not stop.is_set() and len(latencies[i]) < max_calls:
            t0 = time.perf_counter()
            call()
            latencies[i].append(time.perf_counter() - t0)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    stop_timer = threading.Timer(seconds, stop.set)
    stop_timer.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    stop_timer.cancel()
    flat = [x for lat in latencies for x in lat]
    return len(flat), elapsed, flat


class Phase:
    """One measured configuration, accumulated over interleaved rounds."""

    def __init__(self, run: Callable[[float], tuple[int, float, list[float]]], per_call: int):
        self.run, self.per_call = run, per_call
        self.calls, self.seconds, self.latencies = 0, 0.0, []  # type: ignore[var-annotated]

    def measure(self, seconds: float) -> None:
        calls, elapsed, lat = self.run(seconds)
        self.calls += calls
        self.seconds += elapsed
        self.latencies += lat

    @property
    def images_per_s(self) -> float:
        return self.calls * self.per_call / self.seconds

    def ms(self, q: float) -> float:
        return percentile_ms(self.latencies, q)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--model", default=None,
                        help="default: the first vae, else the first model")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measured phase")
    parser.add_argument("--rounds", type=int, default=4,
                        help="phases alternate in this many rounds (load drifts cancel out)")
    parser.add_argument("--max-calls", type=int, default=20000, help="per phase (per client in b)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from latentserve.service.client.inference import LatentServeClient
    from latentserve.service.models.versions import CachedRepository
    from latentserve.service.server.config import ServiceConfig
    from latentserve.worker.runtime.images import read_idx
    from latentserve.worker.runtime.pipeline import Pipeline

    served = ServiceConfig.from_env({}, models=args.models)
    # In process: the server's engine settings and cached repository listing, and as
    # many callers as the server has compute workers, so only the serving layer differs.
    engine = served.engine_config()
    pipeline = Pipeline(CachedRepository(args.models), engine)
    entries = pipeline.models()
    if not entries:
        raise SystemExit(f"no models in {args.models}: pass --models DIR")
    model = args.model or next((e.manifest.ref for e in entries if e.manifest.family == "vae"),
                               entries[0].manifest.ref)
    model = pipeline.repository.resolve(model).manifest.ref
    images = read_idx(args.images)[-1024:] if args.images.is_file() else \
        pipeline.sample(model, 1024, seed=0)
    batch = images[:256]
    one = images[:1]
    cores = os.cpu_count()
    inflight = served.compute_threads
    print(f"bench/service.py: model {model}, {cores} cores; {served.compute_threads} "
          "compute threads x "
          f"{served.ort_threads} onnxruntime threads (server and in process alike), max batch "
          f"{served.max_batch_size}, max queue delay {served.max_queue_delay_us} us; "
          f"{args.seconds:g} s per phase")
    results: dict[str, Any] = {"model": model, "cores": cores}

    def loops(calls: list[Callable[[], Any]], per_call: int) -> Phase:
        """len(calls) closed loops, one per callable (each warmed up once now)."""
        for call in calls:
            call()
        return Phase(lambda sec: concurrent_loops(lambda i: calls[i], len(calls), sec,
                                                  args.max_calls), per_call)

    def single(call: Callable[[], Any]) -> Phase:
        call()

        def run(sec: float) -> tuple[int, float, list[float]]:
            d = timed_loop(call, sec, args.max_calls)
            return len(d), sum(d), d
        return Phase(run, 1)

    with serve(args.models) as target, serve(args.models, "--batching", "false") as off_target:
        client = LatentServeClient(target, timeout=120)
        on_clients = [LatentServeClient(target, timeout=120) for _ in range(args.clients)]
        off_clients = [LatentServeClient(off_target, timeout=120) for _ in range(args.clients)]

        def per_client(clients: list[Any]) -> list[Callable[[], Any]]:
            return [lambda c=c, i=i: c.compress(images[i:i + 1], model=model)
                    for i, c in enumerate(clients)]

        phases = {
            "a_grpc": loops([lambda: client.compress(batch, model=model)] * inflight, 256),
            "a_local": loops([lambda: pipeline.compress(model, batch)] * inflight, 256),
            "b_on": loops(per_client(on_clients), 1),
            "b_off": loops(per_client(off_clients), 1),
            # The most batching can save here: in process, 32 images per call vs 1.
            "ceil_32": loops([lambda: pipeline.compress(model, images[:32])] * inflight, 32),
            "ceil_1": loops([lambda: pipeline.compress(model, one)] * inflight, 1),
            "c_grpc": single(lambda: client.compress(one, model=model)),
            "c_local": single(lambda: pipeline.compress(model, one)),
            # What any call costs here: a round trip that does no work (GetModel).
            "c_floor": single(lambda: client.model(model)),
        }
        # Interleave short rounds, so a change in the machine's load hits both sides.
        order = list(phases)
        for r in range(args.rounds):
            for name in order[r % len(order):] + order[:r % len(order)]:
                phases[name].measure(args.seconds / args.rounds)
        for c in [client, *on_clients, *off_clients]:
            c.close()
    P = phases
    grpc_tput, local_tput = P["a_grpc"].images_per_s, P["a_local"].images_per_s
    on_tput, off_tput = P["b_on"].images_per_s, P["b_off"].images_per_s
    ceil_32, ceil_one = P["ceil_32"].images_per_s, P["ceil_1"].images_per_s
    on_lat, off_lat = P["b_on"].latencies, P["b_off"].latencies
    grpc_lat, local_lat = P["c_grpc"].latencies, P["c_local"].latencies

    rows = [
        ("(a) Compress batch 256, images/s", f"{grpc_tput:,.0f}", f"{local_tput:,.0f}",
         f"{grpc_tput / local_tput:.2f}", ">= 0.90"),
        (f"(b) {args.clients} clients x 1 image, images/s", f"batching on {on_tput:,.0f}",
         f"off {off_tput:,.0f}", f"{on_tput / off_tput:.2f}", ">= 3"),
        ("(b) ceiling: in process, 32 vs 1 per call", f"{ceil_32:,.0f}", f"{ceil_one:,.0f}",
         f"{ceil_32 / ceil_one:.2f}", ""),
        ("(b) p50 / p99 latency, ms", f"on {percentile_ms(on_lat, 50):.2f} / "
         f"{percentile_ms(on_lat, 99):.2f}", f"off {percentile_ms(off_lat, 50):.2f} / "
         f"{percentile_ms(off_lat, 99):.2f}", "", ""),
        ("(c) 1 image, p50 latency, ms", f"{percentile_ms(grpc_lat, 50):.3f}",
         f"{percentile_ms(local_lat, 50):.3f}",
         f"{percentile_ms(grpc_lat, 50) / percentile_ms(local_lat, 50):.2f}", ""),
        ("(c) 1 image, p99 latency, ms", f"{percentile_ms(grpc_lat, 99):.3f}",
         f"{percentile_ms(local_lat, 99):.3f}",
         f"{percentile_ms(grpc_lat, 99) / percentile_ms(local_lat, 99):.2f}", ""),
    ]
    rows.append(("(c) floor: GetModel round trip p50, ms", f"{P['c_floor'].ms(50):.3f}",
                 "", "", ""))
    head = ("", "gRPC / on", "in process / off", "ratio", "goal")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for r in (head, *rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    results.update(
        a_grpc_images_per_s=grpc_tput, a_local_images_per_s=local_tput,
        a_ratio=grpc_tput / local_tput,
        b_ceiling_ratio=ceil_32 / ceil_one,
        b_on_images_per_s=on_tput, b_off_images_per_s=off_tput, b_ratio=on_tput / off_tput,
        b_on_p50_ms=percentile_ms(on_lat, 50), b_on_p99_ms=percentile_ms(on_lat, 99),
        b_off_p50_ms=percentile_ms(off_lat, 50), b_off_p99_ms=percentile_ms(off_lat, 99),
        c_grpc_p50_ms=percentile_ms(grpc_lat, 50), c_grpc_p99_ms=percentile_ms(grpc_lat, 99),
        c_local_p50_ms=percentile_ms(local_lat, 50), c_local_p99_ms=percentile_ms(local_lat, 99),
        c_floor_p50_ms=P["c_floor"].ms(50))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
