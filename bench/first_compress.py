"""First-Compress latency of a fresh server, with and without the load-time warm-up.

Each sample is a new process (onnxruntime's first-run costs are per process): build and
start a server on 127.0.0.1:0, open a channel (ListModels), then time the first and the
next few Compress calls of one image.

    python bench/first_compress.py --model mnist-ae-q3 --runs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys


def one(model: str, models: str, warmup: bool) -> dict[str, float]:
    import time

    import grpc
    import numpy as np

    from latentserve.service.jobs.settings import JobSettings
    from latentserve.service.server.assemble import create_server
    from latentserve.service.server.config import ServiceConfig
    from latentserve.service.wire import raw_image
    from latentserve.v1 import inference_pb2 as pb
    from latentserve.v1 import inference_pb2_grpc as pb_grpc

    config = ServiceConfig(jobs=JobSettings.off(),
                           host="127.0.0.1", port=0, metrics_port=None, models=models,
                           warmup=warmup, repository_poll_s=0)
    t0 = time.perf_counter()
    server, _ = create_server(config)
    start_ms = (time.perf_counter() - t0) * 1e3
    server.start()
    image = raw_image(np.random.default_rng(0).integers(0, 256, (1, 28, 28), np.uint8))
    request = pb.CompressRequest(model=model, images=[image])
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.InferenceStub(channel)
            stub.ListModels(pb.ListModelsRequest(), timeout=60)  # connection up
            times = []
            for _ in range(5):
                t = time.perf_counter()
                stub.Compress(request, timeout=60)
                times.append((time.perf_counter() - t) * 1e3)
    finally:
        server.stop(0).wait(60)
    return {"start_ms": start_ms, "first_ms": times[0], "warm_ms": statistics.median(times[1:])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mnist-ae-q3")
    ap.add_argument("--models", default="models")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.model, args.models, args.one == "on")))
        return 0
    for mode in ("off", "on"):
        rows = []
        for _ in range(args.runs):
            out = subprocess.run([sys.executable, __file__, "--one", mode, "--model",
                                  args.model, "--models", args.models],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        runs = ", ".join(f"{r['first_ms']:.1f}" for r in rows)
        print(f"{args.model} warmup {mode:3}: first Compress median {med['first_ms']:.2f} ms "
              f"(runs: {runs}), then "
              f"{med['warm_ms']:.2f} ms; server build {med['start_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
